"""The supervised dataset end to end: official items, every sample type, randomness, bad data, lengths."""

from __future__ import annotations

import functools
import json
import math
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_chat.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import UNKNOWN_TILES, SupervisedDataset, build_dataset
from internvl_chat.data.errors import BadDataTracker, DataError, TooMuchBadDataError, parse_report
from internvl_chat.data.meta import load_meta
from internvl_chat.data.records import lengths_sidecar_path, write_lengths_sidecar
from internvl_chat.data.templates import tokenize_conversation
from internvl_chat.data.tiling import plan_tiles
from internvl_chat.data.transforms import image_to_tiles, load_image, normalize_tiles
from internvl_chat.model.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DATA = FIXTURES / "data"
TOKENIZER_DIRS = {"qwen2": "tokenizer_qwen2", "bos": "tokenizer_bos"}
PHOTO = "grad_rgb_640x360.png"  # a fixture image


@functools.cache
def tokenizer(kind: str = "qwen2"):
    return load_tokenizer(str(FIXTURES / TOKENIZER_DIRS[kind]))


def token_id(token: str) -> int:
    return tokenizer().convert_tokens_to_ids(token)


@functools.cache
def dataset_items() -> list[dict]:
    return json.loads((DATA / "dataset_items.json").read_text())["items"]


def write_dataset(
    folder: Path,
    records: list,
    *,
    name: str = "ds",
    suffix: str = ".jsonl",
    entry: dict | None = None,
    meta_extra: dict | None = None,
) -> Path:
    """Write an annotation file (records: dicts, or raw strings for raw lines) and a meta file; return the meta."""
    folder.mkdir(parents=True, exist_ok=True)
    annotation = folder / f"{name}{suffix}"
    if suffix == ".json":
        annotation.write_text(json.dumps(records))
    else:
        annotation.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    meta = {name: {"root": str(folder), "annotation": str(annotation), "data_augment": False, "repeat_time": 1,
                   **(entry or {})}}
    meta.update(meta_extra or {})
    path = folder / "meta.json"
    path.write_text(json.dumps(meta))
    return path


def config(**overrides) -> DataConfig:
    values = dict(template="internvl2_5", dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
                  bad_data="fail", max_seq_length=8192)
    values.update(overrides)
    return DataConfig(**values)


def build(folder: Path, records: list, tok: str = "qwen2", *, entry: dict | None = None, suffix: str = ".jsonl",
          **overrides) -> SupervisedDataset:
    return build_dataset(write_dataset(folder, records, entry=entry, suffix=suffix), tokenizer(tok),
                         config(**overrides))


