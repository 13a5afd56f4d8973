"""Meta JSON loading, relative path resolution and repeat_time expansion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from internvl_chat.data.meta import DatasetEntry, MetaError, expand_indices, load_meta, stable_seed


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def _entry(annotation: str, **extra) -> dict:
    return {"root": "", "annotation": annotation, "data_augment": False, "repeat_time": 1, **extra}


@pytest.fixture
def ann(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"conversations": []}\n')
    return path


# ------------------------------------------------------------------------------------------------ load_meta


def test_entries_keep_key_order_types_and_unknown_keys(tmp_path, ann):
    (tmp_path / "imgs").mkdir()
    names = ["zeta", "alpha", "mid"]
    meta = {
        "zeta": _entry(str(ann), root=str(tmp_path / "imgs"), data_augment=True, repeat_time=3, length=7,
                       max_dynamic_patch=24, format="swift", note="kept"),
        "alpha": _entry(str(ann), repeat_time=0.25),
        "mid": _entry(str(ann), repeat_time=2.0, format="auto"),
    }
    entries = load_meta(_write(tmp_path / "meta.json", meta))
    assert [e.name for e in entries] == names
    first = entries[0]
    assert isinstance(first, DatasetEntry)
    assert first.root == str(tmp_path / "imgs") and first.annotation == str(ann)
    assert (first.data_augment, first.repeat_time, first.length, first.max_dynamic_patch) == (True, 3, 7, 24)
    assert first.format == "swift" and first.extra == {"note": "kept"}
    assert first.meta_path == str(tmp_path / "meta.json")
    assert entries[1].repeat_time == 0.25 and entries[1].length is None and entries[1].max_dynamic_patch is None
    assert entries[2].format is None  # "auto" = detect per file
    assert entries[2].repeat_time == 2 and isinstance(entries[2].repeat_time, int)


@pytest.mark.parametrize("missing", ["root", "annotation", "data_augment", "repeat_time"])
def test_missing_required_key_names_file_dataset_and_key(tmp_path, ann, missing):
    entry = _entry(str(ann))
    del entry[missing]
    meta = _write(tmp_path / "meta.json", {"ok": _entry(str(ann)), "broken-set": entry})
    with pytest.raises(MetaError) as info:
        load_meta(meta)
    message = str(info.value)
    assert meta in message and "'broken-set'" in message and missing in message


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("data_augment", "yes", "data_augment"),
        ("repeat_time", "1", "repeat_time"),
        ("repeat_time", 0, "> 0"),
        ("repeat_time", -2, "> 0"),
        ("repeat_time", True, "repeat_time"),
        ("length", -1, "length"),
        ("length", 1.5, "length"),
        ("max_dynamic_patch", 0, "max_dynamic_patch"),
        ("format", "csv", "format"),
        ("root", 3, "root"),
        ("annotation", "", "annotation"),
    ],
)
def test_wrong_types_and_values(tmp_path, ann, key, value, needle):
    meta = _write(tmp_path / "meta.json", {"ds": {**_entry(str(ann)), key: value}})
    with pytest.raises(MetaError, match=needle) as info:
        load_meta(meta)
    assert meta in str(info.value) and "'ds'" in str(info.value)


def test_missing_annotation_lists_the_paths_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta_dir").mkdir()
    meta = _write(tmp_path / "meta_dir" / "meta.json", {"ds": _entry("nowhere.jsonl")})
    with pytest.raises(MetaError) as info:
        load_meta(meta)
    message = str(info.value)
    assert "'ds'" in message and "not found" in message
    assert str(tmp_path / "nowhere.jsonl") in message and str(tmp_path / "meta_dir" / "nowhere.jsonl") in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ("{}", "no dataset"), ('{"a": 3}', "JSON object")],
)
def test_malformed_meta_files(tmp_path, content, needle):
    meta = _write(tmp_path / "meta.json", content)
    with pytest.raises(MetaError, match=needle):
        load_meta(meta)


def test_missing_meta_file(tmp_path):
    with pytest.raises(MetaError, match="does not exist"):
        load_meta(tmp_path / "nope.json")


def test_relative_paths_prefer_cwd_then_meta_dir(tmp_path, monkeypatch):
    """cwd-relative like the official scripts; the meta file's folder only when the former does not exist."""
    meta_dir, cwd = tmp_path / "meta", tmp_path / "cwd"
    for folder in (meta_dir / "data" / "images", cwd / "data"):
        folder.mkdir(parents=True)
    (meta_dir / "data" / "train.jsonl").write_text("{}\n")
    (meta_dir / "data" / "both.jsonl").write_text("{}\n")
    (cwd / "data" / "both.jsonl").write_text("{}\n")
    meta = _write(
        meta_dir / "meta.json",
        {
            "only-meta-dir": {**_entry("data/train.jsonl"), "root": "data/images"},
            "both": {**_entry("data/both.jsonl"), "root": "data"},
        },
    )
    monkeypatch.chdir(cwd)
    only, both = load_meta(meta)
    assert only.annotation == str(meta_dir / "data" / "train.jsonl")
    assert only.root == str(meta_dir / "data" / "images")
    assert both.annotation == str(cwd / "data" / "both.jsonl")  # the cwd wins when it exists
    assert both.root == str(cwd / "data")
    # Relative meta path itself, and paths stored absolute.
    monkeypatch.chdir(meta_dir)
    again = load_meta("meta.json")
    assert os.path.isabs(again[0].annotation) and again[0].annotation == str(meta_dir / "data" / "train.jsonl")


