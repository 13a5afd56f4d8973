"""A small synthetic dataset in the official format, for the demo, tests and benchmarks.

Pictures of coloured shapes on a plain background, with questions a model can actually learn from the pixels
(the shape's colour and kind, its box in the official 0-1000 grounding format, how many shapes there are), a few
two-image comparisons and some text-only turns. Written as JSONL + a meta JSON exactly as a user would lay out their
own data. Deterministic for a seed.

`make_heldout_split` draws more pictures with the same generator and another seed and writes one question per line
in the evaluation format (`eval/evaluate.sh` and `--eval_meta_path`): the last `gpt` turn is the reference, each line
names its `metric` and its `category` (colour, shape, count, grounding), so the demo can show what fine-tuning did.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle")
TEXT_QA = (
    ("What is two plus three?", "Two plus three is five."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many sides does a square have?", "A square has four sides."),
    ("Say hello.", "Hello!"),
)


def _draw(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, str, str, list[int]]:
    width, height = size
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    side = rng.randint(min(width, height) // 4, min(width, height) // 2)
    x1, y1 = rng.randint(0, width - side), rng.randint(0, height - side)
    box = [x1, y1, x1 + side, y1 + side]
    img = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    norm = [round(box[0] / width * 1000), round(box[1] / height * 1000), round(box[2] / width * 1000),
            round(box[3] / height * 1000)]
    return img, colour, shape, norm


def _draw_many(rng: random.Random, size: tuple[int, int], count: int) -> Image.Image:
    """`count` small shapes that do not touch, for the counting questions."""
    width, height = size
    side = min(width, height) // 5
    img = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(img)
    placed: list[tuple[int, int]] = []
    while len(placed) < count:
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        if all(abs(x - px) > side + 4 or abs(y - py) > side + 4 for px, py in placed):
            placed.append((x, y))
            draw_fn = draw.rectangle if rng.choice(SHAPES) == "square" else draw.ellipse
            draw_fn([x, y, x + side, y + side], fill=COLOURS[rng.choice(sorted(COLOURS))])
    return img


def _count_answer(count: int) -> str:
    return "There is 1 shape." if count == 1 else f"There are {count} shapes."


COUNT_QUESTION = "How many shapes are in the picture?"
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"
SIZES = ((320, 240), (240, 320), (448, 448), (640, 200))
# one tile of equal-sized shapes: the coloured area grows with the count, which a tiny model can learn in minutes
COUNT_SIZE = (448, 448)


def make_demo_dataset(out_dir: str | Path, num_images: int = 24, seed: int = 0) -> Path:
    """Write images/, demo.jsonl and meta.json under out_dir; returns the meta JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, described = [], []
    for i in range(num_images):
        size = rng.choice(SIZES)
        img, colour, shape, box = _draw(rng, size)
        name = f"images/shape_{i:03d}.png"
        img.save(out / name)
        described.append((name, colour, shape))
        kind = i % 3
        if kind == 0:
            conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": f"The shape is {colour}."}]
        elif kind == 1:
            conv = [{"from": "human", "value": "<image>\nWhat shape is in the picture?"},
                    {"from": "gpt", "value": f"A {colour} {shape}."},
                    {"from": "human", "value": f"Where is the {shape}?"},
                    {"from": "gpt", "value": f"<ref>{shape}</ref><box>[[{box[0]}, {box[1]}, {box[2]}, {box[3]}]]</box>"}]
        else:
            conv = [{"from": "human", "value": GROUNDING_PROMPT.format(f"the {colour} {shape}")},
                    {"from": "gpt", "value": f"<ref>the {colour} {shape}</ref><box>[[{box[0]}, {box[1]}, {box[2]}, "
                                             f"{box[3]}]]</box>"}]
        records.append({"id": i, "image": name, "width": size[0], "height": size[1], "conversations": conv})
    for j in range(max(2, num_images // 6)):
        (a, ca, sa), (b, cb, sb) = rng.sample(described, 2)
        same = "the same colour" if ca == cb else "different colours"
        records.append({"id": f"pair{j}", "image": [a, b], "conversations": [
            {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nDo the shapes have the same colour?"},
            {"from": "gpt", "value": f"The first is {ca} and the second is {cb}: {same}."}]})
    for j in range(max(2, num_images // 4)):
        count = 1 + j % 3
        name = f"images/count_{j:03d}.png"
        size = COUNT_SIZE
        _draw_many(rng, size, count).save(out / name)
        records.append({"id": f"count{j}", "image": name, "width": size[0], "height": size[1], "conversations": [
            {"from": "human", "value": f"<image>\n{COUNT_QUESTION}"}, {"from": "gpt", "value": _count_answer(count)}]})
    for k, (q, a) in enumerate(TEXT_QA):
        records.append({"id": f"text{k}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    rng.shuffle(records)
    return _write(out, "demo_shapes", "demo.jsonl", "meta.json", records)


def _write(out: Path, name: str, annotation: str, meta_file: str, records: list[dict]) -> Path:
    """The JSONL and a one-entry meta JSON naming it, as a user lays out a dataset; returns the meta JSON."""
    with open(out / annotation, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta = {name: {"root": str(out.resolve()), "annotation": str((out / annotation).resolve()),
                   "data_augment": False, "max_dynamic_patch": 4, "repeat_time": 1, "length": len(records)}}
    meta_path = out / meta_file
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta_path


# question kind -> (metric, chance level of a model that learnt the answer format but not the picture)
HELDOUT_KINDS = {
    "colour": ("vqa_acc", 1 / len(COLOURS)),
    "shape": ("vqa_acc", 1 / (len(COLOURS) * len(SHAPES))),
    "count": ("vqa_acc", 1 / 3),
    "grounding": ("iou_acc", None),
}


def make_heldout_split(out_dir: str | Path, num_images: int = 24, seed: int = 1) -> Path:
    """Write images/heldout_*.png, heldout.jsonl and eval_meta.json under out_dir; returns the eval meta JSON.

    Same generator as `make_demo_dataset`, another seed: pictures the fine-tune never saw. One question per line,
    cycling through colour, shape, count and grounding; each line names its metric and category.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(num_images):
        size = rng.choice(SIZES)
        name = f"images/heldout_{i:03d}.png"
        kind = list(HELDOUT_KINDS)[i % len(HELDOUT_KINDS)]
        if kind == "count":
            count, size = 1 + rng.randrange(3), COUNT_SIZE
            _draw_many(rng, size, count).save(out / name)
            question, answer = f"<image>\n{COUNT_QUESTION}", _count_answer(count)
        else:
            img, colour, shape, box = _draw(rng, size)
            img.save(out / name)
            if kind == "colour":
                question, answer = "<image>\nWhat colour is the shape?", f"The shape is {colour}."
            elif kind == "shape":
                question, answer = "<image>\nWhat shape is in the picture?", f"A {colour} {shape}."
            else:
                ref = f"the {colour} {shape}"
                question = GROUNDING_PROMPT.format(ref)
                answer = f"<ref>{ref}</ref><box>[[{box[0]}, {box[1]}, {box[2]}, {box[3]}]]</box>"
        records.append({"id": f"heldout{i}", "image": name, "width": size[0], "height": size[1],
                        "metric": HELDOUT_KINDS[kind][0], "category": kind,
                        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    return _write(out, "demo_heldout", "heldout.jsonl", "eval_meta.json", records)
