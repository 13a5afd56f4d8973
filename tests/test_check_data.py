"""The pre-flight data checker, the sample inspector and the data-throughput benchmark.

A corpus with one line per bad-data case must come back with every problem at its file, line and
kind (and exit code 1); the clean demo dataset must pass and leave a length sidecar that the
training dataset then uses; the inspector must mark exactly the supervised tokens; the benchmark's
quick run must see identical tensors on both paths.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl_chat.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_chat.data.check import check_dataset
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import SupervisedDataset, build_dataset
from internvl_chat.data.meta import load_meta
from internvl_chat.data.records import lengths_sidecar_path
from internvl_chat.data.tiling import plan_tiles
from internvl_chat.demo_data import TEXT_QA, make_demo_dataset
from internvl_chat.model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER = FIXTURES / "tokenizer_qwen2"
TEMPLATE = "Hermes-2"
MAX_LEN = 700  # fits every good corpus sample (one tile or two frames), not the long one


@functools.cache
def tokenizer():
    return load_tokenizer(str(TOKENIZER))


def load_tool(relative: str):
    """Import a script of tools/ or bench/ as a module (they are run as files, not installed)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus_config(**overrides) -> DataConfig:
    values = dict(template=TEMPLATE, dynamic_image_size=False, max_seq_length=MAX_LEN, min_num_frame=1,
                  max_num_frame=2, bad_data="fail")
    values.update(overrides)
    return DataConfig(**values)


CORPUS_FLAGS = ["--tokenizer", str(TOKENIZER), "--template", TEMPLATE, "--dynamic_image_size", "False",
                "--max_seq_length", str(MAX_LEN), "--min_num_frame", "1", "--max_num_frame", "2"]