def conv(question: str, answer: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def copy_photo(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "images" / PHOTO, folder / PHOTO)
    return PHOTO


def make_video(path: Path, frames: int = 20, size: tuple[int, int] = (64, 48)) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            array = np.zeros((size[1], size[0], 3), np.uint8)
            array[..., 0] = i * 12  # each frame its own colour, so frame choice shows in the pixels
            array[..., 1] = np.arange(size[0], dtype=np.uint8)[None, :] * 3
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ------------------------------------------------------------------------------------------------ official items


def _official_image(root: Path, name: str) -> bool:
    """Copy a fixture image, or (when the fixture set does not ship it) draw one of the size its name gives.

    The tile grid depends only on the size, so tokens and tile counts stay checkable; pixels only for real images.
    """
    source = DATA / "images" / name
    if source.exists():
        shutil.copy(source, root / name)
        return True
    width, height = map(int, re.search(r"_(\d+)x(\d+)\.\w+$", name).groups())
    mode = re.search(r"_(RGB|RGBA|L|P|CMYK)_", name)
    mode = mode.group(1).replace("P", "L") if mode else "RGB"
    Image.new(mode, (width, height), 100).save(root / name)
    return False


@pytest.mark.parametrize("item", dataset_items(), ids=lambda it: f"{it['id']}-{it['template']}-{it['tokenizer']}")
def test_official_dataset_items(tmp_path, item):
    record = item["annotation"]
    images = [record["image"]] if isinstance(record["image"], str) else record["image"]
    real = [_official_image(tmp_path, name) for name in images]
    # Settings of the fixture (its description): dynamic tiling 1..6 with thumbnail, 256 tokens per tile.
    cfg = DataConfig(template=item["template"], dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1,
                     max_dynamic_patch=6, num_image_token=256, image_size=448, bad_data="fail")
    ds = build_dataset(write_dataset(tmp_path, [record]), tokenizer(item["tokenizer"]), cfg)
    out = ds[0]
    assert out["input_ids"].tolist() == item["input_ids"]
    assert out["labels"].tolist() == item["labels"]
    assert out["image_flags"].tolist() == item["image_flags"]
    assert out["num_supervised"] == sum(label != IGNORE_INDEX for label in item["labels"])
    assert out["skipped"] == [] and out["sample_id"] == f"{tmp_path / 'ds.jsonl'}:1"
    assert out["pixel_values"].dtype == torch.uint8
    pixels = normalize_tiles(out["pixel_values"]).double()
    assert list(pixels.shape) == item["pixel_values_shape"]
    # Per-tile means for the tiles of every real image; the sum when all of them are real.
    budget = max(1, 6 // len(images)) if len(images) > 1 else 6
    start = 0
    for name, is_real in zip(images, real):
        with Image.open(tmp_path / name) as image:
            count = plan_tiles(*image.size, 1, budget, 448, True)[2]
        if is_real:
            means = pixels[start : start + count].mean(dim=(1, 2, 3)).tolist()
            assert means == pytest.approx(item["pixel_values_tile_mean"][start : start + count], abs=1e-4)
        start += count
    assert start == pixels.shape[0]
    if all(real):
        assert pixels.sum().item() == pytest.approx(item["pixel_values_sum"], abs=1e-4 * pixels.numel() ** 0.5)


# ------------------------------------------------------------------------------------------------ sample types


def expected_tokens(conversations, num_tiles, tmpl="internvl2_5", text_only=False):
    tokens = None if text_only else [256 * n for n in num_tiles]
    return tokenize_conversation(conversations, tmpl, tokenizer(), tokens, text_only=text_only)


def test_single_image_placeholder_goes_to_first_human_turn_after_a_system_turn(tmp_path):
    name = copy_photo(tmp_path)
    turns = [{"from": "system", "value": "You are a careful test assistant."}, *conv("Describe it.", "Colours.")]
    out = build(tmp_path, [{"image": name, "conversations": turns}])[0]
    tiles = image_to_tiles(load_image(tmp_path / name), max_num=6, use_thumbnail=True)
    assert torch.equal(out["pixel_values"], tiles)
    fixed = [turns[0], {"from": "human", "value": "<image>\nDescribe it."}, turns[2]]
    want = expected_tokens(fixed, [tiles.shape[0]])
    assert out["input_ids"].tolist() == want["input_ids"] and out["labels"].tolist() == want["labels"]
    text = tokenizer().decode(out["input_ids"])
    assert "You are a careful test assistant." in text and "user\n<img>" in text
    assert out["image_flags"].tolist() == [1] * tiles.shape[0]


def test_pure_text_carries_one_white_dummy_tile_with_flag_zero(tmp_path):
    turns = conv("What is 2 + 2?", "4.")
    out = build(tmp_path, [{"conversations": turns}])[0]
    assert out["pixel_values"].shape == (1, 448, 448, 3) and bool((out["pixel_values"] == 255).all())
    assert out["image_flags"].tolist() == [0]
    want = expected_tokens(turns, None, text_only=True)
    assert out["input_ids"].tolist() == want["input_ids"] and out["labels"].tolist() == want["labels"]
    assert token_id(IMG_START_TOKEN) not in out["input_ids"].tolist()
    assert out["num_supervised"] == sum(label != IGNORE_INDEX for label in want["labels"])


@pytest.mark.parametrize(("override", "per_image"), [(None, 2), (9, 3), (2, 1)])
def test_multi_image_tile_budget_per_image(tmp_path, override, per_image):
    """max(1, max_dynamic_patch // n_images) per image, with the meta entry's max_dynamic_patch when given."""
    sizes = [(640, 360), (97, 501), (300, 300)]
    names = []
    for k, size in enumerate(sizes):
        names.append(f"img{k}.png")
        Image.new("RGB", size, (10 * k, 80, 160)).save(tmp_path / names[-1])
    turns = conv("Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nCompare.", "Three images.")
    entry = {"max_dynamic_patch": override} if override else None
    out = build(tmp_path, [{"image": names, "conversations": turns}], entry=entry)[0]
    counts = [plan_tiles(w, h, 1, per_image, 448, True)[2] for w, h in sizes]
    ids = out["input_ids"].tolist()
    assert out["pixel_values"].shape[0] == sum(counts) == len(out["image_flags"])
    assert ids.count(token_id(IMG_END_TOKEN)) == 3
    assert ids.count(token_id(IMG_CONTEXT_TOKEN)) == 256 * sum(counts)
    want = expected_tokens(turns, counts)
    assert ids == want["input_ids"]


def test_one_element_image_list_is_a_single_image(tmp_path):
    name = copy_photo(tmp_path)
    a = build(tmp_path / "a", [{"image": [str(tmp_path / name)], "conversations": conv("Q?")}])[0]
    b = build(tmp_path / "b", [{"image": str(tmp_path / name), "conversations": conv("<image>\nQ?")}])[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_grounding_markup_is_kept_as_supervised_text(tmp_path):
    name = copy_photo(tmp_path)
    turns = conv("<image>\nWhere is <ref>the dog</ref>? Also read <quad>[[1, 2, 3, 4, 5, 6, 7, 8]]</quad>",
                 "<ref>the dog</ref><box>[[120, 340, 560, 910]]</box>")
    out = build(tmp_path, [{"image": name, "conversations": turns, "width": 640, "height": 360}])[0]
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    for token in ("<ref>", "</ref>", "<box>", "</box>"):
        assert token_id(token) in supervised
    assert token_id("<quad>") in ids and token_id("<quad>") not in supervised
    assert "[[120, 340, 560, 910]]" in tokenizer().decode(supervised)


def test_video_sample_frames_tiles_and_frame_prefixes(tmp_path):
    make_video(tmp_path / "clip.mp4")
    turns = conv("<video>\nWhat happens?", "Colours change.")
    ds = build(tmp_path, [{"video": "clip.mp4", "conversations": turns}], min_num_frame=2, max_num_frame=6)
    out = ds[0]
    frames = out["pixel_values"].shape[0]
    assert 2 <= frames <= 6 and out["pixel_values"].shape[1:] == (448, 448, 3)
    assert out["image_flags"].tolist() == [1] * frames
    ids = out["input_ids"].tolist()
    assert ids.count(token_id(IMG_END_TOKEN)) == frames
    assert ids.count(token_id(IMG_CONTEXT_TOKEN)) == 256 * frames
    text = tokenizer().decode(ids)
    lines = "".join(f"Frame-{i}: <img>" + "<IMG_CONTEXT>" * 256 + "</img>\n" for i in range(1, frames + 1))
    assert "user\n" + lines + "What happens?" in text and "<video>" not in text
    assert torch.equal(ds[0]["pixel_values"], out["pixel_values"])  # same (seed, epoch, index): same frames
    # Over epochs, the frame count (uniform in [2, 6]) changes.
    counts = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        counts.add(ds[0]["pixel_values"].shape[0])
    assert len(counts) > 1 and counts <= set(range(2, 7))


def test_video_without_placeholder_and_with_clip(tmp_path):
    make_video(tmp_path / "clip.mp4")
    record = {"video": "clip.mp4", "clip": [0.5, 1.5], "conversations": conv("What happens?")}
    out = build(tmp_path, [record], min_num_frame=4, max_num_frame=4, video_sample="middle")[0]
    assert out["pixel_values"].shape[0] == 4
    text = tokenizer().decode(out["input_ids"])
    assert "user\nFrame-1: <img>" in text and "Frame-4: <img>" in text
    # Frames 5..14 of the 10 fps clip; the red level encodes the frame number (12 per frame, lossy codec).
    red = out["pixel_values"][:, 224, 10, 0].float() / 12
    assert all(5 - 1 <= r <= 14 + 1 for r in red.tolist())


# ------------------------------------------------------------------------------------------------ randomness


def test_jpeg_augmentation_is_seeded_per_seed_epoch_and_index(tmp_path):
    name = copy_photo(tmp_path)
    records = [{"image": name, "conversations": conv("<image>\nQ?")}] * 2
    ds = build(tmp_path, records, entry={"data_augment": True})
    plain = image_to_tiles(load_image(tmp_path / name), max_num=6, use_thumbnail=True)
    first = ds[0]["pixel_values"]
    assert not torch.equal(first, plain)  # re-compressed
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert torch.equal(ds[0]["pixel_values"], first)  # global RNG state plays no part
    again = build(tmp_path / "again", records, entry={"data_augment": True, "root": str(tmp_path)})
    assert torch.equal(again[0]["pixel_values"], first)  # a fresh (resumed) run: same pixels
    assert not torch.equal(ds[1]["pixel_values"], first)  # another index: other qualities
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["pixel_values"], first)
    ds.set_epoch(0)
    assert torch.equal(ds[0]["pixel_values"], first)
    other_seed = build(tmp_path / "seed", records, entry={"data_augment": True, "root": str(tmp_path)}, seed=7)
    assert not torch.equal(other_seed[0]["pixel_values"], first)


def test_set_epoch_reaches_persistent_dataloader_workers(tmp_path):
    name = copy_photo(tmp_path)
    ds = build(tmp_path, [{"image": name, "conversations": conv("<image>\nQ?")}], entry={"data_augment": True})
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen.append(next(iter(loader))["pixel_values"])
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert torch.equal(seen[epoch], ds[0]["pixel_values"])
    assert not torch.equal(seen[0], seen[1])


# ------------------------------------------------------------------------------------------------ bad data

GOOD_TEXT = {"conversations": conv("Hello?", "Hi.")}


def bad_data_file(folder: Path) -> tuple[list, dict[int, str], int]:
    """Records (raw lines allowed), {line: expected kind}, and the line of the last (good) record."""
    folder.mkdir(parents=True, exist_ok=True)
    name = copy_photo(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but then garbage" * 4)
    long_text = "word " * 400
    lines = [
        GOOD_TEXT,  # 1
        '{"conversations": [{"from": "human", "value": "unterminated',  # 2
        "",  # 3: blank, not a record
        {"image": "missing.png", "conversations": conv("<image>\nQ?")},  # 4
        {"image": "broken.png", "conversations": conv("<image>\nQ?")},  # 5
        {"image": name, "conversations": conv("<image>\n<image>\nQ?")},  # 6
        {"conversations": [{"from": "bot", "value": "Q?"}, {"from": "gpt", "value": "A."}]},  # 7
        {"conversations": []},  # 8
        {"image": name, "conversations": conv("<image>\nFind it.", "<ref>x</ref><box>[[0, 0, 1200, 10]]</box>")},  # 9
        {"image": name, "conversations": conv(long_text + "<image>\nQ?")},  # 10
        {"video": "broken.mp4", "conversations": conv("<video>\nQ?")},  # 11
        {"video": "gone.mp4", "conversations": conv("<video>\nQ?")},  # 12
        {"image": name, "conversations": conv("<image>\nGood.")},  # 13
    ]
    kinds = {2: "invalid_json", 4: "missing_file", 5: "corrupt_image", 6: "placeholder_count", 7: "bad_roles",
             8: "empty_conversation", 9: "box_out_of_range", 10: "too_long", 11: "corrupt_video", 12: "missing_file"}
    return lines, kinds, 13


def _bad_dataset(folder: Path, policy: str, **overrides) -> tuple[SupervisedDataset, dict[int, str], int]:
    lines, kinds, last = bad_data_file(folder)
    # One tile per image (256 tokens) so that only line 10 is too long at 600 tokens.
    ds = build(folder, lines, bad_data=policy, dynamic_image_size=False, max_seq_length=600, **overrides)
    return ds, kinds, last


def test_every_bad_sample_fails_with_file_line_and_kind(tmp_path):
    ds, kinds, last = _bad_dataset(tmp_path, "fail")
    annotation = str(tmp_path / "ds.jsonl")
    lines = [line for line in range(1, last + 1) if line != 3]  # the blank line is no record
    assert len(ds) == len(lines)
    for index, line in enumerate(lines):
        assert ds.locate(index) == (annotation, line)
        if line not in kinds:
            assert ds[index]["sample_id"] == f"{annotation}:{line}"
            continue
        with pytest.raises(DataError) as info:
            ds[index]
        err = info.value
        assert (err.file, err.line, err.kind) == (annotation, line, kinds[line]), str(err)
        assert str(err).startswith(f"{annotation}:{line}: ")


def test_skip_policy_replaces_with_the_next_good_sample_and_reports(tmp_path):
    ds, kinds, last = _bad_dataset(tmp_path, "skip")
    annotation = str(tmp_path / "ds.jsonl")
    assert ds[0]["skipped"] == []
    out = ds[1]  # line 2: every following record up to line 13 is bad
    assert out["sample_id"] == f"{annotation}:{last}"
    reports = [parse_report(report) for report in out["skipped"]]
    assert [(r.file, r.line, r.kind) for r in reports] == [(annotation, line, kind) for line, kind in kinds.items()]
    assert all(r.reason for r in reports)
    # The tracker in the training loop counts them.
    tracker = BadDataTracker(max_bad_fraction=1.0, min_samples=0)
    tracker.update(out)
    assert (tracker.good, tracker.bad) == (1, len(kinds))
    assert tracker.by_kind["missing_file"] == 2 and tracker.by_file[annotation] == len(kinds)


def test_skip_policy_wraps_around_and_gives_up_after_too_many_bad_in_a_row(tmp_path):
    ds, _, _ = _bad_dataset(tmp_path, "skip", max_consecutive_bad=3)
    with pytest.raises(TooMuchBadDataError, match="3 bad samples in a row") as info:
        ds[1]
    assert f"{tmp_path / 'ds.jsonl'}:2:" in str(info.value)
    wrap = build(tmp_path / "wrap", [GOOD_TEXT, {"conversations": []}], bad_data="skip")
    assert wrap[1]["sample_id"] == f"{tmp_path / 'wrap' / 'ds.jsonl'}:1" and len(wrap[1]["skipped"]) == 1


def test_json_list_lines_are_element_positions(tmp_path):
    records = [GOOD_TEXT, {"conversations": [{"from": "gpt", "value": "no question"}]}, GOOD_TEXT]
    ds = build(tmp_path, records, suffix=".json")
    assert len(ds) == 3 and ds.locate(2) == (str(tmp_path / "ds.json"), 3)
    assert ds[2]["input_ids"].tolist() == ds[0]["input_ids"].tolist()
    with pytest.raises(DataError) as info:
        ds[1]
    assert (info.value.line, info.value.file) == (2, str(tmp_path / "ds.json"))


def test_json_list_that_does_not_parse_fails_at_start_up(tmp_path):
    (tmp_path / "bad.json").write_text('[\n{"conversations": []},\n{oops}\n]')
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": "", "annotation": str(tmp_path / "bad.json"),
                                      "data_augment": False, "repeat_time": 1}}))
    with pytest.raises(DataError) as info:
        build_dataset(meta, tokenizer(), config())
    assert info.value.file == str(tmp_path / "bad.json") and info.value.line == 3
    assert info.value.kind == "invalid_json"


