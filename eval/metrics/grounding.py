"""``iou_acc``: referring-expression grounding (RefCOCO / RefCOCO+ / RefCOCOg), Precision@1 at IoU >= 0.5.

Official source: ``internvl_chat/eval/refcoco/evaluate_grounding.py`` (``evaluate_chat_model`` + ``box_iou``), with
the record's ``answer`` = the reference box ``[x1, y1, x2, y2]`` in pixels and ``width`` / ``height`` of the image.

Definition, facts of that code:
1. Parse: the FIRST match of ``\\[*\\[(.*?),(.*?),(.*?),(.*?)\\]\\]*`` in the answer (``re.findall(...)[0]``); it
   matches ``<box>[[x1, y1, x2, y2]]</box>``, a bare ``[[...]]`` and also a single ``[...]``. Each group goes
   through Python ``float()``. No match, or a group that is not a number (the first match only; "[[1, 2, 3, 4, 5]]"
   puts "4, 5" in the last group), gives the box (0, 0, 0, 0).
2. Coordinate style: if the four numbers sum to >= 4 they are divided by 1000 (InternVL's 0-1000 grid), otherwise
   they are taken as 0-1 fractions; then x1, x2 are multiplied by the width and y1, y2 by the height. No clipping,
   no reordering of swapped corners.
3. IoU as torchvision's ``box_area``: area = (x2 - x1) * (y2 - y1) (no "+1" pixel convention); intersection
   clamped at 0; IoU = inter / (area_pred + area_ref - inter); right when IoU >= 0.5. ``score`` = Precision@1.
QUIRKS kept by default: the sum >= 4 rule (a 0-1000 box summing to < 4, e.g. [[0, 0, 1, 2]], is read as fractions;
a box in pixels is still divided by 1000); a reversed box has a negative area; all the arithmetic is in float32
(the official tensors are ``torch.float32``), reproduced here exactly without torch (see ``_f32``); a reference of
zero area against an unparseable prediction gives 0/0 = NaN, which is not >= 0.5.

``textbook=True``: the first four numbers inside the first bracket (after ``<box>`` if there is one); fractions only
when all four are <= 1, else 0-1000; corners reordered and clipped to the image; float64; an empty union is IoU 0.

Extras: ``mean_iou`` (NaN counted as 0), ``n_unparsed`` (predictions without a usable box).
"""

from __future__ import annotations

import math
import re
import struct

from .records import get_box, get_number, get_prediction

__all__ = ["box_iou", "iou_acc", "parse_box"]

# The official pattern, a fact of evaluate_grounding.py (PATTERN).
OFFICIAL_BOX = re.compile(r"\[*\[(.*?),(.*?),(.*?),(.*?)\]\]*")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
IOU_THRESHOLD = 0.5

_F32 = struct.Struct("f")


def _f32(value: float) -> float:
    """Round to the nearest float32. Each float32 +, -, *, / equals the float64 operation rounded once to float32
    (53 >= 2 * 24 + 2 bits), so rounding after every step reproduces torch's float32 CPU arithmetic bit for bit."""
    try:
        return _F32.unpack(_F32.pack(value))[0]
    except OverflowError:  # beyond float32 range: torch gives +-inf
        return math.copysign(math.inf, value)


def parse_box(text: str, *, textbook: bool = False) -> tuple[float, float, float, float] | None:
    if textbook:
        start = text.find("<box>")
        bracket = text.find("[", max(start, 0))
        if bracket < 0:
            return None
        numbers = _NUMBER.findall(text[bracket:])
        return tuple(float(v) for v in numbers[:4]) if len(numbers) >= 4 else None
    match = OFFICIAL_BOX.search(text)
    if match is None:
        return None
    try:
        return tuple(float(group) for group in match.groups())
    except ValueError:
        return None


def box_iou(a: tuple, b: tuple, *, f32: bool) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, torchvision's formula; float32 steps when ``f32``."""
    if any(math.isnan(v) for v in (*a, *b)):
        return math.nan  # "nan" parses as a float; torch's max/min propagate it, so the IoU is NaN
    r = _f32 if f32 else float
    area_a = r(r(a[2] - a[0]) * r(a[3] - a[1]))
    area_b = r(r(b[2] - b[0]) * r(b[3] - b[1]))
    w = max(r(min(a[2], b[2]) - max(a[0], b[0])), 0.0)
    h = max(r(min(a[3], b[3]) - max(a[1], b[1])), 0.0)
    inter = r(w * h)
    union = r(r(area_a + area_b) - inter)
    if union == 0:
        return math.nan if f32 else 0.0  # torch: 0 / 0 (inter is 0 whenever the union is)
    return r(inter / union)


def _to_pixels(box: tuple, width: float, height: float, *, textbook: bool) -> tuple:
    if textbook:
        scale = 1.0 if all(v <= 1 for v in box) else 1000.0
        x1, x2 = sorted((box[0] / scale * width, box[2] / scale * width))
        y1, y2 = sorted((box[1] / scale * height, box[3] / scale * height))
        return (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    box = tuple(_f32(v) for v in box)
    total = _f32(_f32(_f32(box[0] + box[1]) + box[2]) + box[3])
    if total >= 4:
        box = tuple(_f32(v / 1000.0) for v in box)
    w, h = _f32(width), _f32(height)
    return (_f32(box[0] * w), _f32(box[1] * h), _f32(box[2] * w), _f32(box[3] * h))


def iou_acc(records: list[dict], *, textbook: bool = False) -> dict:
    per_sample, ious, unparsed = [], [], 0
    for i, record in enumerate(records):
        prediction = get_prediction(record, i)
        reference = get_box(record, i)
        width, height = get_number(record, "width", i, positive=True), get_number(record, "height", i, positive=True)
        box = parse_box(prediction, textbook=textbook)
        unparsed += box is None
        if box is None:
            box = (0.0, 0.0, 0.0, 0.0)
        pred_px = _to_pixels(box, width, height, textbook=textbook)
        ref = tuple(float(v) for v in reference) if textbook else tuple(_f32(float(v)) for v in reference)
        iou = box_iou(pred_px, ref, f32=not textbook)
        per_sample.append(1.0 if iou >= IOU_THRESHOLD else 0.0)
        ious.append(0.0 if math.isnan(iou) else iou)
    return {"score": sum(per_sample) / len(per_sample), "n": len(per_sample), "mean_iou": sum(ious) / len(ious),
            "n_unparsed": unparsed, "per_sample": per_sample}
