"""The CLI contract of issue 10, end to end: ``python -m eval.score --metric NAME --pred FILE`` in a subprocess.

stdout is exactly one JSON object ``{"metric", "score", "n", ...extras}`` and the exit status 0; a malformed line is
``FILE:LINE: problem`` on stderr with exit status 2 and nothing on stdout.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "eval.score", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def ok(*args):
    code, out, err = run(*args)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1, out          # exactly one JSON object on stdout
    return json.loads(out), err


def test_vqa_acc_file_with_blank_lines(tmp_path):
    pred = write(tmp_path / "p.jsonl", [
        {"prediction": "Two", "answers": ["2"] * 10},
        "",
        {"prediction": "the cat", "answer": "cat"},
        "   ",
        {"prediction": "", "answer": "dog"},
        {"prediction": "dog", "answers": ["dog"] + ["cat"] * 9},       # 1 of 10 annotators: 0.3
    ])
    result, err = ok("--metric", "vqa_acc", "--pred", pred)
    assert result["metric"] == "vqa_acc" and result["n"] == 4
    assert result["score"] == pytest.approx((1 + 1 + 0 + 0.3) / 4)
    assert "per_sample" not in result and err == ""


def test_textbook_flag_and_per_sample_file(tmp_path):
    pred = write(tmp_path / "p.jsonl", [{"prediction": "95", "answer": "100"}, {"prediction": "7%", "answer": "0.07"}])
    official, _ = ok("--metric", "relaxed_acc", "--pred", pred)
    textbook, _ = ok("--metric", "relaxed_acc", "--pred", pred, "--textbook")
    assert (official["score"], textbook["score"]) == (0.5, 1.0)
    out = tmp_path / "scores.jsonl"
    ok("--metric", "relaxed_acc", "--pred", pred, "--per-sample", out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"line": 1, "score": 0.0},
                                                                          {"line": 2, "score": 1.0}]


def test_every_metric_through_the_cli(tmp_path):
    cases = {
        "anls": {"prediction": "helo", "answer": "hello"},
        "exact_match": {"prediction": " Paris ", "answers": ["paris", "Paris, France"]},
        "mc_acc": {"prediction": "The answer is B", "answer": "B", "options": {"A": "red", "B": "blue"}},
        "yesno": {"prediction": "No, there is not.", "answer": "no"},
        "iou_acc": {"prediction": "<box>[[100, 100, 600, 600]]</box>", "answer": [20, 10, 120, 60],
                    "width": 200, "height": 100},
    }
    expected = {"anls": 0.8, "exact_match": 1.0, "mc_acc": 1.0, "yesno": 1.0, "iou_acc": 1.0}
    for name, record in cases.items():
        result, _ = ok("--metric", name, "--pred", write(tmp_path / f"{name}.jsonl", [record]))
        assert (result["metric"], result["n"]) == (name, 1)
        assert result["score"] == pytest.approx(expected[name]), name
    assert "mean_iou" in result


def test_yesno_styles(tmp_path):
    pred = write(tmp_path / "p.jsonl", [
        {"prediction": "Yes", "answer": "Yes", "category": "color", "image": "a.jpg"},
        {"prediction": "No", "answer": "No", "category": "color", "image": "a.jpg"},
    ])
    mme, _ = ok("--metric", "yesno", "--pred", pred, "--style", "mme")
    assert mme["mme_score"] == pytest.approx(200.0) and mme["per_category"]["color"]["acc_plus"] == 1.0
    pope, err = ok("--metric", "yesno", "--pred", pred)
    # POPE: the label "No" is not exactly "no", so the official rule counts it as yes; warned on stderr
    assert pope["score"] == 0.5 and "overall_f1" in pope and "WARNING" in err
    code, out, err = run("--metric", "anls", "--pred", pred, "--style", "mme")
    assert code == 2 and out == "" and "--style" in err


GOOD = {"prediction": "a", "answer": "a"}


@pytest.mark.parametrize("metric, bad_line, problem", [
    ("vqa_acc", '{"prediction": "a", "answer": ', "invalid JSON"),
    ("vqa_acc", '["a", "b"]', "JSON object"),
    ("vqa_acc", {"answer": "a"}, 'missing "prediction"'),
    ("anls", {"prediction": None, "answer": "a"}, '"prediction" must be a string'),
    ("exact_match", {"prediction": "a", "answers": ["a", 2]}, "list of strings"),
    ("relaxed_acc", {"prediction": "a"}, 'missing "answers"'),
    ("iou_acc", {"prediction": "[[1,2,3,4]]", "answer": [1, 2, 3], "width": 5, "height": 5}, "4 numbers"),
    ("iou_acc", {"prediction": "[[1,2,3,4]]", "answer": [1, 2, 3, 4], "height": 5}, 'missing "width"'),
    ("mc_acc", {"prediction": "A", "answer": "A"}, 'missing "options"'),
])
def test_malformed_line_names_file_and_line(tmp_path, metric, bad_line, problem):
    good = {"iou_acc": {"prediction": "", "answer": [1, 2, 3, 4], "width": 5, "height": 5},
            "mc_acc": {"prediction": "A", "answer": "A", "options": {"A": "x"}}}.get(metric, GOOD)
    pred = write(tmp_path / "p.jsonl", [good, "", good, bad_line, good])      # the bad line is line 4
    code, out, err = run("--metric", metric, "--pred", pred)
    assert code == 2 and out == ""
    assert err.startswith(f"{pred}:4: ") and problem in err, err


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    code, out, err = run("--metric", "vqa_acc", "--pred", empty)
    assert code == 2 and out == "" and str(empty) in err and "no records" in err
    code, out, err = run("--metric", "vqa_acc", "--pred", tmp_path / "missing.jsonl")
    assert code == 2 and out == "" and "cannot read" in err
    code, out, err = run("--metric", "bleu", "--pred", empty)
    assert code == 2 and out == ""
    for name in ("vqa_acc", "anls", "relaxed_acc", "exact_match", "mc_acc", "yesno", "iou_acc"):
        assert name in err
