"""Hostile meta files and the checker's warnings (issue 11, items 5 and 6).

Every broken meta file must give one clear message, and the checker (``tools/check_data.py``) and training
(``build_dataset``, and once the real ``finetune.main``) must agree: the checker exits 2 printing exactly the
message training stops with. Unknown keys and suspicious records (two turns of one role in a row, media paths
that resolve outside the dataset root) are warnings of the checker that training accepts, unless
``--confine_paths`` makes such a path a bad sample (``path_outside_root``) for both.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import resource
import time
from pathlib import Path

import pytest
from PIL import Image

from internvl_chat.data.check import check_dataset
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import build_dataset
from internvl_chat.data.errors import parse_report
from internvl_chat.data.meta import MetaError, load_meta
from internvl_chat.model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "tokenizer_qwen2"
TEMPLATE = "Hermes-2"


@functools.cache
def tokenizer():
    return load_tokenizer(str(TOKENIZER))


@functools.cache
def check_tool():
    spec = importlib.util.spec_from_file_location("check_data_under_test", REPO / "tools" / "check_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(**overrides) -> DataConfig:
    values = dict(template=TEMPLATE, dynamic_image_size=False, max_seq_length=2048, bad_data="skip")
    values.update(overrides)
    return DataConfig(**values)


def text_record(question: str = "Say hello.", answer: str = "Hello!") -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def write_annotation(path: Path, lines: int = 10) -> Path:
    path.write_text("".join(json.dumps(text_record(f"Question {k}?")) + "\n" for k in range(lines)))
    return path


def entry(annotation: str = "a.jsonl", **overrides) -> dict:
    return {"root": "", "annotation": annotation, "data_augment": False, "repeat_time": 1, **overrides}


def run_checker(capsys, meta: Path, *flags: str) -> tuple[int, str, str]:
    code = check_tool().main(["--meta_path", str(meta), "--no-write-lengths", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def training_error(meta: Path) -> str:
    with pytest.raises(MetaError) as info:
        build_dataset(meta, tokenizer(), config())
    return str(info.value)


# ------------------------------------------------------------------------------------------------------------
# Broken meta files: one message each, the same from the checker and from training

GOOD = json.dumps(entry())


def _meta_text(case: str) -> bytes:
    """The meta file of one case (the annotation a.jsonl, 10 records, exists beside it)."""
    texts = {
        "duplicate_name": f'{{\n  "a": {GOOD},\n  "b": {GOOD},\n  "a": {GOOD}\n}}\n',
        "duplicate_key": '{\n  "a": {"root": "", "annotation": "a.jsonl", "data_augment": false,\n'
                         '        "repeat_time": 1, "repeat_time": 3}\n}\n',
        "misspelled_required": json.dumps({"a": {**entry(), "anotation": "a.jsonl"}}).replace(
            '"annotation": "a.jsonl", ', ""),
        "repeat_string": json.dumps({"a": entry(repeat_time="2")}),
        "repeat_huge": json.dumps({"a": entry(repeat_time=1e12)}),
        "repeat_tiny": json.dumps({"a": entry(repeat_time=0.01)}),
        "repeat_zero": json.dumps({"a": entry(repeat_time=0)}),
        "repeat_negative": json.dumps({"a": entry(repeat_time=-1)}),
        "repeat_nan": '{"a": {"root": "", "annotation": "a.jsonl", "data_augment": false, "repeat_time": NaN}}',
        "repeat_bool": json.dumps({"a": entry(repeat_time=True)}),
        "empty_annotation": json.dumps({"a": entry(), "e": entry("empty.jsonl")}),
        "blank_annotation": json.dumps({"a": entry(), "e": entry("blank.jsonl")}),
        "missing_annotation": json.dumps({"a": entry("nowhere.jsonl")}),
        "fifo_annotation": json.dumps({"a": entry("pipe.jsonl")}),
        "not_an_object": json.dumps([entry()]),
        "entry_not_an_object": json.dumps({"a": ["a.jsonl"]}),
        "empty_meta": "",
        "trailing_garbage": json.dumps({"a": entry()}) + "\n}",
        "directory_annotation": json.dumps({"a": entry("adir")}),
        "deep_nesting": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge_integer": json.dumps({"a": entry()})[:-2] + ', "length": 1' + "0" * 5000 + "}}",
    }
    if case == "non_utf8":
        return b'{\n  "caf\xe9": ' + GOOD.encode() + b"\n}\n"  # Latin-1 e-acute
    return texts[case].encode()


# case -> the fragment both must print (after the meta file's path)
BROKEN = {
    "duplicate_name": ":4: dataset 'a' is defined twice (lines 2 and 4); JSON would keep only the last one",
    "duplicate_key": ":2, dataset 'a': key 'repeat_time' is given twice in the entry",
    "misspelled_required": ":1, dataset 'a': missing required key(s) annotation; found 'anotation' "
                           "(a misspelling of 'annotation'?)",
    "repeat_string": ":1, dataset 'a': repeat_time must be a number, got the string '2' (write 2 without quotes)",
    "repeat_huge": ":1, dataset 'a': repeat_time 1e+12 on 10 records gives 1e+13 samples per epoch, more than the "
                   "1e+09 allowed",
    "repeat_tiny": ":1, dataset 'a': repeat_time 0.01 on 10 records gives int(10 x 0.01) = 0 samples per epoch; "
                   "use at least 0.1",
    "repeat_zero": ":1, dataset 'a': repeat_time must be > 0 (1 = every line once, 0.3 = a random 30%), got 0",
    "repeat_negative": ":1, dataset 'a': repeat_time must be > 0 (1 = every line once, 0.3 = a random 30%), got -1",
    "repeat_nan": ":1, dataset 'a': repeat_time must be a finite number, got nan",
    "repeat_bool": ":1, dataset 'a': repeat_time must be a number, got true",
    "empty_annotation": ":1, dataset 'e': annotation file {folder}/empty.jsonl holds no sample (it is empty or holds "
                        "only blank lines)",
    "blank_annotation": ":1, dataset 'e': annotation file {folder}/blank.jsonl holds no sample (it is empty or holds "
                        "only blank lines)",
    "missing_annotation": ":1, dataset 'a': annotation file 'nowhere.jsonl' not found (tried ",
    "fifo_annotation": ":1, dataset 'a': annotation file 'pipe.jsonl' is not a regular file",
    "not_an_object": " must hold a JSON object mapping dataset names to entries, got a list",
    "entry_not_an_object": ":1, dataset 'a': the entry must be a JSON object, got list",
    "empty_meta": " is not valid JSON: Expecting value at line 1 column 1",
    "trailing_garbage": " is not valid JSON: Extra data at line 2 column 1",
    "directory_annotation": ":1, dataset 'a': annotation file 'adir' is a directory, not a file",
    "deep_nesting": " is nested too deeply to be a meta file",
    "huge_integer": " holds a value that cannot be read: Exceeds the limit (4300 digits)",
    "non_utf8": " is not UTF-8 text: byte 0xe9 at byte offset 8 (line 2) (invalid continuation byte)",
}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder with a good 10-line annotation, an empty one, a blank-lines one, a FIFO and a folder; the cwd."""
    monkeypatch.chdir(tmp_path)
    write_annotation(tmp_path / "a.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n  \r\n\n")
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "adir").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_meta_same_message_from_checker_and_training(folder, capsys, case):
    meta = folder / "meta.json"
    meta.write_bytes(_meta_text(case))
    expected = f"meta file {meta}" + BROKEN[case].format(folder=folder)

    message = training_error(meta)
    assert message.startswith(expected), message
    code, out, err = run_checker(capsys, meta)
    assert code == 2 and out == ""
    assert err == f"check_data: {message}\n"  # the very message training stops with


