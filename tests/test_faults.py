"""Saves that survive faults (train/checkpoint.py): SIGKILL at several points of a save, a full disk, a corrupt
newest checkpoint; each followed by a resume whose final weights equal an uninterrupted run's, tensor for tensor.

One uninterrupted reference run (4 steps, a checkpoint every 2) is shared by the module. The killed and disk-full
command-line runs are real processes that break themselves at a chosen point of the step-4 save (forked children of
one background subprocess, which patch the save, then run `python -m internvl_chat.finetune`); they start with the
module and overlap with the in-process tests.
"""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from internvl_chat.demo_data import make_demo_dataset
from internvl_chat.finetune import main
from internvl_chat.tiny_model import make_tiny_model
from internvl_chat.train import checkpoint
from internvl_chat.train.checkpoint import (
    MARKER,
    CheckpointSaveError,
    is_disk_full,
    rotate_checkpoints,
    verify_checkpoint,
)
from internvl_chat.train.run_folder import RunFolderError, decide

REPO = Path(__file__).resolve().parents[1]


def run_args(model, meta, out, *extra):
    """Tiny CPU run: 4 steps of batch 2, a checkpoint every 2 steps."""
    return [
        "--model_name_or_path", str(model), "--meta_path", str(meta), "--output_dir", str(out),
        "--conv_style", "internvl2_5", "--force_image_size", "448", "--down_sample_ratio", "0.5",
        "--dynamic_image_size", "True", "--use_thumbnail", "True", "--max_dynamic_patch", "2",
        "--max_seq_length", "4096", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--weight_decay", "0.0",
        "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0",
        "--seed", "7", "--bf16", "False", "--grad_checkpoint", "False", "--disable_tqdm", "True",
        "--freeze_backbone", "True", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
        *extra,
    ]