# ------------------------------------------------------------------------------------------------ repeat_time


def test_repeat_one_and_integers_are_full_passes():
    assert expand_indices(5, 1, seed=0).tolist() == list(range(5))
    assert expand_indices(4, 3, seed=0).tolist() == list(range(4)) * 3
    assert expand_indices(4, 3.0, seed=0).tolist() == list(range(4)) * 3
    assert expand_indices(0, 2.5, seed=0).tolist() == []
    assert expand_indices(5, 1).dtype == np.int64


def test_repeat_two_and_a_half_is_two_passes_plus_a_seeded_random_half():
    n = 40
    out = expand_indices(n, 2.5, seed=(7, "ds"))
    assert len(out) == int(n * 2.5)
    assert out[: 2 * n].tolist() == list(range(n)) * 2
    extra = out[2 * n :]
    assert len(set(extra.tolist())) == n // 2 and extra.min() >= 0 and extra.max() < n
    assert extra.tolist() == sorted(extra.tolist())
    assert np.array_equal(out, expand_indices(n, 2.5, seed=(7, "ds")))  # deterministic
    others = {tuple(expand_indices(n, 2.5, seed=(s, "ds"))[2 * n :].tolist()) for s in range(5)}
    assert len(others) > 1  # the half depends on the seed
    assert not np.array_equal(extra, expand_indices(n, 2.5, seed=(7, "other"))[2 * n :])


def test_fractional_repeat_is_a_seeded_random_subset_not_the_official_prefix():
    n = 100
    picks = [expand_indices(n, 0.3, seed=s) for s in range(6)]
    for out in picks:
        assert len(out) == 30 and len(set(out.tolist())) == 30 and out.max() < n
    assert any(out.tolist() != list(range(30)) for out in picks)  # the official code took lines 0..29
    assert len({tuple(p.tolist()) for p in picks}) > 1
    assert np.array_equal(expand_indices(n, 0.3, seed=3), picks[3])
    assert len(expand_indices(7, 0.3, seed=0)) == int(7 * 0.3)  # official count rule: int(n * r)


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf"), "2", True])
def test_bad_repeat_time(bad):
    with pytest.raises(ValueError, match="repeat_time"):
        expand_indices(10, bad, seed=0)


def test_stable_seed_is_stable_across_processes():
    here = stable_seed(42, "my-dataset")
    code = "from internvl_chat.data.meta import stable_seed; print(stable_seed(42, 'my-dataset'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(other.stdout) == here
    assert 0 <= here < 2**63 and stable_seed(42, "other") != here
