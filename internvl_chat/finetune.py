"""Supervised fine-tuning of an InternVL chat checkpoint: `python -m internvl_chat.finetune --meta_path ... ...`

Accepts the official `internvl_chat_finetune.py` arguments unchanged (or one JSON file holding them).
Features: every trainability mode (frozen parts, LoRA on ViT and/or LLM, partial ViT), token / sample / square loss
reductions in every mode, length-grouped sampling, torchrun / Slurm / single process, DeepSpeed ZeRO-1/2/3, CPU
(gloo) when there is no GPU, resume from the newest checkpoint that verifies when the settings are the run's own
(train/run_folder.py), output in the official layout, held-out loss and generation metrics during training
(--eval_meta_path, train/evaluation.py).

    flags, model folder, meta file, a structural pass over every record, the output folder's run (a user error:
    one line, exit code 2; a complete run: exit 0) -> setup -> check eval sets -> load model and data -> apply the
    trainability plan -> train -> [evaluate] -> save -> mark the run complete
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
import traceback

if __name__ == "__main__":  # before the imports below, which print third-party warnings (console.py)
    from .console import install as _quiet_console
    _quiet_console()

import torch
import transformers
from transformers import HfArgumentParser, set_seed

from .data.collator import default_loss_reduction
from .distributed import barrier, dist_info, setup_environment
from .train.arguments import DataTrainingArguments, ModelArguments, TrainingArguments

logger = logging.getLogger("internvl_chat.finetune")


# Old flag -> the transformers 5 flag it means. Renamed on the command line, so the last of the two wins: the launchers
# pass the official `--evaluation_strategy no` before the user's flags, and `--eval_strategy steps` must override it.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy"}

# (ours) A bare `--debug` shows the traceback of a user error. transformers' own `--debug VALUE` (underflow_overflow,
# ...) takes a value and is passed on unchanged.
DEBUG_FLAG = "--debug"


class UserError(Exception):
    """A mistake in the command line or a path: printed as one line by rank 0, exit code 2, no traceback."""


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse would print its usage on every rank and exit
        raise UserError(message)


def split_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without our bare `--debug`, and whether it was there."""
    out, debug = [], False
    for i, arg in enumerate(argv):
        if arg == DEBUG_FLAG and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            debug = True
        else:
            out.append(arg)
    return out, debug


def unknown_flags_message(unknown: list[str], parser: HfArgumentParser) -> str:
    """One line naming each unknown flag with the nearest known one (ours, transformers', the official aliases)."""
    known = {s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")}
    known = sorted(n for n in known | {f[2:] for f in RENAMED_FLAGS} | {DEBUG_FLAG[2:]} if "-" not in n)
    parts = []
    for flag in unknown:  # compared without the dashes, in the official underscore spelling
        near = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), known, n=1, cutoff=0.6)
        parts.append(f"{flag} (did you mean --{near[0]}?)" if near else flag)
    return f"unknown flag{'s' if len(parts) > 1 else ''} {', '.join(parts)}; `--help` lists every flag"


def _read_json_args(parser: HfArgumentParser, path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"arguments file {path} cannot be read: {exc}") from exc
    if not isinstance(values, dict):
        raise UserError(f"arguments file {path} must hold a JSON object of flag names and values")
    names = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}
    unknown = [f"--{key}" for key in values if key not in names]
    if unknown:
        raise UserError(f"{path}: " + unknown_flags_message(unknown, parser))
    return values


# (ours) The launcher's first pass, in one process before torchrun: the early checks and the run-folder decision
# (moving an old run aside), then exit: 0 = start training, 3 = the run is complete, 2 = a user error.
PREFLIGHT_FLAG = "--preflight"
PREFLIGHT_COMPLETE = 3
# Set by the launcher for the training processes after its preflight: the data pass ran already.
PREFLIGHT_ENV = "INTERNVL_CHAT_PREFLIGHT_DONE"


@dataclasses.dataclass
class Flags:
    """The parsed command line: ``values`` (a dict by flag name) for the early checks, :meth:`build` for the three
    argument classes (building TrainingArguments starts the process group under torchrun)."""

    parser: HfArgumentParser
    values: dict
    argv: list[str] | None  # None: the values came from a JSON arguments file

    def build(self):
        try:
            if self.argv is None:
                return self.parser.parse_dict(self.values)
            return self.parser.parse_args_into_dataclasses(args=self.argv)
        except ValueError as exc:  # a value the argument classes refuse (e.g. --warmup_ratio 2)
            raise UserError(str(exc)) from exc


