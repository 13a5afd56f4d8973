"""The EvalAI / VQA answer normaliser, as the official InternVL VQA scoring applies it.

Source: ``internvl_chat/eval/vqa/textvqa_eval.py`` class ``EvalAIAnswerProcessor`` (which InternVL took from LLaVA's
``m4c_evaluator.py``, itself from MMF and the original VQA evaluation code). VLMEvalKit's ``process_answer`` in
``vlmeval/dataset/utils/vqa_eval.py`` applies the same steps. The steps, in order (facts of that code):

1. ``lower()``; delete every ``,`` and ``?``; ``'s`` becomes `` 's`` (so "man's" is two words); ``strip()``; newline
   and tab become a space; ``strip()`` again.
2. Punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: a mark that has a space on either side anywhere in the
   text is deleted, otherwise it is replaced by a space ("red-white" -> "red white", "3 - 4" -> "3  4"). The official
   rule also deletes (instead of spacing) every mark when the text has a digit-comma-digit (``(?<=\\d)(\\,)+(?=\\d)``),
   which can never fire because step 1 already deleted the commas ("1,000" -> "1000").
3. Periods: the official pattern is ``(?!<=\\d)(\\.)(?!\\d)``; its first group is a negative *lookahead* for the text
   "<=digit" (a typo of the lookbehind ``(?<!\\d)``) and always passes at a ".", so the rule is "delete a period that
   is not followed by a digit": "3.5" stays, "5." and "end." lose it. QUIRK kept by default: the call passes
   ``re.UNICODE`` (= 32) as the positional ``count`` of ``Pattern.sub``, so only the first 32 such periods go.
4. Words (``split()`` on whitespace): the number words none/zero..ten become digits (none -> 0), the articles
   a/an/the are dropped, then each word found in the contractions table is replaced ("dont" -> "don't").
   QUIRK kept by default: the table maps "somebody'd" -> "somebodyd" (reversed); entries with capitals ("Im") or
   ``'s`` can never match after steps 1-2.

``textbook=True`` removes the two quirks (all periods go; "somebodyd" -> "somebody'd"); everything else is the
definition of the metric, not a bug, and stays.
"""

from __future__ import annotations

import re

__all__ = ["normalize_answer"]

# Digits and articles: official NUMBER_MAP / ARTICLES (words only; "eleven" and above stay words).
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# The punctuation marks of step 2 (official PUNCTUATIONS, same order; the order does not change the result).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# Equivalent to the official (?!<=\d)(\.)(?!\d): see step 3 of the module docstring.
_PERIOD = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # 32: the flag passed where Pattern.sub expects `count`

# The contractions table of the official processor, "key>value" separated by blanks (the data, not the code).
_CONTRACTIONS_TABLE = """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've couldnt've>couldn't've
didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've hadn'tve>hadn't've hasnt>hasn't
havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's Id've>I'd've
I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am
mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at
shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've shouldnt>shouldn't
shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've
somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's someoned>someone'd
someoned've>someone'd've someone'dve>someone'd've someonell>someone'll someones>someone's somethingd>something'd
somethingd've>something'd've something'dve>something'd've somethingll>something'll thats>that's thered>there'd
thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd theyd've>they'd've
they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've
we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's
whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll
whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've
y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've youll>you'll
youre>you're youve>you've
"""
_CONTRACTIONS = dict(pair.split(">") for pair in _CONTRACTIONS_TABLE.split())
# textbook: the reversed entry fixed (the intended direction, as in the original VQA evaluation).
_CONTRACTIONS_TEXTBOOK = {**{k: v for k, v in _CONTRACTIONS.items() if k != "somebody'd"},
                          "somebodyd": "somebody'd"}


def _tokenize(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str, *, textbook: bool) -> str:
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The test looks at the text as it was before any replacement (official behaviour).
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=0 if textbook else _OFFICIAL_PERIOD_COUNT)


def _digits_articles_contractions(text: str, *, textbook: bool) -> str:
    table = _CONTRACTIONS_TEXTBOOK if textbook else _CONTRACTIONS
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(table.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str, *, textbook: bool = False) -> str:
    """The EvalAI-normalised form of an answer (prediction or reference alike)."""
    text = _tokenize(text)
    text = _punctuation(text, textbook=textbook)
    return _digits_articles_contractions(text, textbook=textbook)
