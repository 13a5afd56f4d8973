"""The structural pre-scan before training (issue 13 item 2): every kind of structural bad line is found with its
file:line and the kind training's dataset gives it; the bad fraction counts distinct records one epoch visits; a
run over the limit stops before the model loads, in one message and exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from internvl_chat.data import prescan
from internvl_chat.data.check import StandInTokenizer
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import SupervisedDataset
from internvl_chat.data.errors import DataError
from internvl_chat.data.meta import expand_indices, load_meta
from internvl_chat.data.prescan import PrescanError, prescan_for_training
from internvl_chat.data.records import index_annotation

REPO = Path(__file__).resolve().parents[1]
VALUES = {"conv_style": "internvl2_5", "dynamic_image_size": False, "max_bad_fraction": 0.01, "bad_data": "skip",
          "seed": 42}


def turns(question: str = "Hi?", answer: str = "Hello.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def line(record) -> str:
    return json.dumps(record)


GOOD = line({"conversations": turns()})
GOOD_IMAGE = line({"image": "good.png", "conversations": turns("<image>\nWhat is it?", "A grey box.")})
GOOD_TWO = line({"image": ["good.png", "good.png"], "conversations": turns("<image><image>\nCompare.", "Same.")})
GOOD_VIDEO = line({"video": "frames", "conversations": turns("<video>\nWhat happens?", "Nothing.")})
SWIFT_BOX = {"messages": [{"role": "user", "content": "<image>Find the <ref-object>."},
                          {"role": "assistant", "content": "Here: <bbox>"}],
             "images": ["good.png"], "objects": {"ref": ["box"], "bbox": [[4, 4, 32, 24]], "bbox_type": "real"}}

# (kind training gives the line, or None for a good line; the line). Only what needs no decoding or tokenizer.
CORPUS: list[tuple[str | None, str]] = [
    (None, GOOD),
    ("invalid_json", '{"conversations": [{"from": "human"'),
    ("invalid_record", "[1, 2, 3]"),
    ("unknown_format", line({"conversation": turns()})),
    (None, GOOD_IMAGE),
    ("bad_turn", line({"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}]})),
    ("bad_roles", line({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]})),
    ("bad_roles", line({"conversations": [{"from": "system", "value": "Be kind."}, {"from": "gpt", "value": "Ok"}]})),
    ("empty_conversation", line({"conversations": []})),
    ("bad_media", line({"image": 5, "conversations": turns("<image>\nWhat is it?")})),
    (None, GOOD_TWO),
    ("placeholder_count", line({"conversations": turns("<image>\nWhat is it?")})),
    ("placeholder_count", line({"image": ["good.png", "good.png"], "conversations": turns("<image>\nCompare.")})),
    ("reserved_token", line({"conversations": turns("Look: <img> here.")})),
    ("box_out_of_range", line({"image": "good.png", "conversations": turns(
        "<image>\nWhere?", "<ref>box</ref><box>[[10, 20, 1200, 40]]</box>")})),
    ("bad_box", line({"image": "good.png", "conversations": turns("<image>\nWhere?", "<box>[[1, 2]]</box>")})),
    (None, GOOD_VIDEO),
    ("missing_file", line({"image": "nope.png", "conversations": turns("<image>\nWhat is it?")})),
    ("missing_file", line({"image": ["good.png", "gone.png"], "conversations": turns("<image><image>\nCompare.")})),
    ("not_a_file", line({"image": "frames", "conversations": turns("<image>\nWhat is it?")})),
    ("missing_file", line({"video": "nope.mp4", "conversations": turns("<video>\nWhat happens?")})),
    ("missing_file", line({"image": "dangling.png", "conversations": turns("<image>\nWhat is it?")})),
    (None, line(SWIFT_BOX)),  # ms-swift pixel boxes: the image header gives the size, as in the dataset
    ("missing_file", line({**SWIFT_BOX, "images": ["nope.png"]})),
    (None, GOOD),
]


def write_data(folder: Path, lines: list[str], repeat_time: float = 1, name: str = "a") -> Path:
    """Images, a frame folder, the annotation file and the meta file; returns the meta path."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (128, 128, 128)).save(folder / "good.png")
    (folder / "frames").mkdir(exist_ok=True)
    for k in range(2):
        Image.new("RGB", (64, 48), (40 * k, 0, 0)).save(folder / "frames" / f"{k:03d}.jpg")
    if not os.path.lexists(folder / "dangling.png"):
        os.symlink(folder / "no_such_target.png", folder / "dangling.png")
    (folder / f"{name}.jsonl").write_text("".join(text + "\n" for text in lines))
    meta = folder / "meta.json"
    meta.write_text(json.dumps({name: {"root": str(folder), "annotation": str(folder / f"{name}.jsonl"),
                                       "data_augment": False, "repeat_time": repeat_time}}))
    return meta


