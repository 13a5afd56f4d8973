"""The run-folder contract (train/run_folder.py) through the real launcher: a finished run is left untouched, changed
settings are refused with the differences and the ways out, --overwrite_output_dir moves the old run aside, an
interrupted run with the same settings resumes; and the decision rules on their own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_chat.data.meta import load_meta
from internvl_chat.data.records import index_annotation
from internvl_chat.tiny_model import make_tiny_model
from internvl_chat.train import checkpoint, run_folder
from internvl_chat.train.run_folder import RunFolderError, decide, differences, resolve_settings

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "shell/internvl2.5/2nd_finetune/internvl2_5_1b_dynamic_res_2nd_finetune_full.sh"


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder`: content hash, size and modification time."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = ()
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, folder)] = (hashlib.sha256(Path(path).read_bytes()).hexdigest(), stat.st_size,
                                                   stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    make_tiny_model(root / "model", llm="qwen2", template="internvl2_5", seed=0)
    subprocess.run([sys.executable, str(REPO / "tools/make_demo_data.py"), str(root / "data"), "--num-images", "8",
                    "--heldout", "0"], check=True, capture_output=True)
    return root


def launch(world: Path, out: Path, *extra: str, meta: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GPUS")}
    env.update(GPUS="1", PER_DEVICE_BATCH_SIZE="2", BATCH_SIZE="2", MODEL=str(world / "model"),
               META_PATH=str(meta or world / "data" / "meta.json"), OUTPUT_DIR=str(out), PYTHON=sys.executable,
               MASTER_PORT=str(_free_port()), USE_GPU="0")
    args = ["--max_steps", "2", "--save_steps", "1", "--save_total_limit", "2", "--bf16", "False",
            "--max_dynamic_patch", "1", "--report_to", "none", "--disable_tqdm", "True", "--dataloader_num_workers",
            "0", "--grad_checkpoint", "False", *extra]
    return subprocess.run(["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished(world):
    """A run trained to its end (2 steps, a checkpoint at each) by the launcher."""
    out = world / "finished"
    proc = launch(world, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_a_finished_run_is_complete_and_untouched(world, finished):
    before = snapshot(finished)
    assert json.loads((finished / "run_settings.json").read_text())["complete"] is True
    assert json.loads((finished / "checkpoint-2" / "run_settings.json").read_text())["global_step"] == 2
    proc = launch(world, finished)
    assert proc.returncode == 0, proc.stderr
    assert f"{finished} holds this run, complete at step 2: nothing to do" in proc.stdout
    assert snapshot(finished) == before  # not even the log: nothing is trained, saved or appended
    assert json.loads((finished / "trainer_state.json").read_text())["global_step"] == 2


def test_changed_settings_are_refused_with_the_differences(world, finished):
    before = snapshot(finished)
    proc = launch(world, finished, "--learning_rate", "1e-3", "--conv_style", "Hermes-2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error = proc.stderr[proc.stderr.index("error: "):]
    assert "other settings" in error
    assert "schedule: learning_rate: 4e-05 -> 0.001" in error
    assert 'template: conv_style: "internvl2_5" -> "Hermes-2"' in error
    assert "--overwrite_output_dir True" in error and "another output folder" in error
    assert snapshot(finished) == before


def test_overwrite_output_dir_moves_the_old_run_aside(world, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    proc = launch(world, out, "--learning_rate", "1e-3", "--overwrite_output_dir", "True")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1 and f"moved it to {aside[0]}" in proc.stdout
    assert snapshot(aside[0]) == before  # the old run, whole, under its new name
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["complete"] and settings["settings"]["schedule"]["learning_rate"] == 1e-3
    assert "moved it to" in (out / "training_log.txt").read_text()  # the new run's log says where the old one went


def test_an_interrupted_run_resumes_only_with_its_settings(world, finished, tmp_path):
    """Killed after checkpoint-1: other data is refused (naming the dataset and the way to resume on purpose), the
    same settings resume from step 1 and finish."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(finished / "checkpoint-1", out / "checkpoint-1")
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    meta = json.loads((data / "meta.json").read_text())
    for entry in meta.values():
        entry["root"] = str(data)
        entry["annotation"] = str(data / Path(entry["annotation"]).name)
    (data / "meta.json").write_text(json.dumps(meta))
    annotation = Path(next(iter(meta.values()))["annotation"])
    lines = annotation.read_text().splitlines()
    annotation.write_text("\n".join(lines + lines[:1]) + "\n")  # one more record
    proc = launch(world, out, meta=data / "meta.json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "data: dataset" in proc.stderr and f"{len(lines)} records" in proc.stderr
    assert f"--resume_from_checkpoint {out}/checkpoint-1" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]

    proc = launch(world, out)  # the original data: same settings
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming from {out}/checkpoint-1 (step 1): same settings" in proc.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


