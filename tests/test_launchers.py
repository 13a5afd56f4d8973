"""The shell launchers: every shipped script and meta JSON, the shared launcher's arithmetic and command lines, and
real runs through the scripts on a tiny model.

Command lines are checked with a fake `python` / `srun` first on PATH that record their argv and environment
(no training); the end-to-end tests run the real scripts on CPU. The Slurm tests only run where `sinfo` reaches
a controller (a one-node Slurm from the Debian `slurm-wlm` packages is enough).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHELL = REPO / "shell"
LAUNCH = SHELL / "launch.sh"
SBATCH = SHELL / "slurm" / "finetune.sbatch"
E2E_SCRIPT = "shell/internvl2.5/2nd_finetune/internvl2_5_1b_dynamic_res_2nd_finetune_full.sh"
EXAMPLE_META = "shell/data/example_finetune.json"

# Variables the launchers read; cleared (with the SLURM_* of an enclosing job, but not SLURM_CONF, which says where
# the cluster is) so the caller's environment cannot leak into a test.
LAUNCH_VARS = (
    "GPUS", "BATCH_SIZE", "PER_DEVICE_BATCH_SIZE", "MODEL", "META_PATH", "OUTPUT_DIR", "DEEPSPEED", "PARTITION",
    "GPUS_PER_NODE", "CPUS_PER_TASK", "QUOTA_TYPE", "SRUN_ARGS", "NNODES", "NODE_RANK", "MASTER_ADDR",
    "MASTER_PORT", "USE_GPU", "PYTHON", "CUDA_VISIBLE_DEVICES", "SCRIPT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
    "DEFAULT_GPUS", "DEFAULT_DEEPSPEED", "TORCH_EXTENSIONS_DIR",
)

# The flags every official 2nd-finetune script passes, minus --overwrite_output_dir.
OFFICIAL_COMMON = {
    "--force_image_size": "448", "--down_sample_ratio": "0.5", "--vision_select_layer": "-1",
    "--dataloader_num_workers": "4", "--bf16": "True", "--num_train_epochs": "1", "--evaluation_strategy": "no",
    "--save_strategy": "steps", "--save_steps": "200", "--warmup_ratio": "0.03", "--lr_scheduler_type": "cosine",
    "--logging_steps": "1", "--do_train": "True", "--grad_checkpoint": "True", "--group_by_length": "True",
    "--dynamic_image_size": "True", "--use_thumbnail": "True", "--ps_version": "v2", "--report_to": "tensorboard",
}


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


make_launchers = _load_tool("make_launchers")
make_example_data = _load_tool("make_example_data")
LAUNCHERS = make_launchers.all_launchers()
BY_PATH = {launcher.path: launcher for launcher in LAUNCHERS}


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in LAUNCH_VARS and (not k.startswith("SLURM_") or k == "SLURM_CONF")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


# ------------------------------------------------------------------------------------------------------------
# fake python / srun / sinfo / scontrol / nvidia-smi

FAKE_RECORDER = """#!/bin/sh
# records its argv (NUL-separated) and environment, then exits with FAKE_EXIT; the launcher's preflight call
# (`-m internvl_chat.finetune --preflight ...`) is recorded as {name}.preflight and exits with FAKE_PREFLIGHT_EXIT
case " $* " in
    *" --preflight "*)
        printf '%s\\0' "$@" > "$FAKE_DIR/{name}.preflight.argv"
        env -0 > "$FAKE_DIR/{name}.preflight.env"
        echo "fake {name} preflight"
        exit "${{FAKE_PREFLIGHT_EXIT:-0}}" ;;