def run_prescan(meta: Path, **values):
    entries = load_meta(meta, log_warnings=False)
    return prescan_for_training({**VALUES, "meta_path": str(meta), **values}, entries,
                                [index_annotation(entry.annotation) for entry in entries])


def listed(message: str) -> dict[int, str]:
    """``line -> kind`` of the ``file:line: reason [kind]`` lines of a message."""
    found = re.findall(r"^  \S+\.jsonl:(\d+): .* \[(\w+)\]$", message, re.M)
    return {int(number): kind for number, kind in found}


def test_every_structural_kind_is_found_with_file_line_and_kind(tmp_path, monkeypatch):
    meta = write_data(tmp_path, [text for _, text in CORPUS])
    expected = {n: kind for n, (kind, _) in enumerate(CORPUS, start=1) if kind}
    monkeypatch.setattr(prescan, "MAX_SHOWN", 100)
    with pytest.raises(PrescanError) as info:
        run_prescan(meta)
    message = str(info.value)
    first = message.splitlines()[0]
    assert first == (f"{len(expected)} of {len(CORPUS)} records ({len(expected) / len(CORPUS):.1%}) are bad, above "
                     "--max_bad_fraction 0.01: training would skip them")
    assert listed(message) == expected
    assert f"{tmp_path / 'a.jsonl'}:18: image file not found: {tmp_path / 'nope.png'} [missing_file]" in message
    assert "missing_file 5" in message and f"python tools/check_data.py --meta_path {meta}" in message


def test_the_prescan_agrees_with_the_training_dataset(tmp_path):
    """Every line the pre-scan calls bad, the training dataset's build path skips with the same kind, and every line
    it passes builds (the dataset here decodes and tokenizes with the checker's stand-in tokenizer)."""
    meta = write_data(tmp_path, [text for _, text in CORPUS])
    with pytest.raises(PrescanError) as info:
        run_prescan(meta, max_bad_fraction=0.0)
    config = DataConfig(template="internvl2_5", dynamic_image_size=False, min_num_frame=2, max_num_frame=2)
    dataset = SupervisedDataset(load_meta(meta, log_warnings=False), StandInTokenizer(), config)
    built: dict[int, str] = {}
    for index, (kind, _) in enumerate(CORPUS):
        try:
            dataset.build_item(index)
        except DataError as err:
            built[err.line] = err.kind
    assert built == {n: kind for n, (kind, _) in enumerate(CORPUS, start=1) if kind}
    assert set(listed(str(info.value))) <= set(built)  # the first ten, in file order
    assert list(listed(str(info.value))) == sorted(built)[:prescan.MAX_SHOWN]


