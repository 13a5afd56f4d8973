"""End-to-end fine-tuning on CPU with tiny models: training modes, resume, distributed, DeepSpeed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from internvl_chat.demo_data import make_demo_dataset
from internvl_chat.finetune import UserError, main
from internvl_chat.model import InternVLChatModel
from internvl_chat.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_tiny_model(root / "qwen2", llm="qwen2", template="internvl2_5", seed=0)
    make_tiny_model(root / "internlm2", llm="internlm2", template="internlm2-chat", seed=0)
    meta = make_demo_dataset(root / "data", num_images=6, seed=0)
    return root, meta


def read_weights(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_same_weights(expected, actual, atol=1e-6, rtol=1e-5):
    """Two checkpoints (directories or read_weights dicts) hold the same tensors."""
    expected = expected if isinstance(expected, dict) else read_weights(expected)
    actual = actual if isinstance(actual, dict) else read_weights(actual)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(expected[key], actual[key], atol=atol, rtol=rtol, msg=key)


def base_args(model, meta, out, *extra):
    return [
        "--model_name_or_path", str(model), "--meta_path", str(meta), "--output_dir", str(out),
        "--conv_style", "internvl2_5", "--force_image_size", "448", "--down_sample_ratio", "0.5",
        "--dynamic_image_size", "True", "--use_thumbnail", "True", "--max_dynamic_patch", "2",
        "--max_seq_length", "4096", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--weight_decay", "0.0",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
        "--seed", "7", "--bf16", "False", "--grad_checkpoint", "False", "--disable_tqdm", "True",
        *extra,
    ]


def test_overfit_drives_loss_down(workdir):
    root, meta = workdir
    out = root / "overfit"
    small = root / "small_meta.json"
    entry = json.loads(Path(meta).read_text())
    entry["demo_shapes"]["repeat_time"] = 0.25  # a handful of samples, seen many times
    small.write_text(json.dumps(entry))
    main(base_args(root / "qwen2", small, out, "--freeze_backbone", "True", "--max_steps", "40",
                   "--learning_rate", "3e-3"))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[0] > 3.0
    assert min(losses[-5:]) < 0.25 * losses[0], losses
    assert "tokens_per_second" in history[0] and "samples_per_second" in history[0]
    model = InternVLChatModel.from_pretrained(out)
    assert model.config.template == "internvl2_5" and model.config.max_dynamic_patch == 2


MODES = {
    "full_vit_frozen": (["--freeze_backbone", "True"], lambda k: not k.startswith("vision_model.")),
    "all": ([], lambda k: True),
    "llm_frozen_head": (["--freeze_backbone", "True", "--freeze_llm", "True", "--freeze_mlp", "True",
                         "--unfreeze_lm_head", "True"], lambda k: k == "language_model.lm_head.weight"),
    "mlp_only": (["--freeze_backbone", "True", "--freeze_llm", "True"], lambda k: k.startswith("mlp1.")),
    "vit_last_layer": (["--freeze_backbone", "True", "--freeze_llm", "True", "--freeze_mlp", "True",
                        "--unfreeze_vit_layers", "-1"], lambda k: k.startswith("vision_model.encoder.layers.1.")),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_only_planned_parameters_change(workdir, mode):
    root, meta = workdir
    flags, should_change = MODES[mode]
    out = root / f"mode_{mode}"
    main(base_args(root / "qwen2", meta, out, "--max_steps", "2", *flags))
    before, after = read_weights(root / "qwen2"), read_weights(out)
    assert before.keys() == after.keys()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        # LayerNorm biases etc. may legitimately stay put in 2 steps; frozen ones must never move
        if not should_change(key):
            assert not changed, f"{mode}: frozen {key} changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if should_change(k)), mode


@pytest.mark.parametrize("target", ["llm", "vit"])
def test_lora_trains_and_merges(workdir, target):
    root, meta = workdir
    out = root / f"lora_{target}"
    flags = ["--freeze_backbone", "True", "--freeze_llm", "True", "--freeze_mlp", "True"]
    flags += ["--use_llm_lora", "4"] if target == "llm" else ["--use_backbone_lora", "4"]
    main(base_args(root / "internlm2", meta, out, "--conv_style", "internlm2-chat", "--max_steps", "2", *flags))
    config = json.loads((out / "config.json").read_text())
    assert config[f"use_{'llm' if target == 'llm' else 'backbone'}_lora"] == 4
    weights = read_weights(out)
    base = read_weights(root / "internlm2")
    lora_b = [k for k in weights if "lora_B" in k]
    assert lora_b and any(torch.count_nonzero(weights[k]) for k in lora_b)
    prefix = "language_model.base_model.model." if target == "llm" else "vision_model.base_model.model."
    for key, value in weights.items():
        if "base_layer" in key:  # frozen base weights unchanged
            plain = key.replace(prefix, prefix.split(".")[0] + ".").replace(".base_layer", "")
            assert torch.equal(value, base[plain]), key
    merged = root / f"lora_{target}_merged"
    subprocess.run([sys.executable, str(REPO / "tools/merge_lora.py"), str(out), str(merged), "--dtype", "float32"],
                   check=True, capture_output=True)
    assert set(read_weights(merged)) == set(base)
    InternVLChatModel.from_pretrained(merged)


def test_resume_reproduces_uninterrupted_run(workdir):
    root, meta = workdir
    straight = root / "straight"
    main(base_args(root / "qwen2", meta, straight, "--freeze_backbone", "True", "--max_steps", "4"))
    resumed = root / "resumed"
    common = ["--freeze_backbone", "True", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1"]
    main(base_args(root / "qwen2", meta, resumed, *common, "--max_steps", "2"))
    assert (resumed / "checkpoint-2" / "internvl_chat_complete.json").exists()
    # a longer run than the finished one: other settings, so the folder refuses to auto-resume; resume on purpose
    with pytest.raises(UserError, match=r"max_steps: 2 -> 4"):
        main(base_args(root / "qwen2", meta, resumed, *common, "--max_steps", "4"))
    main(base_args(root / "qwen2", meta, resumed, *common, "--max_steps", "4",
                   "--resume_from_checkpoint", str(resumed / "checkpoint-2")))
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert_same_weights(straight, resumed)
    # rotation kept only the newest complete checkpoint
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4"]


def test_incomplete_checkpoint_is_never_resumed(workdir, tmp_path):
    from internvl_chat.train.checkpoint import select_resume_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "internvl_chat_complete.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # interrupted while saving: no marker
    assert select_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", "internvl_chat.finetune", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# Adam's first update is lr * g / (|g| + eps): an element whose gradient is zero up to float summation-order noise
# moves by anything in [-lr, lr], so runs that add gradients in another order (ranks, shards) are compared with an
# eps above that noise.
DIST_ARGS = ("--freeze_backbone", "True", "--max_steps", "2", "--loss_reduction_all_gather", "True",
             "--adam_epsilon", "1e-6")


@pytest.fixture(scope="module")
def single_run(workdir):
    """2 steps of batch 2 in one process: the reference for the distributed runs."""
    root, meta = workdir
    out = root / "single"
    main(base_args(root / "qwen2", meta, out, *DIST_ARGS))
    return read_weights(out)


def test_two_process_ddp_equals_single_process(workdir, single_run):
    """2 ranks x batch 1 == 1 process x batch 2 (the loss denominator is averaged over ranks)."""
    root, meta = workdir
    ddp = root / "ddp"
    _torchrun(2, base_args(root / "qwen2", meta, ddp, *DIST_ARGS, "--per_device_train_batch_size", "1"))
    assert_same_weights(single_run, ddp, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("config", ["zero_stage2_config.json", "zero_stage3_config.json",
                                    "zero_stage3_config_offload.json"])
def test_deepspeed_zero(workdir, single_run, config):
    """ZeRO-2/3 (and ZeRO-3 with CPU offload) on 2 CPU ranks train the same weights as one process; ZeRO-3
    output is consolidated in the official layout. The offload run JIT-builds DeepSpeed's CPU Adam once."""
    pytest.importorskip("deepspeed")
    root, meta = workdir
    out = root / config.replace(".json", "")
    ds_config = json.loads((REPO / config).read_text())
    if "optimizer" in ds_config:  # the offload config fixes Adam's eps; use the one of DIST_ARGS, all else as shipped
        ds_config["optimizer"]["params"]["eps"] = float(DIST_ARGS[DIST_ARGS.index("--adam_epsilon") + 1])
    (root / config).write_text(json.dumps(ds_config))
    _torchrun(2, base_args(root / "qwen2", meta, out, *DIST_ARGS, "--per_device_train_batch_size", "1",
                           "--deepspeed", str(root / config)))
    assert_same_weights(single_run, out, atol=2e-5, rtol=1e-4)
    model = InternVLChatModel.from_pretrained(out)
    assert model.config.template == "internvl2_5"


