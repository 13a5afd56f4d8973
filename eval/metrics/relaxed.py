"""``relaxed_acc``: ChartQA relaxed accuracy, 5 % relative tolerance for numbers, exact match otherwise.

Official source: ``internvl_chat/eval/vqa/evaluate_vqa.py`` ``relaxed_correctness`` / ``evaluate_relaxed_accuracy``
(the function is pix2struct's ``metrics.py`` ``relaxed_correctness(target, prediction, max_relative_change=0.05)``).

pix2struct's rule for ``(target, prediction)``: each string is parsed with Python ``float()`` (so "1e3", " 12 ",
"inf" parse); a string ending in "%" is ``float(text.rstrip('%')) / 100`` ("45%" -> 0.45, and every trailing "%" is
stripped). If the prediction parses AND the target parses to a non-zero number, the answer is right when
``|prediction - target| / |target| <= 0.05``; otherwise (either side not a number, or a zero target) it is right
when ``prediction.lower() == target.lower()``. A sample is right if it is right for ANY reference (max); the score is
the fraction of right samples.

QUIRKS kept by default (what the official InternVL call does):
* Swapped arguments: the call is ``relaxed_correctness(prediction.strip(), annotation)``, i.e. the MODEL's answer
  sits in the ``target`` slot. The tolerance is therefore relative to the prediction: pred 95 vs reference 100 is
  |100-95|/95 = 0.0526 -> wrong (textbook 5/100 = 0.05 -> right); pred 105.2 vs reference 100 is 5.2/105.2 = 0.0494
  -> right (textbook 0.052 -> wrong). The "zero target" fallback applies to a prediction of 0, which then needs the
  same string as the reference ("0" vs "0.0" is wrong).
* Only the prediction is stripped; a reference with surrounding blanks can only match numerically.
* "45%" and "0.45" are equal numerically (both 0.45), but "45%" vs "45" is 0.45 vs 45 -> wrong.
``textbook=True`` puts the reference in the target slot (tolerance relative to the reference, as pix2struct and
VLMEvalKit intend), strips both sides, and compares a zero reference numerically ("0" vs "0.0" is right).
"""

from __future__ import annotations

from .records import get_answers, get_prediction

__all__ = ["relaxed_acc", "relaxed_correct"]

MAX_RELATIVE_CHANGE = 0.05  # pix2struct default, kept by the official call


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correct(target: str, prediction: str) -> bool:
    """pix2struct's relaxed correctness with its own argument names (the caller decides what goes where)."""
    prediction_value = _to_float(prediction)
    target_value = _to_float(target)
    if prediction_value is not None and target_value:
        return abs(prediction_value - target_value) / abs(target_value) <= MAX_RELATIVE_CHANGE
    return prediction.lower() == target.lower()


def _textbook_correct(reference: str, prediction: str) -> bool:
    """Tolerance relative to the reference; a zero reference needs a prediction equal to zero."""
    reference_value, prediction_value = _to_float(reference), _to_float(prediction)
    if reference_value == 0 and prediction_value is not None:
        return prediction_value == 0
    return relaxed_correct(reference, prediction)


def relaxed_acc(records: list[dict], *, textbook: bool = False) -> dict:
    per_sample = []
    for i, record in enumerate(records):
        prediction, answers = get_prediction(record, i).strip(), get_answers(record, i)
        if textbook:
            right = any(_textbook_correct(answer.strip(), prediction) for answer in answers)
        else:
            right = any(relaxed_correct(prediction, answer) for answer in answers)
        per_sample.append(1.0 if right else 0.0)
    return {"score": sum(per_sample) / len(per_sample), "n": len(per_sample), "per_sample": per_sample}