def read_flags(argv: list[str] | None) -> Flags:
    """Parse the command line (or one JSON file of flags); a wrong flag raises :class:`UserError` (no prefix
    abbreviations: `--learning_rat` is unknown, not `--learning_rate`)."""
    parser = _Parser((ModelArguments, DataTrainingArguments, TrainingArguments), allow_abbrev=False,
                     epilog=f"{DEBUG_FLAG} (ours, without a value): show the traceback of a user error")
    argv, _ = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    argv = [a for a in argv if a != PREFLIGHT_FLAG]
    if len(argv) == 1 and argv[0].endswith(".json"):
        given = _read_json_args(parser, os.path.abspath(argv[0]))
        defaults = vars(parser.parse_known_args([])[0])  # the same values as the command line would give
        return Flags(parser, _resolved({**defaults, **given}), None)
    renamed = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        renamed.append(RENAMED_FLAGS.get(flag, flag) + eq + value)
    namespace, rest = parser.parse_known_args(renamed)  # before the dataclasses run their checks
    if rest:
        unknown = [a.partition("=")[0] for a in rest if a.startswith("--")]
        if not unknown:
            raise UserError(f"unexpected arguments {' '.join(rest)} (every value follows its --flag)")
        raise UserError(unknown_flags_message(unknown, parser))
    return Flags(parser, _resolved(vars(namespace)), renamed)


def _resolved(values: dict) -> dict:
    """``values`` with ``auto`` settings as the argument classes resolve them, for the early checks and the run
    folder's record."""
    if values.get("loss_reduction") == "auto":
        values["loss_reduction"] = default_loss_reduction(values.get("conv_style"))
    return values


def parse_args(argv: list[str] | None, early_check=None):
    """The three argument groups; ``early_check(values)`` sees the parsed values (a dict) before they are built."""
    flags = read_flags(argv)
    if early_check is not None:
        early_check(flags.values)
    return flags.build()


def check_model_dir(values: dict) -> None:
    """The model to start from is there before anything is loaded: a chat checkpoint folder holding a config.json,
    or the parts of a new model (--vision_path + --llm_path, optional --mlp_path; model/parts.py)."""
    path = values.get("model_name_or_path")
    if not path:
        from .model.parts import PartsError, check_parts

        if values.get("use_qlora"):
            raise UserError("--use_qlora needs --model_name_or_path: tools/merge_lora.py rebuilds a QLoRA run from "
                            "the chat checkpoint it started from; build the model from parts in a first run")
        if not (values.get("vision_path") or values.get("llm_path")):
            raise UserError("--model_name_or_path is required: fine-tuning starts from an InternVL chat checkpoint, "
                            "or from parts (--vision_path InternViT folder + --llm_path LLM folder)")
        try:
            check_parts(values.get("vision_path"), values.get("llm_path"), values.get("mlp_path"),
                        values.get("down_sample_ratio") or 0.5, bool(values.get("allow_pickle")))
        except PartsError as exc:
            raise UserError(str(exc)) from None
        return
    if not os.path.isdir(path):
        raise UserError(f"--model_name_or_path {path}: no such folder (checkpoints are loaded from local folders "
                        "only; download it first, e.g. `huggingface-cli download <repo> --local-dir <dir>`)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--model_name_or_path {path}: the folder holds no config.json, so it is not an InternVL "
                        "chat checkpoint")
    if values.get("mlp_path"):
        from .model.parts import PartsError, check_projector_file

        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
                config = json.load(handle)
            check_projector_file(values["mlp_path"], config["vision_config"], config["llm_config"],
                                 config.get("downsample_ratio", 0.5), bool(values.get("allow_pickle")))
        except (PartsError, OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(str(exc) if isinstance(exc, PartsError) else f"--mlp_path: {exc!r}") from None


ROUTER_FLAGS = ("router_aux_loss_coef", "output_router_logits")


def check_router_flags(values: dict) -> None:
    """--router_aux_loss_coef / --output_router_logits are for an MoE LLM (configuration.MOE_BLOCKS) only."""
    given = [name for name in ROUTER_FLAGS if values.get(name) is not None]
    if not given:
        return
    from .model.configuration import MOE_BLOCKS

    coef = values.get("router_aux_loss_coef")
    if coef is not None and not coef >= 0:  # NaN included
        raise UserError(f"--router_aux_loss_coef must be >= 0, got {coef}")
    try:
        if values.get("model_name_or_path"):
            with open(os.path.join(values["model_name_or_path"], "config.json"), encoding="utf-8") as handle:
                llm_config = json.load(handle)["llm_config"]
        else:
            from .model.parts import llm_config_of

            llm_config = llm_config_of(values["llm_path"])
        arch = (llm_config.get("architectures") or [None])[0]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"--{given[0]}: the LLM config cannot be read ({exc!r})") from None
    if arch not in MOE_BLOCKS:
        raise UserError(f"--{given[0]} is for a mixture-of-experts LLM ({', '.join(sorted(MOE_BLOCKS))}); this "
                        f"model's LLM {arch} is not a mixture-of-experts model and has no router")


