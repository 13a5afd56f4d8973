"""eval.metrics: every metric on hand-computed cases, the official quirks by default and their --textbook fixes.

Expected values are worked out by hand from the official definitions (see each metric module's docstring); none is
read back from the implementation.
"""

import math

import pytest

from eval.metrics import METRICS, MetricInputError, compute
from eval.metrics.evalai import normalize_answer


def score(name, records, **kw):
    return compute(name, records, **kw)["score"]


def one(name, prediction, textbook=False, **record):
    return score(name, [{"prediction": prediction, **record}], textbook=textbook)


def test_registry_names_and_result_shape():
    assert list(METRICS) == ["vqa_acc", "anls", "relaxed_acc", "exact_match", "mc_acc", "yesno", "iou_acc"]
    result = compute("exact_match", [{"prediction": "a", "answer": "a"}, {"prediction": "b", "answer": "a"}])
    assert list(result)[:3] == ["metric", "score", "n"] and list(result)[-1] == "per_sample"
    assert (result["metric"], result["score"], result["n"], result["per_sample"]) == ("exact_match", 0.5, 2, [1, 0])
    with pytest.raises(ValueError, match="vqa_acc"):
        compute("bleu", [])
    with pytest.raises(TypeError):
        compute("anls", [{"prediction": "", "answer": ""}], style="mme")
    assert compute("anls", [])["n"] == 0


# --- EvalAI normalisation and vqa_acc -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),          # number words (up to ten)
    ("The dog", "dog"), ("a cat an owl", "cat owl"),                           # articles
    ("red-white", "red white"), ("3 - 4", "3 4"), ("yes!", "yes"),             # punctuation: space or delete
    ("1,000", "1000"), ("what?", "what"),                                      # , and ? always deleted
    ("3.5", "3.5"), ("5.", "5"), ("end.", "end"),                              # a period before a digit stays
    ("dont", "don't"), ("Isnt it", "isn't it"), ("man's", "man 's"),           # contractions, 's split
    ("  Multi\nLine\t", "multi line"), ("", ""),
])
def test_evalai_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_evalai_quirks_and_textbook():
    # re.UNICODE (32) passed as `count`: only the first 32 periods not followed by a digit are deleted.
    assert normalize_answer("." * 33 + "yes") == ".yes"
    assert normalize_answer("." * 33 + "yes", textbook=True) == "yes"
    assert normalize_answer("somebody'd") == "somebodyd"
    assert normalize_answer("somebodyd", textbook=True) == "somebody'd"


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_acc_ten_answers_leave_one_out(k, expected):
    # k of 10 annotators gave the prediction: (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10.
    answers = ["two"] * k + ["three"] * (10 - k)
    assert one("vqa_acc", "2", answers=answers) == pytest.approx(expected)


def test_vqa_acc_fewer_answers():
    assert one("vqa_acc", "The Dog.", answer="dog") == 1.0          # one reference: exact match after normalising
    assert one("vqa_acc", "dogs", answer="dog") == 0.0
    assert one("vqa_acc", "Two dogs", answers=["2 dogs"]) == 1.0
    # three references, two agree with the prediction: (1/3 + 1/3 + 2/3) / 3
    assert one("vqa_acc", "cat", answers=["cat", "Cat!", "dog"]) == pytest.approx(4 / 9)


def test_vqa_acc_corner_cases_and_mean():
    records = [
        {"prediction": "", "answer": "yes"},                             # empty prediction
        {"prediction": "dont know", "answer": "don't know"},             # contraction
        {"prediction": "A red-white flag", "answer": "red white flag"},  # article + hyphen
        {"prediction": "3.5", "answer": "35"},                           # decimal point kept
    ]
    result = compute("vqa_acc", records)
    assert result["per_sample"] == [0.0, 1.0, 1.0, 0.0]
    assert result["score"] == 0.5 and result["n"] == 4
    thirty_three = "." * 33 + "yes"
    assert one("vqa_acc", thirty_three, answer="yes") == 0.0
    assert one("vqa_acc", thirty_three, textbook=True, answer="yes") == 1.0


