"""``mc_acc``: multiple-choice accuracy with option-letter extraction from free text (MMBench, CCBench, ...).

Official source: ``internvl_chat/eval/mmbench/evaluate_mmbench.py`` ``post_process(pred, option)``; its output is
written to an ``.xlsx`` for the MMBench evaluator (VLMEvalKit / the OpenCompass server), which extracts a letter
again with ``vlmeval/utils/matching_util.py`` ``can_infer`` (no local accuracy in the official script).

Default extraction = the official pipeline, in two stages:

1. ``post_process`` (InternVL), on ``pred.strip()``: a one-character answer is returned as it is (even "b" or "x");
   else if its FIRST character is an option letter, that letter ("B. red" -> B, but also "A cat ..." -> A and
   "Because ..." -> B: QUIRK kept); else the first option, in option order, whose text occurs in the answer
   (case-sensitive substring); else the answer unchanged. QUIRK: an empty answer makes the official code raise
   ``IndexError``; here it simply has no letter.
2. Only when stage 1 yields no option letter (so nothing the InternVL rule decides is ever changed): the MMBench
   evaluator's ``can_infer`` on that text. ``can_infer_option``: replace each of ``.()[],:;!*#{}`` by a blank and
   split into words; if exactly one option letter occurs as a word and its first occurrence is among the last four
   words, that letter ("(B)" -> B, "The answer is B" -> B, but in "I think the answer is B because of its colour
   and shape" B comes too early). Otherwise (no letter, several, or one too early) ``can_infer_text``: if the answer
   is at most twice as long as all option texts together and exactly one option text occurs in it
   (case-insensitive), that option. Otherwise no letter: wrong (VLMEvalKit's "Z" without an LLM judge).
   Also facts of ``can_infer_option``: one of its refusal phrases, or no option letter but a word "Z", ends with no
   letter (the texts are not tried); a text containing "Failed to obtain answer via API" skips it entirely (straight
   to ``can_infer_text``, so "Failed to obtain answer via API B" is not B).

A prediction is right when the extracted letter is the reference letter. The reference (``"answer"``, or each of
``"answers"``) is an option letter, or an option's text, which is mapped to its letter (exact, then
case-insensitive).

``textbook=True`` replaces both stages with one robust, position-independent extraction (no first-character
quirk, lower-case lone letters accepted): a lone letter possibly wrapped as "(b)", "B.", "[B]"; "answer/option/
choice is B" anywhere; a leading "B." / "B)" / "(B)" / "B:"; exactly one option letter as a word anywhere (an
"A" followed by a lower-case word is read as the article); then option texts (case-insensitive; of several
matches the longest wins when it contains all the others).

Extras: ``n_fallback`` (answers whose letter came from stage 2), ``n_no_letter`` (answers with no letter at all).
"""

from __future__ import annotations

import re

from .records import MetricInputError, get_answers, get_options, get_prediction

__all__ = ["extract_letter", "mc_acc"]

_CAN_INFER_BLANKED = ".()[],:;!*#{}"  # VLMEvalKit can_infer_option: characters replaced by a blank
_CAN_INFER_REJECTS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                      "I'm sorry, but without the image provided", "Cannot determine the answer")
# A text holding VLMEvalKit's own API-failure marker skips can_infer_option entirely (no refusal check, no letters)
# and goes straight to can_infer_text; kept so that even such text scores as the official evaluator scores it.
_CAN_INFER_SKIP_OPTION = "Failed to obtain answer via API"

_LONE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?")
_STATED = re.compile(r"(?i:\b(?:answer|option|choice)\b(?:\s+(?:is|would be|should be))?)\s*[:\-]?\s*"
                     r"[(\[]?([A-Z])(?![A-Za-z])")
_LEADING = re.compile(r"[(\[]?([A-Z])(?:[)\].:]|\s*$)")