def test_crlf_bom_and_whitespace_lines(tmp_path):
    body = json.dumps(GOOD_TEXT)
    path = tmp_path / "ds.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode() + b"\r\n  \r\n\r\n" + body.encode() + b"\r\n\n" + body.encode())
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": "", "annotation": str(path), "data_augment": False,
                                      "repeat_time": 1}}))
    ds = build_dataset(meta, tokenizer(), config())
    assert [ds.locate(i)[1] for i in range(len(ds))] == [1, 4, 6]
    assert all(ds[i]["input_ids"].tolist() == ds[0]["input_ids"].tolist() for i in range(3))


# ------------------------------------------------------------------------------------------------ errors, tracker


def test_data_error_reports_round_trip_and_pickle():
    err = DataError("image file not found: a.png", "data/x.jsonl", 12, kind="missing_file")
    assert str(err) == "data/x.jsonl:12: image file not found: a.png"
    back = parse_report(err.report())
    assert (back.reason, back.file, back.line, back.kind) == (err.reason, err.file, err.line, err.kind)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.file, copy.line, copy.kind) == (err.reason, err.file, err.line, err.kind)
    lower = DataError("corrupt", kind="corrupt_video").located("f.jsonl", 3)
    assert str(lower) == "f.jsonl:3: corrupt" and lower.located("other", 9).line == 3