# --- anls -------------------------------------------------------------------------------------------------------

def test_anls_hand_computed():
    assert one("anls", "Yes", answer="yes") == 1.0
    assert one("anls", "helo", answer="hello") == pytest.approx(0.8)          # 1 - 1/5
    assert one("anls", "abc", answer="abcdef") == pytest.approx(0.5)          # 1 - 3/6, threshold keeps 0.5
    assert one("anls", "ab", answer="abcdef") == 0.0                          # 1 - 4/6 < 0.5
    assert one("anls", "hello", answers=["world", "hello"]) == 1.0           # best reference
    assert one("anls", "", answer="abc") == 0.0                               # empty prediction
    assert one("anls", "", answer="") == 1.0                                  # both empty: distance 0
    assert one("anls", "New   York", answer="new york") == 1.0               # whitespace collapsed, lower case


def test_anls_raw_length_quirk_and_textbook():
    # distance over normalised "yes." vs "yes" = 1; official denominator = raw lengths max(4, 5) = 5.
    assert one("anls", " Yes ", answer="yes.") == pytest.approx(0.8)
    assert one("anls", " Yes ", textbook=True, answer="yes.") == pytest.approx(0.75)


def test_anls_raw_mean_extra():
    result = compute("anls", [{"prediction": "ab", "answer": "abcdef"}, {"prediction": "x", "answer": "x"}])
    assert result["score"] == 0.5                                             # (0 + 1) / 2
    assert result["anls_raw"] == pytest.approx((1 / 3 + 1) / 2)


# --- relaxed_acc ------------------------------------------------------------------------------------------------

def test_relaxed_acc_numbers_percent_and_text():
    assert one("relaxed_acc", "12", answer="12.4") == 1.0                    # |12.4-12|/12 = 0.033
    assert one("relaxed_acc", "45%", answer="0.45") == 1.0                   # trailing % -> /100
    assert one("relaxed_acc", "45%", answer="45") == 0.0                     # 0.45 vs 45
    assert one("relaxed_acc", " Yes ", answer="yes") == 1.0                  # text: stripped, case-insensitive
    assert one("relaxed_acc", "Paris.", answer="Paris") == 0.0
    assert one("relaxed_acc", "12", answers=["twelve", "12.5"]) == 1.0       # any reference
    assert one("relaxed_acc", "", answer="3") == 0.0                          # empty prediction


def test_relaxed_acc_swapped_argument_quirk():
    # default: tolerance relative to the PREDICTION (official call relaxed_correctness(pred, annotation))
    assert one("relaxed_acc", "95", answer="100") == 0.0                     # 5 / 95 = 0.0526
    assert one("relaxed_acc", "95", textbook=True, answer="100") == 1.0      # 5 / 100 = 0.05
    assert one("relaxed_acc", "105.2", answer="100") == 1.0                  # 5.2 / 105.2 = 0.0494
    assert one("relaxed_acc", "105.2", textbook=True, answer="100") == 0.0   # 5.2 / 100
    # a zero prediction falls back to string equality; a reference with blanks only matches numerically
    assert one("relaxed_acc", "0", answer="0.0") == 0.0
    assert one("relaxed_acc", "0", textbook=True, answer="0.0") == 1.0
    assert one("relaxed_acc", "yes", answer=" yes") == 0.0
    assert one("relaxed_acc", "yes", textbook=True, answer=" yes") == 1.0


# --- exact_match ------------------------------------------------------------------------------------------------

def test_exact_match_strip_lower_only():
    assert one("exact_match", "  PARIS ", answer="paris") == 1.0
    assert one("exact_match", "Paris.", answer="paris") == 0.0
    assert one("exact_match", "two", answer="2") == 0.0
    assert one("exact_match", "b", answers=["a", "B"]) == 1.0
    assert one("exact_match", "", answer="a") == 0.0
    # textbook: EvalAI normalisation on both sides
    assert one("exact_match", "Paris.", textbook=True, answer="paris") == 1.0
    assert one("exact_match", "The two", textbook=True, answer="2") == 1.0