def apply_router_flags(model, model_args: ModelArguments) -> None:
    """The router flags over the checkpoint's llm_config: read by the training forward, saved in config.json."""
    for name in ROUTER_FLAGS:
        value = getattr(model_args, name)
        if value is not None:
            for config in {id(c): c for c in (model.config.llm_config, model.language_model.config)}.values():
                setattr(config, name, value)


def model_inputs(values: dict) -> list[str]:
    """What the model is read from: the chat checkpoint, or the parts of a new one."""
    if values.get("model_name_or_path"):
        return [values["model_name_or_path"]]
    return [p for p in (values.get("vision_path"), values.get("llm_path"), values.get("mlp_path")) if p]


@dataclasses.dataclass
class Early:
    """What the early checks read, kept for the run: the meta entries with their indexed annotation files (read
    once), the run's resolved settings and what to do with the output folder."""

    output_dir: str
    entries: list
    annotations: list
    settings: dict
    decision: object  # train.run_folder.Decision
    data_summary: str | None = None  # the structural pass's one line (None: skipped, the launcher's preflight ran)
    eval_specs: list | None = None  # the held-out sets (--eval_meta_path), read and checked


def early_checks(values: dict, prescan: bool = True) -> Early:
    """User errors in the first seconds, before any process group or model load: the model folder, the meta file,
    a structural pass over every record (``prescan``), the held-out sets, the output folder's run
    (train/run_folder.py)."""
    from .data.prescan import prescan_for_training
    from .train.evaluation import load_eval_specs
    from .train.run_folder import RunFolderError, decide, in_use_message, lock_holder, resolve_settings

    check_model_dir(values)
    check_router_flags(values)
    entries, annotations = check_meta(values.get("meta_path"))
    data_summary = prescan_for_training(values, entries, annotations) if prescan else None
    eval_specs = load_eval_specs(values["eval_meta_path"], values.get("eval_max_samples", 64)) \
        if values.get("eval_meta_path") else None
    settings = resolve_settings(values, dist_info().world_size, entries, annotations)
    check_output_dir(output_dir_of(values), model_inputs(values))
    holder = lock_holder(output_dir_of(values))
    if holder:
        raise UserError(in_use_message(output_dir_of(values), holder))
    try:
        decision = decide(output_dir_of(values), settings, overwrite=bool(values.get("overwrite_output_dir")),
                          resume_from_checkpoint=values.get("resume_from_checkpoint"),
                          auto_resume=bool(values.get("auto_resume", True)),
                          allow_pickle=bool(values.get("allow_pickle")))
    except (RunFolderError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    if decision.action == "start_over":
        check_move_aside(output_dir_of(values), [*model_inputs(values), values["meta_path"],
                                                 *(e.annotation for e in entries)])
    return Early(output_dir_of(values), entries, annotations, settings, decision, data_summary, eval_specs)


def check_output_dir(output_dir: str, models: list[str]) -> None:
    """The output folder is a folder (or will be) and not a model folder: the final model is written there."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a folder")
    for model in models:
        if os.path.realpath(model) == os.path.realpath(output_dir):
            raise UserError(f"--output_dir {output_dir} is the model folder {model}: the run would write its model "
                            "over it; choose another output folder (OUTPUT_DIR=... or --output_dir ...)")


def check_move_aside(output_dir: str, inputs: list[str]) -> None:
    """--overwrite_output_dir moves the old run's folder aside: refused when it holds the model or the data."""
    out = os.path.realpath(output_dir)
    for path in inputs:
        if os.path.realpath(path).startswith(out + os.sep):
            raise UserError(f"--overwrite_output_dir would move {output_dir} aside, and it holds {path}, an input of "
                            "this run; choose another output folder (OUTPUT_DIR=... or --output_dir ...)")


def output_dir_of(values: dict) -> str:
    return values.get("output_dir") or "trainer_output"  # transformers' default


def check_meta(meta_path: str | None) -> tuple[list, list]:
    """Read the meta file and index every annotation file once (no sample is parsed): a wrong meta file stops
    the run in seconds with :class:`~internvl_chat.data.meta.MetaError`, before the model loads. Returns the
    entries and their :class:`~internvl_chat.data.records.Annotation` indexes, which the dataset reuses."""
    from .data.errors import DataError
    from .data.meta import load_meta, samples_per_epoch
    from .data.records import index_annotation

    if not meta_path:
        raise UserError("--meta_path is required (a meta JSON naming your datasets)")
    entries = load_meta(meta_path, log_warnings=False)  # build_dataset logs its unknown keys, once
    annotations = []
    for entry in entries:
        try:
            annotations.append(index_annotation(entry.annotation, hash_files=True))  # run_folder reuses the hash
        except (OSError, DataError) as exc:
            raise UserError(f"{entry.where()}: annotation file {entry.annotation} cannot be read: {exc}") from exc
        samples_per_epoch(entry, annotations[-1].num_records)
    return entries, annotations


# Official flags of the IterableDataset packer and the resampler, which the planned packing here does not need.
NO_EFFECT_FLAGS = ("use_data_resampling", "max_buffer_size", "log_freq", "strict_mode", "replacement",
                   "allow_overflow", "use_liger")


def ignored_flags(*arg_groups) -> list[str]:
    """`--name value` of every official flag that was set away from its default but has no effect here."""
    import dataclasses

    out = []
    for args in arg_groups:
        for f in dataclasses.fields(args):
            if f.name in NO_EFFECT_FLAGS and getattr(args, f.name) != f.default:
                out.append(f"--{f.name} {getattr(args, f.name)}")
    return out


def setup(training_args: TrainingArguments) -> None:
    # initialise the process group now: ZeRO-3 partitions weights while they load, which needs it
    _ = training_args.device
    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")
    info = dist_info()
    logging.basicConfig(
        format=f"%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if info.is_main else logging.WARNING,
        stream=sys.stdout,
    )
    if info.is_main:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
    set_seed(training_args.seed)


def load_model_and_tokenizer(model_args: ModelArguments, data_args: DataTrainingArguments,
                             training_args: TrainingArguments):
    from .model import InternVLChatModel, load_tokenizer
    from .model.parts import build_from_parts, load_projector, resize_embeddings, resize_position_embedding

    path = model_args.model_name_or_path
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    if not path:  # a new model from parts, as the official pretraining stage starts (checked by check_model_dir)
        tokenizer = load_tokenizer(model_args.llm_path, trust_remote_code=model_args.trust_remote_code,
                                   model_max_length=data_args.max_seq_length)
        model = build_from_parts(model_args.vision_path, model_args.llm_path, dtype=dtype,
                                 allow_pickle=model_args.allow_pickle, template=data_args.conv_style,
                                 downsample_ratio=data_args.down_sample_ratio, seed=training_args.seed)
    else:
        if model_args.vision_path or model_args.llm_path:
            logger.warning("--model_name_or_path is given: --vision_path/--llm_path are ignored, as officially")
        tokenizer = load_tokenizer(path, trust_remote_code=model_args.trust_remote_code,
                                   model_max_length=data_args.max_seq_length)
        load_kwargs = qlora_load_kwargs(model_args, dtype, training_args) if model_args.use_qlora else {}
        model = InternVLChatModel.from_pretrained(path, torch_dtype=dtype, allow_pickle=model_args.allow_pickle,
                                                  **load_kwargs)
    if model_args.use_qlora:
        patch_bnb_for_cpu_training(model)
        model.config.qlora_base_model = os.path.abspath(path)  # tools/merge_lora.py merges into full precision

    cfg = model.config
    if data_args.down_sample_ratio != cfg.downsample_ratio:
        raise ValueError(
            f"--down_sample_ratio {data_args.down_sample_ratio} differs from the checkpoint's downsample_ratio "
            f"{cfg.downsample_ratio}; the projector only works with the ratio it was trained for"
        )
    if getattr(cfg, "template", None) and cfg.template != data_args.conv_style:
        # legitimate when moving a model to another template on purpose; a forgotten --conv_style otherwise (the
        # default is internlm2-chat, as officially), which trains every sample in the wrong format
        logger.warning("--conv_style %s differs from the checkpoint's template %s: the model is trained (and saved) "
                       "with %s; pass --conv_style %s to keep its own", data_args.conv_style, cfg.template,
                       data_args.conv_style, cfg.template)
    # the saved config.json reflects the run, as the official script does
    cfg.template = data_args.conv_style
    cfg.select_layer = model_args.vision_select_layer
    cfg.dynamic_image_size = data_args.dynamic_image_size
    cfg.use_thumbnail = data_args.use_thumbnail
    cfg.ps_version = model_args.ps_version
    cfg.min_dynamic_patch = data_args.min_dynamic_patch
    cfg.max_dynamic_patch = data_args.max_dynamic_patch
    cfg.force_image_size = data_args.force_image_size
    if data_args.normalize_type != "imagenet" or hasattr(cfg, "normalize_type"):
        cfg.normalize_type = data_args.normalize_type
    model.template, model.select_layer, model.ps_version = cfg.template, cfg.select_layer, cfg.ps_version
    model.num_image_token = cfg.num_image_token
    if cfg.vision_config.image_size != data_args.force_image_size:
        resize_position_embedding(model, data_args.force_image_size)
    cfg.vision_config.drop_path_rate = model_args.drop_path_rate
    model.vision_model.encoder.set_drop_path_rate(model_args.drop_path_rate)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")

    # compare with the config, not the weight: under ZeRO-3 a partitioned weight has shape [0]
    if len(tokenizer) > model.config.llm_config.vocab_size:
        resize_embeddings(model, len(tokenizer))
    if model_args.mlp_path:  # safetensors (tools/extract_mlp.py); the official .pth only with --allow_pickle
        load_projector(model, model_args.mlp_path, model_args.allow_pickle)
    model.language_model.config.use_cache = False
    apply_router_flags(model, model_args)
    return model, tokenizer


def qlora_load_kwargs(model_args: ModelArguments, dtype: torch.dtype, training_args: TrainingArguments) -> dict:
    """4-bit NF4 base weights for the LLM's linear layers; ViT, projector and LM head stay in full precision."""
    if not model_args.use_llm_lora:
        raise ValueError("--use_qlora needs --use_llm_lora R: the 4-bit base weights cannot be trained directly")
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype != torch.float32 else torch.bfloat16
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["vision_model", "mlp1", "lm_head", "output"],
    )
    device = "cpu" if training_args.use_cpu else f"cuda:{max(training_args.local_process_index, 0)}"
    return {"quantization_config": config, "device_map": {"": device}}