def test_tracker_counts_distinct_records_per_kind_and_file():
    # limits: tests/test_hostile_records.py (the small-sample rule); here z=0 keeps the arithmetic plain
    tracker = BadDataTracker(max_bad_fraction=0.1, min_samples=20, max_messages=2, z=0)
    tracker.add_bad(DataError("bad", "f.jsonl", 1, kind="invalid_json"))  # 1 of 1 bad: allowed 0.1 * 20 = 2
    tracker.add_bad(DataError("bad", "f.jsonl", 1, kind="invalid_json"))  # the same record again: counted once
    tracker.add_bad(DataError("bad", "f.jsonl", 2, kind="invalid_json"))
    tracker.add_good(27)
    tracker.add_bad(DataError("bad", "f.jsonl", 3, kind="invalid_json"))
    assert tracker.seen == 30 and tracker.bad_fraction == pytest.approx(0.1) and tracker.reports == 4
    assert len(tracker.messages) == 2 and tracker.by_kind == {"invalid_json": 3}
    summary = tracker.summary()
    assert "3 of 30" in summary and "invalid_json 3" in summary and "f.jsonl 3" in summary
    with pytest.raises(TooMuchBadDataError, match="4 of the 32"):  # the item itself is good, its skipped one bad
        tracker.update({"skipped": [DataError("x", "g.jsonl", 2, "too_long").report()], "input_ids": None})
    assert BadDataTracker().summary().startswith("bad data: none")
    batch = BadDataTracker(max_bad_fraction=0.5, min_samples=0)
    batch.update(4, ["f.jsonl:9: gone [missing_file]"])  # a batch of 4 items and the collator's skipped list
    assert (batch.good, batch.bad, batch.by_kind["missing_file"], batch.by_file["f.jsonl"]) == (4, 1, 1, 1)