# --- mc_acc -----------------------------------------------------------------------------------------------------

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


def mc(prediction, answer="B", textbook=False, options=OPTIONS):
    return one("mc_acc", prediction, textbook=textbook, answer=answer, options=options)


@pytest.mark.parametrize("prediction", ["B", "B.", "(B)", "The answer is B", "blue", "It is blue.", "It is Blue",
                                        "B is right because of its colour and shape", " B\n"])
def test_mc_acc_forms_that_count(prediction):
    assert mc(prediction) == 1.0
    assert mc(prediction, textbook=True) == 1.0


def test_mc_acc_official_quirks_and_textbook():
    assert mc("A blue one") == 0.0                       # first character "A" is an option letter -> A
    assert mc("A blue one", textbook=True) == 1.0        # "A" before a lower-case word is the article
    assert mc("b") == 0.0                                # one character is returned as is; "b" is no option
    assert mc("b", textbook=True) == 1.0
    late = "I think the answer is B because of its colour and shape"
    assert mc(late) == 0.0                               # B not among the last four words, text too long
    assert mc(late, textbook=True) == 1.0
    shades = {"A": "red", "B": "dark red"}
    assert mc("dark red", options=shades) == 0.0         # first option whose text occurs: "red" -> A
    assert mc("dark red", textbook=True, options=shades) == 1.0   # longest containing match


def test_mc_acc_answer_as_text_list_options_and_extras():
    assert mc("B", answer="blue") == 1.0
    assert mc("B", answer="Blue") == 1.0
    assert one("mc_acc", "C", answer="C", options=["x", "y", "z"]) == 1.0
    result = compute("mc_acc", [
        {"prediction": "(C)", "answer": "C", "options": OPTIONS},     # letter from the fallback stage
        {"prediction": "", "answer": "A", "options": OPTIONS},        # empty: no letter, no crash
        {"prediction": "C", "answer": "C", "options": OPTIONS},
    ])
    assert result["per_sample"] == [1.0, 0.0, 1.0]
    assert (result["n_fallback"], result["n_no_letter"]) == (1, 1)


def test_mc_acc_can_infer_refusals_and_api_failure_marker():
    # Stage 1 (post_process) finds no letter in any of these: the first character is no option letter and no option
    # text occurs case-sensitively. So VLMEvalKit's can_infer decides.
    # A refusal phrase ends with no letter although "B" is the last word:
    assert mc("So: Cannot determine the answer, B") == 0.0
    # No option letter but a word "Z": the explicit "no answer"; the option text ("blue") is not tried.
    assert mc("Z Blue") == 0.0
    # The API-failure marker skips the letter stage and goes straight to the option texts: "B" as the last word
    # does not count and no option text occurs, so no letter...
    assert mc("Failed to obtain answer via API B") == 0.0
    # ...while an option text still decides: "blue" occurs (case-insensitive) and the 36 characters are within
    # 2 * (3 + 4 + 5 + 6) = 36, so B.
    assert mc("Failed to obtain answer via API Blue") == 1.0
    # Without the marker the same shape is read by its last word (B is 7th of 7 words, after position 7 - 5).
    assert mc("Failed to get an answer here B") == 1.0


def test_mc_acc_input_errors():
    with pytest.raises(MetricInputError, match="options") as info:
        compute("mc_acc", [{"prediction": "A", "answer": "A", "options": OPTIONS}, {"prediction": "A", "answer": "A"}])
    assert info.value.index == 1
    with pytest.raises(MetricInputError, match="neither an option letter"):
        mc("A", answer="purple")


