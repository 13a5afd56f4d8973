"""Evaluation samples: one question for the model, its reference answer and how to score the two.

Every source of evaluation data (the user's held-out JSONL, a known benchmark's official files, the held-out sets of
eval during training) becomes a list of :class:`EvalSample`, so generation (:mod:`eval.generate`) and scoring
(:mod:`eval.metrics`) never look at file formats.

:func:`load_eval_jsonl` reads the user's own eval set, written exactly like training data (any annotation format the
training pipeline accepts; image, multi-image, video or text-only): the LAST ``gpt`` turn is the reference, the turn
before it the question, earlier turns the history the model is given verbatim (teacher forcing of the conversation,
as in training). Optional keys per line:

``metric``   one of the metric names (``vqa_acc``, ``anls``, ``relaxed_acc``, ``exact_match``, ``mc_acc``, ``yesno``,
             ``iou_acc``); else the file-wide default (``metric`` argument), else chosen from the reference: a
             ``<box>`` -> ``iou_acc``, anything else -> ``vqa_acc`` (with one reference that is an exact match after
             the VQA normalisation).
``answers``  a list of acceptable answers (VQA style) used instead of the reference text for text metrics.
``options``  ``{"A": "...", ...}``, needed by ``mc_acc`` (the reference is the letter).
``category`` a free label; the report has one row per category.
``width``/``height``  the image size in pixels, used to turn a ``<box>`` reference (0-1000) into a pixel box for
             ``iou_acc``; read from the image header when absent.

Every problem is a :class:`~internvl_chat.data.errors.DataError` naming ``file:line``, raised before a model loads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from internvl_chat.constants import IMAGE_PLACEHOLDER
from internvl_chat.data.errors import DataError
from internvl_chat.data.formats import to_official
from internvl_chat.data.records import read_records
from internvl_chat.data.transforms import ImageLoadError
from internvl_chat.data.transforms import image_size as _header_size

__all__ = ["KNOWN_METRICS", "EvalSample", "box_to_pixels", "count_placeholders", "image_size", "known_metrics",
           "load_eval_jsonl", "parse_box"]

# The metric names of eval.metrics (common interface); checked here so a typo fails at load time, not after
# generation. eval.metrics.METRICS is preferred when it can be imported (it is the authority).
KNOWN_METRICS = ("vqa_acc", "anls", "relaxed_acc", "exact_match", "mc_acc", "yesno", "iou_acc")

# The first box of the official grounding format: <box>[[x1, y1, x2, y2]]</box>, integers in 0..1000.
_BOX = re.compile(r"<box>\s*\[\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]")

# Record keys that travel to the metric record as they are (the CLI-contract extras).
_EXTRA_KEYS = ("answers", "options", "category", "width", "height", "question_id")


def known_metrics() -> tuple[str, ...]:
    try:
        from eval.metrics import METRICS
    except ImportError:  # the scoring package is optional for loading
        return KNOWN_METRICS
    return tuple(METRICS)


@dataclass
class EvalSample:
    """One evaluation question. ``images``/``video`` are resolved paths; ``question`` is the raw last human turn
    (placeholders as written), ``history`` the earlier (human, gpt) pairs, ``reference`` the expected answer text."""

    id: Any
    question: str
    reference: str
    metric: str
    images: list[str] = field(default_factory=list)
    video: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None
    record_extras: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line" (or a benchmark's description), for error messages

    def to_metric_record(self, prediction: str) -> dict[str, Any]:
        """The CLI-contract record of this sample for its metric (see eval/metrics)."""
        extras = self.record_extras
        record: dict[str, Any] = {"prediction": prediction}
        for key in ("options", "category", "question_id"):
            if key in extras:
                record[key] = extras[key]
        if self.images:
            record["image"] = self.images[0]  # MME's acc+ pairs the two questions of one image
        if self.metric == "iou_acc":
            record["answer"] = extras["box"] if "box" in extras else box_to_pixels(
                parse_box(self.reference, self.source), extras["width"], extras["height"])
            record["width"], record["height"] = extras["width"], extras["height"]
        elif "answers" in extras:
            record["answers"] = list(extras["answers"])
        else:
            record["answer"] = self.reference
        return record


def parse_box(text: str, where: str = "") -> list[float]:
    """The first ``<box>[[x1, y1, x2, y2]]</box>`` of ``text`` (0-1000 coordinates)."""
    match = _BOX.search(text)
    if match is None:
        raise DataError(f"iou_acc needs a reference like <box>[[x1, y1, x2, y2]]</box>, got {text!r}",
                        kind="bad_box").located(*_split_where(where))
    return [float(v) for v in match.groups()]


def box_to_pixels(box: list[float], width: float, height: float) -> list[float]:
    """0-1000 normalised box -> pixel box, the inverse of the official ``round(x / W * 1000)``."""
    x1, y1, x2, y2 = box
    # rounded to 1e-6 px: exact enough for any IoU, and 0.1 stays 0.1 in predictions.jsonl
    return [round(v, 6) for v in (x1 / 1000 * width, y1 / 1000 * height, x2 / 1000 * width, y2 / 1000 * height)]


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header, as the model sees it (EXIF rotation applied).

    The training data's checks apply: a FIFO or directory is refused without being opened, and an image over the
    default pixel limit is refused from its header (see :func:`internvl_chat.data.transforms.image_size`).
    """
    return _header_size(path)


