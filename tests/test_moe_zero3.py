"""MoE LLMs: under DeepSpeed ZeRO-3, ranks that see different modalities (and so route their tokens to different
experts and supervise different numbers of tokens) train together without hanging; the router's loss flags; QLoRA."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from internvl_chat.finetune import UserError, main
from internvl_chat.tiny_model import make_tiny_model
from test_finetune import _free_port, base_args  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[1]
HANG_TIMEOUT = 300  # seconds: far above a healthy run (tens of seconds on a loaded 2-core CPU), so only a hang fails


@pytest.fixture(scope="module")
def moe_workdir(tmp_path_factory):
    """A tiny Qwen3-MoE InternVL and an annotation file alternating text-only and image samples."""
    root = tmp_path_factory.mktemp("moe")
    make_tiny_model(root / "qwen3_moe", llm="qwen3_moe", seed=0)
    data = root / "data"
    data.mkdir()
    Image.new("RGB", (96, 64), (200, 40, 40)).save(data / "red.png")
    records = []
    for i in range(4):
        records.append({"id": f"text{i}", "conversations": [
            {"from": "human", "value": f"Count to {i + 2}."},
            {"from": "gpt", "value": " ".join(str(n) for n in range(1, i + 3))}]})
        records.append({"id": f"image{i}", "image": "red.png", "width": 96, "height": 64, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": "It is red: the whole picture is one flat red colour."}]})
    (data / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = root / "meta.json"
    meta.write_text(json.dumps({"mixed": {"root": str(data), "annotation": str(data / "mixed.jsonl"),
                                          "data_augment": False, "repeat_time": 1, "length": len(records)}}))
    return root, meta


# The finetune entry point with Qwen3-MoE's experts run as per-expert modules run (transformers 4, the official
# remote code): only where tokens reach them. transformers 5 fuses the experts into one module that every rank calls,
# which hides the hang; here the experts run only for sequences over 100 tokens, so the image rank runs them and the
# text-only rank never does. Without the MoE block as a ZeRO-3 leaf, the image rank gathers expert weights that the
# other rank never asks for: a collective mismatch (a hang on NCCL, an abort or a hang on gloo). The LM head's loss
# chunks are 2 rows (221 on a real 151k vocabulary), so the ranks' answers of different lengths need different
# numbers of head calls, each a gather of the partitioned head (model/loss.py evens them out).
ROUTED_EXPERTS_ENTRY = """
import os
import sys
from transformers.models.qwen3_moe import modeling_qwen3_moe as moe
import internvl_chat.model.loss as loss
from internvl_chat.finetune import cli

loss.CHUNK_BYTES, loss._MIN_CHUNK_ROWS = 1, 2
chunk_loss = loss._module_chunk_loss

def counted_chunk_loss(head, hidden, targets, scale, rows, calls=None):
    print(f"head chunks: rank {os.environ['RANK']} {-(-hidden.shape[0] // rows)}", flush=True)
    return chunk_loss(head, hidden, targets, scale, rows, calls)

def forward(self, hidden_states):
    batch, length, width = hidden_states.shape
    flat = hidden_states.view(-1, width)
    _, weights, experts = self.gate(flat)
    print(f"moe tokens: rank {os.environ['RANK']} {flat.shape[0]}", flush=True)
    if flat.shape[0] <= 100:  # no token reaches the experts
        return (flat * 0).view(batch, length, width)
    return self.experts(flat, experts, weights).view(batch, length, width)