# --- yesno: POPE and MME ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, expected", [
    ("No", 0.0), ("no.", 0.0), ("No, there is not.", 0.0), ("There is no dog.", 0.0), ("Yes", 1.0),
    ("Yes, there is a dog", 1.0), ("NO", 1.0), ("Not really", 1.0), ("Nope", 1.0), ("", 1.0), ("No\n", 1.0),
    ("Yes. There is no dog", 1.0),        # only the first sentence counts
])
def test_pope_parsing_is_official(prediction, expected):
    # score against the label "yes": 1.0 means the answer was read as yes
    assert one("yesno", prediction, answer="yes") == expected


@pytest.mark.parametrize("prediction, label", [("NO", "no"), ("Not really", "no"), ("Nope", "unknown"),
                                               ("", "unknown"), ("The answer is yes.", "yes"),
                                               ("It isn't", "no"), ("Yes, there is no dog", "yes")])
def test_yesno_textbook_parsing(prediction, label):
    got_yes = one("yesno", prediction, textbook=True, answer="yes")
    got_no = one("yesno", prediction, textbook=True, answer="no")
    assert (got_yes, got_no) == {"yes": (1.0, 0.0), "no": (0.0, 1.0), "unknown": (0.0, 0.0)}[label]


def test_pope_figures_per_category_and_overall_f1():
    records = [
        {"prediction": "Yes", "answer": "yes", "category": "adversarial"},   # TP
        {"prediction": "No", "answer": "no", "category": "adversarial"},     # TN
        {"prediction": "NO", "answer": "no", "category": "adversarial"},     # read as yes: FP
        {"prediction": "no", "answer": "yes", "category": "random"},         # FN
        {"prediction": "No.", "answer": "no", "category": "random"},         # TN
    ]
    result = compute("yesno", records)
    assert result["score"] == pytest.approx(3 / 5)
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert result["yes_ratio"] == pytest.approx(2 / 5)
    adversarial, random_ = result["per_category"]["adversarial"], result["per_category"]["random"]
    assert (adversarial["precision"], adversarial["recall"], adversarial["f1"]) == pytest.approx((0.5, 1, 2 / 3))
    assert (random_["precision"], random_["recall"], random_["f1"]) == (0.0, 0.0, 0.0)  # no yes: 0, not a crash
    assert result["overall_f1"] == pytest.approx((2 / 3 + 0) / 2)                       # mean of category F1s
    assert result["per_sample"] == [1.0, 1.0, 0.0, 0.0, 1.0]
    uncategorised = compute("yesno", [{k: v for k, v in r.items() if k != "category"} for r in records])
    assert "per_category" not in uncategorised
    assert uncategorised["overall_f1"] == uncategorised["f1"] == pytest.approx(0.5)  # one implicit category


def test_pope_labels_other_than_no_are_positive(caplog):
    assert one("yesno", "no", answer="No") == 0.0          # official: only "no" is negative
    assert "not exactly 'yes' or 'no'" in caplog.text
    assert one("yesno", "no", textbook=True, answer="No") == 1.0
    with pytest.raises(MetricInputError, match="yes or no"):
        one("yesno", "no", textbook=True, answer="maybe")


@pytest.mark.parametrize("prediction, label", [
    ("Yes", "yes"), ("是", "yes"), ("不是", "no"), ("否", "no"), ("True", "yes"), ("false", "no"),
    ("yes, it is", "yes"), ("The answer is yes", "other"), ("none", "no"), (" no", "no"), ("  yes", "other"),
    ("", "other"),
])
def test_mme_parsing_is_official(prediction, label):
    got = [score("yesno", [{"prediction": prediction, "answer": gold}], style="mme") for gold in ("Yes", "No")]
    assert got == {"yes": [1.0, 0.0], "no": [0.0, 1.0], "other": [0.0, 0.0]}[label]