def patch_bnb_for_cpu_training(model) -> None:
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights after an eval-mode no-grad forward, after which
    training fails with an in-place error. Keep the trainable layout."""
    if torch.cuda.is_available():
        return
    patched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    if patched:
        logger.info("bitsandbytes: disabled the AVX512-BF16 weight repacking on %d 4-bit layers (CPU QLoRA)", patched)


def data_config(data_args: DataTrainingArguments, training_args: TrainingArguments, model):
    """The DataConfig of the run (training and eval sets alike): the data flags, the model's tokens per tile."""
    from .data.config import DataConfig

    return DataConfig.from_args(data_args, num_image_token=model.num_image_token,
                                seed=training_args.data_seed or training_args.seed)


def build_data(data_args: DataTrainingArguments, training_args: TrainingArguments, model, tokenizer,
               read: tuple[list, list] | None = None):
    """The training set and its collator; ``read``: the meta entries and annotation indexes of the early checks."""
    from .data.collator import DataCollator
    from .data.dataset import build_dataset

    if not data_args.meta_path:
        raise ValueError("--meta_path is required (a meta JSON naming your datasets)")
    config = data_config(data_args, training_args, model)
    dataset = build_dataset(data_args.meta_path, tokenizer, config, read=read)
    if not data_args.use_packed_ds:
        return dataset, DataCollator(pad_token_id=tokenizer.pad_token_id, loss_reduction=data_args.loss_reduction,
                                     with_sample_ids=True)
    from .data.packing import PackedCollator, PackedDataset

    packed = PackedDataset(dataset, data_args.max_packed_tokens, max_tiles=data_args.num_images_expected,
                           seed=config.seed, num_image_token=model.num_image_token)
    logger.info("packing: %d samples into %d packs of <= %d tokens / %d tiles (%s)", len(dataset), len(packed),
                data_args.max_packed_tokens, data_args.num_images_expected, packed.stats)
    collator = PackedCollator(pad_token_id=tokenizer.pad_token_id, loss_reduction=data_args.loss_reduction,
                              max_packed_tokens=data_args.max_packed_tokens, with_sample_ids=True)
    return packed, collator