moe.Qwen3MoeSparseMoeBlock.forward = forward
loss._module_chunk_loss = counted_chunk_loss
sys.exit(cli())
"""


def _torchrun_or_hang(entry, args, timeout=HANG_TIMEOUT):
    """2-process torchrun of the `entry` script; a run still going after `timeout` is killed with all its workers
    (its own process group) and the test fails as a hang instead of blocking the suite."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(entry), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"2-rank ZeRO-3 run did not finish in {timeout} s (hang):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def test_zero3_moe_with_text_only_rank_completes(moe_workdir):
    """Rank 0 gets only text-only samples, rank 1 only image samples (sequential sampler, batch 1 per rank over
    the alternating file): each step the ranks run the ViT on different tiles (dummy vs real), different expert
    modules (run only where tokens reach them) and the LM head over different numbers of loss chunks. DeepSpeed's own default leaf list is emptied, so
    the run depends on finetune's marking. It must finish, checkpoint included, with the router coefficient given
    on the command line in the saved config."""
    pytest.importorskip("deepspeed")
    root, meta = moe_workdir
    out = root / "zero3"
    entry = root / "routed_experts_finetune.py"
    entry.write_text(ROUTED_EXPERTS_ENTRY)
    ds_config = json.loads((REPO / "zero_stage3_config.json").read_text())
    ds_config["zero_optimization"]["leaf_module"] = {"classes": []}  # DeepSpeed 0.19 lists Qwen3-MoE itself
    (root / "zero3.json").write_text(json.dumps(ds_config))
    args = base_args(root / "qwen3_moe", meta, out, "--per_device_train_batch_size", "1", "--max_steps", "2",
                     "--train_sampling_strategy", "sequential", "--grad_checkpoint", "True",
                     "--deepspeed", str(root / "zero3.json"), "--save_strategy", "steps", "--save_steps", "2",
                     "--router_aux_loss_coef", "0.05")
    log = _torchrun_or_hang(entry, args)
    assert "ZeRO-3: 2 Qwen3MoeSparseMoeBlock blocks gathered whole" in log
    tokens = [line.split()[-2:] for line in log.splitlines() if line.startswith("moe tokens: rank")]
    assert {n for r, n in tokens if r == "0"} and all(int(n) <= 100 for r, n in tokens if r == "0")  # text only
    assert {n for r, n in tokens if r == "1"} and all(int(n) > 100 for r, n in tokens if r == "1")  # an image each
    chunks = [line.split()[-2:] for line in log.splitlines() if line.startswith("head chunks: rank")]
    assert {n for r, n in chunks if r == "0"} != {n for r, n in chunks if r == "1"}, chunks  # uneven head calls
    assert (out / "checkpoint-2").is_dir()
    assert list(out.glob("*.safetensors"))
    llm_config = json.loads((out / "config.json").read_text())["llm_config"]
    assert llm_config["router_aux_loss_coef"] == 0.05 and llm_config["output_router_logits"] is True
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    settings = json.loads((out / "run_settings.json").read_text())["settings"]
    assert settings["model"]["router_aux_loss_coef"] == 0.05 and settings["model"]["output_router_logits"] is None


def test_router_flags_refused_for_a_dense_llm(tmp_path):
    make_tiny_model(tmp_path / "qwen3", llm="qwen3", seed=0)
    with pytest.raises(UserError, match="router_aux_loss_coef.*not a mixture-of-experts"):
        main(["--model_name_or_path", str(tmp_path / "qwen3"), "--meta_path", str(tmp_path / "none.json"),
              "--output_dir", str(tmp_path / "out"), "--router_aux_loss_coef", "0.01"])


def test_router_flags_override_the_checkpoint_and_are_saved(moe_workdir, tmp_path):
    from internvl_chat.finetune import apply_router_flags
    from internvl_chat.model import InternVLChatModel
    from internvl_chat.model.modeling import wants_router_aux_loss
    from internvl_chat.train.arguments import ModelArguments

    root, _ = moe_workdir
    model = InternVLChatModel.from_pretrained(root / "qwen3_moe")
    assert wants_router_aux_loss(model.config.llm_config)  # the tiny checkpoint's own setting
    apply_router_flags(model, ModelArguments(router_aux_loss_coef=0.25, output_router_logits=False))
    assert not wants_router_aux_loss(model.language_model.config)
    model.save_pretrained(tmp_path / "saved")
    llm_config = json.loads((tmp_path / "saved" / "config.json").read_text())["llm_config"]
    assert llm_config["router_aux_loss_coef"] == 0.25 and llm_config["output_router_logits"] is False
    apply_router_flags(model, ModelArguments())  # not given: the checkpoint's values stay
    assert model.config.llm_config.router_aux_loss_coef == 0.25


def test_negative_router_coefficient_refused(moe_workdir, tmp_path):
    root, meta = moe_workdir
    with pytest.raises(UserError, match="router_aux_loss_coef must be >= 0"):
        main(base_args(root / "qwen3_moe", meta, tmp_path / "out", "--router_aux_loss_coef", "-1"))


def test_qlora_on_qwen3_moe_quantizes_the_linear_layers_only(moe_workdir):
    """QLoRA loads, trains and saves a Qwen3-MoE model on CPU; bitsandbytes quantizes nn.Linear layers only, so the
    fused 3-D expert weights (and the router) stay in full precision, as README says."""
    pytest.importorskip("bitsandbytes")
    root, meta = moe_workdir
    out = root / "qlora"
    main(base_args(root / "qwen3_moe", meta, out, "--freeze_backbone", "True", "--freeze_llm", "True",
                   "--freeze_mlp", "True", "--use_llm_lora", "4", "--use_qlora", "True", "--max_steps", "2"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    with safe_open(out / "model.safetensors", "pt") as handle:
        dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
        lora_b = [handle.get_tensor(k) for k in dtypes if "lora_B" in k]
    layer = "language_model.base_model.model.model.layers.0."
    assert dtypes[layer + "self_attn.q_proj.base_layer.weight"] == "U8"  # 4-bit NF4, packed
    assert dtypes[layer + "mlp.experts.0.up_proj.weight"] == "F32" and dtypes[layer + "mlp.gate.weight"] == "F32"
    assert lora_b and all(torch.count_nonzero(t) for t in lora_b)