def test_mme_acc_plus_task_scores():
    records = [
        {"prediction": "Yes", "answer": "Yes", "category": "existence", "image": "1.jpg"},
        {"prediction": "No", "answer": "No", "category": "existence", "image": "1.jpg"},
        {"prediction": "Yes", "answer": "Yes", "category": "existence", "image": "2.jpg"},
        {"prediction": "Yes", "answer": "No", "category": "existence", "image": "2.jpg"},
        {"prediction": "yes", "answer": "yes", "category": "OCR", "image": "3.jpg"},
        {"prediction": "no", "answer": "no", "category": "OCR", "image": "3.jpg"},
    ]
    result = compute("yesno", records, style="mme")
    assert result["score"] == pytest.approx(5 / 6)
    assert result["acc_plus"] == pytest.approx(2 / 3)
    existence = result["per_category"]["existence"]
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == pytest.approx((0.75, 0.5, 125.0))
    assert result["per_category"]["OCR"]["score"] == pytest.approx(200.0)
    assert result["mme_score"] == pytest.approx(325.0)
    assert result["perception"] == pytest.approx(325.0) and "cognition" not in result
    # without "image": consecutive pairs of a category are an image, as the official file order assumes
    no_images = [{k: v for k, v in r.items() if k != "image"} for r in records]
    assert compute("yesno", no_images, style="mme")["mme_score"] == pytest.approx(325.0)
    # without categories: one task
    plain = [{"prediction": r["prediction"], "answer": r["answer"], "image": r["image"]} for r in records]
    assert compute("yesno", plain, style="mme")["mme_score"] == pytest.approx((5 / 6 + 2 / 3) * 100)


def test_mme_tab_quirk_and_bad_label():
    records = [{"prediction": "yes\tindeed", "answer": "yes", "image": "1"},
               {"prediction": "no", "answer": "no", "image": "1"},
               {"prediction": "no", "answer": "no", "image": "2"}]
    result = compute("yesno", records, style="mme")
    assert result["score"] == 1.0                  # the tab line is skipped by the official tool: 2/2 answered
    assert result["acc_plus"] == pytest.approx(0.5)
    assert result["per_sample"] == [0.0, 1.0, 1.0]
    with pytest.raises(MetricInputError, match="yes or no"):
        compute("yesno", [{"prediction": "yes", "answer": "maybe"}], style="mme")
    with pytest.raises(ValueError, match="style"):
        compute("yesno", records, style="hallusion")


# --- iou_acc ----------------------------------------------------------------------------------------------------

W, H, GT = 200, 100, [20, 10, 120, 60]      # the reference box in pixels: 100 x 50


def box(prediction, textbook=False, answer=GT, width=W, height=H):
    return compute("iou_acc", [{"prediction": prediction, "answer": answer, "width": width, "height": height}],
                   textbook=textbook)


@pytest.mark.parametrize("prediction", ["<box>[[100, 100, 600, 600]]</box>", "[[100,100,600,600]]",
                                        "the dog <box>[[100, 100, 600, 600]]</box> left", "[100, 100, 600, 600]",
                                        "[[0.1, 0.1, 0.6, 0.6]]"])
def test_iou_acc_both_box_forms_and_coordinate_styles(prediction):
    result = box(prediction)
    assert (result["score"], result["mean_iou"]) == (1.0, pytest.approx(1.0))


def test_iou_acc_threshold_and_mean():
    half = box("[[100, 100, 350, 600]]")     # 50 x 50 inside the reference: IoU 2500 / 5000
    assert (half["score"], half["mean_iou"]) == (1.0, pytest.approx(0.5))
    less = box("[[100, 100, 340, 600]]")     # 48 x 50: IoU 0.48
    assert (less["score"], less["mean_iou"]) == (0.0, pytest.approx(0.48))
    records = [{"prediction": p, "answer": GT, "width": W, "height": H}
               for p in ("[[100,100,600,600]]", "[[100,100,350,600]]", "[[100,100,340,600]]", "")]
    result = compute("iou_acc", records)
    assert result["score"] == 0.5
    assert result["mean_iou"] == pytest.approx((1 + 0.5 + 0.48 + 0) / 4)
    assert result["n_unparsed"] == 1


