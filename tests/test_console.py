"""What a run prints: no unexplained third-party warning (internvl_chat/console.py), every per-step line numbered,
training_log.txt in complete lines (shell/common.sh: console_and_log), and torchrun's failure box left out after our
one-line error but kept for a crash."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from internvl_chat.console import EXPLAIN, QUIET, step_line

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "shell/internvl2.5/2nd_finetune/internvl2_5_1b_dynamic_res_2nd_finetune_full.sh"

# A line that looks like a warning, from Python, logging, glog-style C++ (W1207 ...) or a library's own wording.
WARNING_LIKE = re.compile(r"(?i)warn|(^|\[|:)W\d{4} |deprecat|\bfailed to\b|mismatch")
# The warning lines a run may print: our own logger's (internvl_chat.*, each one actionable) and console.EXPLAIN's.
ALLOWED = [re.compile(r"^\S+ \S+ \[rank \d+\] WARNING internvl_chat\.")] + [
    re.compile(re.escape(entry.say.split("{")[0])) for entry in EXPLAIN]


def unexplained_warnings(text: str) -> list[str]:
    lines = [segment for line in text.splitlines() for segment in line.split("\r")]
    return [line for line in lines
            if WARNING_LIKE.search(line) and not any(allowed.search(line) for allowed in ALLOWED)]


def test_warning_detector_sees_the_known_ones():
    """The test's own detector would catch each message console.py silences (so the run test means something)."""
    samples = [
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.",
        "[2026-12-07 14:26:34,904] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
        "/x/accelerate/state.py:279: UserWarning: OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at 2",
        "  warnings.warn(",
        "[rank0]:[W1207 14:26:35.554121514 reducer.cpp:1529] Warning: find_unused_parameters=True was specified",
        "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 32. Using "
        "DeepSpeed's value.",
        "/x/y.py:3: FutureWarning: `foo` is deprecated",
    ]
    assert [unexplained_warnings(s) for s in samples] == [[s] for s in samples]
    assert unexplained_warnings("2026-12-07 14:26:34,889 [rank 0] WARNING internvl_chat.finetune: accepted ...") == []
    assert unexplained_warnings("step 3/6 {'loss': '7.1'}\ndataset 'warm': 3 records") == []


