"""Reading the fields of a metric record, with one error type that says which record is wrong and why.

A record is one line of the ``eval.score`` input (its contract is in eval/score.py): ``"prediction"`` (str) and
either ``"answers"`` (list of str) or ``"answer"`` (str; for ``iou_acc`` a pixel box ``[x1, y1, x2, y2]`` with
``"width"`` and ``"height"``), plus ``"options"`` for ``mc_acc``. Metrics never index a record directly: they call
these helpers, so every malformed record fails the same way, with its position, before any score is computed. The
CLI turns the position into ``FILE:LINE``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MetricInputError", "get_answers", "get_box", "get_number", "get_options", "get_prediction",
           "get_single_answer", "optional_str"]


class MetricInputError(ValueError):
    """A record lacks what its metric needs; ``index`` is its 0-based position in the list given to the metric."""

    def __init__(self, index: int, message: str):
        super().__init__(f"record {index}: {message}")
        self.index = index
        self.message = message


def _check_mapping(record: Any, index: int) -> None:
    if not isinstance(record, dict):
        raise MetricInputError(index, f"a record must be a JSON object, got {type(record).__name__}")


def _is_finite_number(value: Any) -> bool:
    """A JSON number usable as a float: bool is an int subclass (true/false is never a size or a coordinate), and a
    JSON integer beyond the float range (json gives an unbounded int) must be refused, not raise OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def get_prediction(record: dict, index: int) -> str:
    _check_mapping(record, index)
    if "prediction" not in record:
        raise MetricInputError(index, 'missing "prediction"')
    pred = record["prediction"]
    if not isinstance(pred, str):
        raise MetricInputError(index, f'"prediction" must be a string, got {type(pred).__name__}')
    return pred


def get_answers(record: dict, index: int) -> list[str]:
    """The reference answers: ``"answers"`` (non-empty list of str) if present, else ``["answer"]``."""
    _check_mapping(record, index)
    if "answers" in record:
        answers = record["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise MetricInputError(index, '"answers" must be a list of strings')
        if not answers:
            raise MetricInputError(index, '"answers" is empty')
        return answers
    if "answer" in record:
        answer = record["answer"]
        if not isinstance(answer, str):
            raise MetricInputError(index, f'"answer" must be a string, got {type(answer).__name__}')
        return [answer]
    raise MetricInputError(index, 'missing "answers" (list of str) or "answer" (str)')


def get_single_answer(record: dict, index: int) -> str:
    """One label (yes/no metrics): ``"answer"``, else the first of ``"answers"``."""
    _check_mapping(record, index)
    if "answer" in record:
        answer = record["answer"]
        if not isinstance(answer, str):
            raise MetricInputError(index, f'"answer" must be a string, got {type(answer).__name__}')
        return answer
    return get_answers(record, index)[0]


def get_number(record: dict, key: str, index: int, *, positive: bool = False) -> float:
    _check_mapping(record, index)
    if key not in record:
        raise MetricInputError(index, f'missing "{key}"')
    value = record[key]
    if not _is_finite_number(value):
        raise MetricInputError(index, f'"{key}" must be a finite number, got {value!r}')
    if positive and value <= 0:
        raise MetricInputError(index, f'"{key}" must be positive, got {value!r}')
    return value


def get_box(record: dict, index: int) -> list[float]:
    """The reference box of ``iou_acc``: ``"answer"`` = ``[x1, y1, x2, y2]``, four finite numbers (pixels)."""
    _check_mapping(record, index)
    if "answer" not in record:
        raise MetricInputError(index, 'missing "answer" (pixel box [x1, y1, x2, y2])')
    box = record["answer"]
    if (not isinstance(box, list) or len(box) != 4
            or not all(_is_finite_number(v) for v in box)):
        raise MetricInputError(index, f'"answer" must be a box of 4 numbers [x1, y1, x2, y2], got {box!r}')
    return box


def get_options(record: dict, index: int) -> dict[str, str]:
    """``"options"`` as an ordered ``{letter: text}``; a list of texts is accepted and lettered A, B, C, ..."""
    _check_mapping(record, index)
    if "options" not in record:
        raise MetricInputError(index, 'missing "options" ({"A": "...", "B": "..."})')
    options = record["options"]
    if isinstance(options, list) and all(isinstance(v, str) for v in options) and 0 < len(options) <= 26:
        return {chr(ord("A") + i): v for i, v in enumerate(options)}
    if (not isinstance(options, dict) or not options
            or not all(isinstance(k, str) and len(k) == 1 and isinstance(v, str) for k, v in options.items())):
        raise MetricInputError(index, '"options" must be a non-empty object of one-letter keys to strings')
    return options


def optional_str(record: dict, key: str, index: int) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MetricInputError(index, f'"{key}" must be a string or a number, got {type(value).__name__}')
    return str(value)