def apply_trainability(model, model_args: ModelArguments):
    from .train.plan import apply_plan, format_plan, resolve_plan

    plan = resolve_plan(model_args)
    apply_plan(model, plan, model_args)
    if model_args.grad_checkpoint:
        model.set_llm_gradient_checkpointing(True)
    vit_gc = model_args.vit_grad_checkpoint
    if vit_gc is None:
        vit_gc = plan.vit != "frozen"
    if vit_gc:
        model.set_vision_gradient_checkpointing(True)
    logger.info("%s", format_plan(model, plan))
    return plan


def mark_moe_blocks_for_zero3(model) -> list[str]:
    """Under DeepSpeed ZeRO-3, make each MoE block of the LLM one ZeRO-3 leaf (configuration.MOE_BLOCKS).

    ZeRO-3 gathers a module's weights when the module runs. Experts that run only when tokens reach them (per-expert
    modules, as in transformers 4 and the official remote code) make ranks that route differently issue different
    gathers: a hang. As a leaf, the whole block (router and every expert) is gathered on entry on every rank.
    transformers 5 fuses the experts into one module that always runs, and DeepSpeed 0.19 marks Qwen3-MoE's block
    by default (not GPT-OSS's; a config's `zero_optimization.leaf_module` replaces that list), so this keeps the
    guarantee whatever the versions. Must run before `deepspeed.initialize` (the Trainer's) installs the hooks;
    returns the block class names marked.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    from .model.configuration import MOE_BLOCKS, llm_family

    block = MOE_BLOCKS.get(llm_family(model.config.llm_config))
    if block is None or not is_deepspeed_zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules

    marked = set_z3_leaf_modules(model.language_model, [block])
    logger.info("ZeRO-3: %d %s blocks gathered whole (leaf modules)", len(marked), block)
    return [block]


def keep_fp32_master_weights(model, model_args: ModelArguments, training_args: TrainingArguments) -> torch.dtype | None:
    """bf16/fp16 without DeepSpeed: trainable weights in float32, computed under autocast.

    DeepSpeed keeps float32 master weights in its optimizer; a plain Trainer/DDP run updates the weights it has, and
    bf16 weights round away updates of lr 1e-5 size (fp16 gradients cannot even be unscaled). Frozen parts stay in
    half precision. Returns the dtype the final weights are saved in (None: as they are).
    """
    half = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    if half is None or training_args.deepspeed or model_args.use_qlora:
        return None
    upcast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype == half:
            param.data = param.data.float()
            upcast += param.numel()
    if upcast:
        logger.info("no DeepSpeed: %d trainable parameters kept in float32 (master weights), %s autocast; the final "
                    "weights are saved in %s", upcast, str(half).split(".")[-1], str(half).split(".")[-1])
    return half


def start_summary(model_args, data_args, training_args, dataset, plan) -> str:
    info = dist_info()
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * max(
        1, info.world_size
    )
    lines = [
        "=" * 72,
        f"model      {model_args.model_name_or_path or f'{model_args.vision_path} + {model_args.llm_path}'} "
        f"(template {data_args.conv_style})",
        f"plan       {plan.describe()}",
        f"data       {data_args.meta_path}: {len(dataset)} samples",
        f"batch      {training_args.per_device_train_batch_size} per device x {training_args.gradient_accumulation_steps}"
        f" accumulation x {max(1, info.world_size)} processes = {global_batch} global",
        f"precision  {'bf16' if training_args.bf16 else 'fp16' if training_args.fp16 else 'fp32'}; "
        f"loss reduction {data_args.loss_reduction}; launcher {info.launcher}; "
        f"device {'cpu (gloo)' if training_args.use_cpu else 'cuda'}",
        *([eval_summary(data_args, training_args)] if data_args.eval_meta_path else []),
        f"output     {training_args.output_dir}",
        "=" * 72,
    ]
    return "\n".join(lines)


def eval_summary(data_args, training_args) -> str:
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    when = "every epoch" if strategy == "epoch" else ""
    if strategy == "steps":
        steps = training_args.eval_steps
        when = f"every {steps:g} steps" if steps >= 1 else f"every {steps:g} of the run"  # < 1: a ratio
    if training_args.do_final_eval:
        when += (" and " if when else "") + "after training"
    what = f"loss + generation metrics on <= {data_args.eval_max_samples} samples per set" \
        if data_args.eval_max_samples else "loss only"
    return f"eval       {data_args.eval_meta_path}: {when or 'never'}; {what}"


def bad_data_totals(tracker):
    """The whole run's bad-data count: every rank saw its own share, so the ranks' record sets are united (a
    record seen on two ranks, e.g. a replacement of a skipped sample, counts once)."""
    import torch.distributed as dist

    from .data.errors import BadDataTracker

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tracker
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, tracker.state())
    return BadDataTracker.merged(states, tracker.max_bad_fraction, tracker.max_messages)


def check_bad_data(tracker, output_dir: str) -> None:
    """Log the run's bad-data summary, and fail the run (every rank alike) when the exact limit is exceeded.

    During training the tracker stops early with a small-sample slack (data/errors.py); this end check applies
    ``bad / seen > max_bad_fraction`` exactly, over the distinct records of the whole run, which is the fraction
    ``tools/check_data.py`` reports. The weights are saved first: the run's work is kept, but its exit code says
    that it trained on too much bad data.
    """
    from .data.errors import TooMuchBadDataError

    totals = bad_data_totals(tracker)
    logger.info("%s", totals.summary())
    try:
        totals.final_check()
    except TooMuchBadDataError as exc:
        raise TooMuchBadDataError(f"end of run: {exc}\n(the weights were saved in {output_dir}, but the run "
                                  "failed: it skipped more bad data than --max_bad_fraction allows)") from None


class RunComplete(Exception):
    """The output folder holds this run, finished: nothing to do (``exit_code`` 0, or 1 if it failed)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def preflight(argv: list[str]) -> int:
    """The launcher's first pass (``--preflight``, one process, before torchrun): the early checks, then the run
    folder made ready (an old run moved aside under --overwrite_output_dir). 0: train; 3: the run is complete."""
    setup_environment()
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stdout)
    early = early_checks(read_flags(argv).values)
    if early.decision.action == "complete":
        raise RunComplete(early.decision.message, early.decision.exit_code)
    prepare_output_dir(early)
    return 0