# One subprocess imports everything once, then forks a child per fault point; each child patches one point of the
# step-4 save to fail and runs `python -m internvl_chat.finetune ARGS` (runpy, so its __main__ block runs too). The
# parent has run no torch op before forking, so the children start with clean thread pools.
FAULT_SERVER = textwrap.dedent('''
    import errno, json, os, runpy, signal, sys, traceback

    from transformers.trainer_callback import TrainerState

    import internvl_chat.finetune  # noqa: F401  the imports every child needs, paid once
    from internvl_chat.train import checkpoint, trainer


    def kill():
        os.kill(os.getpid(), signal.SIGKILL)


    def step4(path):
        return "checkpoint-4" in str(path)


    def patch(point):
        if point == "weights":  # SIGKILL while model.safetensors is half written
            save = trainer.InternVLTrainer._save

            def _save(self, output_dir=None, state_dict=None):
                save(self, output_dir, state_dict)
                if step4(output_dir):
                    weights = os.path.join(output_dir, "model.safetensors")
                    os.truncate(weights, os.path.getsize(weights) // 2)
                    kill()

            trainer.InternVLTrainer._save = _save
        elif point == "publish":  # SIGKILL with every file and the marker written, before the rename into place
            publish = checkpoint.publish

            def _publish(staged, final):
                if step4(final):
                    kill()
                publish(staged, final)

            checkpoint.publish = _publish
        elif point == "rotation":  # SIGKILL in the middle of deleting checkpoint-2 (save_total_limit 1)
            rotate, unlink = checkpoint.rotate_checkpoints, os.unlink
            deleted = []

            def _unlink(path, *args, **kwargs):
                unlink(path, *args, **kwargs)
                deleted.append(path)
                if len(deleted) == 3:
                    kill()

            def _rotate(*args, **kwargs):
                os.unlink = _unlink
                try:
                    return rotate(*args, **kwargs)
                finally:
                    os.unlink = unlink

            checkpoint.rotate_checkpoints = _rotate
        elif point == "enospc":  # the disk fills up while the trainer state is written
            save_to_json = TrainerState.save_to_json

            def _save_to_json(self, json_path):
                if step4(json_path):
                    raise OSError(errno.ENOSPC, "No space left on device", json_path)
                save_to_json(self, json_path)

            TrainerState.save_to_json = _save_to_json


    def child(point, log, argv):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        patch(point)
        sys.argv = ["internvl_chat.finetune", *argv]
        code = 0
        try:
            runpy.run_module("internvl_chat.finetune", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


    jobs, results = json.loads(sys.argv[1]), sys.argv[2]
    children = {}
    for point, (log, argv) in jobs.items():
        pid = os.fork()
        if pid == 0:
            child(point, log, argv)
        children[pid] = point
    codes = {}
    for _ in children:
        pid, status = os.wait()
        codes[children[pid]] = os.waitstatus_to_exitcode(status)
    with open(results, "w") as f:
        json.dump(codes, f)
''')
FAULT_POINTS = ("weights", "publish", "rotation", "enospc")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model and data, the faulty runs (started now in the background, waited for by their tests) and the
    uninterrupted reference run (checkpoints 2 and 4 kept, final weights)."""
    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_model(root / "model", llm="qwen2", template="internvl2_5", seed=0)
    meta = make_demo_dataset(root / "data", num_images=6, seed=0)
    server = root / "fault_server.py"
    server.write_text(FAULT_SERVER)
    jobs = {point: [str(root / f"fault_{point}.log"),
                    run_args(model, meta, root / f"fault_{point}", "--save_total_limit", "1")] for point in FAULT_POINTS}
    # same thread count as this process: CPU reductions then add up in the same order, so weights compare exactly
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(server), json.dumps(jobs), str(root / "codes.json")], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ref = root / "reference"
    main(run_args(model, meta, ref))
    yield {"root": root, "model": model, "meta": meta, "ref": ref, "weights": read_weights(ref), "server": proc}
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def read_weights(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_weights_equal(expected: dict, folder):
    actual = read_weights(folder)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def names(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("checkpoint-"))


def wait_for(setup, point, timeout=300):
    """(exit code, output folder, log) of the faulty run at `point`."""
    proc = setup["server"]
    if "codes" not in setup:
        output, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, output[-3000:]
        setup["codes"] = json.loads((setup["root"] / "codes.json").read_text())
    log = (setup["root"] / f"fault_{point}.log").read_text()
    return setup["codes"][point], setup["root"] / f"fault_{point}", log


def resume(setup, out, *extra):
    logging.getLogger("internvl_chat").setLevel(logging.INFO)  # "resuming from ..." is an INFO line
    main(run_args(setup["model"], setup["meta"], out, "--save_total_limit", "1", *extra))


# --- SIGKILL during a save ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["weights", "publish"])
def test_kill_during_save_resumes_from_the_previous_checkpoint(setup, point, caplog):
    code, out, log = wait_for(setup, point)
    assert code == -signal.SIGKILL, log[-3000:]
    # never a half-written checkpoint-4: only the staging folder, which is ignored
    assert names(out) == ["checkpoint-2", "checkpoint-4.saving"]
    assert verify_checkpoint(str(out / "checkpoint-2")) == []
    resume(setup, out)
    assert f"ignoring {out / 'checkpoint-4.saving'}: an interrupted save" in caplog.text
    assert names(out) == ["checkpoint-4"]  # leftover and rotated checkpoint gone
    assert verify_checkpoint(str(out / "checkpoint-4")) == []
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert_weights_equal(setup["weights"], out)


def test_kill_during_rotation_resumes_from_the_new_checkpoint(setup, caplog):
    code, out, log = wait_for(setup, "rotation")
    assert code == -signal.SIGKILL, log[-3000:]
    assert names(out) == ["checkpoint-2.deleting", "checkpoint-4"]  # renamed before deletion: never half a checkpoint
    resume(setup, out)
    assert "resuming from " + str(out / "checkpoint-4") in caplog.text
    assert names(out) == ["checkpoint-4"]
    assert_weights_equal(setup["weights"], out)


# --- full disk ----------------------------------------------------------------------------------------------------
def test_full_disk_is_one_line_and_the_run_continues_after(setup):
    """Command line: ENOSPC while writing the step-4 checkpoint -> exit 1, one line naming the folder and the space
    needed, no traceback, the partial checkpoint removed, checkpoint-2 kept; the next start resumes from it."""
    code, out, log = wait_for(setup, "enospc")
    assert code == 1, log[-3000:]
    assert "Traceback" not in log
    error = [line for line in log.splitlines() if " ERROR " in line]
    assert len(error) == 1, log[-3000:]
    size = checkpoint.checkpoint_bytes(str(out / "checkpoint-2"))
    assert f"not enough disk space to save {out / 'checkpoint-4'}: it needs about " \
           f"{checkpoint.format_bytes(size)} (the size of checkpoint-2), " in error[0]
    assert " free; the partial checkpoint was removed; " in error[0]
    assert names(out) == ["checkpoint-2"]
    resume(setup, out)
    assert_weights_equal(setup["weights"], out)


def test_torch_write_failure_on_a_full_disk(setup, tmp_path, monkeypatch):
    """torch.save's ENOSPC has no errno ("inline_container.cc ... unexpected pos"): with the free space below the
    estimate it is a full disk too. Partial checkpoint removed, previous one kept, resume equals the reference."""
    out = tmp_path / "run"
    shutil.copytree(setup["ref"] / "checkpoint-2", out / "checkpoint-2")
    real_save, failed = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04" + bytes(1000))
            failed.append(f)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1472")
        return real_save(obj, f, *args, **kwargs)

    real_free = checkpoint.free_bytes
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 50_000 if failed else real_free(path))
    with pytest.raises(CheckpointSaveError) as err:
        resume(setup, out)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"not enough disk space to save {out / 'checkpoint-4'}: it needs about ")
    assert "48.8 KB free; the partial checkpoint was removed; " in message
    assert f"{out / 'checkpoint-2'} is kept" in message
    assert names(out) == ["checkpoint-2"]
    monkeypatch.undo()
    resume(setup, out)
    assert_weights_equal(setup["weights"], out)


def test_too_little_space_stops_before_writing(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1000)
    with pytest.raises(CheckpointSaveError, match=r"it needs about 3\.\d MB \(model and optimizer state\), "
                                                  r"1000 B free; stopping before writing\. "):
        resume(setup, out, "--max_steps", "2")
    assert names(out) == []


def test_full_disk_during_the_final_save(setup, tmp_path, monkeypatch):
    """The last checkpoint is complete, the final model does not fit: one line, and the next start only writes the
    final model again (no extra training step), equal to the reference."""
    from internvl_chat.model import InternVLChatModel

    out = tmp_path / "run"
    real = InternVLChatModel.save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        if Path(save_directory) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(InternVLChatModel, "save_pretrained", save_pretrained)
    with pytest.raises(CheckpointSaveError, match=f"^not enough disk space to save the final model in {out}: it "
                                                  "needs about .* free. Free some space and run the same command "
                                                  "again: it resumes from the last checkpoint$"):
        resume(setup, out)
    monkeypatch.undo()
    resume(setup, out)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert_weights_equal(setup["weights"], out)


def test_disk_full_recognised_in_every_form():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), free=10**12, needed=1)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), free=10**12, needed=1)
    safetensors_error = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                     'message: "No space left on device" })')
    assert is_disk_full(safetensors_error, free=10**12, needed=1)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped, free=10**12, needed=1)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1472")
    assert is_disk_full(torch_error, free=100, needed=1000)
    assert not is_disk_full(torch_error, free=10**12, needed=1000)  # a write failure with space left: not "full"
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), free=0, needed=1000)


# --- corrupt newest checkpoint ------------------------------------------------------------------------------------
def truncate(folder, name):
    path = folder / name
    os.truncate(path, path.stat().st_size // 2)


CORRUPTIONS = {
    # fault -> (how, the reason logged; {size}: model.safetensors' size before)
    "truncated_weights": (lambda d: truncate(d, "model.safetensors"),
                          "model.safetensors is {half} bytes, the marker recorded {size} (truncated or overwritten)"),
    "missing_optimizer": (lambda d: (d / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "zeroed_tail": (lambda d: _zero_tail(d / "model.safetensors"),
                    "model.safetensors content differs from what was saved (sha256)"),
    "no_marker": (lambda d: (d / MARKER).unlink(), "no completion marker (the save did not finish)"),
}


def _zero_tail(path):
    """What a crash after an unsynced write can leave: the right size, zeros at the end."""
    with open(path, "r+b") as f:
        f.seek(-4096, os.SEEK_END)
        f.write(bytes(4096))


@pytest.mark.parametrize("fault", sorted(CORRUPTIONS))
def test_verify_names_the_fault(setup, tmp_path, fault):
    corrupt, reason = CORRUPTIONS[fault]
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(setup["ref"] / "checkpoint-4", folder)
    assert verify_checkpoint(str(folder)) == []
    size = (folder / "model.safetensors").stat().st_size
    corrupt(folder)
    assert verify_checkpoint(str(folder)) == [reason.format(size=size, half=size // 2)]


@pytest.mark.parametrize("fault", ["truncated_weights", "missing_optimizer"])
def test_corrupt_newest_checkpoint_is_skipped_with_its_reason(setup, tmp_path, fault, caplog):
    """Before: every restart died in `SafetensorError: incomplete metadata`, no path. Now the newest checkpoint that
    verifies is resumed, the skipped one is named with its reason, and the run ends with the reference weights."""
    out = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(setup["ref"] / name, out / name)
    corrupt, reason = CORRUPTIONS[fault]
    size = (out / "checkpoint-4" / "model.safetensors").stat().st_size
    reason = reason.format(size=size, half=size // 2)
    corrupt(out / "checkpoint-4")
    resume(setup, out)  # save_total_limit 1
    assert f"skipping checkpoint {out / 'checkpoint-4'}: {reason}" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert names(out) == ["checkpoint-4"] and verify_checkpoint(str(out / "checkpoint-4")) == []
    assert_weights_equal(setup["weights"], out)


def test_explicit_resume_from_a_broken_checkpoint_names_it(setup, tmp_path):
    def start(resume_from_checkpoint):  # what finetune.py decides before training
        return decide(str(tmp_path), {}, overwrite=False, resume_from_checkpoint=resume_from_checkpoint,
                      auto_resume=True)

    folder = tmp_path / "checkpoint-4"
    shutil.copytree(setup["ref"] / "checkpoint-4", folder)
    weights = folder / "model.safetensors"
    size, header = weights.stat().st_size, 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    truncate(folder, "model.safetensors")
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint {folder} cannot be resumed from: "
                                         f"model.safetensors is {size // 2} bytes"):
        start(str(folder))
    (folder / MARKER).unlink()  # without a marker the weight files' structure is still checked
    with pytest.raises(ValueError, match=f"model.safetensors header declares {size - header} data bytes, the file "
                                         f"holds {size // 2 - header} \\(truncated\\)"):
        start(str(folder))
    with pytest.raises(RunFolderError, match="holds checkpoints that do not verify \\(checkpoint-4\\)"):
        start("True")


def test_legacy_marker_still_counts_with_structural_checks(setup, tmp_path):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(setup["ref"] / "checkpoint-2", folder)
    (folder / MARKER).write_text(json.dumps({"global_step": 2, "time": 0}))  # the format before sizes
    assert verify_checkpoint(str(folder)) == []
    truncate(folder, "optimizer.pt")
    assert verify_checkpoint(str(folder)) == ["optimizer.pt not a complete torch archive (truncated or corrupt)"]


# --- rotation -----------------------------------------------------------------------------------------------------
def make_checkpoints(setup, out, good=(), broken=(), leftovers=()):
    for step in good:
        shutil.copytree(setup["ref"] / "checkpoint-2", out / f"checkpoint-{step}")
    for step in broken:
        shutil.copytree(setup["ref"] / "checkpoint-2", out / f"checkpoint-{step}")
        truncate(out / f"checkpoint-{step}", "model.safetensors")
    for name in leftovers:
        (out / name / "checkpoint-9").mkdir(parents=True)


@pytest.mark.parametrize("good, broken, limit, kept", [
    ((2,), (4,), 1, ["checkpoint-2", "checkpoint-4"]),  # corrupt newest + limit 1: the only good one stays
    ((2, 4), (6,), 1, ["checkpoint-4", "checkpoint-6"]),  # newer broken one kept: replaced when the run gets there
    ((4,), (2,), 1, ["checkpoint-4"]),  # broken and older than a good one: a leftover
    ((2, 4, 6), (), 2, ["checkpoint-4", "checkpoint-6"]),
    ((2, 4), (), None, ["checkpoint-2", "checkpoint-4"]),
    ((), (2, 4), 1, ["checkpoint-2", "checkpoint-4"]),  # nothing verifies: nothing is deleted
])
def test_rotation_counts_only_verified_checkpoints(setup, tmp_path, good, broken, limit, kept):
    make_checkpoints(setup, tmp_path, good, broken, leftovers=["checkpoint-8.saving", "checkpoint-1.deleting"])
    rotate_checkpoints(str(tmp_path), limit)
    assert names(tmp_path) == kept