def test_install_silences_exactly_the_listed_messages():
    """Each QUIET message is dropped, another message of the same logger or module still shows, and an EXPLAIN
    warning becomes our one line, once."""
    program = textwrap.dedent("""
        import logging, sys, warnings
        from internvl_chat.console import install
        install()
        install()  # idempotent
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator")
        logging.getLogger("accelerate.accelerator").warning(
            "[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 32.")
        logging.getLogger("accelerate.accelerator").warning(
            "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 32. Using")
        logging.getLogger("accelerate.accelerator").warning(
            "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 4, DeepSpeed config has 32. Using")
        def from_module(name, message):
            exec(compile("import warnings\\nwarnings.warn(message, UserWarning)", name.replace(".", "/") + ".py",
                         "exec"), {"__name__": name, "message": message})
        from_module("accelerate.state", "OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at 2 to improve oob")
        from_module("accelerate.other", "OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at 2 to improve oob")
        for _ in range(3):
            from_module("torch.utils.data.dataloader", "This DataLoader will create 4 worker processes in total. "
                        "Our suggested max number of worker in current system is 2, which is smaller")
        print("done", file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "gemm_4bit_forward" not in err and "Setting accelerator" not in err
    assert "another bitsandbytes warning" in err  # the same logger's other messages still show
    assert "GradientAccumulationPlugin has 1," not in err and "GradientAccumulationPlugin has 4," in err
    assert err.count("OMP_NUM_THREADS") == 1 and "accelerate/other.py" in err  # only accelerate.state's is quiet
    assert "This DataLoader will create" not in err
    said = [line for line in err.splitlines() if line.startswith("warning: 4 data loader workers")]
    assert len(said) == 1 and "--dataloader_num_workers" in said[0]


def test_every_quiet_entry_says_why():
    for entry in QUIET:
        assert entry.kind in ("logger", "warning") and entry.source and entry.message and len(entry.why) > 20


def test_step_line():
    class State:
        global_step, max_steps = 12, 400

    assert step_line(State, {"loss": 1.234567, "total_flos": 5.0, "epoch": 0.5}) == \
        "step 12/400 {'loss': '1.235', 'epoch': '0.5'}"


# ------------------------------------------------------------------------------------------------------------
# shell/common.sh: console_and_log

def console_and_log(stream: str, log: Path) -> str:
    proc = subprocess.run(["sh", "-c", '. "$0/shell/common.sh" && console_and_log "$1"', str(REPO), str(log)],
                          input=stream.encode(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()  # no universal newlines: they would turn each \r into \n


def test_log_gets_complete_lines_console_gets_the_stream(tmp_path):
    bar = "\r 25%|##5       | 1/4 [00:02<00:07,  2.36s/it]"
    stream = ("start\n"
              "Loading weights:   0%|    | 0/65\rLoading weights: 100%|####| 65/65\n"
              f"{bar}\r{' ' * 40}\rstep 1/4 {{'loss': '7.5'}}\n"
              f"{bar}\r 50%|#####     | 2/4 [00:04<00:04,  2.28s/it]\n"
              "\r   \r\n"  # a bar cleared and nothing else: no line in the log
              "Writing model shards:   0%|  | 0/1\x1b[A\rWriting model shards: 100%|##| 1/1\n"
              "\n"
              "end without newline")
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    console = console_and_log(stream, log)
    assert log.read_text() == ("earlier\nstart\nLoading weights: 100%|####| 65/65\nstep 1/4 {'loss': '7.5'}\n"
                               " 50%|#####     | 2/4 [00:04<00:04,  2.28s/it]\n"
                               "Writing model shards: 100%|##| 1/1\n\nend without newline\n")
    # the console: every line as it came; after a line printed under a bar, that bar again (until the next line)
    assert console.startswith("start\nLoading weights:   0%|    | 0/65\rLoading weights: 100%|####| 65/65\n")
    assert f"\rstep 1/4 {{'loss': '7.5'}}\n{bar}{bar}\r 50%" in console
    assert console.endswith("\nend without newline\n")


def torchrun_output(tmp_path: Path, body: str) -> str:
    """What real torchrun prints around a child running `body` (stdout and stderr together)."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(body))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=0", str(child)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("code, kept", [(2, False), (1, False), (3, True)])
def test_torchrun_box_after_our_one_line(tmp_path, code, kept):
    """Exit 2 (a user error) or 1 without a traceback (a data verdict): the output ends with our line. Any other code
    keeps torchrun's box."""
    raw = torchrun_output(tmp_path, f"""
        import sys
        print("training ...")
        print("error: something the user can fix", file=sys.stderr)
        sys.exit({code})
    """)
    assert "ChildFailedError" in raw  # what torchrun prints today
    log = tmp_path / "log.txt"
    console = console_and_log(raw, log)
    for text in (console, log.read_text()):
        assert ("ChildFailedError" in text) is kept
        if not kept:
            assert text.rstrip("\n").splitlines()[-1] == "error: something the user can fix"
            assert "Traceback" not in text and "exitcode" not in text


@pytest.mark.parametrize("code", [2, -15])
def test_torchrun_stopping_other_processes(tmp_path, code):
    """The lines torchrun prints while stopping the other processes go with the box: left out after our one line,
    shown with a kept box."""
    stopping = "W1207 14:46:38.767000 5450 x/api.py:1028] Sending process 5455 closing signal SIGTERM\n"
    box = (f"E1207 14:46:38.9 5450 x/api.py:1002] failed (exitcode: {code}) local_rank: 0 (pid: 5454) of binary: p\n"
           "Traceback (most recent call last):\n  File x\ntorch...ChildFailedError: \n" + "=" * 60 + "\n"
           "internvl_chat.finetune FAILED\n" + "-" * 60 + "\nRoot Cause (first observed failure):\n" + "=" * 60 + "\n")
    stream = "error: something the user can fix\n" + stopping + box
    log = tmp_path / "log.txt"
    console = console_and_log(stream, log)
    expected = "error: something the user can fix\n" if code == 2 else stream
    assert console == expected and log.read_text() == expected


def test_torchrun_box_kept_after_a_crash(tmp_path):
    raw = torchrun_output(tmp_path, """
        raise RuntimeError("a real crash")
    """)
    log = tmp_path / "log.txt"
    console = console_and_log(raw, log)
    for text in (console, log.read_text()):
        assert "RuntimeError: a real crash" in text and "ChildFailedError" in text and "exitcode  : 1" in text


# ------------------------------------------------------------------------------------------------------------
# real runs through the launcher (CPU, tiny model)

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from internvl_chat.demo_data import make_demo_dataset, make_heldout_split
    from internvl_chat.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("console")
    model = make_tiny_model(root / "model", llm="qwen2", template="internvl2_5")
    make_demo_dataset(root / "data", num_images=8)
    make_heldout_split(root / "data", num_images=4)
    return root, Path(model)


def launch(root: Path, model: Path, out: Path, *flags: str, python: str = sys.executable):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GPUS", "DEEPSPEED", "BATCH_SIZE", "PER_DEVICE_BATCH_SIZE", "MASTER_PORT", "RANK",
                        "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    env.update(MODEL=str(model), META_PATH=str(root / "data" / "meta.json"), OUTPUT_DIR=str(out), PYTHON=python,
               CUDA_VISIBLE_DEVICES="", BATCH_SIZE="4", PER_DEVICE_BATCH_SIZE="2", MASTER_PORT=str(_free_port()),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(["sh", SCRIPT, *flags], cwd=REPO, env=env, capture_output=True, timeout=600)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_default_run_prints_no_unexplained_warning(demo, tmp_path):
    """The launcher's defaults on CPU (progress bar on, DeepSpeed config left to the launcher, gradient
    accumulation), with held-out evaluation: no warning line outside the allow-list, on the console or in the log;
    numbered per-step lines; a log without carriage-return fragments."""
    root, model = demo
    out = tmp_path / "run"
    code, stdout, stderr = launch(root, model, out, "--max_steps", "2", "--save_steps", "1", "--max_dynamic_patch",
                                  "2", "--eval_meta_path", str(root / "data" / "eval_meta.json"), "--eval_strategy",
                                  "steps", "--eval_steps", "2", "--eval_max_samples", "2", "--eval_max_new_tokens", "4")
    console = stdout + stderr
    assert code == 0, console[-4000:]
    log = (out / "training_log.txt").read_bytes().decode()
    assert unexplained_warnings(console) == []
    assert unexplained_warnings(log) == []
    assert "\r" in console  # the console still gets the progress bars
    assert "\r" not in log and "\x1b" not in log
    per_step = [line for line in log.splitlines() if "'loss':" in line]
    assert [line.split(" {")[0] for line in per_step] == ["step 1/2", "step 2/2"]
    assert any(line.startswith("step 2/2 {'eval_") for line in log.splitlines())


def test_error_inside_torchrun_ends_with_our_line(demo, tmp_path):
    """A user error that only the training processes see (the launcher's one-process preflight is skipped here):
    torchrun's failure box is not printed after our one line, on the console or in the log."""
    root, model = demo
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = --preflight ] && exit 0; done\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "run"
    code, stdout, stderr = launch(root, model, out, "--learning_rat", "1e-3", python=str(wrapper))
    assert code != 0
    expected = "error: unknown flag --learning_rat (did you mean --learning_rate?); `--help` lists every flag"
    for text in (stdout, (out / "training_log.txt").read_text()):
        assert text.rstrip("\n").splitlines()[-1] == expected, text[-3000:]
        assert "ChildFailedError" not in text and "Traceback" not in text
    assert "ChildFailedError" not in stderr and "Traceback" not in stderr