def test_absurd_repeat_time_fails_fast_without_allocating(folder):
    meta = folder / "meta.json"
    meta.write_bytes(_meta_text("repeat_huge"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(MetaError, match=r"1e\+13 samples per epoch"):
        build_dataset(meta, tokenizer(), config())
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no 80 TB index
    # A repeat_time beyond float range is refused as absurd, not with an OverflowError.
    meta.write_text('{"a": {"root": "", "annotation": "a.jsonl", "data_augment": false, "repeat_time": 1'
                    + "0" * 400 + "}}")
    with pytest.raises(MetaError, match="repeat_time is absurdly large"):
        load_meta(meta)


def test_unreadable_annotation(folder, capsys, monkeypatch):
    annotation = folder / "a.jsonl"
    if os.geteuid() != 0:
        annotation.chmod(0)
    else:  # root reads whatever the permissions: refuse the open as the kernel would for anyone else
        real_open = open

        def refusing_open(path, *args, **kwargs):
            if os.fspath(path) == str(annotation):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("internvl_chat.data.meta.open", refusing_open, raising=False)
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"a": entry()}))
    message = training_error(meta)
    assert message == (f"meta file {meta}:1, dataset 'a': annotation file 'a.jsonl' cannot be read: Permission "
                       f"denied ({annotation})")
    code, _, err = run_checker(capsys, meta)
    assert code == 2 and err == f"check_data: {message}\n"