def test_confine_paths_is_honoured(tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    lines = [GOOD] * 9 + [line({"image": str(outside), "conversations": turns("<image>\nWhat?")})]
    meta = write_data(tmp_path / "data", lines)
    assert "none structurally bad" in run_prescan(meta, max_bad_fraction=0.0)
    with pytest.raises(PrescanError) as info:
        run_prescan(meta, max_bad_fraction=0.0, confine_paths=True)
    assert listed(str(info.value)) == {10: "path_outside_root"}


def test_distinct_lines_not_repeats(tmp_path):
    lines = [GOOD] * 10
    lines[2] = lines[7] = "{oops"
    meta = write_data(tmp_path, lines, repeat_time=3)  # 30 samples per epoch: each bad line is visited 3 times
    with pytest.raises(PrescanError) as info:
        run_prescan(meta)
    message = str(info.value)
    assert message.startswith("2 of 10 records (20.0%) are bad, above --max_bad_fraction 0.01")
    assert listed(message) == {3: "invalid_json", 8: "invalid_json"}
    assert "by kind: invalid_json 2" in message and "more" not in message


def test_fractional_repeat_time_counts_the_subset_one_epoch_visits(tmp_path):
    seed, n = 7, 20
    visited = set(expand_indices(n, 0.5, (seed, "a")).tolist())  # the subset training draws for dataset "a"
    assert len(visited) == 10
    unvisited = sorted(set(range(n)) - visited)
    lines = [GOOD] * n
    for record in unvisited:
        lines[record] = "{oops"
    meta = write_data(tmp_path, lines, repeat_time=0.5)
    assert run_prescan(meta, seed=7, max_bad_fraction=0.0).startswith(
        "data pre-scan: 10 records checked in")  # 10 bad lines, none of them visited: nothing to stop for
    bad = sorted(visited)[:3]
    for record in bad:
        lines[record] = "{oops"
    write_data(tmp_path, lines, repeat_time=0.5)
    with pytest.raises(PrescanError) as info:
        run_prescan(meta, seed=7, max_bad_fraction=0.2)
    assert str(info.value).startswith("3 of 10 records (30.0%) are bad, above --max_bad_fraction 0.2")
    assert listed(str(info.value)) == {record + 1: "invalid_json" for record in bad}
    # --data_seed wins over --seed, as in training: another subset
    other = set(expand_indices(n, 0.5, (8, "a")).tolist())
    expected = sum(1 for record in other if lines[record] != GOOD)
    with pytest.raises(PrescanError, match=rf"^{expected} of 10 records"):
        run_prescan(meta, seed=7, data_seed=8, max_bad_fraction=0.0)


def test_below_the_limit_passes_with_a_summary(tmp_path):
    lines = [GOOD_IMAGE] * 200
    lines[50] = line({"image": "nope.png", "conversations": turns("<image>\nWhat is it?")})
    meta = write_data(tmp_path, lines)
    summary = run_prescan(meta)  # 1 of 200: 0.5% <= 1%
    assert len(summary.splitlines()) == 1
    assert "1 (0.5%) are bad, within --max_bad_fraction 0.01, and training will skip them (missing_file 1)" in summary
    lines[60] = lines[70] = "{oops"
    write_data(tmp_path, lines)
    with pytest.raises(PrescanError, match=r"^3 of 200 records \(1\.5%\) are bad, above --max_bad_fraction 0\.01"):
        run_prescan(meta)
    assert run_prescan(meta, max_bad_fraction=0.015).startswith("data pre-scan: 200 records")  # not above: passes


def test_bad_data_fail_stops_on_one_bad_line(tmp_path):
    lines = [GOOD] * 500
    lines[123] = line({"conversations": []})
    meta = write_data(tmp_path, lines)
    assert "1 (0.2%) are bad" in run_prescan(meta, max_bad_fraction=1.0)
    with pytest.raises(PrescanError) as info:
        run_prescan(meta, max_bad_fraction=1.0, bad_data="fail")
    assert info.value.args[0].startswith("1 of 500 records (0.2%) are bad and --bad_data fail stops")
    assert listed(str(info.value)) == {124: "empty_conversation"}
    write_data(tmp_path, [GOOD] * 500)
    assert "none structurally bad" in run_prescan(meta, bad_data="fail")


def test_a_wrong_data_flag_is_one_message(tmp_path):
    meta = write_data(tmp_path, [GOOD])
    with pytest.raises(PrescanError, match=r"^data settings: unknown conversation template 'nope'"):
        run_prescan(meta, conv_style="nope")


def test_several_datasets_add_up(tmp_path):
    a = write_data(tmp_path / "a", [GOOD] * 8 + ["{oops"] * 2, name="a")
    b = write_data(tmp_path / "b", [GOOD] * 10, name="b", repeat_time=2)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({**json.loads(a.read_text()), **json.loads(b.read_text())}))
    with pytest.raises(PrescanError, match=r"^2 of 20 records \(10\.0%\)"):
        run_prescan(meta, max_bad_fraction=0.05)


# ------------------------------------------------------------------------------------------------ the real entry


def test_a_mostly_bad_set_stops_before_training_through_the_cli(tmp_path):
    """6 of 19 lines structurally bad, each visited twice an epoch: exit code 2 in one message listing the six
    lines once each, before the model loads (no step, no checkpoint, no weights)."""
    from internvl_chat.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model", llm="qwen2", template="internvl2_5", seed=0)
    lines = [GOOD_IMAGE] * 19
    bad = {3: "invalid_json", 5: "empty_conversation", 8: "missing_file", 11: "placeholder_count", 14: "bad_roles",
           17: "missing_file"}
    lines[2] = "{oops"
    lines[4] = line({"conversations": []})
    lines[7] = line({"image": "nope.png", "conversations": turns("<image>\nWhat is it?")})
    lines[10] = line({"conversations": turns("<image>\nWhat is it?")})
    lines[13] = line({"conversations": [{"from": "gpt", "value": "Only an answer."}]})
    lines[16] = line({"image": "gone.png", "conversations": turns("<image>\nWhat is it?")})
    meta = write_data(tmp_path / "data", lines, repeat_time=2)
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(model), "--meta_path", str(meta), "--output_dir", str(out),
            "--conv_style", "internvl2_5", "--force_image_size", "448", "--dynamic_image_size", "False",
            "--per_device_train_batch_size", "2", "--max_steps", "20", "--save_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--bf16", "False", "--disable_tqdm", "True", "--freeze_backbone", "True"]
    done = subprocess.run([sys.executable, "-m", "internvl_chat.finetune", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert re.search(r"^error: 6 of 19 records \(31\.6%\) are bad, above --max_bad_fraction 0\.01: "
                     "training would skip them$", done.stderr, re.M), done.stderr
    assert listed(done.stderr) == bad  # each line once, though the epoch visits it twice
    assert len(re.findall(r"\.jsonl:\d+: ", done.stderr)) == 6
    assert not re.search(r"step \d+", done.stdout + done.stderr)  # no training step logged
    assert not out.exists() or (not any(out.rglob("checkpoint-*")) and not any(out.rglob("*.safetensors")))
