"""Scoring library: the official InternVL benchmark metrics over lists of prediction records.

``compute(name, records, textbook=False, **options)`` returns
``{"metric": name, "score": <fraction in [0, 1]>, "n": <records>, <extra figures>, "per_sample": [...]}``, where
``per_sample`` holds each record's score in input order. A record that lacks what its metric needs raises
:class:`MetricInputError` with the record's position; nothing is scored until every record read so far is valid.

=============  ============================================================  ======================================
name           benchmarks (official script)                                  module
=============  ============================================================  ======================================
vqa_acc        VQAv2, OK-VQA, TextVQA, VizWiz (eval/vqa/textvqa_eval.py)     :mod:`eval.metrics.vqa`
anls           DocVQA, InfoVQA (eval/vqa/infographicsvqa_eval.py)            :mod:`eval.metrics.anls`
relaxed_acc    ChartQA (evaluate_vqa.py relaxed_correctness)                 :mod:`eval.metrics.relaxed`
exact_match    OCR-VQA, AI2D (evaluate_vqa.py exact match)                   :mod:`eval.metrics.exact`
mc_acc         MMBench, CCBench (eval/mmbench post_process + can_infer)      :mod:`eval.metrics.choice`
yesno          POPE (eval/pope/eval_pope.py), MME (eval/mme, style="mme")    :mod:`eval.metrics.yesno`
iou_acc        RefCOCO/+/g (eval/refcoco/evaluate_grounding.py)              :mod:`eval.metrics.grounding`
=============  ============================================================  ======================================

Default = the number the official script prints, quirks included (each module lists its quirks); ``textbook=True``
fixes them. Options: ``style="pope"|"mme"`` for ``yesno``.
"""

from __future__ import annotations

from typing import Callable

from .anls import anls
from .choice import mc_acc
from .exact import exact_match
from .grounding import iou_acc
from .records import MetricInputError
from .relaxed import relaxed_acc
from .vqa import vqa_acc
from .yesno import yesno

__all__ = ["METRICS", "MetricInputError", "compute"]

METRICS: dict[str, Callable[..., dict]] = {
    "vqa_acc": vqa_acc,
    "anls": anls,
    "relaxed_acc": relaxed_acc,
    "exact_match": exact_match,
    "mc_acc": mc_acc,
    "yesno": yesno,
    "iou_acc": iou_acc,
}

# Options a metric accepts beyond `textbook` (anything else is a caller's mistake, not silently ignored).
_OPTIONS = {"yesno": {"style"}}


def compute(name: str, records: list[dict], *, textbook: bool = False, **options) -> dict:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    unknown = set(options) - _OPTIONS.get(name, set())
    if unknown:
        raise TypeError(f"metric {name!r} takes no option(s) {', '.join(sorted(unknown))}")
    if not records:
        return {"metric": name, "score": 0.0, "n": 0, "per_sample": []}
    result = METRICS[name](list(records), textbook=textbook, **options)
    per_sample = result.pop("per_sample")
    return {"metric": name, **result, "per_sample": per_sample}