def prepare_output_dir(early: Early) -> None:
    """Say what the early checks found, and act on the output folder's decision: the old run moved aside (rank 0)
    for --overwrite_output_dir, else the decision said (resuming from ..., or nothing for a new run)."""
    from .train.run_folder import move_aside

    if early.data_summary:
        logger.info("%s", early.data_summary)
    decision = early.decision
    if decision.action != "start_over":
        if decision.message:
            logger.info("%s", decision.message)
        return
    if dist_info().is_main:
        try:
            logger.info("%s: moved it to %s", decision.message, move_aside(early.output_dir))
        except OSError as exc:
            raise UserError(f"--overwrite_output_dir: {early.output_dir} cannot be moved aside ({exc}); move or "
                            "delete it yourself, or choose another output folder") from exc


def main(argv: list[str] | None = None) -> str:
    """Run one fine-tuning job; returns the output directory."""
    setup_environment()
    flags = read_flags(argv)
    early = early_checks(flags.values, prescan=os.environ.get(PREFLIGHT_ENV) != "1")
    if early.decision.action == "complete":  # before the process group: every rank stops alike, nothing written
        raise RunComplete(early.decision.message, early.decision.exit_code)
    model_args, data_args, training_args = flags.build()
    setup(training_args)
    ignored = ignored_flags(model_args, data_args)
    if ignored:
        logger.warning("accepted for compatibility, no effect here (packing is planned, not streamed): %s",
                       ", ".join(ignored))
    from .train.evaluation import check_eval_args
    from .train.run_folder import RunFolderError, RunLock

    check_eval_args(data_args, training_args)
    prepare_output_dir(early)
    barrier()  # the old run is aside before any rank writes
    try:
        lock = RunLock(training_args.output_dir) if dist_info().is_main else None
    except RunFolderError as exc:  # a second launch that passed the early check at the same moment
        raise UserError(str(exc)) from None
    try:
        return train(early, model_args, data_args, training_args)
    finally:
        if lock is not None:
            lock.release()