# ------------------------------------------------------------------------------------------------ lengths, types


def _estimate(record: dict, tiles: int) -> int:
    chars = sum(len(turn["value"]) for turn in record["conversations"])
    return math.ceil(chars / 3) + (2 + 256 * tiles if tiles else 0)


def test_lengths_from_field_estimate_and_sidecar(tmp_path):
    name = copy_photo(tmp_path)
    records = [
        {"conversations": conv("Q?"), "length": 1234},
        {"image": name, "width": 640, "height": 360, "conversations": conv("<image>\nDescribe the picture.")},
        {"image": name, "conversations": conv("<image>\nNo size given.")},
        {"conversations": conv("Only text here, fairly long " * 5)},
    ]
    ds = build(tmp_path, records, entry={"repeat_time": 2})
    field_, sized, unsized, text = (
        1234,
        _estimate(records[1], plan_tiles(640, 360, 1, 6, 448, True)[2]),
        _estimate(records[2], 6 + 1),  # unknown size: the most tiles (max_dynamic_patch + thumbnail)
        _estimate(records[3], 0),
    )
    assert ds.lengths == [field_, sized, unsized, text] * 2
    assert ds.sample_types() == {"text": 4, "image": 4, "multi_image": 0, "video": 0, "invalid": 0}

    # A sidecar written by the checker wins; 0 = unknown falls back to the record.
    write_lengths_sidecar(tmp_path / "ds.jsonl", [11, 0, 33, 44])
    assert Path(lengths_sidecar_path(tmp_path / "ds.jsonl")).exists()
    ds = build_dataset(tmp_path / "meta.json", tokenizer(), config())
    assert ds.lengths == [11, sized, 33, 44] * 2
    # A stale sidecar (other record count) is ignored.
    write_lengths_sidecar(tmp_path / "ds.jsonl", [5, 5, 5])
    ds = build_dataset(tmp_path / "meta.json", tokenizer(), config())
    assert ds.lengths == [field_, sized, unsized, text] * 2


