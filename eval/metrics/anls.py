"""``anls``: Average Normalised Levenshtein Similarity (DocVQA, InfographicVQA), threshold 0.5.

Official source: ``internvl_chat/eval/vqa/evaluate_vqa.py`` writes the raw answers and runs
``eval/vqa/infographicsvqa_eval.py`` (the DocVQA/InfographicVQA challenge script, ``--anls_threshold 0.5``).

Definition per sample, for each reference answer:
  ``gt`` and ``pred`` normalised as ``' '.join(s.strip().lower().split())`` (lower case, whitespace collapsed);
  ``NL = levenshtein(gt, pred) / max(len(raw_gt.upper()), len(raw_pred.upper()))``, 0 when both are empty;
then ``score = 1 - min(NL)`` over the references, set to 0 when ``score < 0.5`` (exactly 0.5 is kept). The dataset's
score is the mean. The distance is over Python characters (code points), insertion/deletion/substitution cost 1.

QUIRK kept by default: the denominator uses the lengths of the RAW strings (not stripped, not collapsed, and measured
after ``upper()``, which lengthens e.g. "ß" to "SS"), while the distance uses the normalised ones; so " Yes " vs
"yes." scores 1 - 1/5 = 0.8 instead of 1 - 1/4 = 0.75. ``textbook=True`` divides by the normalised lengths, as
VLMEvalKit's ``anls_compute`` does.

Extras: ``anls_raw`` = the mean of ``1 - min(NL)`` without the threshold.
"""

from __future__ import annotations

from .records import get_answers, get_prediction

__all__ = ["anls", "anls_sample", "levenshtein"]

THRESHOLD = 0.5  # --anls_threshold default of the official script


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs, one row of the dynamic programme at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls_sample(prediction: str, answers: list[str], *, textbook: bool = False) -> tuple[float, float]:
    """(thresholded score, unthresholded similarity) of one sample."""
    pred = _collapse(prediction)
    distances = []
    for answer in answers:
        gt = _collapse(answer)
        if textbook:
            length = max(len(gt), len(pred))
        else:
            length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else float(levenshtein(gt, pred)) / float(length))
    similarity = 1 - min(distances)
    return (0.0 if similarity < THRESHOLD else similarity), similarity


def anls(records: list[dict], *, textbook: bool = False) -> dict:
    pairs = [anls_sample(get_prediction(r, i), get_answers(r, i), textbook=textbook) for i, r in enumerate(records)]
    per_sample = [score for score, _ in pairs]
    # The unthresholded similarity can fall below 0 under the official denominator quirk; clamp for the extra figure.
    raw = [max(0.0, similarity) for _, similarity in pairs]
    return {"score": sum(per_sample) / len(per_sample), "n": len(per_sample),
            "anls_raw": sum(raw) / len(raw), "per_sample": per_sample}