def train(early: Early, model_args: ModelArguments, data_args: DataTrainingArguments,
          training_args: TrainingArguments) -> str:
    """Load, train, save and mark the run complete (the output folder is ready and held)."""
    from .data.errors import BadDataTracker, TooMuchBadDataError
    from .train.evaluation import build_evaluator
    from .train.run_folder import write_settings
    from .train.trainer import InternVLTrainer

    resume, eval_specs = early.decision.resume, early.eval_specs
    model, tokenizer = load_model_and_tokenizer(model_args, data_args, training_args)
    dataset, collator = build_data(data_args, training_args, model, tokenizer, read=(early.entries, early.annotations))
    evaluator = build_evaluator(eval_specs, tokenizer, data_config(data_args, training_args, model), data_args) \
        if eval_specs else None
    plan = apply_trainability(model, model_args)
    run_dtype = keep_fp32_master_weights(model, model_args, training_args)
    mark_moe_blocks_for_zero3(model)
    logger.info("\n%s", start_summary(model_args, data_args, training_args, dataset, plan))

    trainer = InternVLTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=evaluator.datasets if evaluator else None,
        evaluator=evaluator,
        data_collator=collator,
        processing_class=tokenizer,
        component_lrs={"vit": model_args.vision_lr, "mlp": model_args.mlp_lr, "llm": model_args.llm_lr},
        base_model_dir=model_args.model_name_or_path,
        bad_data=BadDataTracker(data_args.max_bad_fraction),
        loss_reduction_all_gather=data_args.loss_reduction_all_gather,
        run_settings=early.settings,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trained = result.global_step - resumed_step(resume)
    if training_args.do_final_eval and trainer.last_eval_step != trainer.state.global_step:
        metrics = trainer.evaluate()  # --do_eval: once more on the final weights, unless the last step just did
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_dtype = run_dtype  # the final weights in the run's precision; checkpoints keep fp32 masters
    trainer.save_model()
    if trained > 0:
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    else:  # killed after its last checkpoint: the metrics of a run that trained nothing would read train_loss 0
        logger.info("nothing left to train: %s is at the final step %d; the final model is written", resume,
                    result.global_step)
    trainer.save_state()
    failed = None
    try:
        check_bad_data(trainer.bad_data, training_args.output_dir)
    except TooMuchBadDataError as exc:
        failed = str(exc).splitlines()[0]
        raise
    finally:
        if trainer.is_world_process_zero():  # the run is complete: a re-run says so and touches nothing
            write_settings(training_args.output_dir, early.settings, complete=True,
                           global_step=trainer.state.global_step, failed=failed)
    if trainer.is_world_process_zero():
        logger.info("checkpoint written to %s", training_args.output_dir)
    return training_args.output_dir


