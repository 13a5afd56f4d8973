"""ms-swift grounding ``objects`` to the official ``<ref>``/``<box>`` text, in integer 0..1000 coordinates.

Both ms-swift schemas are read (see :mod:`internvl_chat.data.formats`): the i-th ``<ref-object>`` becomes
``<ref>ref_i</ref>`` and the j-th ``<bbox>`` becomes ``<box>[[x1, y1, x2, y2]]</box>``, normalised the official
way, ``round(x / W * 1000)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from internvl_chat.constants import BOX_END_TOKEN, BOX_START_TOKEN, REF_END_TOKEN, REF_START_TOKEN
from internvl_chat.data.errors import DataError
from internvl_chat.data.validation import coordinate_problems, is_number

__all__ = ["BBOX_PLACEHOLDER", "REF_OBJECT_PLACEHOLDER", "ImageSizeFn", "replace_grounding"]

# ms-swift grounding placeholders (plain text in its datasets).
REF_OBJECT_PLACEHOLDER = "<ref-object>"
BBOX_PLACEHOLDER = "<bbox>"
_GROUNDING_PLACEHOLDER = re.compile(r"<ref-object>|<bbox>")
_BBOX_TYPES = {"real": "real", "norm_1000": "norm1000", "norm1000": "norm1000", "norm_1": "norm1", "norm1": "norm1"}

ImageSizeFn = Callable[[str], "tuple[int, int]"]


def replace_grounding(
    turns: list[list[str]],
    objects: Any,
    images: list[str],
    record: Mapping[str, Any],
    image_size_fn: ImageSizeFn | None,
) -> None:
    """Write the boxes and refs of ``objects`` into ``turns`` (``[role, text]`` pairs, edited in place)."""
    if objects not in (None, "", [], {}) or any(_GROUNDING_PLACEHOLDER.search(value) for _, value in turns):
        _replace_grounding(turns, _parse_objects(objects), images, record, image_size_fn)


@dataclass
class _Box:
    coords: list[list[float]]  # one or more [x1, y1, x2, y2]
    bbox_type: str
    image_index: int


def _parse_objects(objects: Any) -> tuple[list[str], list[_Box]]:
    """Both ms-swift schemas to (refs, boxes); the i-th ``<ref-object>``/``<bbox>`` use refs[i]/boxes[i]."""
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except ValueError as exc:
            raise DataError(f"'objects' is a string but not valid JSON: {exc}", kind="bad_objects") from None
    if objects in (None, "", [], {}):
        return [], []
    if isinstance(objects, Mapping):  # {"ref": [...], "bbox": [...], "bbox_type": ..., "image_id": [...]}
        refs = objects.get("ref") or []
        refs = [refs] if isinstance(refs, str) else refs
        bboxes = objects.get("bbox") or []
        bbox_type = _bbox_type(objects.get("bbox_type"))
        image_ids = objects.get("image_id") or []
        if not isinstance(refs, list) or not isinstance(bboxes, list) or not isinstance(image_ids, list):
            raise DataError("'objects' ref/bbox/image_id must be lists", kind="bad_objects")
        if bboxes and is_number(bboxes[0]):
            bboxes = [bboxes]  # a single box written flat
        boxes = [
            _Box(_box_coords(bbox, i), bbox_type, _image_index(image_ids[i] if i < len(image_ids) else 0, i))
            for i, bbox in enumerate(bboxes)
        ]
        return [_ref_text(ref, i) for i, ref in enumerate(refs)], boxes
    if isinstance(objects, list):  # [{"caption": ..., "bbox": [...], "bbox_type": ..., "image": 0}, ...]
        refs, boxes = [], []
        for i, obj in enumerate(objects):
            if not isinstance(obj, Mapping) or "bbox" not in obj:
                raise DataError(f"objects[{i}] must be an object with 'bbox', got {obj!r:.80}", kind="bad_objects")
            ref = obj.get("caption", obj.get("ref"))
            if ref is not None:
                refs.append(_ref_text(ref, i))
            image = obj.get("image", obj.get("image_id", 0))
            boxes.append(_Box(_box_coords(obj["bbox"], i), _bbox_type(obj.get("bbox_type")), _image_index(image, i)))
        return refs, boxes
    raise DataError(f"'objects' must be a list or an object, got {type(objects).__name__}", kind="bad_objects")


def _bbox_type(value: Any) -> str:
    if value is None:
        return "real"  # ms-swift's default
    if value not in _BBOX_TYPES:
        raise DataError(f"unknown bbox_type {value!r}; expected real, norm_1000 or norm_1", kind="bad_objects")
    return _BBOX_TYPES[value]


def _box_coords(bbox: Any, index: int) -> list[list[float]]:
    boxes = [bbox] if isinstance(bbox, list) and bbox and is_number(bbox[0]) else bbox
    if not isinstance(boxes, list) or not boxes or not all(
        isinstance(box, list) and len(box) == 4 and all(is_number(c) for c in box) for box in boxes
    ):
        raise DataError(f"object {index}: bbox must be [x1, y1, x2, y2] or a list of them, got {bbox!r:.80}",
                        kind="bad_objects")
    return boxes


def _image_index(value: Any, index: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"object {index}: image index must be a non-negative int, got {value!r}", kind="bad_objects")
    return value


def _ref_text(ref: Any, index: int) -> str:
    if not isinstance(ref, str):
        raise DataError(f"object {index}: ref/caption must be a string, got {ref!r:.80}", kind="bad_objects")
    return ref


def _replace_grounding(
    turns: list[list[str]],
    parsed: tuple[list[str], list[_Box]],
    images: list[str],
    record: Mapping[str, Any],
    image_size_fn: ImageSizeFn | None,
) -> None:
    refs, boxes = parsed
    sizes: dict[int, tuple[float, float]] = {}
    used = {"ref": 0, "box": 0}

    def size_of(image_index: int) -> tuple[float, float]:
        if image_index not in sizes:
            sizes[image_index] = _image_size(image_index, images, record, image_size_fn)
        return sizes[image_index]

    def replace(match: re.Match) -> str:
        if match.group(0) == REF_OBJECT_PLACEHOLDER:
            i = used["ref"]
            if i >= len(refs):
                raise DataError(f"{i + 1} <ref-object> placeholders but {len(refs)} refs in 'objects'",
                                kind="bad_objects")
            used["ref"] += 1
            return f"{REF_START_TOKEN}{refs[i]}{REF_END_TOKEN}"
        i = used["box"]
        if i >= len(boxes):
            raise DataError(f"{i + 1} <bbox> placeholders but {len(boxes)} boxes in 'objects'", kind="bad_objects")
        used["box"] += 1
        box = boxes[i]
        size = size_of(box.image_index) if box.bbox_type == "real" else None
        normalised = [_normalise_box(coords, box.bbox_type, size, i) for coords in box.coords]
        return f"{BOX_START_TOKEN}{normalised}{BOX_END_TOKEN}"

    for turn in turns:
        turn[1] = _GROUNDING_PLACEHOLDER.sub(replace, turn[1])


def _image_size(
    index: int, images: list[str], record: Mapping[str, Any], image_size_fn: ImageSizeFn | None
) -> tuple[float, float]:
    if index >= len(images):
        raise DataError(f"a box refers to image {index} but the record has {len(images)} images", kind="bad_objects")
    widths, heights = record.get("width_list"), record.get("height_list")
    if isinstance(widths, list) and isinstance(heights, list) and index < min(len(widths), len(heights)):
        size = (widths[index], heights[index])
    elif len(images) == 1 and record.get("width") is not None and record.get("height") is not None:
        size = (record["width"], record["height"])
    elif image_size_fn is not None:
        size = tuple(image_size_fn(images[index]))
    else:
        raise DataError(
            f"bbox_type 'real' needs the size of image {images[index]!r}: add width/height to the record, or "
            "convert through the dataset (it reads the image header)", kind="bad_objects",
        )
    if len(size) != 2 or not all(is_number(v) and v > 0 for v in size):
        raise DataError(f"bad size {size!r} for image {images[index]!r}", kind="bad_objects")
    return size  # type: ignore[return-value]


def _normalise_box(coords: list[float], bbox_type: str, size: tuple[float, float] | None, index: int) -> list[int]:
    """Integer 0..1000 coordinates, the official way: ``round(x / W * 1000)``."""
    if bbox_type == "real":
        width, height = size  # type: ignore[misc]
        out = [round(c / (width if k % 2 == 0 else height) * 1000) for k, c in enumerate(coords)]
    elif bbox_type == "norm1":
        out = [round(c * 1000) for c in coords]
    else:
        out = [round(c) for c in coords]
    problems = coordinate_problems(out, 4)
    if problems:
        where = f" in a {size[0]}x{size[1]} image" if size else ""
        raise DataError(
            f"box {index} {coords} ({bbox_type}{where}) normalises to {out}: {problems[0]}", kind="box_out_of_range"
        )
    return out