def test_iou_acc_unparseable_and_quirks():
    for bad in ("", "a dog", "[[x, y, z, w]]", "[[100, 100, 600, 600, 7]]"):
        result = box(bad)
        assert (result["score"], result["mean_iou"], result["n_unparsed"]) == (0.0, 0.0, 1)
    # sum < 4 -> read as fractions: a tiny 0-1000 box near the origin becomes the whole image (and more)
    tiny = {"answer": [0, 0, 1, 2], "width": 1000, "height": 1000}
    assert box("[[0, 0, 1, 2]]", **tiny)["score"] == 0.0
    assert box("[[0, 0, 1, 2]]", textbook=True, **tiny)["score"] == 1.0
    # swapped corners: no reordering by default
    assert box("[[600, 600, 100, 100]]")["score"] == 0.0
    assert box("[[600, 600, 100, 100]]", textbook=True)["score"] == 1.0


def test_iou_acc_float32_arithmetic():
    # 1/3 of the width in the 0-1000 grid: float32 rounding must not turn the exact-looking cases into NaN or > 1
    result = box("[[333, 0, 667, 1000]]", answer=[0, 0, 300, 300], width=300, height=300)
    assert 0.33 < result["mean_iou"] < 0.34 and not math.isnan(result["mean_iou"])
    zero_area = box("nothing", answer=[5, 5, 5, 5])          # 0/0 in the official torch code: NaN, not >= 0.5
    assert (zero_area["score"], zero_area["mean_iou"]) == (0.0, 0.0)


def test_iou_acc_input_errors():
    with pytest.raises(MetricInputError, match="width"):
        compute("iou_acc", [{"prediction": "", "answer": GT, "height": H}])
    with pytest.raises(MetricInputError, match="4 numbers"):
        compute("iou_acc", [{"prediction": "", "answer": [1, 2, 3], "width": W, "height": H}])
    with pytest.raises(MetricInputError, match="4 numbers"):
        compute("iou_acc", [{"prediction": "", "answer": [1, 2, 3, True], "width": W, "height": H}])
    # A JSON integer beyond the float range is an input error, not an OverflowError from math.isfinite.
    with pytest.raises(MetricInputError, match="4 numbers"):
        compute("iou_acc", [{"prediction": "", "answer": [1, 2, 3, 10 ** 400], "width": W, "height": H}])
    with pytest.raises(MetricInputError, match="width"):
        compute("iou_acc", [{"prediction": "", "answer": GT, "width": 10 ** 400, "height": H}])


# --- shared input checks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, message", [
    ({"answer": "a"}, "prediction"),
    ({"prediction": 3, "answer": "a"}, "prediction"),
    ({"prediction": "a"}, "answers"),
    ({"prediction": "a", "answers": "a"}, "list of strings"),
    ({"prediction": "a", "answers": ["a", 1]}, "list of strings"),
    ({"prediction": "a", "answers": []}, "empty"),
    ({"prediction": "a", "answer": 1}, "string"),
])
def test_malformed_records_name_their_index(record, message):
    for name in ("vqa_acc", "anls", "relaxed_acc", "exact_match"):
        with pytest.raises(MetricInputError, match=message) as info:
            compute(name, [{"prediction": "x", "answer": "x"}, record])
        assert info.value.index == 1


@pytest.mark.parametrize("name, extra", [("vqa_acc", {"answer": "a"}), ("anls", {"answer": "a"}),
                                         ("relaxed_acc", {"answer": "a"}), ("exact_match", {"answer": "a"}),
                                         ("mc_acc", {"answer": "A", "options": OPTIONS}),
                                         ("yesno", {"answer": "yes"}),
                                         ("iou_acc", {"answer": GT, "width": W, "height": H})])
def test_every_metric_scores_an_empty_prediction(name, extra):
    result = compute(name, [{"prediction": "", **extra}])
    assert 0.0 <= result["score"] <= 1.0 and result["n"] == 1 and len(result["per_sample"]) == 1