def resumed_step(resume: str | None) -> int:
    """The step of the checkpoint a run resumes from (0 for a new run)."""
    from .train.checkpoint import CHECKPOINT_RE

    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resume))) if resume else None
    if match:
        return int(match.group(1))
    if resume:  # a folder named otherwise: its trainer state says
        try:
            with open(os.path.join(resume, "trainer_state.json"), encoding="utf-8") as handle:
                return int(json.load(handle).get("global_step", 0))
        except (OSError, ValueError, TypeError):
            return 0
    return 0


def shutdown_process_group() -> None:
    """Close the process group before the interpreter exits: left to exit-time teardown, gloo/DeepSpeed ZeRO-3 runs
    on CPU aborted now and then after a complete run ("terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it (rank 0 hosts the rendezvous store)
        dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    """`python -m internvl_chat.finetune`: the exit code. User errors (flags, meta file, paths) are one line from
    rank 0 and exit code 2 (every rank hits the same error; `--debug` adds the traceback); a data verdict or a
    failed save is one line and exit code 1."""
    from .data.errors import TooMuchBadDataError
    from .data.meta import MetaError
    from .train.checkpoint import CheckpointSaveError

    from .data.prescan import PrescanError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = split_debug_flag(argv)[1]
    try:
        if PREFLIGHT_FLAG in argv:
            return preflight(argv)
        main(argv)
    except RunComplete as done:
        if dist_info().is_main:
            print(str(done), flush=True)
        return PREFLIGHT_COMPLETE if PREFLIGHT_FLAG in argv and done.exit_code == 0 else done.exit_code
    except (UserError, MetaError, PrescanError) as exc:
        if dist_info().is_main:
            if debug:
                traceback.print_exc()
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (TooMuchBadDataError, CheckpointSaveError) as exc:  # a data verdict or a full disk, not a crash
        logger.error("%s", exc)
        return 1
    shutdown_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
