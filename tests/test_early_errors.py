"""User errors of `python -m internvl_chat.finetune` stop it in the first seconds: one line, exit code 2, no traceback
(`--debug` adds it), only rank 0 prints; checked before any process group or model load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from internvl_chat.data.meta import MetaError
from internvl_chat.finetune import UserError, cli, main, parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_model(tmp_path):
    """Enough of a checkpoint folder for the early checks (they read no weights)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def write_meta(tmp_path, records: list[str], **extra) -> Path:
    (tmp_path / "a.jsonl").write_text("".join(line + "\n" for line in records))
    meta = tmp_path / "meta.json"
    entry = {"root": str(tmp_path), "annotation": str(tmp_path / "a.jsonl"), "data_augment": False, "repeat_time": 1}
    meta.write_text(json.dumps({"a": {**entry, **extra}}))
    return meta


def args(model, meta, tmp_path, *extra):
    return ["--model_name_or_path", str(model), "--meta_path", str(meta), "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", *extra]


def run_entry(*argv, env=None):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "internvl_chat.finetune", *argv], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)
    return proc, time.monotonic() - start


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_unknown_flag_through_the_real_entry_names_the_nearest_flag(tmp_path):
    proc, seconds = run_entry("--output_dir", str(tmp_path / "out"), "--learning_rat", "1e-3")
    print(f"unknown flag: exit after {seconds:.1f} s")  # the interpreter and torch/transformers imports
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        "error: unknown flag --learning_rat (did you mean --learning_rate?); `--help` lists every flag"]
    assert not (tmp_path / "out").exists()


def test_no_prefix_abbreviations():
    with pytest.raises(UserError, match=r"unknown flag --learning_rat \(did you mean --learning_rate\?\)"):
        parse_args(["--output_dir", "o", "--learning_rat", "1e-3"])
    with pytest.raises(UserError, match=r"unknown flags --lerning_rate \(did you mean --learning_rate\?\), "
                                        r"--evaluation_strateg \(did you mean --evaluation_strategy\?\)"):
        parse_args(["--output_dir", "o", "--lerning_rate=1", "--evaluation_strateg", "no"])
    with pytest.raises(UserError, match="invalid float value: 'abc'"):
        parse_args(["--output_dir", "o", "--learning_rate", "abc"])
    with pytest.raises(UserError, match="unexpected arguments 1e-3"):
        parse_args(["--output_dir", "o", "1e-3"])
    assert parse_args(["--output_dir", "o", "--learning_rate", "1e-3"])[2].learning_rate == 1e-3


def test_unknown_key_in_an_arguments_file(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": "o", "learning_rat": 1e-3}))
    with pytest.raises(UserError, match=r"unknown flag --learning_rat \(did you mean --learning_rate\?\)"):
        parse_args([str(path)])


def test_missing_or_foreign_model_folder(tmp_path, fake_model):
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    meta = write_meta(tmp_path, [json.dumps(record)])
    with pytest.raises(UserError, match=r"--model_name_or_path .*nope: no such folder"):
        main(args(tmp_path / "nope", meta, tmp_path))
    (fake_model / "config.json").unlink()
    with pytest.raises(UserError, match="holds no config.json"):
        main(args(fake_model, meta, tmp_path))
    with pytest.raises(UserError, match="--model_name_or_path is required"):
        main(["--meta_path", str(meta), "--output_dir", str(tmp_path / "out")])


def test_meta_errors_before_the_model_loads(tmp_path, fake_model):
    """The fake model folder has no weights: these errors come before any load."""
    with pytest.raises(UserError, match="--meta_path is required"):
        main(["--model_name_or_path", str(fake_model), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(MetaError, match="holds no sample"):
        main(args(fake_model, write_meta(tmp_path, []), tmp_path))
    with pytest.raises(MetaError, match=r"int\(1 x 0.5\) = 0 samples per epoch"):
        main(args(fake_model, write_meta(tmp_path, ["{}"], repeat_time=0.5), tmp_path))
    (tmp_path / "meta.json").write_text('{"a": ')
    with pytest.raises(MetaError, match="is not valid JSON"):
        main(args(fake_model, tmp_path / "meta.json", tmp_path))
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_and_only_on_rank_0(tmp_path, fake_model, capsys, monkeypatch):
    (tmp_path / "meta.json").write_text('{"your_dataset": "PLACEHOLDER"}')
    argv = args(fake_model, tmp_path / "meta.json", tmp_path)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: meta file ") and "Traceback" not in err
    monkeypatch.setenv("RANK", "1")  # no process group is started: the meta file is read before
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(argv) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli(argv) == 2
    assert capsys.readouterr().err == err


def test_broken_meta_through_the_real_entry(tmp_path, fake_model):
    (tmp_path / "meta.json").write_text('{"a": {"root": "x", "annotation": "x.jsonl", }}')
    proc, seconds = run_entry(*args(fake_model, tmp_path / "meta.json", tmp_path))
    print(f"broken meta: exit after {seconds:.1f} s")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "is not valid JSON" in proc.stderr


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert cli(["--debug", "--output_dir", str(tmp_path / "out"), "--learning_rat", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError" in err and len(error_lines(err)) == 1
    assert cli(["--output_dir", str(tmp_path / "out"), "--learning_rat", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err
