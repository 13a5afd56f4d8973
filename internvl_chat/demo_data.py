"""A small synthetic dataset in the official format, for the demo, tests and benchmarks.

Pictures of one coloured shape on a plain background, with questions a model can actually learn from the pixels
(the shape's colour and kind, its box in the official 0-1000 grounding format), a few two-image comparisons and some
text-only turns. Written as JSONL + a meta JSON exactly as a user would lay out their own data. Deterministic for a
seed.
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


def make_demo_dataset(out_dir: str | Path, num_images: int = 24, seed: int = 0) -> Path:
    """Write images/, demo.jsonl and meta.json under out_dir; returns the meta JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, described = [], []
    for i in range(num_images):
        size = rng.choice([(320, 240), (240, 320), (448, 448), (640, 200)])
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
            conv = [{"from": "human", "value": f"Please provide the bounding box coordinate of the region this "
                                               f"sentence describes: <ref>the {colour} {shape}</ref>"},
                    {"from": "gpt", "value": f"<ref>the {colour} {shape}</ref><box>[[{box[0]}, {box[1]}, {box[2]}, "
                                             f"{box[3]}]]</box>"}]
        records.append({"id": i, "image": name, "width": size[0], "height": size[1], "conversations": conv})
    for j in range(max(2, num_images // 6)):
        (a, ca, sa), (b, cb, sb) = rng.sample(described, 2)
        same = "the same colour" if ca == cb else "different colours"
        records.append({"id": f"pair{j}", "image": [a, b], "conversations": [
            {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nDo the shapes have the same colour?"},
            {"from": "gpt", "value": f"The first is {ca} and the second is {cb}: {same}."}]})
    for k, (q, a) in enumerate(TEXT_QA):
        records.append({"id": f"text{k}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    rng.shuffle(records)
    with open(out / "demo.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta = {"demo_shapes": {"root": str(out.resolve()), "annotation": str((out / "demo.jsonl").resolve()),
                            "data_augment": False, "max_dynamic_patch": 4, "repeat_time": 1, "length": len(records)}}
    meta_path = out / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta_path
