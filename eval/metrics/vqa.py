"""``vqa_acc``: VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz) with the EvalAI answer normalisation.

Official source: ``internvl_chat/eval/vqa/textvqa_eval.py`` ``TextVQAAccuracyEvaluator`` (called by
``eval/vqa/evaluate_vqa.py`` for the datasets whose metric is ``vqa_score``, on the raw model answer).

Definition: the prediction and every reference go through :func:`~eval.metrics.evalai.normalize_answer`. With the
N references of a question, for each reference i take the other N-1 and score ``min(1, matches / 3)`` where
``matches`` counts those equal to the prediction; the sample's score is the mean of the N values; the dataset's
score is the mean over samples. For the usual 10 answers a prediction given by k annotators scores
``(k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10``, e.g. k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9, k>=4 -> 1.

Number of references (our decision, documented): the official evaluator asserts exactly 10. For N >= 2 we apply the
same leave-one-out formula over the N answers (as VLMEvalKit's ``process_line(method='vqa_score')`` does). For N = 1
leave-one-out has nobody left to agree with (it would score every prediction 0), so a single reference degrades to
exact match after normalisation: 1.0 if the normalised forms are equal, else 0.0.

Quirks kept by default: those of the normaliser (see :mod:`eval.metrics.evalai`). The leave-one-out formula is the
definition, not a quirk, so ``textbook=True`` only switches the normaliser to its fixed form.
"""

from __future__ import annotations

from .evalai import normalize_answer
from .records import get_answers, get_prediction

__all__ = ["vqa_acc", "vqa_sample_score"]


def vqa_sample_score(prediction: str, answers: list[str], *, textbook: bool = False) -> float:
    pred = normalize_answer(prediction, textbook=textbook)
    refs = [normalize_answer(a, textbook=textbook) for a in answers]
    if len(refs) == 1:
        return 1.0 if pred == refs[0] else 0.0
    total_matches = sum(ref == pred for ref in refs)
    # Summed in reference order, then divided by N, exactly as the official evaluator does (same float result).
    accs = [min(1, float(total_matches - (ref == pred)) / 3) for ref in refs]
    return sum(accs) / len(accs)


def vqa_acc(records: list[dict], *, textbook: bool = False) -> dict:
    per_sample = [vqa_sample_score(get_prediction(r, i), get_answers(r, i), textbook=textbook)
                  for i, r in enumerate(records)]
    return {"score": sum(per_sample) / len(per_sample), "n": len(per_sample), "per_sample": per_sample}
