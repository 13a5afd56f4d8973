"""Hostile annotation lines: every one is named by the checker and skipped and counted by training.

One generated JSONL corpus holds a line per hostile case (invalid / array / null / deeply nested JSON, huge
integers, lone surrogates, non-UTF-8 bytes, a BOM and CRLF line endings, empty conversations, odd turn orders,
unknown roles, non-string values, boxes out of range, wrong placeholder counts, an over-long sample) between
good lines. The checker must report each bad line with its exact kind; a dataset pass must skip and count
exactly those lines and never yield an item whose labels are all -100; one short real fine-tuning run must
finish and report the same count; a mostly-bad set must stop early (and at the end of a run, over the exact
limit). The small-sample rule of the bad-data tracker is unit-tested on its own.
"""

from __future__ import annotations

import functools
import json
import math
import re
import resource
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_chat.constants import IGNORE_INDEX
from internvl_chat.data.check import check_dataset
from internvl_chat.data.collator import DataCollator
from internvl_chat.data import dataset as dataset_module
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import build_dataset
from internvl_chat.data.errors import BadDataTracker, DataError, TooMuchBadDataError, parse_report, record_error
from internvl_chat.data.records import MAX_JSON_DEPTH, parse_json_line, read_records
from internvl_chat.data.templates import TokenizerError, tokenize_conversation
from internvl_chat.model.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MAX_LEN = 600


@functools.cache
def tokenizer():
    return load_tokenizer(str(FIXTURES / "tokenizer_qwen2"))


def config(**overrides) -> DataConfig:
    values = dict(template="internvl2_5", dynamic_image_size=False, max_seq_length=MAX_LEN, bad_data="skip")
    values.update(overrides)
    return DataConfig(**values)