def test_tiles_per_sample_exact_from_sizes_else_unknown(tmp_path):
    name = copy_photo(tmp_path)  # 640 x 360
    make_video(tmp_path / "v.mp4", frames=4)
    records = [
        {"image": name, "width": 640, "height": 360, "conversations": conv("<image>\nDescribe.")},
        {"image": [name, name], "width_list": [640, 640], "height_list": [360, 360],
         "conversations": conv("<image><image>\nCompare.")},
        {"image": name, "conversations": conv("<image>\nNo size given.")},
        {"conversations": conv("Only text.")},
        {"video": "v.mp4", "conversations": conv("<video>\nWhat happens?")},
        "{broken",
    ]
    ds = build(tmp_path, records, bad_data="skip")
    one, two = plan_tiles(640, 360, 1, 6, 448, True)[2], 2 * plan_tiles(640, 360, 1, 3, 448, True)[2]
    assert ds.tiles == [one, two, UNKNOWN_TILES, 1, UNKNOWN_TILES, UNKNOWN_TILES]
    for index in (0, 1, 3):  # the planned counts are what the samples hold
        assert ds[index]["pixel_values"].shape[0] == ds.tiles[index]
    assert build(tmp_path / "fixed", [records[0]], dynamic_image_size=False).tiles == [1]