def test_packed_training_runs_without_max_steps(workdir):
    root, meta = workdir
    out = root / "packed"
    main(base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--use_packed_ds", "True",
                   "--max_packed_tokens", "3000", "--num_images_expected", "6", "--per_device_train_batch_size", "1",
                   "--num_train_epochs", "1", "--loss_reduction", "square"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] > 0
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert all(l == l and l > 0 for l in losses)  # finite, non-zero
    assert sum(h.get("samples_per_second", 0) > 0 for h in state["log_history"]) > 0


def test_qlora_trains_saves_and_merges(workdir):
    pytest.importorskip("bitsandbytes")
    root, meta = workdir
    out = root / "qlora"
    main(base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--freeze_llm", "True",
                   "--freeze_mlp", "True", "--use_llm_lora", "4", "--use_qlora", "True", "--max_steps", "3",
                   "--learning_rate", "1e-2"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["qlora_base_model"] == str(root / "qwen2")
    weights = read_weights(out)
    lora_b = [k for k in weights if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(weights[k]) for k in lora_b)
    merged = root / "qlora_merged"
    subprocess.run([sys.executable, str(REPO / "tools/merge_lora.py"), str(out), str(merged), "--dtype", "float32"],
                   check=True, capture_output=True)
    base, result = read_weights(root / "qwen2"), read_weights(merged)
    assert set(result) == set(base)
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], result[q])  # the adapter was merged into full-precision weights
    assert torch.equal(base["mlp1.1.weight"], result["mlp1.1.weight"])  # frozen parts untouched
    assert json.loads((merged / "config.json").read_text()).get("quantization_config") is None
    InternVLChatModel.from_pretrained(merged)


