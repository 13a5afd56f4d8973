"""The demo's pieces: the held-out split, the loss-curve PNG, the before/after comparison, and `make demo` itself
(at a reduced size) showing that fine-tuning lifted the held-out accuracy above the untrained model and chance."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from eval.compare import compare, format_comparison
from eval.samples import load_eval_jsonl
from internvl_chat.demo_data import HELDOUT_KINDS, make_demo_dataset, make_heldout_split
from internvl_chat.train.loss_curve import plot_loss_curve, read_loss_history

REPO = Path(__file__).resolve().parents[1]


def _pixels_digest(path: Path) -> str:
    return hashlib.sha256(Image.open(path).convert("RGB").tobytes()).hexdigest()


def test_heldout_split_holds_new_pictures_and_every_question_kind(tmp_path):
    make_demo_dataset(tmp_path, num_images=12, seed=0)
    eval_meta = make_heldout_split(tmp_path, num_images=8, seed=1)
    train = {_pixels_digest(p) for p in (tmp_path / "images").glob("*.png") if not p.name.startswith("heldout_")}
    heldout = sorted((tmp_path / "images").glob("heldout_*.png"))
    assert len(heldout) == 8 and not train & {_pixels_digest(p) for p in heldout}
    training_questions = (tmp_path / "demo.jsonl").read_text()
    assert "How many shapes are in the picture?" in training_questions  # counting is taught, not only tested

    samples = load_eval_jsonl(tmp_path / "heldout.jsonl")
    assert [s.record_extras["category"] for s in samples] == [list(HELDOUT_KINDS)[i % 4] for i in range(8)]
    assert all(s.metric == HELDOUT_KINDS[s.record_extras["category"]][0] for s in samples)
    grounding = next(s for s in samples if s.metric == "iou_acc")
    record = grounding.to_metric_record("")
    x1, y1, x2, y2 = record["answer"]
    assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
    # the box reference is the drawn shape: inside it the picture is not background
    img = Image.open(grounding.images[0]).convert("RGB")
    assert img.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2))) != (245, 245, 240)
    entry = json.loads(eval_meta.read_text())["demo_heldout"]
    assert entry["annotation"] == str((tmp_path / "heldout.jsonl").resolve()) and entry["length"] == 8

    again = tmp_path / "again"
    make_heldout_split(again, num_images=8, seed=1)
    assert (again / "heldout.jsonl").read_text() == (tmp_path / "heldout.jsonl").read_text()  # deterministic


def test_loss_curve_png_from_trainer_state(tmp_path):
    history = [{"step": s, "loss": 5.0 / s, "epoch": s / 10} for s in range(1, 11)]
    history += [{"step": 5, "eval_heldout_loss": 1.5}, {"step": 10, "eval_heldout_loss": 1.2},
                {"step": 10, "train_runtime": 3.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    curves = read_loss_history(tmp_path)
    assert curves["train"][0] == (1, 5.0) and len(curves["train"]) == 10
    assert curves["eval_heldout"] == [(5, 1.5), (10, 1.2)]
    png = plot_loss_curve(tmp_path)
    assert png == tmp_path / "loss_curve.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 300

    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "eval_x_loss": 1.0}]}))
    with pytest.raises(ValueError, match="no training loss"):
        read_loss_history(tmp_path)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        read_loss_history(tmp_path / "missing")


def _metrics(colour, count, grounding, mean_iou):
    return {"results": [{"dataset": "heldout", "metric": "vqa_acc", "score": (colour + count) / 2, "n": 4},
                        {"dataset": "heldout", "metric": "iou_acc", "score": grounding, "n": 2, "mean_iou": mean_iou}],
            "breakdown": [{"dataset": "heldout", "group": "category=colour", "metric": "vqa_acc", "score": colour,
                           "n": 2},
                          {"dataset": "heldout", "group": "category=count", "metric": "vqa_acc", "score": count,
                           "n": 2}]}


def test_compare_and_the_demo_verdict(tmp_path):
    before, after = _metrics(0.0, 0.0, 0.0, 0.0), _metrics(1.0, 0.5, 0.5, 0.4)
    rows = compare(before, after)
    assert [(r["label"].strip(), r["metric"], r["before"], r["after"]) for r in rows] == [
        ("heldout", "vqa_acc", 0.0, 0.75), ("heldout", "iou_acc", 0.0, 0.5),
        ("category=colour", "vqa_acc", 0.0, 1.0), ("category=count", "vqa_acc", 0.0, 0.5)]
    table = format_comparison(rows)
    assert "+75.0" in table and "0.000 -> 0.400" in table

    for name, metrics in (("before", before), ("after", after)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    tool = [sys.executable, str(REPO / "tools/demo_report.py"), "--require-improvement"]
    good = subprocess.run([*tool, str(tmp_path / "before"), str(tmp_path / "after")], capture_output=True, text=True)
    # chance of the accuracy row: colour 1/4 and count 1/3, two questions each
    assert good.returncode == 0 and "chance 29.2%" in good.stdout and "fine-tuning helped" in good.stdout
    worse = subprocess.run([*tool, str(tmp_path / "after"), str(tmp_path / "before")], capture_output=True, text=True)
    assert worse.returncode == 1 and "NO improvement" in worse.stdout
    cli = subprocess.run([sys.executable, "-m", "eval.compare", str(tmp_path / "before"), str(tmp_path / "nowhere")],
                         capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 2 and "nowhere" in cli.stderr


@pytest.mark.slow
def test_make_demo_shows_fine_tuning_helped(tmp_path):
    """The README's main job at a reduced size: held-out accuracy after fine-tuning is above before and chance."""
    demo_dir = tmp_path / "demo"
    venv = Path(sys.prefix)
    cmd = ["make", "-C", str(REPO), "demo", f"DEMO_DIR={demo_dir}", f"VENV={venv}", "-o", f"{venv}/.installed",
           "DEMO_IMAGES=48", "DEMO_HELDOUT=24", "DEMO_STEPS=150", "DEMO_EVAL_STEPS=75", "DEMO_LR=3e-3"]
    env = dict(os.environ, MASTER_PORT=str(_free_port()))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fine-tuning helped" in proc.stdout
    from test_console import unexplained_warnings  # tests/ is on sys.path under pytest

    assert unexplained_warnings(proc.stdout + proc.stderr) == []  # every third-party warning: internvl_chat/console.py
    before = json.loads((demo_dir / "eval_before/metrics.json").read_text())
    after = json.loads((demo_dir / "eval_after/metrics.json").read_text())
    accuracy = {name: next(r["score"] for r in m["results"] if r["metric"] == "vqa_acc")
                for name, m in (("before", before), ("after", after))}
    assert accuracy["after"] > accuracy["before"] and accuracy["after"] > 0.3  # chance: 23.6 %
    assert (demo_dir / "run/loss_curve.png").is_file()
    state = json.loads((demo_dir / "run/trainer_state.json").read_text())
    assert any("eval_demo_heldout_loss" in entry for entry in state["log_history"])  # evaluated during training


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