def test_sample_types_and_invalid_records(tmp_path):
    make_video(tmp_path / "v.mp4", frames=4)
    records = [GOOD_TEXT, {"video": "v.mp4", "conversations": conv("Q?")}, "{broken",
               {"image": ["a.png", "b.png"], "conversations": conv("<image><image>Q")}]
    ds = build(tmp_path, records, entry={"repeat_time": 3})
    assert ds.sample_types() == {"text": 3, "image": 0, "multi_image": 3, "video": 3, "invalid": 3}
    assert len(ds.lengths) == 12 and ds.lengths[1] > 8 * 256  # video: max_num_frame frames planned


# ------------------------------------------------------------------------------------------------ concatenation, repeat


def test_concatenation_repeat_time_and_per_dataset_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve from the current directory, as in the official scripts
    name = copy_photo(tmp_path)
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"conversations": conv(f"Q{i}?")}) + "\n" for i in range(10)))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"image": name, "conversations": conv(f"<image>\n{i}")}) + "\n" for i in range(4)))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "texts": {"root": "", "annotation": "a.jsonl", "data_augment": False, "repeat_time": 0.5},
        "images": {"root": ".", "annotation": "b.jsonl", "data_augment": False, "repeat_time": 2.5,
                   "max_dynamic_patch": 1},
    }))
    ds = build_dataset(meta, tokenizer(), config())
    assert len(ds) == 5 + 10
    text_lines = [ds.locate(i)[1] for i in range(5)]
    assert len(set(text_lines)) == 5 and all(ds.locate(i)[0] == str(a) for i in range(5))
    image_lines = [ds.locate(i)[1] for i in range(5, 15)]
    assert image_lines[:8] == [1, 2, 3, 4] * 2 and set(image_lines[8:]) <= {1, 2, 3, 4}
    assert ds[7]["pixel_values"].shape[0] == 1  # the entry's max_dynamic_patch = 1
    assert ds[-1]["sample_id"].startswith(str(b))
    with pytest.raises(IndexError):
        ds[15]
    # Same seed: same subset; another seed: (here) another subset of the text file.
    same = build_dataset(meta, tokenizer(), config())
    assert [same.locate(i) for i in range(15)] == [ds.locate(i) for i in range(15)]
    subsets = {tuple(build_dataset(meta, tokenizer(), config(seed=s)).locate(i)[1] for i in range(5))
               for s in range(4)}
    assert len(subsets) > 1
    assert [e.name for e in load_meta(meta)] == ["texts", "images"]


def test_config_validation_and_from_args():
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="nope")
    with pytest.raises(ValueError, match="bad_data"):
        DataConfig(bad_data="ignore")
    with pytest.raises(ValueError, match="min_num_frame"):
        DataConfig(min_num_frame=9, max_num_frame=8)
    with pytest.raises(ValueError, match="video_sample"):
        DataConfig(video_sample="fps0")  # a setting error, never a per-sample "corrupt video"
    assert DataConfig(video_sample="fps0.5").video_sample == "fps0.5"

    class Args:
        conv_style, force_image_size, max_dynamic_patch, use_thumbnail, unrelated = "Hermes-2", 224, 4, True, 1

    cfg = DataConfig.from_args(Args(), num_image_token=64, seed=3)
    assert (cfg.template, cfg.image_size, cfg.max_dynamic_patch, cfg.use_thumbnail) == ("Hermes-2", 224, 4, True)
    assert (cfg.num_image_token, cfg.seed) == (64, 3)

    class Official:
        conv_style, force_image_size, down_sample_ratio = "internvl2_5", 448, 0.5

    assert DataConfig.from_args(Official()).num_image_token == 256  # official (448 // 14)**2 * 0.5**2
