"""Checker gaps of issue 13: turn-order warnings, "did you mean" for a misspelled key, counts that add up,
and a header that says what the statistics assume without ``--model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_chat.cli.check_data import main as check_main
from internvl_chat.data.check import check_dataset
from internvl_chat.data.config import DataConfig
from internvl_chat.data.errors import DataError
from internvl_chat.data.formats import detect_format, to_official
from internvl_chat.data.validation import near_miss_keys


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


RECORDS = [
    {"conversations": [turn("human", "Q?"), turn("gpt", "A.")]},  # 1: fine
    {"conversations": [turn("gpt", "An answer to nothing."), turn("human", "Q?"), turn("gpt", "A.")]},  # 2
    {"conversations": [turn("system", "Be brief."), turn("gpt", "Hello."), turn("human", "Q?"),  # 3: both
                       turn("gpt", "A."), turn("human", "And then?")]},
    {"conversations": [turn("human", "Q?"), turn("gpt", "A."), turn("human", "Left hanging?")]},  # 4
    '{"conversations": [',  # 5: unreadable
    {"conversation": [turn("human", "Q?"), turn("gpt", "A.")]},  # 6: misspelled key
    {"image_path": "a.png", "conversations": [turn("human", "Q?"), turn("gpt", "A.")]},  # 7: trains as text
    {"image": "a.png", "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "A.")]},  # 8: missing file
]


@pytest.fixture()
def meta(tmp_path: Path) -> Path:
    annotation = tmp_path / "train.jsonl"
    annotation.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in RECORDS))
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": str(annotation), "data_augment": False,
                                      "repeat_time": 1}}))
    return path


def config() -> DataConfig:
    return DataConfig(template="Hermes-2", bad_data="fail")


def test_gpt_first_and_trailing_human_turns_are_warnings_with_file_and_line(meta):
    report = check_dataset(meta, None, config(), write_lengths=False)
    found = {(w.line, w.kind) for w in report.warnings}
    assert found == {(2, "assistant_first"), (3, "assistant_first"), (3, "trailing_human_turn"),
                     (4, "trailing_human_turn"), (7, "misspelled_key")}
    assert all(w.file == str(meta.parent / "train.jsonl") for w in report.warnings)
    by_key = {(w.line, w.kind): w.reason for w in report.warnings}
    assert by_key[(3, "assistant_first")].startswith("turn 1 (the first after any system turn) is 'gpt'")
    assert by_key[(3, "trailing_human_turn")].startswith("turn 4, the last one, is 'human'")
    # Warnings only: the records still train.
    assert {p.line for p in report.problems} == {5, 6, 8}


def test_a_misspelled_key_is_named_with_the_nearest_known_one(meta):
    report = check_dataset(meta, None, config(), write_lengths=False)
    problem = next(p for p in report.problems if p.line == 6)
    assert problem.kind == "unknown_format" and "did you mean 'conversations'?" in problem.reason
    warning = next(w for w in report.warnings if w.kind == "misspelled_key")
    assert warning.line == 7 and "unknown key 'image_path': did you mean 'image'?" in warning.reason
    with pytest.raises(DataError, match=r"did you mean 'conversations' \(not 'conversatons'\)") as info:
        detect_format({"conversatons": []})
    assert info.value.kind == "unknown_format"
    with pytest.raises(DataError, match=r"did you mean 'query' \(not 'querry'\)"):
        detect_format({"querry": "Q", "id": 1})
    with pytest.raises(DataError, match="did you mean 'conversations'"):  # the format named explicitly
        to_official({"conversation": [turn("human", "Q?"), turn("gpt", "A.")]}, "messages")
    with pytest.raises(DataError, match="no image .*did you mean 'image'") as info:  # placeholder, no media
        to_official({"imgae": "a.png", "conversations": [turn("human", "<image>\nQ?"), turn("gpt", "A.")]})
    assert info.value.kind == "placeholder_count"
    # Old ms-swift pairs under 'conversation' and an 'image_id' beside an 'image' are not typos.
    pairs = {"conversation": [{"human": "Q?", "assistant": "A."}]}
    assert detect_format(pairs) == "messages" and to_official(pairs)["conversations"][0]["value"] == "Q?"
    assert near_miss_keys({"image": "a.png", "image_id": 3, "conversations": []}) == []


def test_per_type_counts_add_up_to_the_records_in_text_and_json(meta, capsys):
    report = check_dataset(meta, None, config(), write_lengths=False)
    assert report.types["invalid"] == 2 and sum(report.types.values()) == report.records == len(RECORDS)
    assert check_main(["--meta_path", str(meta), "--template", "Hermes-2", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert sum(data["types"].values()) == data["records"] == len(RECORDS)
    assert sum(data["datasets"][0]["types"].values()) == data["datasets"][0]["records"]
    check_main(["--meta_path", str(meta), "--template", "Hermes-2"])
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("samples by type"))
    assert "text 5, image 1, multi_image 0, video 0, invalid 2; total 8 records" in line


def test_without_model_the_header_states_its_assumptions(meta, capsys):
    check_main(["--meta_path", str(meta), "--template", "Hermes-2"])
    header = capsys.readouterr().out.split("\n\n")[0]
    assert ("no --model: the statistics assume template Hermes-2, dynamic tiling off, max_dynamic_patch 12, "
            "thumbnail off") in header
    assert "--dynamic_image_size True --use_thumbnail True --max_dynamic_patch N" in header
    assert "meta file's max_dynamic_patch" not in header
    entry = json.loads(meta.read_text())
    entry["d"]["max_dynamic_patch"] = 4
    meta.write_text(json.dumps(entry))
    check_main(["--meta_path", str(meta), "--template", "Hermes-2", "--dynamic_image_size", "True"])
    header = capsys.readouterr().out.split("\n\n")[0]
    assert "dynamic tiling on" in header and "the meta file's max_dynamic_patch is used for: d (4)" in header
    check_main(["--meta_path", str(meta), "--template", "Hermes-2", "--json"])
    assert json.loads(capsys.readouterr().out)["assumptions"][0].startswith("no --model: the statistics assume")