def turns(question: str, answer: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def line(record) -> bytes:
    return json.dumps(record).encode()


GOOD = line({"conversations": turns("Say hello.", "Hello!")})
DEEP = 100_000

# (expected kind or None for a good line, raw line bytes). The file is written with CRLF line endings and a BOM
# before line 1, so both are exercised on every line.
CORPUS: list[tuple[str | None, bytes]] = [
    (None, GOOD),
    ("invalid_json", b'{"conversations": [{"from": "human", "value": "hi"}'),
    ("invalid_record", b"[1, 2, 3]"),
    ("invalid_record", b"null"),
    ("invalid_json", b'{"conversations": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    ("invalid_json", b'{"id": ' + b"7" * 5000 + b', "conversations": ' + line(turns("Hi.")) + b"}"),
    ("invalid_unicode", b'{"conversations": [{"from": "human", "value": "bad \\ud800 text"}, '
                        b'{"from": "gpt", "value": "ok"}]}'),
    (None, b'{"conversations": [{"from": "human", "value": "a pair \\ud83d\\ude00 is fine"}, '
           b'{"from": "gpt", "value": "ok"}]}'),
    ("invalid_json", b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}'),
    ("invalid_json", b'{"conversations": [{"from": "human", "value": "caf\xed\xa0\x80"}, '
                     b'{"from": "gpt", "value": "x"}]}'),  # a UTF-8-encoded surrogate: not UTF-8
    ("empty_conversation", line({"conversations": []})),
    (None, line({"conversations": [{"from": "gpt", "value": "Welcome."}, *turns("Hi?", "Hello.")]})),  # gpt first
    ("bad_roles", line({"conversations": [{"from": "gpt", "value": "Only an answer."}]})),
    (None, line({"conversations": [*turns("Hi?", "Hello."), {"from": "human", "value": "Bye?"}]})),  # human last
    ("bad_roles", line({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]})),
    ("bad_roles", line({"conversations": [{"from": 5, "value": "Hi"}, {"from": "gpt", "value": "Beep"}]})),
    ("bad_turn", line({"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}]})),
    ("bad_turn", line({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": None}]})),
    ("bad_turn", line({"conversations": "Say hello."})),
    ("bad_media", line({"image": 5, "conversations": turns("<image>\nWhat is it?")})),
    ("box_out_of_range", line({"image": "good.png", "conversations": turns(
        "<image>\nWhere is the box?", "<ref>box</ref><box>[[10, 20, 1200, 40]]</box>")})),
    ("placeholder_count", line({"conversations": turns("<image>\nWhat is it?")})),
    ("placeholder_count", line({"image": ["good.png", "good.png"], "conversations": turns("<image>\nCompare.")})),
    ("too_long", line({"conversations": turns("Tell me a long story.", "once upon a time " * 300)})),  # truncated
    ("too_long", line({"conversations": turns("Read this. " + "blah " * 800, "Done.")})),  # no answer left: refused
    (None, line({"conversations": turns("Hi.", "Hello."), "length": 10**30, "width": float("nan")})),
    (None, line({"image": "good.png", "conversations": turns("<image>\nWhat is it?", "A grey box.")})),
    (None, GOOD),
]


TRUNCATED = 24  # the line training cuts to max_seq_length and keeps: a checker problem, not a skipped sample


def expected_bad() -> dict[int, str]:
    """The checker's findings, line -> kind."""
    return {n: kind for n, (kind, _) in enumerate(CORPUS, start=1) if kind is not None}


def expected_skipped() -> dict[int, str]:
    """What training skips and counts: the checker's findings but the truncated line."""
    return {n: kind for n, kind in expected_bad().items() if n != TRUNCATED}


def write_corpus(folder: Path, lines: list[bytes], name: str = "hostile") -> Path:
    """The annotation file (BOM, CRLF) and its meta file; returns the meta path."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (128, 128, 128)).save(folder / "good.png")
    annotation = folder / f"{name}.jsonl"
    annotation.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    meta = folder / "meta.json"
    meta.write_text(json.dumps({name: {"root": str(folder), "annotation": str(annotation), "data_augment": False,
                                       "repeat_time": 1}}))
    return meta


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("hostile"), [raw for _, raw in CORPUS])


# ------------------------------------------------------------------------------------------------ the checker


def test_checker_names_every_hostile_line(corpus):
    report = check_dataset(corpus, tokenizer(), config(bad_data="fail"), write_lengths=False)
    annotation = str(corpus.parent / "hostile.jsonl")
    assert {p.line: p.kind for p in report.problems} == expected_bad()
    assert {p.file for p in report.problems} == {annotation}
    assert not report.fatal and report.problem_counts.get("unexpected_error") is None
    assert report.records == len(CORPUS) and report.bad_records == len(expected_bad())
    assert CORPUS[TRUNCATED - 1][0] == "too_long" and "training cuts it" in {p.line: p.reason for p in
                                                                              report.problems}[TRUNCATED]
    # the bad fraction counts what training skips: not the truncated line it keeps
    assert report.bad_fraction == pytest.approx(len(expected_skipped()) / len(CORPUS))
    reasons = {p.line: p.reason for p in report.problems}
    assert f"deeper than {MAX_JSON_DEPTH} levels" in reasons[5]
    assert "number too large" in reasons[6] and "4300" in reasons[6]
    assert "lone surrogate '\\ud800'" in reasons[7]
    assert "not UTF-8" in reasons[9] and "not UTF-8" in reasons[10]


def test_deep_line_is_refused_before_parsing_quickly_and_without_memory():
    raw = b'{"a": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        parse_json_line(raw)
    elapsed = time.perf_counter() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert info.value.kind == "invalid_json" and elapsed < 5 and grown_mb < 200, (elapsed, grown_mb)
    # brackets inside strings do not count; real depth up to the limit parses
    assert parse_json_line(json.dumps({"t": "[" * 500})) == {"t": "[" * 500}
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json_line(nested) is not None
    with pytest.raises(DataError):
        parse_json_line("[" + nested + "]")


def test_json_list_elements_get_the_same_names(tmp_path):
    good = {"conversations": turns("Hi.")}
    text = "[" + json.dumps(good) + ',{"conversations": [{"from": "human", "value": "x\\udc00"}, ' \
        '{"from": "gpt", "value": "y"}]},' + '{"a": ' + "[" * 100 + "]" * 100 + "}]"
    (tmp_path / "list.json").write_text(text)
    found = {n: (r.kind if isinstance(r, DataError) else None) for n, r in read_records(tmp_path / "list.json")}
    assert found == {1: None, 2: "invalid_unicode", 3: "invalid_json"}
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"l": {"root": str(tmp_path), "annotation": str(tmp_path / "list.json"),
                                      "data_augment": False, "repeat_time": 1}}))
    report = check_dataset(meta, tokenizer(), config(bad_data="fail"), write_lengths=False)
    assert {p.line: p.kind for p in report.problems} == {2: "invalid_unicode", 3: "invalid_json"}
    # an element too deep for the parser makes the list unusable, with a name, not a RecursionError
    (tmp_path / "list.json").write_text("[" + json.dumps(good) + "," + "[" * DEEP + "]" * DEEP + "]")
    report = check_dataset(meta, tokenizer(), config(bad_data="fail"), write_lengths=False)
    assert ("invalid_json", 2) in {(p.kind, p.line) for p in report.problems} and report.fatal


# ------------------------------------------------------------------------------------------------ training data


def test_dataset_skips_and_counts_exactly_the_bad_lines(corpus):
    dataset = build_dataset(corpus, tokenizer(), config())
    annotation = str(corpus.parent / "hostile.jsonl")
    assert len(dataset.lengths) == len(CORPUS)  # the start-up scan survives every line
    assert dataset.sample_types()["invalid"] >= 5
    tracker = BadDataTracker(max_bad_fraction=1.0)
    collate = DataCollator(pad_token_id=tokenizer().pad_token_id, with_sample_ids=True)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    for start in range(0, len(order), 4):
        items = [dataset[i] for i in order[start:start + 4]]
        for item in items:
            assert (item["labels"] != IGNORE_INDEX).any(), item["sample_id"]
        batch = collate(items)
        tracker.update(len(items), batch.get("skipped_samples"), batch["sample_ids"])
    assert tracker.bad == len(expected_skipped()) and tracker.seen == len(CORPUS)
    report = check_dataset(corpus, tokenizer(), config(bad_data="fail"), write_lengths=False)
    assert tracker.bad_fraction == report.bad_fraction  # one epoch: exactly the checker's fraction
    reported = {}
    for message in tracker.messages:
        err = parse_report(message)
        assert err.file == annotation
        reported[err.line] = err.kind
    assert reported == expected_skipped()
    kinds = list(expected_skipped().values())
    assert dict(tracker.by_kind) == {kind: kinds.count(kind) for kind in kinds}


def test_fail_policy_raises_the_named_error_not_the_foreign_one(corpus):
    dataset = build_dataset(corpus, tokenizer(), config(bad_data="fail"))
    for index in (4, 5, 6):  # deep, huge integer, lone surrogate (0-based)
        with pytest.raises(DataError) as info:
            dataset[index]
        assert (info.value.line, info.value.kind) == (index + 1, CORPUS[index][0])


class _BrokenTokenizer:
    """Delegates to the real tokenizer, but raises like a Rust tokenizer on a marker word."""

    def __init__(self, inner, error: BaseException) -> None:
        self.inner, self.error = inner, error

    def __call__(self, text, **kwargs):
        if "BOOM" in text:
            raise self.error
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenizer_and_unexpected_errors_are_named_and_skipped(tmp_path, caplog):
    meta = write_corpus(tmp_path, [GOOD, line({"conversations": turns("BOOM")}), GOOD])
    broken = _BrokenTokenizer(tokenizer(), TypeError("TextEncodeInput must be Union[...]"))
    dataset = build_dataset(meta, broken, config())
    item = dataset[1]
    (report,) = [parse_report(r) for r in item["skipped"]]
    assert (report.line, report.kind) == (2, "tokenizer_error") and "TypeError" in report.reason
    with pytest.raises(TokenizerError):
        tokenize_conversation(turns("BOOM"), "internvl2_5", broken, None)
    # a bug-like exception inside one record's processing: kind "unexpected", type and message, traceback once
    original = dataset._make_item

    def buggy(record, entry, rngs):
        if "BOOM" in json.dumps(record):
            raise AttributeError("'NoneType' object has no attribute 'shape'")
        return original(record, entry, rngs)

    dataset._make_item = buggy
    dataset_module._logged_unexpected.discard("AttributeError")  # once per process: start this test afresh
    with caplog.at_level("ERROR", logger="internvl_chat.data.dataset"):
        first, second = dataset[1], dataset[1]
    (report,) = [parse_report(r) for r in first["skipped"]]
    assert report.kind == "unexpected" and "AttributeError" in report.reason and "shape" in report.reason
    assert second["skipped"] == first["skipped"]
    logged = [r for r in caplog.records if "AttributeError while building" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None and ":2: " in logged[0].getMessage()
    # errors that say nothing about the record still stop the run
    for error in (KeyboardInterrupt(), TooMuchBadDataError("stop")):
        def raising(record, entry, rngs, error=error):
            raise error

        dataset._make_item = raising
        with pytest.raises(type(error)):
            dataset[0]


def test_record_error_names():
    assert record_error(RecursionError("deep")).kind == "too_deep"
    assert record_error(MemoryError()).kind == "out_of_memory"
    assert record_error(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")).kind \
        == "invalid_unicode"
    assert record_error(ValueError("Exceeds the limit (4300 digits) for integer string conversion")).kind \
        == "number_too_large"
    assert record_error(OverflowError("int too big")).kind == "number_too_large"
    unexpected = record_error(KeyError("x"), "tokenizing")
    assert unexpected.kind == "unexpected" and unexpected.reason == "unexpected KeyError while tokenizing: 'x'"
    assert record_error(KeyboardInterrupt()) is None and record_error(SystemExit(1)) is None
    assert record_error(TooMuchBadDataError("x")) is None
    oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch.cuda"})
    assert record_error(oom("CUDA out of memory")) is None
    panic = type("PanicException", (BaseException,), {})
    assert record_error(panic("rust")).kind == "unexpected"


# ------------------------------------------------------------------------------------------------ the limit


def test_small_sample_rule():
    tracker = BadDataTracker(max_bad_fraction=0.01)  # min_samples 100, z 3
    assert tracker.allowed_bad() == pytest.approx(1 + 3 * math.sqrt(100 * 0.01 * 0.99))
    for k in range(3):  # 3 bad of the first 3: within the small-sample allowance
        tracker.add_bad(f"f.jsonl:{k + 1}: broken [invalid_json]")
    with pytest.raises(TooMuchBadDataError, match=r"4 of the 4 records seen so far are bad"):
        tracker.add_bad("f.jsonl:4: broken [invalid_json]")
    # the same record reported again (consecutive bad lines, a second epoch) counts once
    again = BadDataTracker(max_bad_fraction=0.01)
    for _ in range(10):
        again.update(1, ["f.jsonl:1: broken [invalid_json]"], ["f.jsonl:2"])
    assert (again.bad, again.seen, again.reports) == (1, 2, 10)
    # zero tolerance: the first bad record stops
    with pytest.raises(TooMuchBadDataError):
        BadDataTracker(max_bad_fraction=0.0).add_bad("f.jsonl:1: x [invalid_json]")
    # a large set within the limit passes, over it stops
    fine = BadDataTracker(max_bad_fraction=0.01)
    fine.update(990, None, [f"f.jsonl:{k}" for k in range(990)])
    fine.update(0, [f"f.jsonl:{1000 + k}: x [too_long]" for k in range(10)])
    assert fine.bad_fraction == pytest.approx(0.01)
    fine.final_check()  # exactly at the limit is allowed
    fine.add_bad("f.jsonl:2000: x [too_long]")  # 11 of 1001: within the slack while running ...
    with pytest.raises(TooMuchBadDataError, match=r"11 of the 1001 records this run saw"):
        fine.final_check()  # ... but not at the end


def test_distinct_counts_survive_compaction_and_merge_across_ranks():
    from internvl_chat.data.errors import _KeySet

    keys = _KeySet()
    keys._FLUSH = 3  # compact into the sorted array often
    added = [keys.add(k) for k in (5, 1, 5, 9, 1, 7, 3, 9, -2)]
    assert added == [True, True, False, True, False, True, True, False, True]
    assert len(keys) == 6 and keys.array().tolist() == [-2, 1, 3, 5, 7, 9] and 7 in keys and 4 not in keys
    # two ranks: a replacement record seen on both, a bad record reported on both -> each counted once
    rank0, rank1 = BadDataTracker(1.0), BadDataTracker(1.0)
    rank0.update(2, ["f.jsonl:3: x [invalid_json]"], ["f.jsonl:1", "f.jsonl:4"])
    rank1.update(2, ["f.jsonl:3: x [invalid_json]", "f.jsonl:5: y [too_long]"], ["f.jsonl:4", "f.jsonl:6"])
    merged = BadDataTracker.merged([rank0.state(), rank1.state()], 0.3)
    assert (merged.seen, merged.bad, merged.reports) == (5, 2, 3)
    with pytest.raises(TooMuchBadDataError, match="2 of the 5 records this run saw"):
        merged.final_check()


def test_mostly_bad_set_stops_early(tmp_path):
    """22 bad of 60 lines under the default 1 %: the run stops after a handful of samples, naming counts."""
    lines = [line({"conversations": []}) if k % 3 == 0 and k < 66 else GOOD for k in range(60)]
    assert sum(raw != GOOD for raw in lines) == 20
    lines[1] = lines[2] = b"{oops"
    meta = write_corpus(tmp_path, lines)
    dataset = build_dataset(meta, tokenizer(), config())
    tracker = BadDataTracker(max_bad_fraction=0.01)
    seen_items = 0
    with pytest.raises(TooMuchBadDataError, match=r"of the \d+ records seen so far are bad") as info:
        for index in range(len(dataset)):
            tracker.update(dataset[index])
            seen_items += 1
    assert tracker.bad == 4 and seen_items < 10, (tracker.bad, seen_items)
    assert "max_bad_fraction=0.01" in str(info.value) and "empty_conversation" in str(info.value)


# ------------------------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from internvl_chat.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "qwen2", llm="qwen2", template="internvl2_5", seed=0)


def run_args(model, meta, out, *extra):
    return [
        "--model_name_or_path", str(model), "--meta_path", str(meta), "--output_dir", str(out),
        "--conv_style", "internvl2_5", "--force_image_size", "448", "--down_sample_ratio", "0.5",
        "--dynamic_image_size", "False", "--max_seq_length", str(MAX_LEN), "--per_device_train_batch_size", "4",
        "--num_train_epochs", "1", "--learning_rate", "1e-4", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "7", "--bf16", "False",
        "--grad_checkpoint", "False", "--disable_tqdm", "True", "--freeze_backbone", "True", *extra,
    ]


def test_finetune_finishes_skips_and_counts_then_the_end_check(tiny_model, tmp_path, caplog):
    """One epoch over the hostile corpus: the run finishes, its end-of-run count is exactly the skipped lines
    (the checker's fraction), every batch had supervised tokens; the same totals over a lower limit fail the
    end check with a message naming the counts."""
    from internvl_chat import finetune
    from internvl_chat.train import trainer as trainer_module

    meta = write_corpus(tmp_path / "data", [raw for _, raw in CORPUS])
    captured, batches = {}, []
    real_check, real_loss = finetune.check_bad_data, trainer_module.InternVLTrainer.compute_loss

    def spy_check(tracker, output_dir):
        captured["tracker"] = tracker
        real_check(tracker, output_dir)

    def spy_loss(self, model, inputs, *args, **kwargs):
        batches.append((inputs["labels"] != IGNORE_INDEX).sum(dim=1).tolist())
        return real_loss(self, model, inputs, *args, **kwargs)

    finetune.check_bad_data = spy_check
    trainer_module.InternVLTrainer.compute_loss = spy_loss
    try:
        with caplog.at_level("INFO", logger="internvl_chat.finetune"):
            finetune.main(run_args(tiny_model, meta, tmp_path / "out", "--max_bad_fraction", "1.0"))
    finally:
        finetune.check_bad_data = real_check
        trainer_module.InternVLTrainer.compute_loss = real_loss
    skipped, records = len(expected_skipped()), len(CORPUS)
    tracker = captured["tracker"]
    assert (tracker.bad, tracker.seen) == (skipped, records)
    assert {parse_report(m).line: parse_report(m).kind for m in tracker.messages} == expected_skipped()
    assert batches and all(n > 0 for rows in batches for n in rows)  # no row without a supervised token
    assert any(f"bad data: {skipped} of {records} records" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "model.safetensors").exists()
    tracker.max_bad_fraction = skipped / records - 0.01
    with pytest.raises(TooMuchBadDataError, match=rf"end of run: {skipped} of the {records} records this run saw"):
        finetune.check_bad_data(tracker, str(tmp_path / "out"))


def test_finetune_stops_early_on_a_mostly_bad_set(tiny_model, tmp_path):
    """22 bad lines of 60 under the default --max_bad_fraction 0.01, bad in what only decoding finds (corrupt and
    truncated image files), so the structural pre-scan lets the run start: exit code 1 after the first batches,
    with the counts in one clear message, no traceback, no weights. (Structurally bad lines stop it before
    training: tests/test_prescan.py.)"""
    import io
    import subprocess
    import sys

    def image_line(name: str) -> bytes:
        return line({"image": name, "conversations": turns("<image>\nWhat is it?", "A box.")})

    lines = [image_line("corrupt.png") if k % 3 == 1 else GOOD for k in range(60)]
    lines[3] = lines[6] = image_line("truncated.png")
    assert sum(raw != GOOD for raw in lines) == 22
    meta = write_corpus(tmp_path / "data", lines)
    (tmp_path / "data" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
    whole = io.BytesIO()
    Image.effect_noise((64, 48), 64).convert("RGB").save(whole, "PNG")
    (tmp_path / "data" / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    out = tmp_path / "out"
    args = run_args(tiny_model, meta, out, "--per_device_train_batch_size", "2")
    done = subprocess.run([sys.executable, "-m", "internvl_chat.finetune", *args], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert re.search(r"ERROR internvl_chat.finetune: [4-9] of the \d+ records seen so far are bad", output), \
        output[-3000:]
    assert "max_bad_fraction=0.01" in output and "Traceback" not in output
    assert "corrupt_image" in output  # found while training, by decoding
    assert not (out / "model.safetensors").exists()