esac
printf '%s\\0' "$@" > "$FAKE_DIR/{name}.argv"
env -0 > "$FAKE_DIR/{name}.env"
echo "fake {name} ran"
exit "${{FAKE_EXIT:-0}}"
"""


class Fakes:
    """A bin/ folder of recording stand-ins, and how to run a launcher with it first on PATH."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.records = root / "records"
        self.bin.mkdir(parents=True)
        self.records.mkdir()
        for name in ("python", "srun"):
            self.script(name, FAKE_RECORDER.format(name=name))
        for launcher in LAUNCHERS:  # the launchers refuse a MODEL that is not a local folder
            (root / launcher.env["MODEL"]).mkdir(parents=True, exist_ok=True)

    def script(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def printer(self, name: str, output: str, rc: int = 0) -> None:
        self.script(name, f"#!/bin/sh\nprintf '%b' '{output}'\nexit {rc}\n")

    def env(self, **overrides: str | None) -> dict[str, str]:
        """The fake python (not the repository's .venv) and no GPU unless overridden; None removes a variable."""
        env = clean_environ()
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", FAKE_DIR=str(self.records), USE_GPU="0",
                   PYTHON="python")
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    def gpus(self, count: int) -> None:
        """A fake nvidia-smi listing `count` GPUs (0: a machine whose driver sees none)."""
        self.printer("nvidia-smi", "".join(f"GPU {i}: H100 (UUID: {i})\\n" for i in range(count)))

    def run(self, script: str | Path, *args: str, cwd: Path | None = None, **env: str | None):
        for old in self.records.iterdir():
            old.unlink()
        return subprocess.run(
            ["sh", str(script), *args], cwd=cwd or self.root, env=self.env(**env), capture_output=True, text=True,
            timeout=60,
        )

    def argv(self, name: str) -> list[str] | None:
        path = self.records / f"{name}.argv"
        return path.read_bytes().decode().split("\0")[:-1] if path.exists() else None

    def recorded_env(self, name: str) -> dict[str, str]:
        items = (self.records / f"{name}.env").read_bytes().decode().split("\0")
        return dict(item.split("=", 1) for item in items if "=" in item)


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def split_torchrun(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """fake python argv -> (torchrun options, finetune args)."""
    assert argv[:2] == ["-m", "torch.distributed.run"], argv[:4]
    cut = argv.index("internvl_chat.finetune")
    assert argv[cut - 1] == "-m"
    options = dict(item[2:].split("=", 1) for item in argv[2:cut - 1])
    return options, argv[cut + 1:]


def flag_dict(args: list[str]) -> dict[str, str]:
    """`--key value` pairs, the last occurrence winning (as argparse does)."""
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return dict(zip(args[::2], args[1::2]))


# ------------------------------------------------------------------------------------------------------------
# the shipped files


def test_generated_launchers_match_the_table():
    expected = make_launchers.expected_files()
    on_disk = {p.relative_to(REPO).as_posix() for p in SHELL.rglob("*.sh")} - {"shell/launch.sh", "shell/common.sh"}
    assert on_disk == set(expected), "launchers on disk and the table in tools/make_launchers.py differ"
    for rel, text in expected.items():
        assert (REPO / rel).read_text() == text, f"{rel} is stale: run python tools/make_launchers.py"
    assert make_launchers.main(["--check"]) == 0


def test_generator_writes_every_launcher(tmp_path: Path):
    assert make_launchers.main(["--root", str(tmp_path)]) == 0
    for rel, text in make_launchers.expected_files().items():
        assert (tmp_path / rel).read_text() == text


SHIPPED_SHELL = sorted(p.relative_to(REPO).as_posix() for p in [*SHELL.rglob("*.sh"), *SHELL.rglob("*.sbatch")])


@pytest.mark.parametrize("rel", SHIPPED_SHELL)
def test_shell_files_parse(rel: str):
    result = subprocess.run(["sh", "-n", str(REPO / rel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("bash"):
        result = subprocess.run(["bash", "-n", str(REPO / rel)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_expected_launcher_set():
    """The scripts users know, at the official paths."""
    names = {Path(p).name for p in BY_PATH}
    v20 = ["1b_qwen2_0_5b", "2b_internlm2_1_8b", "4b_phi3_3_8b", "8b_internlm2_7b", "26b_internlm2_20b",
           "40b_hermes2_yi_34b", "76b_hermes2_llama3_70b"]
    v25 = ["1b", "2b", "4b", "8b", "26b", "38b", "78b"]
    v15 = ["internlm2_20b", "internlm2_1_8b", "phi3_3_8b"]
    v30 = ["1b", "2b", "8b", "9b", "14b", "38b", "78b"]
    v35 = ["1b", "2b", "4b", "8b", "14b", "38b", "30b_a3b", "gpt_oss_20b_a4b", "241b_a28b"]
    want = set()
    for mode in ("full", "lora"):
        want |= {f"internvl2_{m}_dynamic_res_2nd_finetune_{mode}.sh" for m in v20}
        want |= {f"internvl2_5_{m}_dynamic_res_2nd_finetune_{mode}.sh" for m in v25}
        want |= {f"internvl_chat_v1_5_{m}_dynamic_res_2nd_finetune_{mode}.sh" for m in v15}
        want |= {f"internvl3_{m}_dynamic_res_2nd_finetune_{mode}.sh" for m in v30}
        want |= {f"internvl3_5_{m}_dynamic_res_2nd_finetune_{mode}.sh" for m in v35}
    assert names == want
    folders = {Path(p).parent.as_posix() for p in BY_PATH if Path(p).name.startswith("internvl3")}
    assert folders == {"shell/internvl3.0/2nd_finetune", "shell/internvl3.5/2nd_finetune"}


@pytest.mark.parametrize("path", sorted(BY_PATH))
def test_launcher_settings_follow_the_official_rules(path: str):
    from internvl_chat.data.templates import TEMPLATE_NAMES

    launcher = BY_PATH[path]
    env, flags = launcher.env, dict(launcher.flags)
    assert len(flags) == len(launcher.flags), "each flag once"
    gpus, batch, per_device = int(env["GPUS"]), int(env["BATCH_SIZE"]), int(env["PER_DEVICE_BATCH_SIZE"])
    assert batch % (per_device * gpus) == 0, "the defaults must give a whole GRADIENT_ACC"
    assert (REPO / env["DEEPSPEED"]).is_file()
    assert env["OUTPUT_DIR"].endswith("/" + Path(path).stem)
    full = launcher.mode == "full"
    if full:
        assert (flags["--freeze_llm"], flags["--freeze_mlp"]) == ("False", "False")
        assert "--use_llm_lora" not in flags
    else:  # every LoRA script, official (1.5 - 2.5) or following them (3.0, 3.5)
        assert (batch, flags["--freeze_llm"], flags["--freeze_mlp"], flags["--freeze_backbone"]) == (
            16, "True", "True", "True")
        assert (flags["--use_llm_lora"], flags["--drop_path_rate"]) == ("16", "0.0")
    family = path.split("/")[1]
    if family == "internvl3.5":  # the official SFT scripts' own defaults
        assert env["MODEL"].startswith("OpenGVLab/InternVL3_5-")
        assert env["OUTPUT_DIR"].startswith("work_dirs/internvl_chat_v3_5/")
        assert (env["DEEPSPEED"], per_device) == ("zero_stage3_config.json", 1)
        assert (flags["--use_packed_ds"], flags["--loss_reduction"], flags["--group_by_length"]) == (
            "True", "square", "False")
        assert (flags["--max_packed_tokens"], flags["--num_images_expected"]) == ("32768", "96")
        assert (flags["--max_seq_length"], flags["--max_dynamic_patch"]) == ("32768", "12")
        assert flags["--conv_style"] == ("internvl3_5_gpt_oss" if "gpt_oss" in path else "internvl2_5")
        assert flags["--learning_rate"] == ("2e-5" if "241b" in path else "8e-5")
        if full:
            assert (batch, flags["--freeze_backbone"]) == (512, "False"), "the official SFT trains the ViT"
        else:
            assert gpus == (16 if "241b" in path else 2)
        for gone in ("--max_steps", "--split_annotations", "--use_custom_flash_attn", "--gradient_checkpointing"):
            assert gone not in flags
    else:
        assert flags["--freeze_backbone"] == "True"
        assert "--use_packed_ds" not in flags and "--loss_reduction" not in flags
        if full:
            assert batch == 128
        else:
            assert gpus in (2, 8)
        big = "zero_stage3" in env["DEEPSPEED"]  # bigger models: smaller per-device batch, lower LR, ZeRO-3
        if family == "internvl3.0":
            assert env["MODEL"].startswith("OpenGVLab/InternVL3-")
            assert (flags["--conv_style"], flags["--use_fast_tokenizer"]) == ("internvl2_5", "False")
            assert (flags["--max_seq_length"], flags["--max_dynamic_patch"]) == ("16384", "12")
            assert env["OUTPUT_DIR"].startswith("work_dirs/internvl_chat_v3/")
            assert (per_device <= 2, flags["--learning_rate"]) == (
                (True, "2e-5") if big else (False, "1e-5" if "_1b_" in path else "2e-5"))
        else:
            if full:
                assert float(flags["--drop_path_rate"]) in (0.1, 0.4)
            assert (flags["--learning_rate"], per_device <= 2) == (("2e-5", True) if big else ("4e-5", False))
            if family == "internvl2.5":
                assert env["MODEL"].startswith("OpenGVLab/InternVL2_5-")
                assert (flags["--conv_style"], flags["--use_fast_tokenizer"]) == ("internvl2_5", "False")
                assert (flags["--max_seq_length"], flags["--max_dynamic_patch"]) == ("8192", "6")
                assert env["OUTPUT_DIR"].startswith("work_dirs/internvl_chat_v2_5/")
            elif family == "internvl2.0":
                assert env["MODEL"].startswith("./pretrained/InternVL2-")
                assert (flags["--max_seq_length"], flags["--max_dynamic_patch"]) == ("4096", "6")
                assert env["OUTPUT_DIR"].startswith("work_dirs/internvl_chat_v2_0/")
            else:
                assert family == "internvl1.5"
                assert (flags["--max_seq_length"], flags["--max_dynamic_patch"]) == ("4096", "12")
                assert env["OUTPUT_DIR"].startswith("work_dirs/internvl_chat_v1_5/")
    assert flags["--conv_style"] in TEMPLATE_NAMES, f"unknown template {flags['--conv_style']}"


# ------------------------------------------------------------------------------------------------------------
# the shared launcher, with a fake python


@pytest.mark.parametrize("path", sorted(BY_PATH))
def test_every_launcher_command_line(fakes: Fakes, path: str):
    """Each script, with its own defaults on a machine with enough GPUs, run from another directory: torchrun
    options, GRADIENT_ACC, the official common flags, the table's model flags, DeepSpeed resolved against the
    repository."""
    launcher = BY_PATH[path]
    env = launcher.env
    fakes.gpus(64)  # the most any script asks for (InternVL3.5-241B full)
    result = fakes.run(REPO / path, MASTER_PORT="29999", USE_GPU="auto")
    assert result.returncode == 0, result.stderr
    assert "CPU" not in result.stdout and "DeepSpeed" not in result.stdout  # no notes on a GPU machine
    options, args = split_torchrun(fakes.argv("python"))
    gpus, batch, per_device = int(env["GPUS"]), int(env["BATCH_SIZE"]), int(env["PER_DEVICE_BATCH_SIZE"])
    assert options == {"nnodes": "1", "node_rank": "0", "master_addr": "127.0.0.1",
                       "nproc_per_node": str(gpus), "master_port": "29999"}
    flags = flag_dict(args)
    assert flags["--gradient_accumulation_steps"] == str(batch // (per_device * gpus))
    assert flags["--per_device_train_batch_size"] == str(per_device)
    own = dict(launcher.flags)  # InternVL3.5's scripts override two common flags (workers, length grouping)
    for key, value in OFFICIAL_COMMON.items():
        assert flags[key] == own.get(key, value), key
    for key, value in launcher.flags:
        assert flags[key] == value, key
    # and our finetune accepts every flag, reading the value the script means (the last one given)
    from internvl_chat.finetune import read_flags

    values = read_flags(args).values
    for key, value in launcher.flags:
        parsed = values[key[2:]]
        if isinstance(parsed, bool):
            assert str(parsed) == value, key
        elif isinstance(parsed, (int, float)):
            assert parsed == float(value), key
        else:
            assert parsed == value, key
    assert flags["--save_total_limit"] == ("2" if "v1_5" in path and launcher.mode == "full" else "1")
    assert "--overwrite_output_dir" not in flags, "resuming is the default: never overwrite"
    assert flags["--model_name_or_path"] == env["MODEL"]
    assert flags["--output_dir"] == env["OUTPUT_DIR"]
    # the default meta file, found in the repository although the script ran elsewhere
    assert Path(flags["--meta_path"]).resolve() == REPO / "shell/data/internvl_1_2_finetune_custom.json"
    assert flags["--deepspeed"] == str(REPO / env["DEEPSPEED"])
    log = fakes.root / env["OUTPUT_DIR"] / "training_log.txt"
    assert "fake python ran" in log.read_text()


@pytest.mark.parametrize(
    "gpus, per_device, batch, nnodes",
    [(1, 1, 2, 1), (8, 1, 128, 1), (8, 4, 128, 1), (2, 2, 16, 1), (3, 2, 12, 1), (8, 2, 128, 2), (4, 1, 64, 4)],
)
def test_gradient_accumulation(fakes: Fakes, gpus: int, per_device: int, batch: int, nnodes: int):
    result = fakes.run(REPO / E2E_SCRIPT, GPUS=str(gpus), PER_DEVICE_BATCH_SIZE=str(per_device),
                       BATCH_SIZE=str(batch), NNODES=str(nnodes))
    assert result.returncode == 0, result.stderr
    options, args = split_torchrun(fakes.argv("python"))
    flags = flag_dict(args)
    world = gpus * nnodes
    assert int(flags["--gradient_accumulation_steps"]) * int(flags["--per_device_train_batch_size"]) * world == batch
    assert (options["nproc_per_node"], options["nnodes"]) == (str(gpus), str(nnodes))
    assert f"global batch {batch}" in result.stdout


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(GPUS="8", PER_DEVICE_BATCH_SIZE="3", BATCH_SIZE="128"), ["BATCH_SIZE=128", "24", "120", "144"]),
        (dict(GPUS="8", PER_DEVICE_BATCH_SIZE="4", BATCH_SIZE="16"), ["smaller", "BATCH_SIZE=16", "32"]),
        (dict(GPUS="2", NNODES="2", PER_DEVICE_BATCH_SIZE="2", BATCH_SIZE="12"), ["NNODES=2", "8"]),
        (dict(GPUS="eight"), ["GPUS", "eight"]),
        (dict(GPUS="0"), ["GPUS", "positive"]),
        (dict(PER_DEVICE_BATCH_SIZE="-1"), ["PER_DEVICE_BATCH_SIZE"]),
        (dict(NNODES="2", NODE_RANK="2"), ["NODE_RANK=2", "NNODES=2"]),
        (dict(USE_GPU="maybe"), ["USE_GPU"]),
        (dict(DEEPSPEED="no_such_config.json"), ["no_such_config.json", "DEEPSPEED=none"]),
        (dict(META_PATH="no_such_meta.json"), ["META_PATH=no_such_meta.json", "example_finetune.json"]),
        (dict(PARTITION="p", GPUS="12", GPUS_PER_NODE="8"), ["GPUS=12", "GPUS_PER_NODE=8"]),
    ],
)
def test_bad_settings_fail_before_launching(fakes: Fakes, overrides: dict, words: list[str]):
    result = fakes.run(REPO / E2E_SCRIPT, **overrides)
    assert result.returncode == 2
    for word in words:
        assert word in result.stderr
    assert fakes.argv("python") is None and fakes.argv("srun") is None


def test_launch_sh_needs_a_model(fakes: Fakes):
    result = fakes.run(LAUNCH)
    assert result.returncode == 2 and "MODEL" in result.stderr


def test_launch_sh_refuses_a_model_that_is_not_a_folder(fakes: Fakes):
    """Training never downloads: a hub id or a missing ./pretrained folder stops before torchrun starts."""
    for model in ("OpenGVLab/InternVL2_5-8B-not-here", "./pretrained/InternVL2-1B-not-here"):
        result = fakes.run(REPO / E2E_SCRIPT, MODEL=model)
        assert result.returncode == 2 and f"MODEL={model} is not a local folder" in result.stderr
        assert "huggingface-cli download OpenGVLab/" in result.stderr
        assert fakes.argv("python") is None


def test_launch_sh_alone_has_safe_defaults(fakes: Fakes):
    (fakes.root / "m").mkdir()
    result = fakes.run(LAUNCH, "--conv_style", "Hermes-2", MODEL="m")
    assert result.returncode == 0, result.stderr
    options, args = split_torchrun(fakes.argv("python"))
    flags = flag_dict(args)
    assert options["nproc_per_node"] == "1"
    assert (flags["--gradient_accumulation_steps"], flags["--output_dir"]) == ("1", "work_dirs/finetune")
    assert "--deepspeed" not in flags and flags["--conv_style"] == "Hermes-2"


def test_extra_args_pass_through_and_win(fakes: Fakes):
    result = fakes.run(REPO / E2E_SCRIPT, "--max_steps", "2", "--learning_rate", "1e-6", "--bf16", "False",
                       "--meta_path", "a b.json", GPUS="1", PER_DEVICE_BATCH_SIZE="1", BATCH_SIZE="2")
    assert result.returncode == 0, result.stderr
    _, args = split_torchrun(fakes.argv("python"))
    assert args[-8:] == ["--max_steps", "2", "--learning_rate", "1e-6", "--bf16", "False", "--meta_path", "a b.json"]
    flags = flag_dict(args)
    assert (flags["--learning_rate"], flags["--bf16"], flags["--meta_path"]) == ("1e-6", "False", "a b.json")
    assert "'a b.json'" in result.stdout  # the logged command line is copy-pasteable


@pytest.mark.parametrize("form", ["split", "joined"])
def test_output_dir_flag_moves_the_log_too(fakes: Fakes, tmp_path: Path, form: str):
    out = tmp_path / f"flag {form}"
    args = ["--output_dir", str(out)] if form == "split" else [f"--output_dir={out}"]
    result = fakes.run(REPO / E2E_SCRIPT, *args, GPUS="1", BATCH_SIZE="4", OUTPUT_DIR=str(tmp_path / "env"))
    assert result.returncode == 0, result.stderr
    assert "fake python ran" in (out / "training_log.txt").read_text()
    assert not (tmp_path / "env").exists()


def test_environment_and_overrides(fakes: Fakes, tmp_path: Path):
    out = tmp_path / "my out"
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    result = fakes.run(REPO / E2E_SCRIPT, GPUS="2", PER_DEVICE_BATCH_SIZE="1", BATCH_SIZE="4", MODEL=str(tmp_path),
                       META_PATH=str(meta), OUTPUT_DIR=str(out), DEEPSPEED="none", PYTHONPATH="/keep/me")
    assert result.returncode == 0, result.stderr
    env = fakes.recorded_env("python")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/keep/me"]
    assert (env["MASTER_PORT"], env["TF_CPP_MIN_LOG_LEVEL"], env["PYTHONUNBUFFERED"]) == ("34229", "3", "1")
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # USE_GPU=0 hides the GPUs
    _, args = split_torchrun(fakes.argv("python"))
    flags = flag_dict(args)
    assert (flags["--model_name_or_path"], flags["--meta_path"], flags["--output_dir"]) == (
        str(tmp_path), str(meta), str(out))
    assert "not a local folder" not in result.stderr
    assert "--deepspeed" not in flags
    log = (out / "training_log.txt").read_text()
    assert log.startswith("==> ") and "fake python ran" in log
    # a second run appends to the same log (resuming keeps the history)
    fakes.run(REPO / E2E_SCRIPT, GPUS="2", PER_DEVICE_BATCH_SIZE="1", BATCH_SIZE="4", OUTPUT_DIR=str(out))
    assert (out / "training_log.txt").read_text().count("fake python ran") == 2


def test_exit_status_is_the_trainers(fakes: Fakes, tmp_path: Path):
    result = fakes.run(REPO / E2E_SCRIPT, GPUS="1", BATCH_SIZE="4", OUTPUT_DIR=str(tmp_path / "o"), FAKE_EXIT="3")
    assert result.returncode == 3
    assert "fake python ran" in result.stdout and "status 3" in result.stderr


def test_multi_node_torchrun(fakes: Fakes):
    result = fakes.run(REPO / E2E_SCRIPT, GPUS="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3",
                       MASTER_PORT="30000", PER_DEVICE_BATCH_SIZE="4", BATCH_SIZE="128", OUTPUT_DIR="o")
    assert result.returncode == 0, result.stderr
    options, args = split_torchrun(fakes.argv("python"))
    assert options == {"nnodes": "2", "node_rank": "1", "master_addr": "10.1.2.3", "nproc_per_node": "8",
                       "master_port": "30000"}
    assert flag_dict(args)["--gradient_accumulation_steps"] == "2"  # 128 / (4 x 8 x 2)
    assert (fakes.root / "o" / "training_log_node1.txt").is_file()
    assert not (fakes.root / "o" / "training_log.txt").exists()


def test_gpu_count_is_checked_for_torchrun(fakes: Fakes):
    fakes.printer("nvidia-smi", "GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\n")
    result = fakes.run(REPO / E2E_SCRIPT, USE_GPU="auto", GPUS="4", BATCH_SIZE="16")
    assert result.returncode == 2 and "2 GPU" in result.stderr and "NNODES" in result.stderr
    result = fakes.run(REPO / E2E_SCRIPT, USE_GPU="auto", GPUS="2", BATCH_SIZE="16")
    assert result.returncode == 0, result.stderr
    assert "CUDA_VISIBLE_DEVICES" not in fakes.recorded_env("python")
    result = fakes.run(REPO / E2E_SCRIPT, USE_GPU="auto", GPUS="2", BATCH_SIZE="16", CUDA_VISIBLE_DEVICES="3")
    assert result.returncode == 2 and "1 GPU" in result.stderr


# ---- defaults that depend on the machine: python, CPU processes, DeepSpeed ----


def test_repository_venv_python_is_the_default(fakes: Fakes, tmp_path: Path):
    """PYTHON unset: the .venv next to shell/ is used even when the `python` on PATH is another (failing) one;
    without a .venv, `python` from PATH; PYTHON set wins. The start-up line names the interpreter."""
    repo = tmp_path / "repo"
    (repo / "shell").mkdir(parents=True)
    for name in ("launch.sh", "common.sh"):
        shutil.copy(SHELL / name, repo / "shell" / name)
    (repo / "m").mkdir()
    meta = repo / "meta.json"
    meta.write_text("{}")
    fakes.script("python", "#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")
    run = dict(MODEL="m", META_PATH=str(meta), OUTPUT_DIR="o", PYTHON=None)
    assert fakes.run(repo / "shell" / "launch.sh", cwd=repo, **run).returncode == 1  # no .venv: PATH's python

    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(FAKE_RECORDER.format(name="venv_python"))
    venv_python.chmod(0o755)
    result = fakes.run(repo / "shell" / "launch.sh", "--max_steps", "1", cwd=repo, **run)
    assert result.returncode == 0, result.stderr
    assert f"python: {venv_python}\n" in result.stdout and "fake venv_python ran" in result.stdout
    options, args = split_torchrun(fakes.argv("venv_python"))
    assert options["nproc_per_node"] == "1" and flag_dict(args)["--max_steps"] == "1"

    fakes.script("python", FAKE_RECORDER.format(name="python"))
    result = fakes.run(repo / "shell" / "launch.sh", cwd=repo, **{**run, "PYTHON": "python"})
    assert result.returncode == 0 and "python: python\n" in result.stdout
    assert fakes.argv("python") and not fakes.argv("venv_python")
    result = fakes.run(repo / "shell" / "launch.sh", cwd=repo, **{**run, "PYTHON": "no-such-python"})
    assert result.returncode == 2 and "PYTHON=no-such-python not found" in result.stderr


@pytest.mark.parametrize("hide", ["no GPU visible", "USE_GPU=0"])
def test_cpu_defaults_one_process_no_deepspeed(fakes: Fakes, hide: str):
    """A per-model script (8 GPUs, ZeRO-1 by default) on a machine without a GPU: 1 CPU process and no DeepSpeed,
    each said in one line of the console and the log; the global batch is kept."""
    fakes.gpus(0)
    result = fakes.run(REPO / E2E_SCRIPT, OUTPUT_DIR="o", USE_GPU="auto" if hide == "no GPU visible" else "0")
    assert result.returncode == 0, result.stderr
    options, args = split_torchrun(fakes.argv("python"))
    flags = flag_dict(args)
    assert options["nproc_per_node"] == "1" and "--deepspeed" not in flags
    assert flags["--gradient_accumulation_steps"] == "32"  # 128 / (4 per device x 1 process)
    notes = [line for line in result.stdout.splitlines() if line.startswith("==> ") and hide in line]
    assert notes == [f"==> {hide}: 1 CPU process (set GPUS=N for more)",
                     f"==> {hide}: DeepSpeed off, plain DDP (DEEPSPEED=zero_stage1_config.json to use it; on CPU it "
                     "first compiles ops, ~3 min)"]
    assert all(note in (fakes.root / "o" / "training_log.txt").read_text() for note in notes)


def test_cpu_honours_explicit_gpus_and_deepspeed(fakes: Fakes, tmp_path: Path):
    """GPUS and DEEPSPEED given on CPU are kept; the one-off DeepSpeed op build is announced until it is cached."""
    fakes.gpus(0)
    cache = tmp_path / "torch_extensions"
    run = dict(USE_GPU="auto", GPUS="2", DEEPSPEED="zero_stage1_config.json", TORCH_EXTENSIONS_DIR=str(cache),
               OUTPUT_DIR="o")
    result = fakes.run(REPO / E2E_SCRIPT, **run)
    assert result.returncode == 0, result.stderr
    options, args = split_torchrun(fakes.argv("python"))
    assert options["nproc_per_node"] == "2"
    assert flag_dict(args)["--deepspeed"] == str(REPO / "zero_stage1_config.json")
    assert "CPU process" not in result.stdout and "DeepSpeed off" not in result.stdout
    build = [line for line in result.stdout.splitlines() if "compiles its CPU ops" in line]
    assert len(build) == 1 and "about 3 minutes" in build[0] and str(cache) in build[0]
    for op in ("cpu_adam/cpu_adam.so", "deepspeed_shm_comm/deepspeed_shm_comm.so"):
        (cache / "py311_cpu" / op).parent.mkdir(parents=True)
        (cache / "py311_cpu" / op).write_text("")
    result = fakes.run(REPO / E2E_SCRIPT, **run)
    assert result.returncode == 0 and "compiles" not in result.stdout  # already built: nothing to announce
    result = fakes.run(REPO / E2E_SCRIPT, **{**run, "DEEPSPEED": "none", "GPUS": None})
    assert "--deepspeed" not in fakes.argv("python") and "DeepSpeed" not in result.stdout  # asked for: no note


# ---- the older paths the Mini-InternVL guide quotes ----


@pytest.mark.parametrize("alias", sorted(make_launchers.ALIASES))
def test_guide_alias_runs_its_script(fakes: Fakes, tmp_path: Path, alias: str):
    """Run from the repository root as the guide does, an alias gives exactly the command and environment of the
    Mini-InternVL full fine-tune script it stands for, extra flags and variables included."""
    target = make_launchers.alias_target(alias)
    assert (REPO / target.path).is_file() and target.mode == "full"
    assert target.row.title.startswith(("Mini-InternVL-Chat-2B-V1-5", "Mini-InternVL-Chat-4B-V1-5"))
    assert target.row.name.split("_v1_5_")[1] in alias  # internlm2_1_8b / phi3_3_8b
    fakes.gpus(8)
    run = dict(USE_GPU="auto", MODEL=str(tmp_path), OUTPUT_DIR=str(tmp_path / "o"), PER_DEVICE_BATCH_SIZE="2")
    seen = []
    for script in (alias, target.path):
        result = fakes.run(script, "--max_steps", "3", "--learning_rate", "1e-5", cwd=REPO, **run)
        assert result.returncode == 0, result.stderr
        env = fakes.recorded_env("python")
        seen.append((fakes.argv("python"), env["PER_DEVICE_BATCH_SIZE"], env["DEFAULT_GPUS"]))
    assert seen[0] == seen[1]
    flags = flag_dict(split_torchrun(seen[0][0])[1])
    assert (flags["--max_steps"], flags["--learning_rate"], flags["--per_device_train_batch_size"]) == (
        "3", "1e-5", "2")
    assert (flags["--freeze_llm"], flags["--freeze_mlp"]) == ("False", "False")


# ---- srun ----


def split_srun(argv: list[str]) -> tuple[list[str], list[str]]:
    cut = argv.index("internvl_chat.finetune")
    assert argv[cut - 3:cut] == ["python", "-u", "-m"], argv[cut - 3:cut]
    return argv[:cut - 3], argv[cut + 1:]


def test_srun_command_line(fakes: Fakes):
    result = fakes.run(REPO / E2E_SCRIPT, PARTITION="p1", GPUS="16", GPUS_PER_NODE="8", QUOTA_TYPE="reserved",
                       SRUN_ARGS="--time=1:00:00 --exclusive", USE_GPU="1", OUTPUT_DIR="o")
    assert result.returncode == 0, result.stderr
    assert fakes.argv("python") is None
    srun, args = split_srun(fakes.argv("srun"))
    assert srun == ["-p", "p1", "--gres=gpu:8", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8",
                    "--cpus-per-task=10", "--kill-on-bad-exit=1", "--quotatype=reserved", "--time=1:00:00",
                    "--exclusive"]
    flags = flag_dict(args)
    assert flags["--gradient_accumulation_steps"] == "2"  # 128 / (4 x 16): GPUS is the total under srun
    assert flags["--conv_style"] == "internvl2_5"
    env = fakes.recorded_env("srun")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO) and env["MASTER_PORT"] == "34229"
    assert "MASTER_ADDR" not in env  # each task learns it from Slurm (internvl_chat.distributed)
    assert "fake srun ran" in (fakes.root / "o" / "training_log.txt").read_text()


@pytest.mark.parametrize(
    "sinfo, use_gpu, gres",
    [("gpu:8", "auto", "--gres=gpu:2"), ("gpu:a100:4(S:0-1)", "auto", "--gres=gpu:2"), ("(null)", "auto", None),
     (None, "auto", "--gres=gpu:2"), ("gpu:8", "0", None), ("(null)", "1", "--gres=gpu:2")],
)
def test_srun_gpu_or_cpu(fakes: Fakes, sinfo: str | None, use_gpu: str, gres: str | None):
    if sinfo is None:
        fakes.printer("sinfo", "", rc=1)  # no controller reachable: assume a GPU cluster
    else:
        fakes.printer("sinfo", sinfo + "\\n")
    result = fakes.run(REPO / E2E_SCRIPT, PARTITION="p", GPUS="2", CPUS_PER_TASK="1", USE_GPU=use_gpu,
                       BATCH_SIZE="8", OUTPUT_DIR="o")
    assert result.returncode == 0, result.stderr
    srun, _ = split_srun(fakes.argv("srun"))
    assert [a for a in srun if a.startswith("--gres")] == ([gres] if gres else [])
    assert srun[srun.index("-p") + 1] == "p" and "--ntasks-per-node=2" in srun and "--nodes=1" in srun
    assert not any(a.startswith("--quotatype") for a in srun)
    # the script's DeepSpeed config on GPUs; none on a CPU partition (DeepSpeed would first compile CPU ops)
    assert ("--deepspeed" in fakes.argv("srun")) == (gres is not None)
    assert ("DeepSpeed off" in result.stdout) == (gres is None)


# ---- sbatch template ----


def test_sbatch_template_runs_the_script_once_per_node(fakes: Fakes, tmp_path: Path):
    """Run the template outside Slurm with Slurm's variables set; the fake srun runs its command as node 1."""
    fakes.printer("scontrol", "node-a\\nnode-b\\n")
    fakes.script("srun", """#!/bin/sh
printf '%s\\0' "$@" > "$FAKE_DIR/srun.argv"
while [ "${1#-}" != "$1" ]; do shift; done
SLURM_NODEID=1 exec "$@"
""")
    result = fakes.run(SBATCH, "--max_steps", "3", cwd=tmp_path, SCRIPT=E2E_SCRIPT, SLURM_SUBMIT_DIR=str(REPO),
                       MODEL=str(fakes.root / BY_PATH[E2E_SCRIPT].env["MODEL"]),
                       SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
                       SLURM_CPUS_PER_TASK="16", PARTITION="must-be-ignored", OUTPUT_DIR=str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    srun = fakes.argv("srun")
    assert srun[:4] == ["--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=16"]
    options, args = split_torchrun(fakes.argv("python"))
    assert options == {"nnodes": "2", "node_rank": "1", "master_addr": "node-a", "nproc_per_node": "4",
                       "master_port": "34229"}
    flags = flag_dict(args)
    assert flags["--gradient_accumulation_steps"] == "4"  # 128 / (4 per GPU x 4 GPUs x 2 nodes)
    assert flags["--max_steps"] == "3"
    assert (tmp_path / "o" / "training_log_node1.txt").is_file()


def test_sbatch_template_explains_missing_settings(fakes: Fakes, tmp_path: Path):
    result = fakes.run(SBATCH, cwd=tmp_path, SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="n1")
    assert result.returncode == 2 and "SCRIPT" in result.stderr
    result = fakes.run(SBATCH, cwd=tmp_path, SCRIPT=E2E_SCRIPT, SLURM_SUBMIT_DIR=str(REPO))
    assert result.returncode == 2 and "sbatch" in result.stderr
    assert fakes.argv("srun") is None


# ------------------------------------------------------------------------------------------------------------
# meta JSONs and the example dataset

META_FILES = sorted(p.relative_to(REPO).as_posix() for p in (SHELL / "data").glob("*.json"))


@pytest.mark.parametrize("rel", META_FILES)
def test_meta_json_is_well_formed(rel: str):
    from internvl_chat.data.meta import load_meta

    meta = json.loads((REPO / rel).read_text())
    assert isinstance(meta, dict) and meta
    for name, entry in meta.items():
        assert {"root", "annotation", "data_augment", "repeat_time"} <= set(entry), name
        assert entry["annotation"].endswith((".jsonl", ".json"))
        assert isinstance(entry["data_augment"], bool) and entry["repeat_time"] > 0
    if all((REPO / e["annotation"]).is_file() for e in meta.values()):
        cwd = os.getcwd()
        os.chdir(REPO)  # launchers run from the repository root; paths in shipped meta files are relative to it
        try:
            entries = load_meta(rel)
        finally:
            os.chdir(cwd)
        assert [e.name for e in entries] == list(meta)
        for entry in entries:
            assert os.path.isdir(entry.root) and os.path.isfile(entry.annotation)
    else:  # a template pointing at the user's playground/ data, like the official one
        assert all(e["annotation"].startswith("playground/") for e in meta.values())


def test_default_meta_path_is_shipped():
    assert (REPO / "shell/data/internvl_1_2_finetune_custom.json").is_file()


def example_rows() -> list[dict]:
    annotation = json.loads((REPO / EXAMPLE_META).read_text())["demo_shapes"]["annotation"]
    return [json.loads(line) for line in (REPO / annotation).read_text().splitlines()]


def test_example_dataset_matches_its_generator(tmp_path: Path):
    shipped = REPO / "shell" / "data" / "example"
    make_example_data.main(["--out", str(tmp_path / "example")])
    fresh = tmp_path / "example"
    assert (fresh / "demo.jsonl").read_text() == (shipped / "demo.jsonl").read_text(), (
        "shell/data/example is stale: run python tools/make_example_data.py")
    names = sorted(p.name for p in (fresh / "images").iterdir())
    assert names == sorted(p.name for p in (shipped / "images").iterdir())
    for name in names:
        a = np.asarray(Image.open(fresh / "images" / name))
        b = np.asarray(Image.open(shipped / "images" / name))
        assert a.shape == b.shape and (a == b).all(), name
    assert json.loads((fresh / "meta.json").read_text())["demo_shapes"]["annotation"] == str(fresh / "demo.jsonl")
    shipped_meta = json.loads((REPO / EXAMPLE_META).read_text())["demo_shapes"]
    assert (shipped_meta["root"], shipped_meta["annotation"]) == ("shell/data/example", "shell/data/example/demo.jsonl")
    assert not (shipped / "meta.json").exists()  # one meta file for the shipped copy, with repo-relative paths


def test_example_grounding_boxes_locate_the_shapes():
    """Each box is the 0..1000-scaled bounds of the image's one shape, measured from its pixels."""
    grounded = 0
    for row in example_rows():
        for turn in row["conversations"]:
            for ref, boxes in re.findall(r"<ref>(.*?)</ref><box>(.*?)</box>", turn["value"]):
                image = np.asarray(Image.open(REPO / "shell/data/example" / row["image"]).convert("RGB")).astype(int)
                height, width = image.shape[:2]
                shape = (image != image[0, 0]).any(-1)  # everything that is not the background
                ys, xs = np.nonzero(shape)
                (x1, y1, x2, y2), = json.loads(boxes)
                assert abs(xs.min() - x1 * width / 1000) <= 2 and abs(xs.max() - x2 * width / 1000) <= 2, ref
                assert abs(ys.min() - y1 * height / 1000) <= 2 and abs(ys.max() - y2 * height / 1000) <= 2, ref
                grounded += 1
    assert grounded >= 2


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """LLM family -> a tiny checkpoint (made on first use)."""
    from internvl_chat.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(llm: str) -> Path:
        if llm not in cache:
            cache[llm] = make_tiny_model(root / llm, llm=llm, template="internvl2_5" if llm == "qwen2" else None)
        return cache[llm]

    return get


def test_example_dataset_builds_every_sample(tiny_models):
    from internvl_chat.data.config import DataConfig
    from internvl_chat.data.dataset import build_dataset
    from internvl_chat.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_models("qwen2")))
    config = DataConfig(template="internvl2_5", dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
                        bad_data="fail")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        dataset = build_dataset(EXAMPLE_META, tokenizer, config)
    finally:
        os.chdir(cwd)
    rows = example_rows()
    assert len(dataset) == len(rows)
    kinds = []
    for i, row in enumerate(rows):
        item = dataset[i]
        assert not item["skipped"] and item["num_supervised"] > 0
        images = row.get("image", [])
        images = [images] if isinstance(images, str) else images
        kinds.append("multi" if len(images) > 1 else "single" if images else "text")
        assert int(item["image_flags"].sum()) == (0 if not images else item["image_flags"].numel())
        assert item["image_flags"].numel() >= max(1, len(images))
    assert set(kinds) == {"single", "multi", "text"}, "the example shows every kind of sample"
    assert any(len(row["conversations"]) > 2 for row in rows), "and a multi-turn one"


# ------------------------------------------------------------------------------------------------------------
# real runs on a tiny model (CPU)


def run_real(script: str, model: Path, out: Path, *args: str, **env: str | None) -> subprocess.CompletedProcess:
    """Run a launcher for real from the repository root; a None in env removes that variable."""
    full_env = clean_environ()
    full_env.update(
        GPUS="1", PER_DEVICE_BATCH_SIZE="1", BATCH_SIZE="2", MODEL=str(model), META_PATH=EXAMPLE_META,
        OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()), PATH=f"{Path(sys.executable).parent}{os.pathsep}"
        + os.environ.get("PATH", ""), PYTHON=sys.executable, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    if not deepspeed_available():
        full_env["DEEPSPEED"] = "none"
    full_env.update(env)
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(["sh", script, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def test_end_to_end_launcher_run(tiny_models, tmp_path: Path):
    """The documented command on a tiny model: trains, logs, checkpoints, and the output loads."""
    import torch
    from safetensors.torch import load_file

    from internvl_chat.model import InternVLChatModel

    base = tiny_models("qwen2")
    out = tmp_path / "out"
    result = run_real(E2E_SCRIPT, base, out, "--max_steps", "2", "--save_steps", "2", "--bf16", "False",
                      "--dataloader_num_workers", "0", "--report_to", "none")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "training_log.txt").read_text()
    assert log.startswith("==> ") and "global batch 2" in log and "-m internvl_chat.finetune" in log
    assert len(re.findall(r"'loss': '[0-9.]+'", log)) == 2  # one log line per step
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    model = InternVLChatModel.from_pretrained(str(out))
    assert model.config.template == "internvl2_5" and model.config.max_dynamic_patch == 6
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    vit = [k for k in before if k.startswith("vision_model.")]
    llm = [k for k in before if k.startswith("language_model.")]
    assert vit and all(torch.equal(before[k], after[k]) for k in vit), "--freeze_backbone True: ViT unchanged"
    assert any(not torch.equal(before[k], after[k]) for k in llm), "the LLM trained"


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").is_file(), reason="no .venv in the repository")
def test_new_user_run_on_cpu_real(tiny_models, tmp_path: Path):
    """The first command a new user types, on a machine without a GPU, no venv active (the `python` on PATH has no
    torch), no GPUS / DEEPSPEED / PYTHON: the .venv's python, 1 CPU process, no DeepSpeed, each said in one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    out = tmp_path / "out"
    result = run_real(E2E_SCRIPT, tiny_models("qwen2"), out, "--max_steps", "1", "--bf16", "False",
                      "--dataloader_num_workers", "0", "--report_to", "none",
                      GPUS=None, DEEPSPEED=None, PYTHON=None, BATCH_SIZE="4", CUDA_VISIBLE_DEVICES="",
                      PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "training_log.txt").read_text()
    assert f"python: {REPO / '.venv' / 'bin' / 'python'}\n" in log and "--nproc_per_node=1 " in log
    assert "==> no GPU visible: 1 CPU process" in log and "==> no GPU visible: DeepSpeed off" in log
    assert "--deepspeed" not in log and "'loss'" in log


# Every script of the older generations; of InternVL3.0 and 3.5 (30 more scripts, beyond the suite's budget) one
# each, the one whose settings are newest: 3.0's LoRA (no official LoRA script), 3.5's full fine-tune (packing,
# the square loss, ZeRO-3, the ViT trained) and the GPT-OSS LoRA one (its harmony template, an MoE LLM). Their
# settings are checked one by one, without training, above.
def _one_per_behaviour(paths) -> list[str]:
    """The first script of each (LLM family, full/LoRA, DeepSpeed config, template): the scripts of one group differ
    only in model size and tile count, which their command-line test checks."""
    first: dict[tuple, str] = {}
    for path in sorted(paths):
        launcher = BY_PATH[path]
        key = (launcher.row.llm, launcher.mode, launcher.env["DEEPSPEED"], dict(launcher.flags)["--conv_style"])
        first.setdefault(key, path)
    return sorted(first.values())


TRAINED_LAUNCHERS = _one_per_behaviour(p for p in BY_PATH
                                       if not p.startswith(("shell/internvl3.0/", "shell/internvl3.5/"))) + [
    "shell/internvl3.0/2nd_finetune/internvl3_1b_dynamic_res_2nd_finetune_lora.sh",
    "shell/internvl3.5/2nd_finetune/internvl3_5_1b_dynamic_res_2nd_finetune_full.sh",
    "shell/internvl3.5/2nd_finetune/internvl3_5_gpt_oss_20b_a4b_dynamic_res_2nd_finetune_lora.sh",
]


@pytest.mark.slow  # ~12 s each, 25 scripts: about 5 minutes on 2 CPU cores
@pytest.mark.parametrize("path", TRAINED_LAUNCHERS)
def test_every_launcher_trains_a_step(tiny_models, tmp_path: Path, path: str):
    """Every shipped script (a sample of the newest generations) runs one real step (GPUS=1 on CPU) on a tiny model
    of its LLM family."""
    launcher = BY_PATH[path]
    out = tmp_path / "out"
    # the script's own DeepSpeed config, asked for explicitly (on CPU the launcher leaves DeepSpeed off otherwise)
    deepspeed = launcher.env["DEEPSPEED"] if deepspeed_available() else "none"
    result = run_real(path, tiny_models(launcher.row.llm), out, "--max_steps", "1", "--save_steps", "1",
                      "--bf16", "False", "--dataloader_num_workers", "0", "--report_to", "none",
                      BATCH_SIZE="1", DEEPSPEED=deepspeed)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "'loss'" in (out / "training_log.txt").read_text()
    assert (out / "checkpoint-1").is_dir()
    assert json.loads((out / "config.json").read_text())["template"] == dict(launcher.flags)["--conv_style"]
    if launcher.mode == "full":  # ZeRO-3 runs too: the weights are consolidated in the official layout
        assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()


# ---- a real local Slurm (skipped unless sinfo reaches a controller) ----


def slurm_partition() -> str | None:
    if not shutil.which("sinfo"):
        return None
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in result.stdout.split("\n") if result.returncode == 0 else []:
        name, _, state = line.partition(" ")
        if state.strip() in ("idle", "mixed"):
            return name.rstrip("*")
    return None


@pytest.fixture(scope="module")
def partition() -> str:
    """An idle partition of a reachable Slurm, else the test is skipped (asked only when such a test runs)."""
    name = slurm_partition()
    if name is None:
        pytest.skip("no Slurm controller reachable (sinfo)")
    return name


def test_srun_launch_on_local_slurm(partition: str, tiny_models, tmp_path: Path):
    out = tmp_path / "out"
    result = run_real(E2E_SCRIPT, tiny_models("qwen2"), out, "--max_steps", "2", "--save_steps", "2",
                      "--bf16", "False", "--dataloader_num_workers", "0", "--report_to", "none",
                      PARTITION=partition, GPUS="2", CPUS_PER_TASK="1", USE_GPU="auto")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "training_log.txt").read_text()
    assert "==> srun -p" in log and "--gres" not in log.split("\n")[1]
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()


def test_sbatch_template_on_local_slurm(partition: str, tiny_models, tmp_path: Path):
    out = tmp_path / "out"
    job_log = tmp_path / "job.out"
    env = clean_environ()
    env.update(SCRIPT=E2E_SCRIPT, GPUS="2", PER_DEVICE_BATCH_SIZE="1", BATCH_SIZE="2",
               MODEL=str(tiny_models("qwen2")), META_PATH=EXAMPLE_META, OUTPUT_DIR=str(out),
               MASTER_PORT=str(free_port()), PYTHON=sys.executable, HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not deepspeed_available():
        env["DEEPSPEED"] = "none"
    result = subprocess.run(
        ["sbatch", "--wait", "-p", partition, "--cpus-per-task=2", f"--output={job_log}", str(SBATCH),
         "--max_steps", "2", "--save_steps", "2", "--bf16", "False", "--dataloader_num_workers", "0",
         "--report_to", "none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr + (job_log.read_text() if job_log.exists() else "")
    assert "--nproc_per_node=2" in (out / "training_log.txt").read_text()
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()


# The official 2nd-finetune settings, transcribed from the official `shell/internvl2.*/2nd_finetune/` and
# `shell/internvl3.0/2nd_finetune/` scripts: script stem -> (conv_style, GPUS full/lora, PER_DEVICE, drop_path full,
# lr, weight_decay, max_seq_length, DeepSpeed config). InternVL3 has full scripts only: its LoRA GPU count is the
# InternVL2.5 convention (2, 8 for the largest model).
_Z1, _Z3, _Z34, _Z100 = ("zero_stage1_config.json", "zero_stage3_config.json", "zero_stage3_config_34b.json",
                          "zero_stage3_config_100b.json")
_V2, _V25 = "internvl2.0/2nd_finetune/internvl2_", "internvl2.5/2nd_finetune/internvl2_5_"
_V3 = "internvl3.0/2nd_finetune/internvl3_"
OFFICIAL_SETTINGS = {
    f"{_V2}1b_qwen2_0_5b": ("Hermes-2", 8, 2, 4, 0.1, "4e-5", "0.01", 4096, _Z1),
    f"{_V2}2b_internlm2_1_8b": ("internlm2-chat", 8, 2, 4, 0.1, "4e-5", "0.01", 4096, _Z1),
    f"{_V2}4b_phi3_3_8b": ("phi3-chat", 8, 2, 4, 0.1, "4e-5", "0.01", 4096, _Z1),
    f"{_V2}8b_internlm2_7b": ("internlm2-chat", 8, 2, 4, 0.1, "4e-5", "0.05", 4096, _Z1),
    f"{_V2}26b_internlm2_20b": ("internlm2-chat", 8, 2, 2, 0.4, "2e-5", "0.05", 4096, _Z3),
    f"{_V2}40b_hermes2_yi_34b": ("Hermes-2", 16, 2, 2, 0.4, "2e-5", "0.05", 4096, _Z34),
    f"{_V2}76b_hermes2_llama3_70b": ("internlm2-chat", 32, 8, 1, 0.4, "2e-5", "0.05", 4096, _Z100),
    **{f"{_V25}{size}": ("internvl2_5", 8, 2, 4, 0.1, "4e-5", "0.01", 8192, _Z1) for size in ("1b", "2b", "4b")},
    f"{_V25}8b": ("internvl2_5", 8, 2, 4, 0.1, "4e-5", "0.05", 8192, _Z1),
    f"{_V25}26b": ("internvl2_5", 8, 2, 2, 0.4, "2e-5", "0.05", 8192, _Z3),
    f"{_V25}38b": ("internvl2_5", 16, 2, 2, 0.4, "2e-5", "0.05", 8192, _Z34),
    f"{_V25}78b": ("internvl2_5", 32, 8, 1, 0.4, "2e-5", "0.05", 8192, _Z100),
    f"{_V3}1b": ("internvl2_5", 8, 2, 4, 0.0, "1e-5", "0.05", 16384, _Z1),
    **{f"{_V3}{size}": ("internvl2_5", 8, 2, 4, 0.0, "2e-5", "0.05", 16384, _Z1) for size in ("2b", "8b", "9b")},
    f"{_V3}14b": ("internvl2_5", 8, 2, 4, 0.1, "2e-5", "0.05", 16384, _Z1),
    f"{_V3}38b": ("internvl2_5", 16, 2, 2, 0.2, "2e-5", "0.05", 16384, _Z34),
    f"{_V3}78b": ("internvl2_5", 32, 8, 2, 0.4, "2e-5", "0.05", 16384, _Z100),
}


def read_launcher_file(rel: str) -> tuple[dict[str, str], dict[str, str]]:
    """(environment defaults, flags) of a shipped script, read from its text (not from the generator's table)."""
    text = (SHELL / rel).read_text()
    env = dict(re.findall(r'^export (\w+)="\$\{\w+:-([^}]*)\}"$', text, flags=re.M))
    env.update(re.findall(r"^export DEFAULT_(GPUS|DEEPSPEED)=(\S+)$", text, flags=re.M))
    flags = re.findall(r"^\s+(--\w+) (\S+) \\$", text, flags=re.M)
    assert len(dict(flags)) == len(flags), f"{rel} passes a flag twice"
    return env, dict(flags)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("stem", sorted(OFFICIAL_SETTINGS))
def test_launcher_files_carry_the_official_settings(stem: str, mode: str):
    """Read the shipped script itself (not the generator's table) and compare it with the official settings."""
    conv, gpus_full, gpus_lora, per_device, drop_path, lr, wd, max_len, zero = OFFICIAL_SETTINGS[stem]
    env, flags = read_launcher_file(f"{stem}_dynamic_res_2nd_finetune_{mode}.sh")
    assert env["GPUS"] == str(gpus_full if mode == "full" else gpus_lora)
    assert env["BATCH_SIZE"] == ("128" if mode == "full" else "16")
    assert env["PER_DEVICE_BATCH_SIZE"] == str(per_device)
    assert env["DEEPSPEED"] == zero
    assert (flags["--conv_style"], flags["--learning_rate"], flags["--weight_decay"]) == (conv, lr, wd)
    patches = "12" if stem.startswith(_V3) else "6"
    assert (flags["--max_dynamic_patch"], flags["--max_seq_length"]) == (patches, str(max_len))
    assert float(flags["--drop_path_rate"]) == (drop_path if mode == "full" else 0.0)
    assert (flags["--freeze_backbone"], flags["--freeze_llm"], flags["--freeze_mlp"]) == (
        ("True", "False", "False") if mode == "full" else ("True", "True", "True"))
    assert flags.get("--use_llm_lora") == (None if mode == "full" else "16")
    if stem.startswith((_V25, _V3)):
        assert flags["--use_fast_tokenizer"] == "False"
    assert "--use_packed_ds" not in flags and "--loss_reduction" not in flags  # token-averaged loss, padding


# InternVL3.5, transcribed from the official `internvl_chat_gpt_oss/shell/internvl3_5_{qwen3,gpt_oss}/*_sft.sh`:
# script stem -> (conv_style, drop_path full, lr); GPUS full / lora are ours (the official scripts take the node
# count from the cluster). Every one: 1 pack per GPU, global batch 512, ZeRO-3 (zero_stage3_config.json),
# max_dynamic_patch 12, max_seq_length 32768, packing (32768 tokens, 96 tiles), the square loss, the ViT trained.
_V35 = "internvl3.5/2nd_finetune/internvl3_5_"
OFFICIAL_V35 = {
    f"{_V35}1b": ("internvl2_5", 0.0, "8e-5", 8, 2),
    f"{_V35}2b": ("internvl2_5", 0.0, "8e-5", 8, 2),
    f"{_V35}4b": ("internvl2_5", 0.0, "8e-5", 8, 2),
    f"{_V35}8b": ("internvl2_5", 0.1, "8e-5", 8, 2),
    f"{_V35}14b": ("internvl2_5", 0.1, "8e-5", 8, 2),
    f"{_V35}38b": ("internvl2_5", 0.4, "8e-5", 16, 2),
    f"{_V35}30b_a3b": ("internvl2_5", 0.1, "8e-5", 16, 2),
    f"{_V35}gpt_oss_20b_a4b": ("internvl3_5_gpt_oss", 0.1, "8e-5", 8, 2),
    f"{_V35}241b_a28b": ("internvl2_5", 0.4, "2e-5", 64, 16),
}
V35_COMMON = {
    "--use_fast_tokenizer": "False", "--max_dynamic_patch": "12", "--max_seq_length": "32768",
    "--weight_decay": "0.05", "--dataloader_num_workers": "16", "--group_by_length": "False",
    "--min_num_frame": "8", "--max_num_frame": "32", "--use_packed_ds": "True", "--num_images_expected": "96",
    "--max_packed_tokens": "32768", "--loss_reduction": "square", "--seed": "42",
}


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("stem", sorted(OFFICIAL_V35))
def test_internvl3_5_launchers_keep_its_own_defaults(stem: str, mode: str):
    """InternVL3.5's defaults (packing, square loss reduction, ZeRO-3, its learning rates), read from the shipped
    script; the LoRA scripts keep them, with the InternVL2.5 LoRA conventions on top."""
    conv, drop_path, lr, gpus_full, gpus_lora = OFFICIAL_V35[stem]
    env, flags = read_launcher_file(f"{stem}_dynamic_res_2nd_finetune_{mode}.sh")
    assert env["MODEL"] == "OpenGVLab/InternVL3_5-" + stem.removeprefix(_V35).upper().replace(
        "GPT_OSS_20B_A4B", "GPT-OSS-20B-A4B-Preview").replace("_", "-")
    assert (env["DEEPSPEED"], env["PER_DEVICE_BATCH_SIZE"]) == ("zero_stage3_config.json", "1")
    assert (flags["--conv_style"], flags["--learning_rate"]) == (conv, lr)
    for key, value in V35_COMMON.items():
        assert flags[key] == value, key
    if mode == "full":
        assert (env["GPUS"], env["BATCH_SIZE"]) == (str(gpus_full), "512")
        assert (flags["--freeze_backbone"], flags["--freeze_llm"], flags["--freeze_mlp"]) == ("False",) * 3
        assert float(flags["--drop_path_rate"]) == drop_path and "--use_llm_lora" not in flags
    else:
        assert (env["GPUS"], env["BATCH_SIZE"]) == (str(gpus_lora), "16")
        assert (flags["--freeze_backbone"], flags["--freeze_llm"], flags["--freeze_mlp"]) == ("True",) * 3
        assert (flags["--use_llm_lora"], float(flags["--drop_path_rate"])) == ("16", 0.0)
    # the official flags left out on purpose (tools/make_launchers.py says why)
    for gone in ("--max_steps", "--save_steps", "--save_total_limit", "--split_annotations", "--use_custom_flash_attn",
                 "--gradient_checkpointing", "--use_liger", "--max_buffer_size", "--overwrite_output_dir"):
        assert gone not in flags, gone


def test_preflight_runs_first_with_the_same_flags(fakes: Fakes, tmp_path: Path):
    """One process checks flags, data and the output folder before torchrun starts; its rank and world size are
    the job's (the global batch is part of the run's settings)."""
    out = tmp_path / "o"
    result = fakes.run(REPO / E2E_SCRIPT, "--max_steps", "2", GPUS="2", PER_DEVICE_BATCH_SIZE="1", BATCH_SIZE="4",
                       OUTPUT_DIR=str(out))
    assert result.returncode == 0, result.stderr
    pre = (fakes.records / "python.preflight.argv").read_bytes().decode().split("\0")[:-1]
    assert pre[:3] == ["-m", "internvl_chat.finetune", "--preflight"]
    assert pre[3:] == split_torchrun(fakes.argv("python"))[1]
    pre_env = dict(i.split("=", 1) for i in (fakes.records / "python.preflight.env").read_bytes().decode()
                   .split("\0") if "=" in i)
    assert (pre_env["RANK"], pre_env["WORLD_SIZE"]) == ("0", "2")
    assert fakes.recorded_env("python")["INTERNVL_CHAT_PREFLIGHT_DONE"] == "1"
    log = (out / "training_log.txt").read_text()
    assert log.startswith("==> ") and log.index("fake python preflight") < log.index("fake python ran")


@pytest.mark.parametrize("code, expected", [(3, 0), (2, 2)])
def test_preflight_verdicts_start_nothing_and_write_nothing(fakes: Fakes, tmp_path: Path, code: int, expected: int):
    """3: the run in OUTPUT_DIR is complete (exit 0); 2: a user error. Neither starts torchrun or creates a file."""
    out = tmp_path / "o"
    result = fakes.run(REPO / E2E_SCRIPT, GPUS="1", BATCH_SIZE="4", OUTPUT_DIR=str(out),
                       FAKE_PREFLIGHT_EXIT=str(code))
    assert result.returncode == expected, result.stderr
    assert "fake python preflight" in result.stdout
    assert fakes.argv("python") is None  # torchrun never ran
    assert not out.exists()