def test_bom_meta_and_string_length_are_accepted(folder, capsys):
    meta = folder / "meta.json"
    meta.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": entry(length="10")}, indent=2).encode())
    (entry_a,) = load_meta(meta)
    assert (entry_a.name, entry_a.length, entry_a.meta_line, entry_a.warnings) == ("a", 10, 2, [])
    assert len(build_dataset(meta, tokenizer(), config())) == 10
    code, out, _ = run_checker(capsys, meta)
    assert code == 0 and "warnings:" not in out


def test_unknown_keys_warn_with_the_nearest_known_key(folder, capsys, caplog):
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"a": entry(), "b": entry(max_dynamic_patchs=4, data_type="chat", metric="vqa_acc")},
                               indent=2))
    expected = [
        "dataset 'b': unknown key 'max_dynamic_patchs' is ignored (did you mean 'max_dynamic_patch'?)",
        "dataset 'b': unknown key 'data_type' is ignored (known keys: root, annotation, data_augment, repeat_time, "
        "length, max_dynamic_patch, format)",
    ]  # 'metric' (of --eval_meta_path) is known to our tools: no warning
    # Training accepts the file and says so loudly, once per key.
    with caplog.at_level(logging.WARNING, logger="internvl_chat.data.meta"):
        dataset = build_dataset(meta, tokenizer(), config())
    assert len(dataset) == 20
    assert [r.getMessage() for r in caplog.records if r.name == "internvl_chat.data.meta"] == [
        f"meta file {meta}:8, {text}" for text in expected]
    assert dataset.entries[1].max_dynamic_patch is None and dataset.entries[1].extra["max_dynamic_patchs"] == 4
    # The checker passes it and lists the same warnings at the meta file's line.
    code, out, err = run_checker(capsys, meta)
    assert code == 0 and err == ""
    assert "  unknown_meta_key: 2" in out
    for text in expected:
        assert f"    {meta}:8: {text}\n" in out


def test_training_entry_point_stops_with_the_checkers_message(tmp_path, capsys, monkeypatch):
    """The real finetune.main, not just build_dataset: a tiny repeat_time stops it with the same message."""
    from internvl_chat.finetune import main
    from internvl_chat.tiny_model import make_tiny_model

    make_tiny_model(tmp_path / "model", llm="qwen2", template="internvl2_5", seed=0)
    monkeypatch.chdir(tmp_path)
    write_annotation(tmp_path / "a.jsonl")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": entry(repeat_time=0.05)}))
    with pytest.raises(MetaError) as info:
        main(["--model_name_or_path", str(tmp_path / "model"), "--meta_path", str(meta), "--output_dir",
              str(tmp_path / "out"), "--conv_style", "internvl2_5", "--max_steps", "1", "--report_to", "none",
              "--bf16", "False", "--dataloader_num_workers", "0"])
    assert "int(10 x 0.05) = 0 samples per epoch" in str(info.value)
    capsys.readouterr()  # the model loading's progress bars
    code, _, err = run_checker(capsys, meta)
    assert code == 2 and err == f"check_data: {info.value}\n"


# ------------------------------------------------------------------------------------------------------------
# Warnings: same-role turns and paths outside the dataset root; --confine_paths


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (200, 40, 40)).save(path)
    return path


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, Path, Path]:
    """(meta, annotation, the real path of the image outside the root); line numbers as in the records below."""
    root = tmp_path / "data" / "images"
    _image(root / "in.png")
    outside = _image(tmp_path / "elsewhere" / "out.png")
    (root / "link.png").symlink_to(outside)
    (root / "sub").mkdir()
    (root / "sub" / "up.png").symlink_to("../in.png")  # a link that stays inside: fine
    question = "<image>\nWhat colour is it?"
    records = [
        {"image": "in.png", **text_record(question, "Red.")},  # 1: good
        {"conversations": [{"from": "human", "value": "Hi."}, {"from": "human", "value": "Hello?"},  # 2
                           {"from": "gpt", "value": "Hello!"}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi."},  # 3
                           {"from": "gpt", "value": "Hello!"}, {"from": "gpt", "value": "Hi again!"}]},
        {"image": str(outside), **text_record(question, "Red.")},  # 4: absolute, outside
        {"image": "../../elsewhere/out.png", **text_record(question, "Red.")},  # 5: ../ escape
        {"image": "link.png", **text_record(question, "Red.")},  # 6: symlink out of the root
        {"image": str(root / "in.png"), **text_record(question, "Red.")},  # 7: absolute but inside: fine
        {"image": "sub/up.png", **text_record(question, "Red.")},  # 8: link inside the root: fine
    ]
    annotation = tmp_path / "data" / "train.jsonl"
    annotation.write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = tmp_path / "data" / "meta.json"
    meta.write_text(json.dumps({"d": entry(str(annotation), root=str(root))}))
    return meta, annotation, Path(os.path.realpath(outside))


