"""``exact_match``: normalised exact match (OCR-VQA, AI2D, and the official "accuracy" datasets other than GQA).

Official source: ``internvl_chat/eval/vqa/evaluate_vqa.py`` ``evaluate_exact_match_accuracy``: right when
``prediction.strip().lower() == reference.strip().lower()`` for ANY reference (max over annotations); score = the
fraction of right samples. What is normalised: surrounding whitespace (``str.strip``) and letter case
(``str.lower``), nothing else; so "Paris." vs "paris" and "two" vs "2" are wrong, "  PARIS " vs "paris" is right.

There is no bug to fix in the official rule, only a strict definition. ``textbook=True`` compares the EvalAI-normalised
forms instead (punctuation, articles, number words, contractions: :mod:`eval.metrics.evalai`), which is the official
``STVQAAccuracyEvaluator`` of the same ``textvqa_eval.py``.
"""

from __future__ import annotations

from .evalai import normalize_answer
from .records import get_answers, get_prediction

__all__ = ["exact_match"]


def _normal(text: str, textbook: bool) -> str:
    return normalize_answer(text, textbook=True) if textbook else text.strip().lower()


def exact_match(records: list[dict], *, textbook: bool = False) -> dict:
    per_sample = []
    for i, record in enumerate(records):
        prediction = _normal(get_prediction(record, i), textbook)
        right = any(prediction == _normal(answer, textbook) for answer in get_answers(record, i))
        per_sample.append(1.0 if right else 0.0)
    return {"score": sum(per_sample) / len(per_sample), "n": len(per_sample), "per_sample": per_sample}
