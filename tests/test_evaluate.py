"""eval/evaluate.sh, eval/evaluate.py, eval/benchmarks.py, eval/samples.py, eval/generate.py.

Fast tests: loading eval JSONL (conversions, per-line metric, box references, errors with file:line), sharding,
prompt placement, the benchmark loaders on small hand-made files in the official layout, the errors evaluate.sh
reports before a model loads, and the scoring wiring of evaluate.py with the generation replaced by fixed answers
(hand-computed scores). Slow tests (@slow): evaluate.sh end to end on a tiny random model, GPUS=1 vs GPUS=2 (gloo)
giving byte-identical predictions, and a benchmark layout evaluated for real.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `eval` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from eval import benchmarks  # noqa: E402
from eval.evaluate import main as evaluate_main  # noqa: E402
from eval.generate import chat_turns, shard  # noqa: E402
from eval.samples import EvalSample, load_eval_jsonl  # noqa: E402
from internvl_chat.data.errors import DataError  # noqa: E402

VQA_SUFFIX = " Answer the question using a single word or phrase."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(path: Path, size=(320, 240), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from internvl_chat.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "tiny-internvl"
    make_tiny_model(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# shard


def test_shard_is_the_official_contiguous_split():
    # InferenceSampler: the first len % world ranks take one more item, in order
    assert [list(shard(list(range(7)), r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(shard(list(range(2)), r, 4)) for r in range(4)] == [[0], [1], [], []]
    for n in range(9):
        for world in range(1, 5):
            parts = [list(shard(list(range(n)), r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)


# ---------------------------------------------------------------------------------------------------------------
# load_eval_jsonl


def test_load_eval_jsonl_reads_the_training_format(tmp_path):
    _image(tmp_path / "img" / "a.png", (320, 240))
    _image(tmp_path / "img" / "b.png", (500, 400))
    path = _write_jsonl(tmp_path / "heldout.jsonl", [
        {"id": "colour", "image": "img/a.png", "category": "colour",
         "conversations": _conv("<image>\nWhat colour?", "Red.")},
        {"id": "chat", "image": "img/a.png", "metric": "exact_match", "answers": ["red", "crimson"],
         "conversations": _conv("Describe it.", "A red square.", "What colour?", "red")},
        # box reference, no width/height: 320x240 read from the image -> [x / 1000 * 320, y / 1000 * 240]
        {"id": "box", "image": "img/a.png",
         "conversations": _conv("Where is it?", "<ref>it</ref><box>[[100, 200, 500, 1000]]</box>")},
        # width/height given on the line win over the file's size
        {"id": "box2", "image": "img/b.png", "width": 1000, "height": 2000,
         "conversations": _conv("Where?", "<box>[[10, 20, 30, 40]]</box>")},
        {"id": "pair", "image": ["img/a.png", "img/b.png"], "metric": "mc_acc", "options": {"A": "yes", "B": "no"},
         "conversations": _conv("Image-1: <image>\nImage-2: <image>\nSame size?", "B")},
        {"id": "text", "conversations": [{"from": "system", "value": "Be brief."}, *_conv("2+3?", "5")]},
        # ms-swift format is accepted as in training
        {"query": "Colour?", "response": "red", "images": ["img/b.png"]},
    ])
    samples = load_eval_jsonl(path)
    by_id = {s.id: s for s in samples}
    assert len(samples) == 7
    # metric: the line's "metric", else the file-wide argument, else from the reference (<box> -> iou_acc)
    assert [s.metric for s in samples] == ["vqa_acc", "exact_match", "iou_acc", "iou_acc", "mc_acc", "vqa_acc",
                                           "vqa_acc"]
    assert [s.metric for s in load_eval_jsonl(path, metric="anls")] == ["anls", "exact_match", "anls", "anls",
                                                                        "mc_acc", "anls", "anls"]

    colour = by_id["colour"]
    assert colour.question == "<image>\nWhat colour?" and colour.reference == "Red." and colour.history == []
    assert colour.images == [str(tmp_path / "img" / "a.png")]
    assert colour.to_metric_record("red")["answer"] == "Red."
    assert colour.to_metric_record("red")["category"] == "colour"

    chat = by_id["chat"]
    assert chat.history == [("Describe it.", "A red square.")] and chat.question == "What colour?"
    assert chat.to_metric_record("red")["answers"] == ["red", "crimson"]

    box = by_id["box"]
    record = box.to_metric_record("<box>[[0, 0, 10, 10]]</box>")
    assert record["answer"] == [32.0, 48.0, 160.0, 240.0]
    assert (record["width"], record["height"]) == (320, 240)
    record2 = by_id["box2"].to_metric_record("")
    assert record2["answer"] == [10.0, 40.0, 30.0, 80.0] and (record2["width"], record2["height"]) == (1000, 2000)

    pair = by_id["pair"]
    assert len(pair.images) == 2 and pair.to_metric_record("B")["options"] == {"A": "yes", "B": "no"}
    assert by_id["text"].system == "Be brief." and by_id["text"].images == []
    swift = samples[-1]
    assert swift.id == "heldout.jsonl:7" and swift.reference == "red" and swift.images[0].endswith("b.png")


def test_load_eval_jsonl_default_metric_without_argument(tmp_path):
    path = _write_jsonl(tmp_path / "e.jsonl", [{"conversations": _conv("Q?", "A")}])
    assert load_eval_jsonl(path)[0].metric == "vqa_acc"


@pytest.mark.parametrize("line, message", [
    ('{"conversations": [', "invalid JSON"),
    ({"metric": "bleu", "conversations": _conv("Q?", "A")}, "unknown metric 'bleu'"),
    ({"image": "missing.png", "conversations": _conv("Q?", "A")}, "image file not found"),
    ({"metric": "mc_acc", "conversations": _conv("Q?", "A")}, "needs 'options'"),
    ({"metric": "iou_acc", "image": "ok.png", "conversations": _conv("Where?", "left")}, "<box>"),
    ({"conversations": _conv("Q?", "A", "And?")}, "last turn must be the gpt reference"),
    ({"conversations": [{"from": "human", "value": "Q?"}]}, "assistant"),
    ({"answers": [], "conversations": _conv("Q?", "A")}, "'answers'"),
])
def test_load_eval_jsonl_errors_name_file_and_line(tmp_path, line, message):
    _image(tmp_path / "ok.png")
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"conversations": _conv("fine?", "yes")}, line])
    with pytest.raises(DataError) as info:
        load_eval_jsonl(path)
    text = str(info.value)
    assert f"{path}:2:" in text and message in text


def test_load_eval_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="eval file not found"):
        load_eval_jsonl(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# prompt placement


def test_chat_turns_place_the_image_as_training_does():
    one = EvalSample(id=1, question="What colour?", reference="red", metric="vqa_acc", images=["a.png"])
    assert chat_turns(one, 1, VQA_SUFFIX) == ("<image>\nWhat colour?" + VQA_SUFFIX, [])
    # with history, model.chat would not add the placeholder: it goes to the first human turn
    multi = EvalSample(id=2, question="And now?", reference="x", metric="vqa_acc", images=["a.png"],
                       history=[("Describe.", "A square.")])
    assert chat_turns(multi, 1) == ("And now?", [("<image>\nDescribe.", "A square.")])
    placed = EvalSample(id=3, question="Look <image> here", reference="x", metric="vqa_acc", images=["a.png"])
    assert chat_turns(placed, 1)[0] == "Look <image> here"
    text = EvalSample(id=4, question="Hi", reference="x", metric="vqa_acc")
    assert chat_turns(text, 0) == ("Hi", [])
    video = EvalSample(id=5, question="<video>\nWhat happens?", reference="x", metric="vqa_acc", video="v.mp4")
    assert chat_turns(video, 2)[0] == "Frame-1: <image>\nFrame-2: <image>\nWhat happens?"


# ---------------------------------------------------------------------------------------------------------------
# benchmark layouts (built from a few generated files)


def _textvqa(root: Path) -> dict:
    """3 questions; returns {question_id: fixed answer} with hand-computed vqa_acc scores 1, 0, 0.6."""
    for name in ("a", "b", "c"):
        _image(root / "textvqa" / "train_images" / f"{name}.jpg")
    _write_jsonl(root / "textvqa" / "textvqa_val.jsonl", [
        {"image": f"data/textvqa/train_images/{n}.jpg", "question": f"What is {n}?", "question_id": i,
         "answer": "x"} for i, n in enumerate("abc")])
    answers = [["red"] * 10, ["blue"] * 10, ["cat"] * 2 + ["dog"] * 8]
    (root / "textvqa" / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": i, "answers": [{"answer": a} for a in ans]} for i, ans in enumerate(answers)]}))
    # "cat" vs 2 x cat + 8 x dog: leave-one-out min(1, matches/3) = (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    return {0: "red", 1: "green", 2: "cat"}


def _refcoco(root: Path) -> dict:
    """2 expressions on a 200x100 image; the fixed answers hit the first box exactly and miss the second."""
    _image(root / "coco" / "train2014" / "r.jpg", (200, 100))
    _write_jsonl(root / "refcoco" / "refcoco_val.jsonl", [
        {"image": "data/coco/train2014/r.jpg", "sent": "left half", "bbox": [0, 0, 100, 50], "width": 200,
         "height": 100},
        {"image": "data/coco/train2014/r.jpg", "sent": "bottom right", "bbox": [100, 50, 200, 100], "width": 200,
         "height": 100}])
    # 0-1000 -> x * 200 / 1000, y * 100 / 1000: [0, 0, 100, 50] (IoU 1) for both -> the second has IoU 0
    return {"refcoco_val:1": "<ref>left half</ref><box>[[0, 0, 500, 500]]</box>",
            "refcoco_val:2": "[[0, 0, 500, 500]]"}


def _pope(root: Path) -> dict:
    _image(root / "pope" / "val2014" / "p.jpg")
    questions, qid = [], 0
    answers = {}
    fixed = {"adversarial": ["Yes", "No"], "popular": ["yes.", "not really"], "random": ["No", "No"]}
    for category in ("adversarial", "popular", "random"):
        _write_jsonl(root / "pope" / "coco" / f"coco_pope_{category}.json",
                     [{"label": "yes"}, {"label": "no"}])
        for answer in fixed[category]:
            questions.append({"question_id": qid, "image": "p.jpg", "category": category,
                              "text": f"Is there a thing {qid}? Answer the question using a single word or phrase."})
            answers[qid] = answer
            qid += 1
    _write_jsonl(root / "pope" / "llava_pope_test.jsonl", questions)
    return answers


def test_resolve_keys():
    assert [b.name for b in benchmarks.resolve("vqa-textvqa-val")] == ["textvqa_val"]
    assert [b.name for b in benchmarks.resolve("vqa-chartqa-test")] == ["chartqa_test_human", "chartqa_test_augmented"]
    assert [b.name for b in benchmarks.resolve("refcoco+-testA")] == ["refcoco+_testA"]
    assert len(benchmarks.resolve("refcoco")) == 8
    assert benchmarks.resolve("infovqa_val")[0].max_num == 24 and benchmarks.resolve("vqa-docvqa-val")[0].max_num == 18
    assert benchmarks.resolve("mmbench-dev-en")[0].name == "mmbench_dev_20230712"
    assert benchmarks.resolve("textvqa_val")[0].prompt_suffix == VQA_SUFFIX
    with pytest.raises(benchmarks.BenchmarkError, match="unknown dataset 'vqa-nothing'"):
        benchmarks.resolve("vqa-nothing")


def test_benchmark_loaders_read_the_official_files(tmp_path):
    root = tmp_path / "data"
    _textvqa(root), _refcoco(root), _pope(root)
    vqa = benchmarks.load_benchmark(benchmarks.BENCHMARKS["textvqa_val"], str(root))
    assert [s.id for s in vqa] == [0, 1, 2] and vqa[2].record_extras["answers"] == ["cat"] * 2 + ["dog"] * 8
    assert vqa[0].images == [str(root / "textvqa" / "train_images" / "a.jpg")]
    ref = benchmarks.load_benchmark(benchmarks.BENCHMARKS["refcoco_val"], str(root), limit=1)
    assert len(ref) == 1 and ref[0].question == benchmarks.GROUNDING_PROMPT.format("left half")
    assert ref[0].to_metric_record("p") == {"prediction": "p", "image": ref[0].images[0],
                                             "answer": [0.0, 0.0, 100.0, 50.0], "width": 200, "height": 100}
    pope = benchmarks.load_benchmark(benchmarks.BENCHMARKS["pope"], str(root))
    assert [(s.record_extras["category"], s.reference) for s in pope[:3]] == [
        ("adversarial", "yes"), ("adversarial", "no"), ("popular", "yes")]


def test_mme_and_mmbench_loaders(tmp_path):
    root = tmp_path / "data"
    lists = root / "mme" / "Your_Results"
    lists.mkdir(parents=True)
    (lists / "existence.txt").write_text("1.jpg\tIs there a dog?\tYes\n1.jpg\tIs there a cat?\tNo\n")
    (lists / "OCR.txt").write_text("o.jpg\tDoes it say hi?\tYes\n")
    for task, name in (("existence", "1.jpg"), ("OCR", "o.jpg")):
        _image(root / "mme" / "MME_Benchmark_release_version" / task / name)
    mme = benchmarks.load_benchmark(benchmarks.BENCHMARKS["mme"], str(root))
    assert [(s.record_extras["category"], s.question, s.reference) for s in mme] == [
        ("OCR", "Does it say hi?", "Yes"), ("existence", "Is there a dog?", "Yes"),
        ("existence", "Is there a cat?", "No")]
    assert benchmarks.BENCHMARKS["mme"].metric_options == {"style": "mme"}

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    rows = [f"7\tWhich animal?\t\tcat\tdog\t\tNone\tB\tanimals\t{image}",  # empty C and pandas-NA "None" D dropped
            f"8\tHow many?\tLook closely.\t1\t2\t3\t\tC\tcounting\t{image}"]
    (root / "mmbench").mkdir()
    (root / "mmbench" / "mmbench_dev_20230712.tsv").write_text("\n".join([header, *rows]) + "\n")
    mmb = benchmarks.load_benchmark(benchmarks.resolve("mmbench-dev-en")[0], str(root))
    assert mmb[0].question == "Which animal?\nA. cat\nB. dog"
    assert mmb[1].question == "Look closely.\nHow many?\nA. 1\nB. 2\nC. 3"
    assert mmb[0].to_metric_record("B") == {"prediction": "B", "options": {"A": "cat", "B": "dog"},
                                            "category": "animals", "question_id": "7", "image": mmb[0].images[0],
                                            "answer": "B"}
    assert Image.open(mmb[1].images[0]).size == (30, 20)


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py / evaluate.sh: errors before any model loads


def _sh(args, env_extra=None, timeout=600, cwd=None):
    env = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=str(_free_port()), **(env_extra or {}))
    return subprocess.run(["sh", str(REPO / "eval" / "evaluate.sh"), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO)


def test_evaluate_sh_errors(tmp_path, tiny_model):
    unknown = _sh([tiny_model, "vqa-nothing"], {"GPUS": "2"})
    assert unknown.returncode == 2
    assert unknown.stderr.count("unknown dataset 'vqa-nothing'") == 1  # checked once, before torchrun starts
    missing = _sh([tiny_model, "vqa-textvqa-val", "--data-root", tmp_path / "empty"])
    assert missing.returncode == 2
    assert str(tmp_path / "empty" / "textvqa" / "textvqa_val.jsonl") in missing.stderr
    assert "official" in missing.stderr
    no_model = _sh([tmp_path / "no-model", "pope"])
    assert no_model.returncode == 2 and "no-model" in no_model.stderr and "not a folder" in no_model.stderr
    bad_line = _write_jsonl(tmp_path / "bad.jsonl", [{"conversations": _conv("Q?", "A")}, "{oops"])
    broken = _sh([tiny_model, bad_line])
    assert broken.returncode == 2 and f"{bad_line}:2:" in broken.stderr
    assert _sh([tiny_model, "pope"], {"GPUS": "x"}).returncode == 2


def test_existing_results_are_not_overwritten(tmp_path, tiny_model, capsys):
    data = _write_jsonl(tmp_path / "e.jsonl", [{"conversations": _conv("Q?", "A")}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert evaluate_main([str(tiny_model), str(data), "--out-dir", str(out), "--check-only"]) == 2
    assert "already holds metrics.json" in capsys.readouterr().err
    assert evaluate_main([str(tiny_model), str(data), "--out-dir", str(out), "--check-only", "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py scoring wiring, with generation replaced by fixed answers (hand-computed scores)


def test_benchmark_scores_through_evaluate(tmp_path, tiny_model, monkeypatch, capsys):
    import eval.generate

    root = tmp_path / "data"
    fixed = {**_textvqa(root), **_refcoco(root), **{("pope", k): v for k, v in _pope(root).items()}}
    calls = []

    def fake_predict(model, tokenizer, samples, **kwargs):
        calls.append(kwargs)
        return [fixed[("pope", s.id) if "category" in s.record_extras else s.id] for s in samples]

    monkeypatch.setattr(eval.generate, "predict", fake_predict)

    def run(key):
        out = tmp_path / "out" / key
        assert evaluate_main([str(tiny_model), key, "--data-root", str(root), "--out-dir", str(out)]) == 0
        lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        return lines, json.loads((out / "metrics.json").read_text())

    lines, metrics = run("vqa-textvqa-val")
    assert calls[-1]["prompt_suffix"] == VQA_SUFFIX and calls[-1]["max_new_tokens"] == 10
    assert calls[-1]["max_num"] == 6 and calls[-1]["dynamic"] is False
    assert [x["score"] for x in lines] == pytest.approx([1.0, 0.0, 0.6])
    assert lines[2]["references"] == ["cat"] * 2 + ["dog"] * 8 and lines[2]["prediction"] == "cat"
    (row,) = metrics["results"]
    assert row["metric"] == "vqa_acc" and row["n"] == 3 and row["score"] == pytest.approx(1.6 / 3)

    lines, metrics = run("refcoco-val")
    assert [x["score"] for x in lines] == [1.0, 0.0] and lines[0]["reference"] == [0.0, 0.0, 100.0, 50.0]
    assert metrics["results"][0]["score"] == 0.5 and metrics["results"][0]["mean_iou"] == pytest.approx(0.5)

    lines, metrics = run("pope")
    assert [x["score"] for x in lines] == [1, 1, 1, 1, 0, 1]
    assert calls[-1]["prompt_suffix"] == "" and calls[-1]["max_new_tokens"] == 100
    row = metrics["results"][0]
    assert row["score"] == pytest.approx(5 / 6)
    assert row["overall_f1"] == pytest.approx(2 / 3)  # mean of the category F1s 1, 1, 0 (official Overall F1)
    table = capsys.readouterr().out
    assert "pope" in table and "83.33" in table and "overall_f1=0.6667" in table


# ---------------------------------------------------------------------------------------------------------------
# end to end on a tiny random model (slow)


def _custom_set(tmp_path: Path) -> Path:
    img = tmp_path / "set" / "images"
    _image(img / "red.png", (320, 240), (220, 40, 40))
    _image(img / "blue.png", (240, 320), (40, 80, 220))
    return _write_jsonl(tmp_path / "set" / "heldout.jsonl", [
        {"id": "q1", "image": "images/red.png", "category": "colour",
         "conversations": _conv("<image>\nWhat colour is the picture?", "red")},
        {"id": "q2", "image": "images/blue.png", "category": "colour",
         "conversations": _conv("What colour is the picture?", "blue")},
        {"id": "g1", "image": "images/red.png", "conversations": _conv(
            "Please provide the bounding box coordinate of the region this sentence describes: <ref>the red</ref>",
            "<ref>the red</ref><box>[[0, 0, 1000, 1000]]</box>")},
        {"id": "m1", "image": ["images/red.png", "images/blue.png"], "metric": "exact_match",
         "conversations": _conv("Image-1: <image>\nImage-2: <image>\nSame colour?", "no")},
        {"id": "t1", "conversations": _conv("Say hello.", "Hello!", "Again?", "Hello!")},
    ])


@pytest.mark.slow
def test_evaluate_sh_end_to_end_one_and_two_processes(tmp_path, tiny_model):
    data = _custom_set(tmp_path)
    outs = {}
    for gpus in ("1", "2"):
        out = tmp_path / f"gpus{gpus}"
        proc = _sh([tiny_model, data, "--max-new-tokens", "6", "--out-dir", out], {"GPUS": gpus})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs[gpus] = out
        assert "vqa_acc" in proc.stdout and "iou_acc" in proc.stdout and "category=colour" in proc.stdout
    one = (outs["1"] / "predictions.jsonl").read_text()
    assert one == (outs["2"] / "predictions.jsonl").read_text()  # same answers, same order
    lines = [json.loads(x) for x in one.splitlines()]
    assert [x["id"] for x in lines] == ["q1", "q2", "g1", "m1", "t1"]
    assert [x["metric"] for x in lines] == ["vqa_acc", "vqa_acc", "iou_acc", "exact_match", "vqa_acc"]
    assert lines[2]["reference"] == [0.0, 0.0, 320.0, 240.0]
    metrics = json.loads((outs["1"] / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["settings"]["world_size"] == 1
    assert json.loads((outs["2"] / "metrics.json").read_text())["settings"]["world_size"] == 2
    for row in metrics["results"]:  # each figure is the mean of its samples' scores
        scores = [x["score"] for x in lines if x["metric"] == row["metric"]]
        assert row["n"] == len(scores) and row["score"] == pytest.approx(sum(scores) / len(scores))
    assert {(b["group"], b["metric"], b["n"]) for b in metrics["breakdown"]} >= {("category=colour", "vqa_acc", 2)}
    # a second run into the same folder is refused
    again = _sh([tiny_model, data, "--out-dir", outs["1"]])
    assert again.returncode == 2 and "already holds" in again.stderr


@pytest.mark.slow
def test_benchmark_layout_end_to_end(tmp_path, tiny_model):
    root = tmp_path / "data"
    _textvqa(root)
    _refcoco(root)
    proc = _sh([tiny_model, "vqa-textvqa-val", "--data-root", root, "--out-dir", tmp_path / "tv", "--dynamic",
                "--max-num", "2", "--max-new-tokens", "4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "tv" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["question"] == "What is a?"
    settings = json.loads((tmp_path / "tv" / "metrics.json").read_text())["settings"]
    assert settings["dynamic"] is True and settings["tasks"]["textvqa_val"]["max_num"] == 2
    assert settings["tasks"]["textvqa_val"]["prompt_suffix"] == VQA_SUFFIX
    # default output folder: results/<model>/<dataset> under the current folder
    proc = _sh([tiny_model, "refcoco-val", "--data-root", root, "--limit", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "results" / tiny_model.name / "refcoco-val"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "metrics.json").read_text())["results"][0]["metric"] == "iou_acc"


def test_group_mean_is_the_official_chartqa_figure():
    from eval.evaluate import group_means

    rows = [{"dataset": "chartqa_test_human", "metric": "relaxed_acc", "score": 0.5, "n": 2},
            {"dataset": "chartqa_test_augmented", "metric": "relaxed_acc", "score": 1.0, "n": 4}]
    assert group_means("vqa-chartqa-test", rows) == [{"dataset": "vqa-chartqa-test", "metric": "relaxed_acc",
                                                      "score": 0.75, "n": 6,
                                                      "mean_of": ["chartqa_test_human", "chartqa_test_augmented"]}]
    assert group_means("x", rows[:1]) == [] and group_means("x", [rows[0], {**rows[1], "metric": "anls"}]) == []