# --- the rules, without training ----------------------------------------------------------------------------------
def settings_for(world: Path, **values):
    meta = str(world / "data" / "meta.json")
    entries = load_meta(meta, log_warnings=False)
    flags = {"model_name_or_path": str(world / "model"), "meta_path": meta, "learning_rate": 4e-5, **values}
    return resolve_settings(flags, 1, entries, [index_annotation(e.annotation) for e in entries])


def test_decisions(world, finished, tmp_path):
    same = json.loads((finished / "run_settings.json").read_text())["settings"]
    other = settings_for(world, learning_rate=1.0)
    kw = dict(overwrite=False, resume_from_checkpoint=None, auto_resume=True)
    assert decide(str(tmp_path / "missing"), other, **kw).action == "new"
    (tmp_path / "logs_only").mkdir()
    (tmp_path / "logs_only" / "training_log.txt").write_text("an earlier failed start\n")
    assert decide(str(tmp_path / "logs_only"), other, **kw).action == "new"
    assert decide(str(finished), same, **kw).action == "complete"
    assert decide(str(finished), other, **{**kw, "overwrite": True}).action == "start_over"
    named = decide(str(finished), other, **{**kw, "resume_from_checkpoint": str(finished / "checkpoint-1")})
    assert (named.action, named.resume) == ("resume", str(finished / "checkpoint-1"))  # on purpose: no comparison

    run = tmp_path / "interrupted"
    shutil.copytree(finished / "checkpoint-2", run / "checkpoint-2")
    assert decide(str(run), same, **kw).resume == str(run / "checkpoint-2")
    with pytest.raises(RunFolderError, match="--auto_resume is False"):
        decide(str(run), same, **{**kw, "auto_resume": False})
    (run / "checkpoint-2" / "run_settings.json").unlink()  # an older version's checkpoint: resumed, with a note
    checkpoint.write_marker(str(run / "checkpoint-2"), 2)
    legacy = decide(str(run), other, **kw)
    assert legacy.action == "resume" and "could not be compared" in legacy.message

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")  # someone's model, not a run
    with pytest.raises(RunFolderError, match=r"the files of another run \(config.json\); training here would write"):
        decide(str(foreign), other, **kw)


def test_fingerprints_follow_content_not_paths(world, tmp_path):
    base = settings_for(world)
    moved = tmp_path / "model_copy"
    shutil.copytree(world / "model", moved)
    assert differences(base, settings_for(world, model_name_or_path=str(moved))) == []
    config = json.loads((moved / "config.json").read_text())
    config["template"] = "Hermes-2"
    (moved / "config.json").write_text(json.dumps(config))
    assert [d.split(":")[:2] for d in differences(base, settings_for(world, model_name_or_path=str(moved)))] == [
        ["model", " checkpoint"]]
    # the global batch is what counts: 8 per device x 1 equals 4 per device x 2 accumulation
    assert differences(base, settings_for(world, per_device_train_batch_size=4, gradient_accumulation_steps=2)) == []
    assert differences(base, settings_for(world, per_device_train_batch_size=4)) == [
        "batch: global batch: 8 (8 per device x 1 accumulation x 1 processes) -> "
        "4 (4 per device x 1 accumulation x 1 processes)"]
    # the fast image path changes the pixels (slightly): a resume must not switch it silently
    assert differences(settings_for(world, fast_image_decode=False), settings_for(world, fast_image_decode=True)) == [
        "data: fast_image_decode: false -> true"]
    older = json.loads(json.dumps(base))
    del older["schedule"]["lr_scheduler_kwargs"]  # a setting an older version did not record: not a difference
    assert differences(older, base) == []
    assert run_folder.zero_stage(str(REPO / "zero_stage3_config_34b.json")) == "ZeRO-3"
    assert run_folder.zero_stage({"zero_optimization": {"stage": 1}}) == "ZeRO-1"
    assert run_folder.zero_stage(None) is None


