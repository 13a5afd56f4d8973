"""``yesno``: yes/no questions, parsed the POPE way (default) or the MME way (``style="mme"``).

The score is the accuracy in both styles; precision, recall and F1 treat "yes" as the positive class.

POPE (``style="pope"``, default). Official source: ``internvl_chat/eval/pope/eval_pope.py`` ``eval_pope`` (run by
``eval/pope/evaluate_pope.py``). Parsing of the answer, facts of that code:
  keep the text before the first "." (if any); delete ","; split on single spaces (``split(' ')``); the answer is
  "no" if one of the words is exactly ``No``, ``no`` or ``not``, otherwise "yes".
QUIRKS kept by default: case-sensitive ("NO", "Not" and "NOT" read as yes); anything without such a word is yes,
including an empty answer, "I don't know" and "Nope"; words split on spaces only ("No\\n" is not "No"); a label is
negative only when it is exactly ``no`` (any other label, "No" included, is positive; a warning says so). Per
category (the ``category`` key: adversarial / popular / random) the official script prints accuracy, precision,
recall, F1 and yes-ratio, and its headline "Overall F1" is the MEAN of the per-category F1s (not the F1 of the pooled
data): here ``overall_f1``. The official script divides by zero when a category has no "yes" prediction; here such a
precision (recall, F1) is 0.
Figures: ``score`` = accuracy, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (pooled over all records), with
categories also ``per_category``; ``overall_f1`` is the mean of the category F1s (without categories: ``f1``).

MME (``style="mme"``). Official sources: ``internvl_chat/eval/mme/eval.py`` ``post_processing`` and
``eval/mme/calculation.py`` (the MME benchmark's tool). Parsing:
  delete newlines; "不是" -> "No", then "是" -> "Yes", "否" -> "No"; ``lower()``; "true" -> "yes", "false" -> "no";
  delete CJK characters (U+4E00..U+9FA5); then "yes" or "no" if the text is exactly that, else "yes" if "yes"
  occurs in its first 4 characters, else "no" if "no" does ("nope", "none", "know" -> no), else "other" (wrong).
  A reference must be yes/no in any case. QUIRK kept: a prediction containing a tab breaks the official
  tab-separated result line, which is then skipped (counted wrong for acc+, left out of acc).
  NOT modelled: a carriage return ("\\r") in a prediction survives the official post-processing and splits the
  result line when calculation.py reads it back (universal newlines); the extra line shifts the official question
  pairing of that task (or trips its pair assertion). Here the record is parsed as one answer and pairs stay put.
Per task (``category``): ``acc`` = right / answered, ``acc_plus`` = fraction of images whose questions are ALL
right, task score = ``(acc + acc_plus) * 100``. Images are the ``image`` key (grouped within a category); without it,
consecutive pairs of records of a category are an image, as the official file order assumes. Precision and recall
leave "other" answers out (as the official confusion matrix does). Figures: ``score`` = accuracy, ``acc_plus``,
``mme_score`` (sum of the task scores; without categories ``(acc + acc_plus) * 100``), ``perception`` and
``cognition`` (sums over the official task lists, when such tasks are present), ``per_category``.

``textbook=True`` (both styles): case-insensitive parsing of the words of the whole answer: the first word if it is
yes/no, else "yes" when "yes" occurs and no negation (no, not, n't) does, "no" for the reverse, otherwise "unknown"
(counted wrong: not a yes, so a miss when the label is yes); labels are read case-insensitively and must be yes/no.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from .records import MetricInputError, get_prediction, get_single_answer, optional_str

__all__ = ["mme_label", "pope_label", "textbook_label", "yesno"]

log = logging.getLogger(__name__)

STYLES = ("pope", "mme")
# calculation.py eval_type_dict: the tasks summed into the two MME totals.
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

_CJK = re.compile("[\u4e00-\u9fa5]")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def pope_label(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def mme_label(text: str) -> str:
    text = text.replace("\n", "").replace("不是", "No").replace("是", "Yes").replace("否", "No")
    text = text.lower().replace("true", "yes").replace("false", "no")
    text = _CJK.sub("", text)
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def textbook_label(text: str) -> str:
    words = _WORD.findall(text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    negated = any(w in ("no", "not") or w.endswith("n't") for w in words)
    if "yes" in words and not negated:
        return "yes"
    if negated and "yes" not in words:
        return "no"
    return "unknown"


def _gold(answer: str, index: int, *, style: str, textbook: bool) -> str:
    if style == "pope" and not textbook:
        return "no" if answer == "no" else "yes"  # official: label 'no' -> 0, anything else -> 1
    label = answer.strip().lower()
    if label not in ("yes", "no"):
        raise MetricInputError(index, f"a yes/no label must be yes or no, got {answer!r}")
    return label


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _confusion(pairs: list[tuple[str, str]]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of (prediction, label) pairs; "yes" is positive."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p != "yes" and g == "yes" for p, g in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(sum(p == g for p, g in pairs), len(pairs)), "precision": precision,
            "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(sum(p == "yes" for p, _ in pairs), len(pairs)), "n": len(pairs)}


def _categories(records: list[dict]) -> list[str | None]:
    cats = [optional_str(r, "category", i) for i, r in enumerate(records)]
    if any(c is not None for c in cats) and any(c is None for c in cats):
        missing = next(i for i, c in enumerate(cats) if c is None)
        raise MetricInputError(missing, 'missing "category" (other records have one)')
    return cats


def _pope(preds: list[str], golds: list[str], cats: list, *, textbook: bool) -> dict:
    pairs = list(zip(preds, golds))
    figures = _confusion(pairs)
    out = {"score": figures["accuracy"], "n": len(pairs),
           **{k: figures[k] for k in ("precision", "recall", "f1", "yes_ratio")}}
    if textbook:
        out["n_unknown"] = sum(p == "unknown" for p in preds)
    if cats[0] is not None:
        groups = defaultdict(list)
        for pair, cat in zip(pairs, cats):
            groups[cat].append(pair)
        out["per_category"] = {cat: _confusion(group) for cat, group in groups.items()}
        out["overall_f1"] = sum(c["f1"] for c in out["per_category"].values()) / len(groups)
    else:  # one implicit category: the official headline is its F1
        out["overall_f1"] = figures["f1"]
    out["per_sample"] = [1.0 if p == g else 0.0 for p, g in pairs]
    return out


def _images(records: list[dict], cats: list) -> list:
    """An image key per record: (category, image) when every record has "image", else consecutive pairs."""
    images = [optional_str(r, "image", i) for i, r in enumerate(records)]
    if all(img is not None for img in images):
        return list(zip(cats, images))
    seen = defaultdict(int)
    keys = []
    for cat in cats:
        keys.append((cat, seen[cat] // 2))
        seen[cat] += 1
    return keys


def _mme_task(rows: list[tuple[str, str, bool, object]]) -> dict:
    """rows: (prediction label, gold, skipped, image key) of one task."""
    answered = [(p, g) for p, g, skipped, _ in rows if not skipped]
    acc = _ratio(sum(p == g for p, g in answered), len(answered))
    per_image = defaultdict(lambda: True)
    for p, g, skipped, image in rows:
        per_image[image] = per_image[image] and not skipped and p == g
    acc_plus = _ratio(sum(per_image.values()), len(per_image))
    clean = [(p, g) for p, g in answered if p in ("yes", "no")]
    figures = _confusion(clean)
    return {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100, "precision": figures["precision"],
            "recall": figures["recall"], "other_num": len(answered) - len(clean), "n": len(rows)}


def _mme(preds: list[str], golds: list[str], skipped: list[bool], cats: list, images: list) -> dict:
    rows = list(zip(preds, golds, skipped, images))
    pooled = _mme_task(rows)
    out = {"score": pooled["acc"], "n": len(rows), "acc_plus": pooled["acc_plus"],
           "precision": pooled["precision"], "recall": pooled["recall"], "other_num": pooled["other_num"]}
    if cats[0] is None:
        out["mme_score"] = pooled["score"]
    else:
        groups = defaultdict(list)
        for row, cat in zip(rows, cats):
            groups[cat].append(row)
        tasks = {cat: _mme_task(group) for cat, group in groups.items()}
        out["mme_score"] = sum(t["score"] for t in tasks.values())
        for name, members in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
            if any(cat in members for cat in tasks):
                out[name] = sum(t["score"] for cat, t in tasks.items() if cat in members)
        out["per_category"] = tasks
    out["per_sample"] = [1.0 if (p == g and not s) else 0.0 for p, g, s, _ in rows]
    return out


def yesno(records: list[dict], *, textbook: bool = False, style: str = "pope") -> dict:
    if style not in STYLES:
        raise ValueError(f"unknown yes/no style {style!r}; choose one of {', '.join(STYLES)}")
    raw = [get_prediction(r, i) for i, r in enumerate(records)]
    answers = [get_single_answer(r, i) for i, r in enumerate(records)]
    golds = [_gold(a, i, style=style, textbook=textbook) for i, a in enumerate(answers)]
    cats = _categories(records)
    if style == "pope" and not textbook:
        odd = sum(a not in ("yes", "no") for a in answers)
        if odd:
            log.warning("%d label(s) are not exactly 'yes' or 'no'; the official POPE rule counts every label other "
                        "than 'no' as yes (--textbook reads labels case-insensitively)", odd)
    if textbook:
        preds = [textbook_label(p) for p in raw]
    else:
        preds = [pope_label(p) if style == "pope" else mme_label(p) for p in raw]
    if style == "pope":
        return _pope(preds, golds, cats, textbook=textbook)
    # After post-processing, a tab splits the official result line into too many fields: the line is skipped.
    skipped = [False if textbook else "\t" in p for p in raw]
    return _mme(preds, golds, skipped, cats, _images(records, cats))
