#!/usr/bin/env python
"""Write the per-model 2nd-finetune shell scripts from one settings table.

    python tools/make_launchers.py            # (re)write shell/<family>/2nd_finetune/*.sh and the aliases
    python tools/make_launchers.py --check    # exit 1 if a script on disk differs from the table

Each generated script is a few lines of settings plus one call to `shell/launch.sh`, which holds everything the
scripts share. The numbers are the official scripts' (`shell/internvl2.0/2nd_finetune/`,
`shell/internvl2.5/2nd_finetune/`, `shell/internvl3.0/2nd_finetune/` and, for InternVL 1.5 and Mini-InternVL,
`shell/internvl1.5/2nd_finetune/`); InternVL3.5's come from its SFT scripts (`internvl_chat_gpt_oss/shell/`, see
`FAMILIES`). InternVL3.0 and 3.5 have no official LoRA script: theirs follow the InternVL2.5 LoRA scripts.
The older paths the Mini-InternVL fine-tuning guide quotes are
one-line aliases of the matching full fine-tune script (`ALIASES`). To change a default, change `MODELS` below and
re-run; `tests/test_launchers.py` fails when the files and the table
disagree.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Family:
    folder: str  # under shell/
    work_dir: str  # OUTPUT_DIR default = <work_dir>/<script name>
    max_seq_length: int
    max_dynamic_patch: int
    save_total_limit_full: int
    extra_flags: tuple[str, ...] = ()  # written right after --conv_style
    tail_flags: tuple[str, ...] = ()  # the family's own training settings, written last (before "$@")
    batch_full: int = 128
    train_vit_full: bool = False  # the official full fine-tune trains the ViT too
    official_lora: bool = True  # False: no official LoRA script; ours follows the InternVL2.5 LoRA scripts
    notes: tuple[str, ...] = ()  # header comment lines
    official_gpus: bool = True  # False: the official scripts leave the GPU count to the cluster


# InternVL3.5 (`internvl_chat_gpt_oss/shell/internvl3_5_{qwen3,gpt_oss}/*_sft.sh`): every flag those scripts pass is
# either here, in shell/launch.sh, or left out for the reason given.
#   kept:  --use_packed_ds True --num_images_expected 96 --max_packed_tokens 32768 --loss_reduction square (the 3.5
#          defaults), --group_by_length False (packing plans its own rows), --dataloader_num_workers 16,
#          --min_num_frame 8 --max_num_frame 32, --seed 42, ZeRO-3, a global batch of 512 with 1 pack per GPU, the
#          learning and drop-path rates, --max_dynamic_patch 12, --max_seq_length 32768, the ViT trained (full).
#   left out:
#   --max_steps 8000, --save_steps 500, --save_total_limit 100: a pre-training-scale schedule; a 2nd fine-tune runs
#          one epoch over your data and keeps the newest checkpoint, saved every 200 steps (launch.sh), as for the
#          other generations. Pass --max_steps N to cap a run.
#   --max_buffer_size, --log_freq, --strict_mode, --replacement, --allow_overflow: knobs of the official streaming
#          packer; here the packs are planned ahead from the sample lengths (the flags are accepted, with no effect).
#   --split_annotations True: each rank of the official streaming loader reads its own slice of the annotation
#          files; the dataset here is map-style and the sampler splits it over the ranks.
#   --remove_unused_columns False: always so here (train/arguments.py).
#   --gradient_checkpointing True: the Trainer-level switch; --grad_checkpoint True (launch.sh) checkpoints the
#          LLM, and the ViT is checkpointed whenever it trains (the --vit_grad_checkpoint default).
#   --use_custom_flash_attn: the official flash-attention patch with attention sinks for GPT-OSS; transformers' own
#          GPT-OSS attention handles the sinks.
#   --use_liger (some versions of the scripts): the loss here already runs the LM head on the supervised tokens
#          only, in chunks (model/loss.py), with liger's fused kernel on a GPU when it is installed.
#   --overwrite_output_dir True: never passed (launch.sh: a rerun resumes).
_V35_TAIL = (
    "--dataloader_num_workers", "16", "--group_by_length", "False", "--min_num_frame", "8", "--max_num_frame", "32",
    "--use_packed_ds", "True", "--num_images_expected", "96", "--max_packed_tokens", "32768",
    "--loss_reduction", "square", "--seed", "42",
)

FAMILIES = {
    "1.5": Family("internvl1.5", "work_dirs/internvl_chat_v1_5", 4096, 12, 2),
    "2.0": Family("internvl2.0", "work_dirs/internvl_chat_v2_0", 4096, 6, 1),
    "2.5": Family("internvl2.5", "work_dirs/internvl_chat_v2_5", 8192, 6, 1, ("--use_fast_tokenizer", "False")),
    "3.0": Family("internvl3.0", "work_dirs/internvl_chat_v3", 16384, 12, 1, ("--use_fast_tokenizer", "False"),
                  official_lora=False),
    "3.5": Family("internvl3.5", "work_dirs/internvl_chat_v3_5", 32768, 12, 1, ("--use_fast_tokenizer", "False"),
                  _V35_TAIL, batch_full=512, train_vit_full=True, official_lora=False, official_gpus=False, notes=(
                      "InternVL3.5's own settings, from its official SFT scripts: sample packing, the square loss",
                      "reduction, ZeRO-3; the GPU counts are ours (those scripts leave them to the cluster). The",
                      "flags of those scripts left out here, and why: tools/make_launchers.py.")),
}


@dataclass(frozen=True)
class ModelRow:
    family: str  # key of FAMILIES
    name: str  # script name stem, before "_dynamic_res_2nd_finetune_{full,lora}"
    title: str  # what the checkpoint is, for the script's header
    llm: str  # LLM family as in internvl_chat.tiny_model (qwen2 | internlm2 | phi3 | llama | internlm3 | qwen3 | ...)
    model: str  # default MODEL (a path; never downloaded)
    conv_style: str
    per_device: int
    learning_rate: str
    weight_decay: str
    drop_path_full: str
    deepspeed: str
    gpus_full: int = 8
    gpus_lora: int = 2
    official_srun: bool = False  # the official full script launches with srun on several nodes (for the record)


# fmt: off
MODELS: tuple[ModelRow, ...] = (
    ModelRow("1.5", "internvl_chat_v1_5_internlm2_20b",
             "InternVL-Chat-V1-5 (26B: InternViT-6B + InternLM2-Chat-20B)", "internlm2",
             "./pretrained/InternVL-Chat-V1-5", "internlm2-chat", 2, "2e-5", "0.05", "0.4", "zero_stage3_config.json"),
    ModelRow("1.5", "internvl_chat_v1_5_internlm2_1_8b",
             "Mini-InternVL-Chat-2B-V1-5 (InternViT-300M + InternLM2-Chat-1.8B)", "internlm2",
             "./pretrained/Mini-InternVL-Chat-2B-V1-5", "internlm2-chat", 4, "4e-5", "0.01", "0.1",
             "zero_stage1_config.json"),
    ModelRow("1.5", "internvl_chat_v1_5_phi3_3_8b", "Mini-InternVL-Chat-4B-V1-5 (InternViT-300M + Phi-3-mini)", "phi3",
             "./pretrained/Mini-InternVL-Chat-4B-V1-5", "phi3-chat", 4, "4e-5", "0.05", "0.1",
             "zero_stage1_config.json"),
    ModelRow("2.0", "internvl2_1b_qwen2_0_5b", "InternVL2-1B (InternViT-300M + Qwen2-0.5B-Instruct)", "qwen2",
             "./pretrained/InternVL2-1B", "Hermes-2", 4, "4e-5", "0.01", "0.1", "zero_stage1_config.json"),
    ModelRow("2.0", "internvl2_2b_internlm2_1_8b", "InternVL2-2B (InternViT-300M + InternLM2-Chat-1.8B)", "internlm2",
             "./pretrained/InternVL2-2B", "internlm2-chat", 4, "4e-5", "0.01", "0.1", "zero_stage1_config.json"),
    ModelRow("2.0", "internvl2_4b_phi3_3_8b", "InternVL2-4B (InternViT-300M + Phi-3-mini)", "phi3",
             "./pretrained/InternVL2-4B", "phi3-chat", 4, "4e-5", "0.01", "0.1", "zero_stage1_config.json"),
    ModelRow("2.0", "internvl2_8b_internlm2_7b", "InternVL2-8B (InternViT-300M + InternLM2.5-7B-Chat)", "internlm2",
             "./pretrained/InternVL2-8B", "internlm2-chat", 4, "4e-5", "0.05", "0.1", "zero_stage1_config.json"),
    ModelRow("2.0", "internvl2_26b_internlm2_20b", "InternVL2-26B (InternViT-6B + InternLM2-Chat-20B)", "internlm2",
             "./pretrained/InternVL2-26B", "internlm2-chat", 2, "2e-5", "0.05", "0.4", "zero_stage3_config.json"),
    ModelRow("2.0", "internvl2_40b_hermes2_yi_34b", "InternVL2-40B (InternViT-6B + Nous-Hermes-2-Yi-34B)", "llama",
             "./pretrained/InternVL2-40B", "Hermes-2", 2, "2e-5", "0.05", "0.4", "zero_stage3_config_34b.json",
             gpus_full=16, official_srun=True),
    ModelRow("2.0", "internvl2_76b_hermes2_llama3_70b",
             "InternVL2-Llama3-76B (InternViT-6B + Hermes-2-Theta-Llama-3-70B)", "llama",
             "./pretrained/InternVL2-Llama3-76B", "internlm2-chat", 1, "2e-5", "0.05", "0.4",
             "zero_stage3_config_100b.json", gpus_full=32, gpus_lora=8, official_srun=True),
    ModelRow("2.5", "internvl2_5_1b", "InternVL2.5-1B (InternViT-300M + Qwen2.5-0.5B-Instruct)", "qwen2",
             "OpenGVLab/InternVL2_5-1B", "internvl2_5", 4, "4e-5", "0.01", "0.1", "zero_stage1_config.json"),
    ModelRow("2.5", "internvl2_5_2b", "InternVL2.5-2B (InternViT-300M + InternLM2.5-1.8B-Chat)", "internlm2",
             "OpenGVLab/InternVL2_5-2B", "internvl2_5", 4, "4e-5", "0.01", "0.1", "zero_stage1_config.json"),
    ModelRow("2.5", "internvl2_5_4b", "InternVL2.5-4B (InternViT-300M + Qwen2.5-3B-Instruct)", "qwen2",
             "OpenGVLab/InternVL2_5-4B", "internvl2_5", 4, "4e-5", "0.01", "0.1", "zero_stage1_config.json"),
    ModelRow("2.5", "internvl2_5_8b", "InternVL2.5-8B (InternViT-300M + InternLM2.5-7B-Chat)", "internlm2",
             "OpenGVLab/InternVL2_5-8B", "internvl2_5", 4, "4e-5", "0.05", "0.1", "zero_stage1_config.json"),
    ModelRow("2.5", "internvl2_5_26b", "InternVL2.5-26B (InternViT-6B + InternLM2.5-20B-Chat)", "internlm2",
             "OpenGVLab/InternVL2_5-26B", "internvl2_5", 2, "2e-5", "0.05", "0.4", "zero_stage3_config.json"),
    ModelRow("2.5", "internvl2_5_38b", "InternVL2.5-38B (InternViT-6B + Qwen2.5-32B-Instruct)", "qwen2",
             "OpenGVLab/InternVL2_5-38B", "internvl2_5", 2, "2e-5", "0.05", "0.4", "zero_stage3_config_34b.json",
             gpus_full=16, official_srun=True),
    ModelRow("2.5", "internvl2_5_78b", "InternVL2.5-78B (InternViT-6B + Qwen2.5-72B-Instruct)", "qwen2",
             "OpenGVLab/InternVL2_5-78B", "internvl2_5", 1, "2e-5", "0.05", "0.4", "zero_stage3_config_100b.json",
             gpus_full=32, gpus_lora=8, official_srun=True),
    # InternVL3: the official `shell/internvl3.0/2nd_finetune/internvl3_*_full.sh`; LoRA as for InternVL2.5 (2 GPUs,
    # 8 for the largest model, the full script's learning rate).
    ModelRow("3.0", "internvl3_1b", "InternVL3-1B (InternViT-300M-V2.5 + Qwen2.5-0.5B)", "qwen2",
             "OpenGVLab/InternVL3-1B", "internvl2_5", 4, "1e-5", "0.05", "0.0", "zero_stage1_config.json"),
    ModelRow("3.0", "internvl3_2b", "InternVL3-2B (InternViT-300M-V2.5 + Qwen2.5-1.5B)", "qwen2",
             "OpenGVLab/InternVL3-2B", "internvl2_5", 4, "2e-5", "0.05", "0.0", "zero_stage1_config.json"),
    ModelRow("3.0", "internvl3_8b", "InternVL3-8B (InternViT-300M-V2.5 + Qwen2.5-7B)", "qwen2",
             "OpenGVLab/InternVL3-8B", "internvl2_5", 4, "2e-5", "0.05", "0.0", "zero_stage1_config.json"),
    ModelRow("3.0", "internvl3_9b", "InternVL3-9B (InternViT-300M-V2.5 + InternLM3-8B-Instruct)", "internlm3",
             "OpenGVLab/InternVL3-9B", "internvl2_5", 4, "2e-5", "0.05", "0.0", "zero_stage1_config.json"),
    ModelRow("3.0", "internvl3_14b", "InternVL3-14B (InternViT-300M-V2.5 + Qwen2.5-14B)", "qwen2",
             "OpenGVLab/InternVL3-14B", "internvl2_5", 4, "2e-5", "0.05", "0.1", "zero_stage1_config.json"),
    ModelRow("3.0", "internvl3_38b", "InternVL3-38B (InternViT-6B-V2.5 + Qwen2.5-32B)", "qwen2",
             "OpenGVLab/InternVL3-38B", "internvl2_5", 2, "2e-5", "0.05", "0.2", "zero_stage3_config_34b.json",
             gpus_full=16, official_srun=True),
    ModelRow("3.0", "internvl3_78b", "InternVL3-78B (InternViT-6B-V2.5 + Qwen2.5-72B)", "qwen2",
             "OpenGVLab/InternVL3-78B", "internvl2_5", 2, "2e-5", "0.05", "0.4", "zero_stage3_config_100b.json",
             gpus_full=32, gpus_lora=8, official_srun=True),
    # InternVL3.5: the official SFT scripts' learning and drop-path rates and ZeRO-3 (see _V35_TAIL), here
    # fine-tuning the released chat model (the official SFT starts from `*-Pretrained`). Those scripts leave the
    # node count to the cluster; the GPU counts here give ZeRO-3 room for 16 bytes per trained parameter on 80 GB
    # GPUs (full), and LoRA 2 GPUs as for InternVL2.5, 16 for the 241B model (482 GB of bf16 weights).
    ModelRow("3.5", "internvl3_5_1b", "InternVL3.5-1B (InternViT-300M + Qwen3-0.6B)", "qwen3",
             "OpenGVLab/InternVL3_5-1B", "internvl2_5", 1, "8e-5", "0.05", "0.0", "zero_stage3_config.json"),
    ModelRow("3.5", "internvl3_5_2b", "InternVL3.5-2B (InternViT-300M + Qwen3-1.7B)", "qwen3",
             "OpenGVLab/InternVL3_5-2B", "internvl2_5", 1, "8e-5", "0.05", "0.0", "zero_stage3_config.json"),
    ModelRow("3.5", "internvl3_5_4b", "InternVL3.5-4B (InternViT-300M + Qwen3-4B)", "qwen3",
             "OpenGVLab/InternVL3_5-4B", "internvl2_5", 1, "8e-5", "0.05", "0.0", "zero_stage3_config.json"),
    ModelRow("3.5", "internvl3_5_8b", "InternVL3.5-8B (InternViT-300M + Qwen3-8B)", "qwen3",
             "OpenGVLab/InternVL3_5-8B", "internvl2_5", 1, "8e-5", "0.05", "0.1", "zero_stage3_config.json"),
    ModelRow("3.5", "internvl3_5_14b", "InternVL3.5-14B (InternViT-300M + Qwen3-14B)", "qwen3",
             "OpenGVLab/InternVL3_5-14B", "internvl2_5", 1, "8e-5", "0.05", "0.1", "zero_stage3_config.json"),
    ModelRow("3.5", "internvl3_5_38b", "InternVL3.5-38B (InternViT-6B + Qwen3-32B)", "qwen3",
             "OpenGVLab/InternVL3_5-38B", "internvl2_5", 1, "8e-5", "0.05", "0.4", "zero_stage3_config.json",
             gpus_full=16),
    ModelRow("3.5", "internvl3_5_30b_a3b", "InternVL3.5-30B-A3B (InternViT-300M + Qwen3-30B-A3B, MoE)", "qwen3_moe",
             "OpenGVLab/InternVL3_5-30B-A3B", "internvl2_5", 1, "8e-5", "0.05", "0.1", "zero_stage3_config.json",
             gpus_full=16),
    # `internvl_chat_gpt_oss/shell/internvl3_5_gpt_oss/internvl3_5_gpt_oss_20b_stage2_sft.sh`: the 30B-A3B row's
    # settings with its own (harmony) chat format; 8 GPUs as in that script.
    ModelRow("3.5", "internvl3_5_gpt_oss_20b_a4b",
             "InternVL3.5-GPT-OSS-20B-A4B-Preview (InternViT-300M + GPT-OSS-20B, MoE)", "gpt_oss",
             "OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B-Preview", "internvl3_5_gpt_oss", 1, "8e-5", "0.05", "0.1",
             "zero_stage3_config.json"),
    ModelRow("3.5", "internvl3_5_241b_a28b", "InternVL3.5-241B-A28B (InternViT-6B + Qwen3-235B-A22B, MoE)",
             "qwen3_moe", "OpenGVLab/InternVL3_5-241B-A28B", "internvl2_5", 1, "2e-5", "0.05", "0.4",
             "zero_stage3_config.json", gpus_full=64, gpus_lora=16),
)
# fmt: on

# Paths quoted in the Mini-InternVL fine-tuning guide (the official scripts there were full fine-tunes of
# Mini-InternVL-Chat-2B-V1-5 and -4B-V1-5) -> (MODELS name, mode) of the script each one runs.
ALIASES = {
    "shell/internlm2_1_8b_dynamic/internvl_chat_v1_5_internlm2_1_8b_dynamic_res_finetune.sh":
        ("internvl_chat_v1_5_internlm2_1_8b", "full"),
    "shell/phi3_3_8b_dynamic/internvl_chat_v1_5_phi3_3_8b_dynamic_res_finetune.sh":
        ("internvl_chat_v1_5_phi3_3_8b", "full"),
}

MODES = ("full", "lora")
BATCH_SIZE_LORA = 16  # every official LoRA script's; full: Family.batch_full
LORA_RANK = 16


@dataclass(frozen=True)
class Launcher:
    """One generated script: its path and every setting it carries."""

    row: ModelRow
    mode: str

    @property
    def family(self) -> Family:
        return FAMILIES[self.row.family]

    @property
    def stem(self) -> str:
        return f"{self.row.name}_dynamic_res_2nd_finetune_{self.mode}"

    @property
    def path(self) -> str:  # relative to the repository root
        return f"shell/{self.family.folder}/2nd_finetune/{self.stem}.sh"

    @property
    def env(self) -> dict[str, str]:
        """The variables the script sets when the environment does not."""
        gpus = self.row.gpus_full if self.mode == "full" else self.row.gpus_lora
        return {
            "GPUS": str(gpus),
            "BATCH_SIZE": str(self.family.batch_full if self.mode == "full" else BATCH_SIZE_LORA),
            "PER_DEVICE_BATCH_SIZE": str(self.row.per_device),
            "MODEL": self.row.model,
            "OUTPUT_DIR": f"{self.family.work_dir}/{self.stem}",
            "DEEPSPEED": self.row.deepspeed,
        }

    @property
    def flags(self) -> list[tuple[str, str]]:
        """Model-specific finetune flags, in the order written; shell/launch.sh adds the common ones."""
        fam = self.family
        out = [("--conv_style", self.row.conv_style)]
        out += list(zip(fam.extra_flags[::2], fam.extra_flags[1::2]))
        out += [("--max_dynamic_patch", str(fam.max_dynamic_patch)), ("--max_seq_length", str(fam.max_seq_length))]
        if self.mode == "full":
            out += [("--freeze_llm", "False"), ("--freeze_mlp", "False"),
                    ("--freeze_backbone", str(not fam.train_vit_full)), ("--drop_path_rate", self.row.drop_path_full)]
        else:
            out += [("--freeze_llm", "True"), ("--freeze_mlp", "True"), ("--freeze_backbone", "True"),
                    ("--use_llm_lora", str(LORA_RANK)), ("--drop_path_rate", "0.0")]
        out += [("--learning_rate", self.row.learning_rate), ("--weight_decay", self.row.weight_decay)]
        limit = fam.save_total_limit_full if self.mode == "full" else 1
        if limit != 1:  # launch.sh passes --save_total_limit 1
            out.append(("--save_total_limit", str(limit)))
        out += list(zip(fam.tail_flags[::2], fam.tail_flags[1::2]))
        return out

    def render(self) -> str:
        env = self.env
        fam = self.family
        acc = int(env["BATCH_SIZE"]) // (int(env["PER_DEVICE_BATCH_SIZE"]) * int(env["GPUS"]))
        if self.mode == "lora":
            what = f"LoRA (rank {LORA_RANK}) on the LLM, everything else frozen"
        elif fam.train_vit_full:
            what = "full fine-tune of the ViT, the MLP projector and the LLM"
        else:
            what = "full fine-tune of the MLP projector and the LLM (ViT frozen)"
        if self.mode == "lora" and not fam.official_lora:
            origin = "Defaults (no official LoRA script: as the InternVL2.5 LoRA scripts)"
        elif not fam.official_gpus:
            origin = "Defaults (the official settings, our GPU count)"
        else:
            origin = "Official defaults"
        lines = [
            "#!/bin/sh",
            f"# {self.row.title}: {what}.",
            f"# {origin}: {env['GPUS']} GPUs x {env['PER_DEVICE_BATCH_SIZE']} per GPU x {acc} accumulation"
            f" = batch {env['BATCH_SIZE']}, {env['DEEPSPEED'].removesuffix('.json')}.",
        ]
        lines += [f"# {note}" for note in fam.notes]
        if int(env["GPUS"]) > 8:
            nodes = int(env["GPUS"]) // 8
            lines.append(f"# Needs {nodes} nodes of 8 GPUs: PARTITION=<slurm partition> sh {self.path}")
            lines.append(f"# (or GPUS=8 NNODES={nodes} NODE_RANK=<n> MASTER_ADDR=<node 0> on each node).")
        else:
            lines.append(f"#   GPUS={env['GPUS']} PER_DEVICE_BATCH_SIZE=1 sh {self.path} [--finetune_flag value ...]")
        lines += [
            "# Set any variable below from the environment; GPUS and DEEPSPEED override the DEFAULT_ ones",
            "# (without a GPU, launch.sh uses 1 CPU process and no DeepSpeed unless they are set).",
            "# The rest is in shell/launch.sh. Generated by tools/make_launchers.py from its settings table:",
            "# edit the table, then re-run it.",
        ]
        for key, value in env.items():
            if key in ("GPUS", "DEEPSPEED"):
                lines.append(f"export DEFAULT_{key}={value}")
            else:
                lines.append(f'export {key}="${{{key}:-{value}}}"')
        flag_lines = [" ".join(pair) for pair in self.flags]
        body = ' \\\n  '.join(['exec sh "$(dirname "$0")/../../launch.sh"', *flag_lines, '"$@"'])
        return "\n".join(lines) + "\n" + body + "\n"


def all_launchers() -> list[Launcher]:
    return [Launcher(row, mode) for row in MODELS for mode in MODES]


def alias_target(alias: str) -> Launcher:
    name, mode = ALIASES[alias]
    (row,) = [row for row in MODELS if row.name == name]
    return Launcher(row, mode)


def render_alias(alias: str) -> str:
    target = alias_target(alias)
    up = "/".join([".."] * (alias.count("/") - 1))  # from the alias's folder back to shell/
    rel = target.path.removeprefix("shell/")
    return "\n".join([
        "#!/bin/sh",
        "# The path the Mini-InternVL fine-tuning guide quotes; it runs, with the same arguments and environment,",
        f"# {target.path}",
        f"# {target.row.title}, {target.mode} fine-tune. Generated by tools/make_launchers.py.",
        f'exec sh "$(dirname "$0")/{up}/{rel}" "$@"',
    ]) + "\n"


def expected_files() -> dict[str, str]:
    """Repository-relative path -> exact text of every generated script and alias."""
    files = {launcher.path: launcher.render() for launcher in all_launchers()}
    files.update({alias: render_alias(alias) for alias in ALIASES})
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs or is missing")
    parser.add_argument("--root", default=str(REPO), help="repository root to write under")
    args = parser.parse_args(argv)
    root = Path(args.root)
    stale = []
    for rel, text in expected_files().items():
        path = root / rel
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)
    if args.check:
        for rel in stale:
            print(f"out of date: {rel} (run python tools/make_launchers.py)", file=sys.stderr)
        return 1 if stale else 0
    print(f"{len(stale)} of {len(expected_files())} launchers written under {root / 'shell'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