def test_output_folder_mistakes_are_one_line_errors(world, finished, tmp_path):
    from internvl_chat.finetune import UserError, early_checks, read_flags

    def check(out, *extra, meta=None):
        flags = read_flags(["--model_name_or_path", str(world / "model"), "--meta_path",
                            str(meta or world / "data" / "meta.json"), "--output_dir", str(out), *extra])
        return early_checks(flags.values)

    with pytest.raises(UserError, match="is the model folder"):
        check(world / "model")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check(tmp_path / "a_file")
    # the data inside the folder of a run to start over: moving it aside would take the data along
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.copytree(world / "data", run / "data")
    meta = json.loads((run / "data" / "meta.json").read_text())
    for entry in meta.values():
        entry["root"] = str(run / "data")
        entry["annotation"] = str(run / "data" / Path(entry["annotation"]).name)
    (run / "data" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"would move .* aside, and it holds .*meta.json, an input of this run"):
        check(run, "--overwrite_output_dir", "True", meta=run / "data" / "meta.json")
    assert (run / "checkpoint-2").is_dir()


def test_a_folder_in_use_by_a_running_run_is_refused(tmp_path):
    out = tmp_path / "busy"
    lock = run_folder.RunLock(str(out))
    try:
        holder = run_folder.lock_holder(str(out))
        assert holder and f"pid {os.getpid()}" in holder
        with pytest.raises(RunFolderError, match=r"is in use by a run that is still going \(pid "):
            run_folder.RunLock(str(out))
    finally:
        lock.release()
    assert run_folder.lock_holder(str(out)) is None  # released: the next run may start


def test_a_forgotten_conv_style_is_named(world, tmp_path, caplog):
    """The default --conv_style (internlm2-chat, as officially) on an internvl2_5 checkpoint: said in one warning."""
    from internvl_chat.finetune import load_model_and_tokenizer, read_flags

    base = ["--model_name_or_path", str(world / "model"), "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    for extra, expected in (([], 1), (["--conv_style", "internvl2_5"], 0)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="internvl_chat.finetune"):
            load_model_and_tokenizer(*read_flags(base + extra).build())
        named = [r for r in caplog.records if "differs from the checkpoint's template internvl2_5" in r.message]
        assert len(named) == expected, [r.message for r in caplog.records]


def test_only_training_hashes_annotation_files_while_indexing(world, tmp_path, monkeypatch):
    """Training indexes with `hash_files` and the fingerprint reuses that hash; checkers and evaluation (a dataset
    indexing its own files) never hash, and the fingerprint of unhashed indexes is the same."""
    from types import SimpleNamespace

    from internvl_chat.data import records
    from internvl_chat.data.config import DataConfig
    from internvl_chat.data.dataset import SupervisedDataset
    from internvl_chat.finetune import check_meta
    from internvl_chat.model import load_tokenizer

    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"conversations": []}]))
    for path in (listed, Path(load_meta(str(world / "data" / "meta.json"), log_warnings=False)[0].annotation)):
        assert index_annotation(path).sha256 is None
        assert index_annotation(path, hash_files=True).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    meta = str(world / "data" / "meta.json")
    entries, hashed = check_meta(meta)  # the training path
    assert all(a.sha256 for a in hashed)
    plain = [index_annotation(e.annotation) for e in entries]
    assert run_folder.data_fingerprint(meta, entries, hashed) == run_folder.data_fingerprint(meta, entries, plain)

    def no_hashing(*args):
        raise AssertionError("an annotation file was hashed outside training")

    monkeypatch.setattr(records, "hashlib", SimpleNamespace(sha256=no_hashing))
    dataset = SupervisedDataset(entries, load_tokenizer(str(world / "model")), DataConfig())
    assert all(source.annotation.sha256 is None for source in dataset.sources)
    assert len(list(records.read_records(entries[0].annotation))) == hashed[0].num_records  # the checker's reader