def _split_where(where: str) -> tuple[str | None, int | None]:
    file, _, line = where.rpartition(":")
    if file and line.isdigit():
        return file, int(line)
    return (where or None), None


def _join(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def load_eval_jsonl(path: str | os.PathLike, root: str | os.PathLike | None = None,
                    metric: str | None = None) -> list[EvalSample]:
    """Read a held-out set in the training format; media paths are relative to ``root`` (default: the file's
    folder). ``metric`` is the default for lines without a ``metric`` key. See the module docstring."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"eval file not found: {path}", file=path, kind="missing_file")
    root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    names = known_metrics()
    if metric is not None and metric not in names:
        raise DataError(f"unknown metric {metric!r}; known: {', '.join(names)}", file=path, kind="bad_metric")
    samples = []
    for line, record in read_records(path):
        if isinstance(record, DataError):
            raise record
        samples.append(_sample(record, path, line, root, metric, names))
    if not samples:
        raise DataError("the eval file holds no samples", file=path, kind="empty_file")
    return samples


def _sample(raw: dict, path: str, line: int, root: str, default_metric: str | None, names) -> EvalSample:
    where = f"{path}:{line}"

    def fail(reason: str, kind: str = "invalid_record") -> DataError:
        return DataError(reason, file=path, line=line, kind=kind)

    def size_of(rel: str) -> tuple[int, int]:
        return _image_size_checked(_join(root, rel), fail)

    record = to_official(raw, None, file=path, line=line, image_size_fn=size_of)
    turns = [(t["from"], t["value"]) for t in record["conversations"]]
    system = turns.pop(0)[1] if turns and turns[0][0] == "system" else None
    if not turns or turns[-1][0] != "gpt":
        raise fail("the last turn must be the gpt reference answer (a trailing human turn has nothing to score)",
                   "bad_roles")
    if len(turns) < 2 or turns[-2][0] != "human":
        raise fail("the last gpt turn must follow a human turn (the question)", "bad_roles")
    reference = turns[-1][1]
    question = turns[-2][1]
    history, pending = [], None
    for role, value in turns[:-2]:
        if role == "human":
            if pending is not None:
                raise fail("two human turns in a row: history must alternate human/gpt", "bad_roles")
            pending = value
        else:
            if pending is None:
                raise fail("a gpt turn without the human turn before it", "bad_roles")
            history.append((pending, value))
            pending = None
    if pending is not None:
        raise fail("two human turns in a row: history must alternate human/gpt", "bad_roles")

    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    images = [_join(root, p) for p in images]
    for image in images:
        if not os.path.isfile(image):
            raise fail(f"image file not found: {image}", "missing_file")
    video = record.get("video")
    if video is not None:
        video = _join(root, video)
        if not os.path.exists(video):
            raise fail(f"video not found: {video}", "missing_file")

    name = raw.get("metric", default_metric)
    if name is None:
        name = "iou_acc" if "<box>" in reference else "vqa_acc"
    if name not in names:
        raise fail(f"unknown metric {name!r}; known: {', '.join(names)}", "bad_metric")

    extras = {k: raw[k] for k in _EXTRA_KEYS if k in raw}
    if "clip" in record:
        extras["clip"] = record["clip"]
    if "answers" in extras and not (isinstance(extras["answers"], list) and extras["answers"]
                                    and all(isinstance(a, str) for a in extras["answers"])):
        raise fail("'answers' must be a non-empty list of strings")
    if name == "mc_acc" and not (isinstance(raw.get("options"), dict) and raw["options"]):
        raise fail("metric mc_acc needs 'options': {\"A\": \"...\", \"B\": \"...\"} on the line "
                   "(the reference is the option letter)")
    if name == "iou_acc":
        box = parse_box(reference, where)
        if not images:
            raise fail("metric iou_acc needs an image (the box is scored in its pixels)")
        width, height = raw.get("width"), raw.get("height")
        if not (_positive(width) and _positive(height)):
            if width is not None or height is not None:
                raise fail(f"width/height must be positive numbers, got {width!r}/{height!r}")
            width, height = _image_size_checked(images[0], fail)
        extras["width"], extras["height"] = width, height
        extras["box"] = box_to_pixels(box, width, height)
    return EvalSample(
        id=raw.get("id", f"{os.path.basename(path)}:{line}"), question=question, reference=reference, metric=name,
        images=images, video=video, history=history, system=system, record_extras=extras, source=where,
    )


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _image_size_checked(path: str, fail) -> tuple[int, int]:
    try:
        return image_size(path)
    except FileNotFoundError:
        raise fail(f"image file not found: {path}", "missing_file") from None
    except ImageLoadError as exc:  # names the file and says why (not a file, too large, truncated, ...)
        raise fail(str(exc), getattr(exc, "kind", None) or "corrupt_image") from exc
    except Exception as exc:  # PIL raises many types for a bad file
        raise fail(f"cannot read image {path}: {type(exc).__name__}: {exc}", "corrupt_image") from exc


def count_placeholders(sample: EvalSample, placeholder: str = IMAGE_PLACEHOLDER) -> int:
    """How many ``placeholder`` the human turns of ``sample`` hold (question and history)."""
    return sample.question.count(placeholder) + sum(q.count(placeholder) for q, _ in sample.history)