def write_video(path: Path, num_frames: int = 6) -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(num_frames):
            pixels = np.full((48, 64, 3), 40 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# line -> expected kind (None: a good line). Blank lines are not records but keep their line numbers.
CORPUS = [
    (None, {"image": "good.png", "conversations": turns("<image>\nWhat is it?", "A grey box.")}),
    ("invalid_json", '{"conversations": [{"from": "human", "value": "hi"}'),
    ("missing_file", {"image": "nowhere.png", "conversations": turns("<image>\nWhat is it?", "A box.")}),
    ("corrupt_image", {"image": "corrupt.jpg", "conversations": turns("<image>\nWhat is it?", "A box.")}),
    ("corrupt_video", {"video": "corrupt.mp4", "conversations": turns("<video>\nWhat happens?", "Nothing.")}),
    ("placeholder_count", {"image": ["good.png", "good.png"],
                           "conversations": turns("<image>\nCompare the two.", "They match.")}),
    ("bad_roles", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "system", "value": "Be brief."},
                                     {"from": "gpt", "value": "Hello."}]}),
    ("empty_conversation", {"conversations": []}),
    (None, ""),  # a blank line
    ("box_out_of_range", {"image": "good.png", "conversations": turns(
        "<image>\nWhere is the box?", "<ref>box</ref><box>[[10, 20, 1200, 40]]</box>")}),
    ("too_long", {"conversations": turns("Tell me a long story.", "once upon a time " * 400)}),
    ("unknown_format", {"prompt": "hello", "completion": "world"}),
    ("bad_roles", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep."}]}),
    (None, {"conversations": turns("Say hello.", "Hello!")}),
    (None, {"video": "clip.mp4", "conversations": turns("<video>\nWhat happens?", "The screen brightens.")}),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_corpus")
    Image.new("RGB", (64, 48), (128, 128, 128)).save(folder / "good.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 8)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage, not a movie" * 16)
    write_video(folder / "clip.mp4")
    lines = [r if isinstance(r, str) else json.dumps(r) for _, r in CORPUS]
    (folder / "bad.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"bad": {"root": str(folder), "annotation": str(folder / "bad.jsonl"), "data_augment": False,
                    "repeat_time": 1}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def expected_problems() -> dict[int, str]:
    return {line: kind for line, (kind, raw) in enumerate(CORPUS, start=1) if kind is not None}


def problems_by_line(report) -> dict[int, str]:
    return {p.line: p.kind for p in report.problems}


def test_every_bad_line_is_reported_with_file_line_and_kind(corpus):
    report = check_dataset(corpus / "meta.json", tokenizer(), corpus_config(), write_lengths=False)
    assert problems_by_line(report) == expected_problems()
    assert {p.file for p in report.problems} == {str(corpus / "bad.jsonl")}
    assert all(p.reason and p.dataset == "bad" for p in report.problems)
    good = sum(1 for kind, raw in CORPUS if kind is None and raw)
    assert report.records == good + len(expected_problems())
    assert report.bad_records == len(expected_problems())
    assert report.exit_code("fail") == 1
    # The too_long reason says what training would do with it.
    too_long = next(p for p in report.problems if p.kind == "too_long")
    assert f"max_seq_length {MAX_LEN}" in too_long.reason and "cuts it" in too_long.reason


def test_truncation_can_be_allowed_and_image_cuts_are_always_errors(corpus):
    report = check_dataset(corpus / "meta.json", tokenizer(), corpus_config(), write_lengths=False,
                           allow_truncation=True)
    assert "too_long" not in problems_by_line(report).values()
    assert [w.kind for w in report.warnings] == ["truncated"]
    # With a limit below one image block, the good image sample cannot be cut: refused, not truncated.
    report = check_dataset(corpus / "meta.json", tokenizer(), corpus_config(max_seq_length=100),
                           write_lengths=False, allow_truncation=True)
    refused = [p for p in report.problems if p.kind == "too_long" and p.line == 1]
    assert refused and "image block" in refused[0].reason


def test_sidecar_holds_what_training_builds_for_each_record(corpus, tmp_path):
    shutil.copytree(corpus, tmp_path / "c")
    meta = tmp_path / "c" / "meta.json"
    meta.write_text(meta.read_text().replace(str(corpus), str(tmp_path / "c")))
    report = check_dataset(meta, tokenizer(), corpus_config())
    sidecar = np.load(lengths_sidecar_path(tmp_path / "c" / "bad.jsonl")).tolist()
    assert report.sidecars == [lengths_sidecar_path(tmp_path / "c" / "bad.jsonl")]
    dataset = SupervisedDataset(load_meta(meta), tokenizer(), corpus_config(min_num_frame=2))
    records = [(kind, raw) for kind, raw in CORPUS if raw != ""]
    for index, (kind, raw) in enumerate(records):
        if kind is None:  # the real length (videos: with max_num_frame frames)
            assert sidecar[index] == len(dataset.build_item(index)["input_ids"])
        elif kind == "too_long":  # training keeps it, cut to max_seq_length
            assert sidecar[index] == MAX_LEN == len(dataset.build_item(index)["input_ids"])
        else:
            assert sidecar[index] == 0
    # The dataset reads it (it estimates only the records marked unknown, 0).
    assert [n for n, s in zip(dataset.lengths, sidecar) if s > 0] == [s for s in sidecar if s > 0]


def test_cli_reports_all_problems_as_json_and_exits_1(corpus, capsys):
    tool = load_tool("tools/check_data.py")
    code = tool.main(["--meta_path", str(corpus / "meta.json"), *CORPUS_FLAGS, "--json", "--no-write-lengths"])
    assert code == 1
    out = json.loads(capsys.readouterr().out)
    assert {item["line"]: item["kind"] for item in out["problems"]["items"]} == expected_problems()
    assert out["exit_code"] == 1 and out["bad_records"] == len(expected_problems())
    assert not (corpus / "bad.jsonl.lengths.npy").exists()


def test_cli_text_summary_groups_problems_by_kind(corpus, capsys):
    tool = load_tool("tools/check_data.py")
    assert tool.main(["--meta_path", str(corpus / "meta.json"), *CORPUS_FLAGS, "--no-write-lengths"]) == 1
    text = capsys.readouterr().out
    for line, kind in expected_problems().items():
        assert f"  {kind}: " in text
        assert f"{corpus / 'bad.jsonl'}:{line}: " in text
    assert "result: FAIL" in text


def test_skip_policy_exit_code_follows_the_bad_fraction(corpus, capsys):
    tool = load_tool("tools/check_data.py")
    base = ["--meta_path", str(corpus / "meta.json"), *CORPUS_FLAGS, "--no-write-lengths", "--policy", "skip"]
    assert tool.main(base + ["--max-bad-fraction", "0.9"]) == 0
    assert tool.main(base + ["--max-bad-fraction", "0.5"]) == 1  # 11 of 14 bad
    capsys.readouterr()


def test_without_a_tokenizer_everything_but_tokens_is_checked(corpus):
    report = check_dataset(corpus / "meta.json", None, corpus_config())
    expected = {line: kind for line, kind in expected_problems().items() if kind != "too_long"}
    assert problems_by_line(report) == expected
    assert not report.tokenized and report.tokens is None and not report.sidecars
    assert report.types["video"] == 2  # types count every record, bad ones included (the corrupt video)
    assert report.tiles["max"] == 2  # the good video read with max_num_frame frames


def test_parallel_workers_give_the_same_report(corpus):
    one = check_dataset(corpus / "meta.json", tokenizer(), corpus_config(), write_lengths=False)
    two = check_dataset(corpus / "meta.json", tokenizer(), corpus_config(), write_lengths=False, workers=2)
    assert [(p.line, p.kind, p.reason) for p in two.problems] == [(p.line, p.kind, p.reason) for p in one.problems]
    assert two.tokens == one.tokens and two.types == one.types


def test_a_broken_json_list_is_fatal_whatever_the_policy(tmp_path):
    good = {"conversations": turns("Say hello.", "Hello!")}
    (tmp_path / "list.json").write_text("[" + json.dumps(good) + ",\n" + json.dumps(good) + ",\n{\"conversations\": ]")
    meta = {"llava": {"root": str(tmp_path), "annotation": str(tmp_path / "list.json"), "data_augment": False,
                      "repeat_time": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    for tok in (tokenizer(), None):
        report = check_dataset(tmp_path / "meta.json", tok, corpus_config(), write_lengths=False)
        kinds = {(p.kind, p.line) for p in report.problems}
        assert ("invalid_json", 3) in kinds  # the third element of the list
        assert any(kind == "unusable_file" for kind, _ in kinds)
        assert report.bad_records == report.records == 3
        assert report.exit_code("skip", 1.0) == 1


def test_clean_demo_dataset_passes_and_its_sidecar_feeds_the_dataset(tmp_path, capsys):
    num_images = 12
    meta = make_demo_dataset(tmp_path / "demo", num_images=num_images, seed=3)
    annotation = Path(load_meta(meta)[0].annotation)
    before = (annotation.read_bytes(), meta.read_bytes())
    flags = ["--tokenizer", str(TOKENIZER), "--template", TEMPLATE, "--dynamic_image_size", "--use_thumbnail"]
    tool = load_tool("tools/check_data.py")
    assert tool.main(["--meta_path", str(meta), *flags, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (annotation.read_bytes(), meta.read_bytes()) == before  # user files untouched
    sidecar = lengths_sidecar_path(annotation)
    assert out["sidecars"] == [sidecar] and Path(sidecar).is_file()
    # Per-type counts are those the generator writes.
    counting = max(2, num_images // 4)  # pictures of several shapes for the counting question
    assert out["types"] == {"text": len(TEXT_QA), "image": num_images + counting,
                            "multi_image": max(2, num_images // 6),
                            "video": 0, "invalid": 0}
    assert out["problems"]["count"] == 0 and out["exit_code"] == 0

    config = DataConfig(template=TEMPLATE, dynamic_image_size=True, use_thumbnail=True, bad_data="fail")
    dataset = build_dataset(meta, tokenizer(), config)
    items = [dataset[i] for i in range(len(dataset))]
    real = [len(item["input_ids"]) for item in items]
    assert dataset.lengths == real  # read from the sidecar: the exact token lengths
    assert np.load(sidecar).tolist() == real
    # Summary numbers agree with the items the dataset builds.
    assert out["tokens"]["total"] == sum(real) and out["tokens"]["max"] == max(real)
    assert out["supervised"]["total"] == sum(item["num_supervised"] for item in items)
    tiles = [int(item["image_flags"].sum()) for item in items if int(item["image_flags"].sum())]
    assert out["tiles"]["total"] == sum(tiles) and out["tiles"]["count"] == len(tiles)


def test_data_flags_and_checkpoint_settings_give_the_training_config(tmp_path):
    """The tools' flags go through DataConfig.from_args, as training's: a checkpoint's config.json fills what the
    command line leaves unset, tokens per tile follow the tile size unless given, and the shared tile rules hold."""
    import argparse

    from internvl_chat.cli.data_args import SetupError, add_data_arguments, setup_from_args
    from internvl_chat.data.config import image_tile_range, num_image_tokens

    model = tmp_path / "model"
    shutil.copytree(TOKENIZER, model)
    (model / "config.json").write_text(json.dumps({
        "template": "Hermes-2", "force_image_size": 224, "downsample_ratio": 0.5, "max_dynamic_patch": 6,
        "dynamic_image_size": True, "vision_config": {"patch_size": 14, "image_size": 448}}))
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)

    def config(*flags: str):
        return setup_from_args(parser.parse_args(["--model", str(model), *flags]))[1]

    cfg = config()
    assert (cfg.template, cfg.image_size, cfg.num_image_token, cfg.max_dynamic_patch, cfg.dynamic_image_size) == (
        "Hermes-2", 224, 64, 6, True)
    assert (config("--force_image_size", "448").num_image_token, config("--num_image_token", "100").num_image_token,
            config("--template", "internvl2_5", "--max_dynamic_patch", "2").max_dynamic_patch) == (256, 100, 2)
    plain = setup_from_args(parser.parse_args(["--template", "internvl2_5"]))
    assert plain[0] is None and plain[1] == DataConfig(template="internvl2_5")
    with pytest.raises(SetupError, match="needs --template"):
        setup_from_args(parser.parse_args(["--tokenizer", str(TOKENIZER)]))
    with pytest.raises(SetupError, match="min_dynamic_patch"):
        setup_from_args(parser.parse_args(["--min_dynamic_patch", "8", "--max_dynamic_patch", "4"]))

    assert (num_image_tokens(448), num_image_tokens(224), num_image_tokens(448, 14, 0.25)) == (256, 64, 64)
    # one image: the whole budget; n images share it (at least 1 each); below min_dynamic_patch: one tile
    assert image_tile_range(12) == (1, 12) and image_tile_range(12, 3) == (1, 4) and image_tile_range(2, 5) == (1, 1)
    assert image_tile_range(12, 2, min_dynamic_patch=4) == (4, 6) and image_tile_range(12, 4, 4) == (1, 1)


def test_tools_are_thin_entry_points_of_the_cli_modules():
    """`python tools/check_data.py` and `python -m internvl_chat.cli.check_data` are the same program."""
    outputs = [subprocess.run([sys.executable, *how, "--help"], capture_output=True, text=True, check=True).stdout
               for how in ([str(REPO / "tools" / "check_data.py")], ["-m", "internvl_chat.cli.check_data"])]
    assert outputs[0] == outputs[1] and "--meta_path" in outputs[0]


# --------------------------------------------------------------------------------------------
# inspect_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("inspect") / "demo", num_images=6, seed=1)


def find_line(meta: Path, predicate) -> tuple[int, dict]:
    annotation = Path(load_meta(meta)[0].annotation)
    for line, text in enumerate(annotation.read_text().splitlines(), start=1):
        if text.strip() and predicate(json.loads(text)):
            return line, json.loads(text)
    raise AssertionError("no such record")


def inspect_json(capsys, meta: Path, line: int, *extra: str) -> dict:
    tool = load_tool("tools/inspect_data.py")
    code = tool.main(["--meta_path", str(meta), "--dataset", "demo_shapes", "--line", str(line), "--tokenizer",
                      str(TOKENIZER), "--template", TEMPLATE, "--dynamic_image_size", "--use_thumbnail", *extra])
    assert code == 0
    return capsys.readouterr().out


def supervised_ids(answer: str) -> list[int]:
    tok = tokenizer()
    return tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_inspect_json_marks_exactly_the_supervised_tokens_of_a_text_sample(demo, capsys):
    line, record = find_line(demo, lambda r: r["conversations"][0]["value"] == "Say hello.")
    out = json.loads(inspect_json(capsys, demo, line, "--json"))
    marked = [i for i, flag in enumerate(out["supervised"]) if flag]
    expected = supervised_ids("Hello!")
    assert [out["input_ids"][i] for i in marked] == expected
    assert marked == list(range(len(out["input_ids"]) - len(expected), len(out["input_ids"])))
    assert [out["labels"][i] != IGNORE_INDEX for i in range(len(out["labels"]))] == out["supervised"]
    assert "".join(out["tokens"][i] for i in marked) == "Hello!<|im_end|>"
    assert out["line"] == line and out["type"] == "text" and out["num_tiles"] == 0 and out["images"] == []
    assert "[[Hello!<|im_end|>]]" in out["text"]


def test_inspect_image_sample_collapses_blocks_and_reports_tiles_and_grid(demo, capsys, tmp_path):
    line, record = find_line(demo, lambda r: isinstance(r.get("image"), str) and len(r["conversations"]) == 2
                             and r["conversations"][0]["value"].startswith("<image>"))
    answer = record["conversations"][1]["value"]
    root = Path(load_meta(demo)[0].root)
    width, height = Image.open(root / record["image"]).size
    cols, rows, tiles = plan_tiles(width, height, 1, load_meta(demo)[0].max_dynamic_patch, 448, True)

    info = json.loads(inspect_json(capsys, demo, line, "--json", "--save-tiles", str(tmp_path / "tiles")))
    marked = [info["input_ids"][i] for i, flag in enumerate(info["supervised"]) if flag]
    assert marked == supervised_ids(answer)
    [image] = info["images"]
    assert (image["tiles"], image["grid"], image["context_tokens"]) == (tiles, [cols, rows], 256 * tiles)
    assert image["thumbnail"] == (tiles > cols * rows) and (image["width"], image["height"]) == (width, height)
    context_id = tokenizer().convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert info["input_ids"][image["start"] + 1 : image["end"]] == [context_id] * (256 * tiles)
    assert len(info["saved_tiles"]) == tiles and Image.open(info["saved_tiles"][0]).size == (448, 448)

    text = inspect_json(capsys, demo, line, "--no-color")
    block = f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN}×{256 * tiles}{IMG_END_TOKEN}"
    assert block in text and f"[[{answer}<|im_end|>]]" in text
    assert f"grid {cols}x{rows}" in text and "\x1b[" not in text
    assert IMG_CONTEXT_TOKEN * 2 not in text  # collapsed, never spelled out


def test_inspect_reports_a_bad_sample_with_its_location(corpus, capsys):
    tool = load_tool("tools/inspect_data.py")
    code = tool.main(["--meta_path", str(corpus / "meta.json"), "--line", "3", *CORPUS_FLAGS])
    assert code == 1
    assert f"{corpus / 'bad.jsonl'}:3: " in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The benchmark


def test_benchmark_quick_run_sees_identical_tensors(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "data_throughput.py"), "--quick", "--json",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["mismatches"] == [] and result["identical"] == result["samples"] > 0
    assert {k for k, n in result["mix"].items() if n} >= {"photo", "page", "multi", "text"}
    for path in ("ours", "official"):
        stages = result["paths"][path]["stages"]
        assert result["paths"][path]["samples_per_s"] > 0
        assert sum(stages.values()) == pytest.approx(result["paths"][path]["seconds"], rel=1e-6)
    assert result["paths"]["official"]["stages"]["normalise"] > 0
    assert result["ratio"] == pytest.approx(result["paths"]["official"]["seconds"] / result["paths"]["ours"]["seconds"])