OUTSIDE_LINES = (4, 5, 6)


def test_checker_warns_same_role_turns_and_paths_outside_root(corpus, capsys):
    meta, annotation, outside = corpus
    report = check_dataset(meta, tokenizer(), config(bad_data="fail"), write_lengths=False)
    assert report.problems == [] and report.exit_code("fail") == 0
    found = {(w.line, w.kind) for w in report.warnings}
    assert found == {(2, "same_role_turns"), (3, "same_role_turns"), *((n, "path_outside_root") for n in OUTSIDE_LINES)}
    assert all(w.file == str(annotation) and w.dataset == "d" for w in report.warnings)
    by_line = {w.line: w.reason for w in report.warnings}
    assert by_line[2] == "turns 0 and 1 are both 'human': two human turns in a row (the first question gets no answer)"
    assert by_line[3] == "turns 2 and 3 are both 'gpt': two gpt turns in a row (two answers to one question)"
    for line in OUTSIDE_LINES:
        assert f"resolves to {outside}, outside the dataset root " in by_line[line]
    # The command line: exit 0, each warning at file:line with the resolved path.
    code, out, _ = run_checker(capsys, meta)
    assert code == 0 and "  path_outside_root: 3" in out and "  same_role_turns: 2" in out
    for line in OUTSIDE_LINES:
        assert f"    {annotation}:{line}: image " in out
    assert out.count(f"resolves to {outside}, outside the dataset root") == 3


def test_training_reads_outside_paths_unless_confined(corpus, capsys):
    meta, annotation, outside = corpus
    free = build_dataset(meta, tokenizer(), config())
    for index in range(len(free)):  # every record trains, on its own line
        item = free[index]
        assert item["skipped"] == [] and item["sample_id"] == f"{annotation}:{index + 1}"

    confined = build_dataset(meta, tokenizer(), config(confine_paths=True))
    item = confined[3]  # line 4: lines 4, 5 and 6 are skipped, line 7 (absolute, inside) replaces them
    assert item["sample_id"] == f"{annotation}:7"
    reports = [parse_report(r) for r in item["skipped"]]
    assert [(r.line, r.kind) for r in reports] == [(n, "path_outside_root") for n in OUTSIDE_LINES]
    assert all(r.file == str(annotation) and f"resolves to {outside}, outside the dataset root" in r.reason
               for r in reports)
    assert confined[7]["sample_id"] == f"{annotation}:8" and confined[7]["skipped"] == []
    # The checker with --confine_paths: the same three lines are problems, no longer warnings.
    code, out, _ = run_checker(capsys, meta, "--confine_paths")
    assert code == 1 and "  path_outside_root: 3" in out
    report = check_dataset(meta, tokenizer(), config(confine_paths=True, bad_data="fail"), write_lengths=False)
    assert [(p.line, p.kind) for p in report.problems] == [(n, "path_outside_root") for n in OUTSIDE_LINES]
    assert {w.kind for w in report.warnings} == {"same_role_turns"}


def test_confine_paths_flag_reaches_the_data_config():
    from types import SimpleNamespace

    from internvl_chat.finetune import data_config, parse_args

    _, data_args, training_args = parse_args(["--meta_path", "m.json", "--output_dir", "/tmp/unused",
                                              "--confine_paths", "True", "--report_to", "none"])
    assert data_config(data_args, training_args, SimpleNamespace(num_image_token=256)).confine_paths is True
    _, data_args, training_args = parse_args(["--meta_path", "m.json", "--output_dir", "/tmp/unused",
                                              "--report_to", "none"])
    assert data_config(data_args, training_args, SimpleNamespace(num_image_token=256)).confine_paths is False