def test_arguments_from_a_json_file(workdir, tmp_path):
    root, meta = workdir
    out = tmp_path / "json_run"
    argv = base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--max_steps", "1")
    args = {}
    for key, value in zip(argv[::2], argv[1::2]):
        args[key.lstrip("-")] = {"True": True, "False": False}.get(value, value)
    for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "seed",
                "max_dynamic_patch", "max_seq_length", "force_image_size", "dataloader_num_workers"):
        args[key] = int(args[key])
    for key in ("learning_rate", "weight_decay", "down_sample_ratio"):
        args[key] = float(args[key])
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    main([str(path)])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


def test_killed_run_resumes_to_the_same_weights(workdir):
    """SIGKILL a real run right after its first checkpoint is complete, start it again, compare weights."""
    import signal
    import time

    root, meta = workdir
    common = ["--freeze_backbone", "True", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2"]
    straight = root / "kill_straight"
    main(base_args(root / "qwen2", meta, straight, *common))
    out = root / "kill_resumed"
    cmd = [sys.executable, "-m", "internvl_chat.finetune", *base_args(root / "qwen2", meta, out, *common)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "internvl_chat_complete.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "trainer_state.json").exists() or proc.returncode != 0
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert_same_weights(straight, out)


def test_resume_in_a_later_epoch_with_length_grouping(workdir):
    """group_by_length (the launchers' default): a run resumed in its second epoch sees that epoch's order."""
    root, meta = workdir
    small = root / "small_meta_epochs.json"
    entry = json.loads(Path(meta).read_text())
    entry["demo_shapes"]["repeat_time"] = 0.25
    small.write_text(json.dumps(entry))
    common = ["--freeze_backbone", "True", "--group_by_length", "True", "--save_strategy", "steps",
              "--save_steps", "1", "--max_steps", "7"]
    straight = root / "epochs_straight"
    main(base_args(root / "qwen2", small, straight, *common))
    state = json.loads((straight / "trainer_state.json").read_text())
    per_epoch = round(state["global_step"] / state["epoch"])
    assert per_epoch < 7, "the run must cross an epoch"
    resume_at = per_epoch + 1  # a checkpoint inside the second epoch
    resumed = root / "epochs_resumed"
    main(base_args(root / "qwen2", small, resumed, *common[:-1], str(resume_at)))
    main(base_args(root / "qwen2", small, resumed, *common,
                   "--resume_from_checkpoint", str(resumed / f"checkpoint-{resume_at}")))
    assert_same_weights(straight, resumed)


def test_bf16_without_deepspeed_keeps_fp32_master_weights(workdir):
    """Plain bf16 weights would round away updates this small; checkpoints keep fp32 masters, the final save is bf16."""
    root, meta = workdir
    out = root / "bf16_master"
    main(base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--bf16", "True", "--learning_rate", "1e-5",
                   "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"))
    base, ckpt, final = read_weights(root / "qwen2"), read_weights(out / "checkpoint-2"), read_weights(out)
    key = "language_model.model.layers.0.mlp.down_proj.weight"
    assert ckpt[key].dtype == torch.float32 and ckpt["vision_model.embeddings.patch_embedding.weight"].dtype \
        == torch.bfloat16
    assert not torch.equal(ckpt[key], base[key].to(torch.bfloat16).float()), "the update was rounded away"
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