def _official_post_process(pred: str, options: dict[str, str]) -> str:
    pred = pred.strip()
    if len(pred) == 1:
        return pred
    if pred and pred[0] in options:
        return pred[0]
    for letter, text in options.items():
        if text in pred:
            return letter
    return pred


def _words(text: str) -> list[str]:
    for ch in _CAN_INFER_BLANKED:
        text = text.replace(ch, " ")
    return text.split()


def _can_infer(text: str, options: dict[str, str]) -> str | None:
    if _CAN_INFER_SKIP_OPTION not in text:
        letter = _can_infer_option(text, options)
        if letter != "":
            return letter
    return _can_infer_text(text, options)


def _can_infer_option(text: str, options: dict[str, str]) -> str | None:
    """The letter, None for a final "no answer" (a refusal or a lone "Z"), "" to let the option texts decide."""
    if any(reject in text for reject in _CAN_INFER_REJECTS):
        return None
    words = _words(text)
    present = [letter for letter in options if letter in words]
    if len(present) == 1 and words.index(present[0]) > len(words) - 5:
        return present[0]
    if not present and "Z" in words:  # VLMEvalKit's explicit "no answer"
        return None
    return ""


def _can_infer_text(text: str, options: dict[str, str]) -> str | None:
    # Not decided by a letter (none, several, or one too early): the option texts decide.
    if len(text) > 2 * sum(len(v) for v in options.values()):
        return None
    lowered = text.lower()
    hits = [letter for letter, option in options.items() if option.lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def _textbook_letter(pred: str, options: dict[str, str]) -> str | None:
    text = pred.strip()
    if not text:
        return None
    match = _LONE.fullmatch(text)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    for pattern in (_STATED, _LEADING):
        match = pattern.search(text) if pattern is _STATED else pattern.match(text)
        if match and match.group(1) in options:
            return match.group(1)
    words = _words(text)
    present = {w for i, w in enumerate(words) if w in options
               and not (w == "A" and i + 1 < len(words) and words[i + 1][:1].islower())}
    if len(present) == 1:
        return present.pop()
    lowered = text.lower()
    hits = [letter for letter, option in options.items() if option and option.lower() in lowered]
    if len(hits) > 1:
        longest = max(hits, key=lambda k: len(options[k]))
        if all(options[k].lower() in options[longest].lower() for k in hits):
            return longest
    return hits[0] if len(hits) == 1 else None


def extract_letter(prediction: str, options: dict[str, str], *, textbook: bool = False) -> tuple[str | None, bool]:
    """(option letter or None, whether the default's second stage was needed)."""
    if textbook:
        return _textbook_letter(prediction, options), False
    first = _official_post_process(prediction, options)
    if first in options:
        return first, False
    return _can_infer(first, options), True


def _reference_letters(record: dict, index: int, options: dict[str, str]) -> set[str]:
    letters = set()
    for answer in get_answers(record, index):
        key = answer.strip()
        if key in options:
            letters.add(key)
            continue
        by_text = [k for k, v in options.items() if v.strip() == key] or \
                  [k for k, v in options.items() if v.strip().lower() == key.lower()]
        if not by_text:
            raise MetricInputError(index, f"answer {answer!r} is neither an option letter ({', '.join(options)}) "
                                          "nor an option's text")
        letters.add(by_text[0])
    return letters


def mc_acc(records: list[dict], *, textbook: bool = False) -> dict:
    per_sample, fallback, no_letter = [], 0, 0
    for i, record in enumerate(records):
        prediction, options = get_prediction(record, i), get_options(record, i)
        references = _reference_letters(record, i, options)
        letter, used_fallback = extract_letter(prediction, options, textbook=textbook)
        fallback += used_fallback and letter is not None
        no_letter += letter is None
        per_sample.append(1.0 if letter in references else 0.0)
    return {"score": sum(per_sample) / len(per_sample), "n": len(per_sample), "n_fallback": fallback,
            "n_no_letter": no_letter, "per_sample": per_sample}
