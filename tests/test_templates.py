"""Templates and label masks against the official preprocessing outputs in ``tests/fixtures``.

Clean fixture cases (no ``error``, no mismatch warning) must be token-identical. Where the official code raised or
fell back to all -100 labels, ``OUR_BEHAVIOUR`` records what we do instead; cases not listed there (e.g. a larger
fixture set) get the generic check: a ``ValueError``, or the official ``input_ids`` with every assistant reply
supervised.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

from internvl_chat.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_chat.data.templates import (
    TEMPLATE_NAMES,
    SampleTooLongError,
    Template,
    get_template,
    image_block,
    tokenize_conversation,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER_DIRS = {"qwen2": "tokenizer_qwen2", "bos": "tokenizer_bos"}
TRAINING_TEMPLATES = ("Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5")

# What we do where the official preprocessing raised or dropped every label: (case id, template) -> behaviour,
# for both tokenizers unless a tokenizer is named. "supervise": official input_ids (when it produced any) with every
# assistant reply supervised; "ValueError: <text>": we refuse the sample with a message containing <text>.
_SUPERVISE = "supervise"
OUR_BEHAVIOUR: dict[tuple[str, str] | tuple[str, str, str], str] = {
    # Official KeyError 'system': we honour a leading system turn everywhere.
    **{("empty_system_message", t): _SUPERVISE for t in ("Hermes-2", "internlm2-chat", "phi3-chat", "internvl_zh")},
    # Official AssertionError on two user turns in a row (internvl2_5 accepted them): we accept them everywhere.
    **{("two_humans_in_a_row", t): _SUPERVISE for t in ("Hermes-2", "internlm2-chat", "phi3-chat", "internvl_zh")},
    # Official mismatch: "<|im_end|>"/"<|end|>" written in the user text broke the turn splitter.
    **{("special_token_in_text", t): _SUPERVISE for t in ("Hermes-2", "internlm2-chat", "phi3-chat", "internvl_zh")},
    # Official mismatch: Hermes-2 counted a BOS in every round; phi3 offset corrections failed on multi-turn.
    ("multi_turn_3", "Hermes-2", "bos"): _SUPERVISE,
    ("pure_text_multi_turn", "Hermes-2", "bos"): _SUPERVISE,
    ("multi_turn_3", "phi3-chat"): _SUPERVISE,
    ("pure_text_multi_turn", "phi3-chat"): _SUPERVISE,
    # Official mismatch: internlm2-chat assumed a BOS, so it failed for every sample with a Qwen2 tokenizer.
    **{
        (case, "internlm2-chat", "qwen2"): _SUPERVISE
        for case in (
            "single_image", "image_placeholder_missing", "multi_turn_3", "video_frames_4", "pure_text_multi_turn",
            "pure_text_with_image_tag", "grounding_ref_box", "grounding_detect_all", "grounding_quad",
            "unicode_chinese", "whitespace_padding", "newlines_and_code",
        )
    },
    # Official AssertionError "0 != 1": one image, no <image> placeholder in the user turns.
    ("image_placeholder_missing", "internvl2_5"): "ValueError: placeholder",
    # Official generic preprocess never matched the internvl_zh format: every sample dropped. We train it.
    **{
        (case, "internvl_zh"): _SUPERVISE
        for case in (
            "single_image", "image_placeholder_missing", "multi_turn_3", "video_frames_4", "pure_text_multi_turn",
            "pure_text_with_image_tag", "grounding_ref_box", "grounding_detect_all", "grounding_quad",
            "unicode_chinese", "whitespace_padding", "newlines_and_code", "truncated_max_length_300",
        )
    },
}


@functools.lru_cache(maxsize=None)
def tokenizer(flavour: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / TOKENIZER_DIRS[flavour])


@functools.lru_cache(maxsize=None)
def load_json(relative: str):
    return json.loads((FIXTURES / relative).read_text(encoding="utf-8"))


def preprocess_cases() -> list[dict]:
    return load_json("data/preprocess.json")["results"]


def is_clean(case: dict) -> bool:
    return case.get("error") is None and not case.get("stdout")


def case_param_id(case: dict) -> str:
    return f"{case['id']}-{case['template']}-{case['tokenizer']}"


def run_case(case: dict):
    return tokenize_conversation(
        case["conversation"],
        case["template"],
        tokenizer(case["tokenizer"]),
        case["num_image_token_list"],
        max_length=case["model_max_length"],
        text_only=case["text_only"],
    )


def official_unpadded(case: dict) -> tuple[list[int], list[int]]:
    """The official ids/labels without the padding it added when neither group_by_length nor packing was on."""
    ids, labels = list(case["input_ids"]), list(case["labels"])
    if case["group_by_length"] or case["use_packed_ds"]:
        return ids, labels
    pad = tokenizer(case["tokenizer"]).pad_token_id
    tokens = len(ids)
    # Padding fills up to model_max_length; the side the official call used is recorded per case.
    if case["padding_side_after"] == "left":
        while ids and ids[0] == pad and labels[0] == IGNORE_INDEX:
            ids, labels = ids[1:], labels[1:]
    else:
        while ids and ids[-1] == pad and labels[-1] == IGNORE_INDEX:
            ids, labels = ids[:-1], labels[:-1]
    assert tokens == case["model_max_length"] or len(ids) == tokens
    return ids, labels


def expected_replies(case_conversation: list[dict], template: str) -> list[str]:
    """The text each assistant turn should supervise, derived from the conversation alone."""
    tpl = get_template(template)
    turns = [t for t in case_conversation if t["from"] != "system"]
    if template != "internvl2_5" and turns and turns[0]["from"] in ("gpt", "assistant"):
        turns = turns[1:]  # official rule kept: a leading assistant turn is dropped
    replies = []
    for turn in turns:
        if turn["from"] not in ("gpt", "assistant"):
            continue
        text = turn["value"].strip() if template == "internlm2-chat" else turn["value"]
        replies.append((" " if tpl.style == "internvl_zh" else "") + text + tpl.stop_str)
    return replies


def image_token_ids(tok) -> tuple[int, int, int]:
    return tuple(tok.convert_tokens_to_ids(t) for t in (IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN))


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return runs


def assert_replies_supervised(case: dict, ids: list[int], labels: list[int], truncated: bool) -> None:
    """Each supervised run decodes to one assistant reply (a merged leading whitespace may sit in the header)."""
    tok = tokenizer(case["tokenizer"])
    decoded = [tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for run in supervised_runs(ids, labels)]
    expected = expected_replies(case["conversation"], case["template"])
    if truncated:
        assert 1 <= len(decoded) <= len(expected)
        expected = expected[: len(decoded)]
        expected[-1] = expected[-1][: len(expected[-1]) - len(expected[-1].lstrip()) + len(decoded[-1])]
    assert len(decoded) == len(expected), (decoded, expected)
    for got, want in zip(decoded, expected):
        assert want.endswith(got) and not want[: len(want) - len(got)].strip(), (got, want)


# ----------------------------------------------------------------------------------------------------------------
# Fixture parity


CLEAN = [c for c in preprocess_cases() if is_clean(c)]
NOT_CLEAN = [c for c in preprocess_cases() if not is_clean(c)]


def test_fixture_covers_all_training_templates_and_tokenizers():
    covered = {(c["template"], c["tokenizer"]) for c in CLEAN}
    assert covered >= {(t, k) for t in TRAINING_TEMPLATES for k in TOKENIZER_DIRS}


@pytest.mark.parametrize("case", CLEAN, ids=case_param_id)
def test_clean_cases_identical(case):
    out = run_case(case)
    ids, labels = official_unpadded(case)
    assert out["input_ids"] == ids
    assert out["labels"] == labels


@pytest.mark.parametrize("case", CLEAN, ids=case_param_id)
def test_reply_oracle_agrees_with_official_labels(case):
    """The independent oracle used for the non-clean cases reads the official clean labels the same way."""
    ids, labels = official_unpadded(case)
    assert_replies_supervised(case, ids, labels, truncated=len(ids) == case["model_max_length"])


def our_behaviour(case: dict) -> str | None:
    return OUR_BEHAVIOUR.get((case["id"], case["template"], case["tokenizer"])) or OUR_BEHAVIOUR.get(
        (case["id"], case["template"])
    )


def test_behaviour_table_lists_only_non_clean_cases():
    clean_keys = {(c["id"], c["template"], c["tokenizer"]) for c in CLEAN}
    for key in OUR_BEHAVIOUR:
        tokenizers = [key[2]] if len(key) == 3 else list(TOKENIZER_DIRS)
        for flavour in tokenizers:
            assert (key[0], key[1], flavour) not in clean_keys, key


@pytest.mark.parametrize("case", NOT_CLEAN, ids=case_param_id)
def test_official_error_and_mismatch_cases(case):
    behaviour = our_behaviour(case)
    if behaviour is not None and behaviour.startswith("ValueError"):
        with pytest.raises(ValueError, match=behaviour.split(": ", 1)[1]):
            run_case(case)
        return
    try:
        out = run_case(case)
    except ValueError as error:  # a case we have not pinned may be refused, but only with a message
        assert behaviour is None and str(error)
        return
    ids, labels = out["input_ids"], out["labels"]
    if case.get("input_ids") is not None:
        assert ids == official_unpadded(case)[0]
    assert any(label != IGNORE_INDEX for label in labels)
    assert_replies_supervised(case, ids, labels, truncated=len(ids) == case["model_max_length"])


def test_dataset_items_identical():
    """End-to-end official dataset items, multi-image included (tile counts read from the official ids)."""
    items = load_json("data/dataset_items.json")["items"]
    for item in items:
        tok = tokenizer(item["tokenizer"])
        start, context, end = image_token_ids(tok)
        counts, current = [], 0
        for token in item["input_ids"]:
            if token == start:
                current = 0
            elif token == context:
                current += 1
            elif token == end:
                counts.append(current)
        out = tokenize_conversation(item["annotation"]["conversations"], item["template"], tok, counts)
        assert out["input_ids"] == item["input_ids"], item["id"]
        assert out["labels"] == item["labels"], item["id"]


@pytest.mark.parametrize("model", ["qwen2_hermes2", "qwen2_internvl2_5"])
def test_model_fixture_training_sample(model):
    reference = load_json(f"{model}/reference.json")
    forward = reference["forward"]
    tok = tokenizer_for_model(model)
    n_context = forward["input_ids"].count(reference["img_context_token_id"])
    out = tokenize_conversation(forward["conversation"], reference["template"], tok, n_context)
    assert out["input_ids"] == forward["input_ids"]
    assert out["labels"] == forward["labels"]


# ----------------------------------------------------------------------------------------------------------------
# Generation prompts (chat API contract)


@functools.lru_cache(maxsize=None)
def tokenizer_for_model(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / model)


def expand_compressed(text: str) -> str:
    """``<IMG_CONTEXT>*512`` in the stored prompt text means 512 repetitions."""
    return re.sub(r"(<[^<>]+>)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)


def chat_prompt(template: Template, history, question: str, num_patches: int, num_image_token: int) -> str:
    """The official chat() recipe: '<image>\\n' prepended to a first question without one, history replayed."""
    if not history and "<image>" not in question:
        question = "<image>\n" + question
    messages = []
    for old_question, old_answer in history or []:
        messages += [(template.roles[0], old_question), (template.roles[1], old_answer)]
    messages += [(template.roles[0], question), (template.roles[1], None)]
    return template.render(messages).replace("<image>", image_block(num_image_token * num_patches), 1)


@pytest.mark.parametrize(
    "model,template_name",
    [("qwen2_hermes2", "Hermes-2"), ("qwen2_hermes2", "internlm2-chat"), ("qwen2_internvl2_5", "internvl2_5")],
)
def test_render_generation_prompts_match_reference(model, template_name):
    """Hermes-2 and internlm2-chat are the same prompt at inference, so both are checked on the Hermes-2 model."""
    reference = load_json(f"{model}/reference.json")
    template = get_template(template_name)
    tok = tokenizer_for_model(model)
    n_token = reference["num_image_token"]
    for call in reference["generation"]["calls"]:
        assert tok.convert_tokens_to_ids(template.stop_str) == call["eos_token_id"]
        if call["kind"] == "batch_chat":
            prompts = [chat_prompt(template, None, q, n, n_token)
                       for q, n in zip(call["questions"], call["num_patches_list"])]
        else:
            prompts = [chat_prompt(template, call.get("history"), call["question"], call["num_patches_list"][0],
                                   n_token)]
        for prompt, stored, ids, mask in zip(prompts, call["prompt_text"], call["input_ids"], call["attention_mask"]):
            stored = expand_compressed(stored)
            padding = re.match(f"(?:{re.escape(tok.pad_token)})*", stored).end()  # batch_chat pads left
            assert prompt == stored[padding:]
            assert tok(prompt)["input_ids"] == [i for i, m in zip(ids, mask) if m]


@pytest.mark.parametrize("template_name", sorted({case["template"] for case in preprocess_cases()}))
@pytest.mark.parametrize("flavour", list(TOKENIZER_DIRS))
def test_generation_prompt_is_prefix_of_training_sample(template_name, flavour):
    """For every template of the fixtures, the generation prompt tokenizes to the official training ids before the
    reply (internvl3_5_gpt_oss: tests/test_gpt_oss_template.py)."""
    case = next(c for c in preprocess_cases()
                if (c["id"], c["template"], c["tokenizer"]) == ("single_image", template_name, flavour))
    template = get_template(template_name)
    tok = tokenizer(flavour)
    question, answer = (turn["value"] for turn in case["conversation"])
    prompt = template.render([(template.roles[0], question), (template.roles[1], None)])
    prompt = prompt.replace("<image>", image_block(case["num_image_token_list"][0]), 1)
    prompt_ids = tok(prompt)["input_ids"]
    official = case["input_ids"]
    assert official[: len(prompt_ids)] == prompt_ids
    rest = tok.decode(official[len(prompt_ids):], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert rest.startswith(expected_replies(case["conversation"], template_name)[0])


# ----------------------------------------------------------------------------------------------------------------
# Registry and render


def test_registry():
    assert set(TEMPLATE_NAMES) >= {"Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5", "internvl_zh"}
    for name in TEMPLATE_NAMES:
        assert get_template(name).name == name
    with pytest.raises(ValueError, match="internvl2_5") as error:
        get_template("internvl2.5")
    assert "internvl2.5" in str(error.value)


@pytest.mark.parametrize("template_name", [name for name in TEMPLATE_NAMES if name != "internvl3_5_gpt_oss"])
def test_stop_str_is_one_token(template_name):  # the harmony template's: tests/test_gpt_oss_template.py
    template = get_template(template_name)
    tok = tokenizer("qwen2")
    assert len(tok(template.stop_str, add_special_tokens=False)["input_ids"]) == 1
    assert template.stop_str == template.sep.strip()


def test_render_none_is_generation_slot_and_empty_string_is_a_message():
    template = get_template("internvl2_5")
    user, assistant = template.roles
    slot = template.render([(user, "Q"), (assistant, None)], system_message="S")
    assert slot.endswith(template.sep + assistant)
    empty = template.render([(user, "Q"), (assistant, "")], system_message="S")
    assert empty == slot + template.sep
    zh = get_template("internvl_zh")
    zh_prompt = zh.render([(zh.roles[0], "Q"), (zh.roles[1], None)])
    assert zh_prompt.endswith(zh.roles[0] + ": Q" + zh.sep2 + zh.roles[1] + ":")


# ----------------------------------------------------------------------------------------------------------------
# Roles, system turn, turn order


def simple_conversation(user_role="human", assistant_role="gpt"):
    return [{"from": user_role, "value": "<image>\nWhat is this?"}, {"from": assistant_role, "value": "A bird."}]


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
def test_role_aliases(template_name):
    tok = tokenizer("bos")
    reference = tokenize_conversation(simple_conversation(), template_name, tok, 256)
    assert tokenize_conversation(simple_conversation("user", "assistant"), template_name, tok, 256) == reference
    assert tokenize_conversation(simple_conversation(), get_template(template_name), tok, [256]) == reference


@pytest.mark.parametrize(
    "conversation,message",
    [
        ([], "empty"),
        ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "robot"),
        ([{"from": "human", "value": "hi"}, {"from": "system", "value": "S"}, {"from": "gpt", "value": "x"}],
         "system turn"),
        ([{"from": "human", "value": "hi"}], "no assistant"),
        ([{"from": "human", "value": None}, {"from": "gpt", "value": "x"}], "non-string"),
        ([{"value": "hi"}], "'from'"),
        ("human: hi", "list of turns"),
    ],
)
def test_bad_conversations_raise(conversation, message):
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(conversation, "Hermes-2", tokenizer("qwen2"), None)


def test_leading_assistant_turn():
    tok = tokenizer("qwen2")
    conversation = [{"from": "gpt", "value": "Hello."}] + simple_conversation()
    # Official rule kept: dropped by the MPT-trained templates, kept and supervised by internvl2_5.
    assert tokenize_conversation(conversation, "Hermes-2", tok, 256) == tokenize_conversation(
        simple_conversation(), "Hermes-2", tok, 256)
    out = tokenize_conversation(conversation, "internvl2_5", tok, 256)
    assert len(supervised_runs(out["input_ids"], out["labels"])) == 2
    with pytest.raises(ValueError, match="no assistant"):
        tokenize_conversation([{"from": "gpt", "value": "Hello."}], "Hermes-2", tok, None)


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
@pytest.mark.parametrize("flavour", list(TOKENIZER_DIRS))
def test_system_turn_is_honoured(template_name, flavour):
    template, tok = get_template(template_name), tokenizer(flavour)
    system = "You are a careful assistant."
    out = tokenize_conversation([{"from": "system", "value": system}] + simple_conversation(), template, tok, 256)
    prompt = template.render([(template.roles[0], "<image>\nWhat is this?"), (template.roles[1], None)],
                             system_message=system).replace("<image>", image_block(256))
    prompt_ids = tok(prompt)["input_ids"]
    assert out["input_ids"][: len(prompt_ids)] == prompt_ids
    assert system in tok.decode(out["input_ids"][: len(prompt_ids)])
    assert template.system_message not in tok.decode(out["input_ids"]) or not template.system_message
    default = tokenize_conversation(simple_conversation(), template, tok, 256)
    if template.system_message:
        assert template.system_message in tok.decode(default["input_ids"])
    assert supervised_runs(out["input_ids"], out["labels"]) == supervised_runs(default["input_ids"], default["labels"])


@pytest.mark.parametrize("flavour", list(TOKENIZER_DIRS))
def test_internvl2_5_keeps_exactly_one_bos(flavour):
    tok = tokenizer(flavour)
    out = tokenize_conversation(simple_conversation() * 2, "internvl2_5", tok, [256, 256])
    expected = 1 if tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id else 0
    bos_positions = [i for i, t in enumerate(out["input_ids"]) if t == tok.bos_token_id]
    assert bos_positions == list(range(expected))
    assert all(label == IGNORE_INDEX for label in out["labels"][: expected + 1])


def test_phi3_never_supervises_endoftext():
    tok = tokenizer("bos")
    conversation = [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": "Here <|endoftext|> it is."}]
    out = tokenize_conversation(conversation, "phi3-chat", tok, None)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    position = out["input_ids"].index(eot)
    assert out["labels"][position] == IGNORE_INDEX
    assert out["labels"][position - 1] != IGNORE_INDEX and out["labels"][position + 1] != IGNORE_INDEX


# ----------------------------------------------------------------------------------------------------------------
# Images


def image_block_lengths(ids: list[int], tok) -> list[int]:
    start, context, end = image_token_ids(tok)
    lengths = []
    for position, token in enumerate(ids):
        if token == start:
            stop = ids.index(end, position)
            assert set(ids[position + 1: stop]) == {context}
            lengths.append(stop - position - 1)
    return lengths


MULTI_IMAGE = [
    {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nCompare."},
    {"from": "gpt", "value": "The first is larger."},
    {"from": "human", "value": "And <image>?"},
    {"from": "gpt", "value": "Smaller."},
]


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
def test_multi_image_counts_in_order(template_name):
    tok = tokenizer("qwen2")
    out = tokenize_conversation(MULTI_IMAGE, template_name, tok, [256, 768, 512])
    assert image_block_lengths(out["input_ids"], tok) == [256, 768, 512]
    assert all(label == IGNORE_INDEX for token, label in zip(out["input_ids"], out["labels"])
               if token == tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))
    assert len(supervised_runs(out["input_ids"], out["labels"])) == 2


def test_image_count_mismatch_and_misplaced_placeholders():
    tok = tokenizer("qwen2")
    with pytest.raises(ValueError, match="placeholder"):
        tokenize_conversation(MULTI_IMAGE, "internvl2_5", tok, [256, 256, 256, 256])
    in_answer = [{"from": "human", "value": "Look."}, {"from": "gpt", "value": "<image> is a bird."}]
    with pytest.raises(ValueError, match="assistant turn"):
        tokenize_conversation(in_answer, "Hermes-2", tok, 256)
    # Extra placeholders stay plain text, like the official code; text_only never expands them.
    out = tokenize_conversation(MULTI_IMAGE, "Hermes-2", tok, [256, 256])
    assert image_block_lengths(out["input_ids"], tok) == [256, 256]
    text_only = tokenize_conversation(MULTI_IMAGE, "internvl2_5", tok, [256], text_only=True)
    assert image_block_lengths(text_only["input_ids"], tok) == []
    assert tok.decode(text_only["input_ids"]).count("<image>") == 3
    with pytest.raises(ValueError, match="num_image_tokens"):
        tokenize_conversation(MULTI_IMAGE, "Hermes-2", tok, [256, 0])


NARROW_CASES = [
    (MULTI_IMAGE, [256, 768, 512]),
    ([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "x<image>y <image> \n<image>"},
      {"from": "gpt", "value": " Two birds.\n"}], [5, 1, 300]),
    ([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "<image>?"}, {"from": "human",
      "value": "  <image>"}, {"from": "gpt", "value": "Ok"}], [3, 7]),
    ([{"from": "human", "value": f"<image>\nA literal {IMG_CONTEXT_TOKEN} too."},  # the full blocks' path
      {"from": "gpt", "value": "Yes."}], [4]),
]


@pytest.mark.parametrize("flavour", list(TOKENIZER_DIRS))
@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
def test_narrow_image_blocks_tokenize_like_full_ones(template_name, flavour, monkeypatch):
    """Image blocks are tokenized with one context token and widened after: the same ids and labels as tokenizing
    the full blocks, on every template and tokenizer, or the same error."""
    from internvl_chat.data import templates

    tok = tokenizer(flavour)
    block_ids = templates._narrow_block_ids(tok)
    assert block_ids == tuple(tok.convert_tokens_to_ids([IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN]))

    def both(conversation, counts):
        out = []
        for narrow in (True, False):
            monkeypatch.setattr(templates, "_narrow_block_ids", lambda _, narrow=narrow: narrow and block_ids)
            try:
                out.append(tokenize_conversation(conversation, template_name, tok, counts, max_length=4096))
            except ValueError as exc:
                out.append(f"{type(exc).__name__}: {exc}")
        return out

    widened = []
    widen = templates._widen
    monkeypatch.setattr(templates, "_widen", lambda *args: widened.append(widen(*args)) or widened[-1])
    for k, (conversation, counts) in enumerate(NARROW_CASES):
        widened.clear()
        narrow, full = both(conversation, counts)
        assert narrow == full
        if isinstance(narrow, dict):  # the narrow path was taken, but for the literal context token
            assert (widened[0] is None) == (k == len(NARROW_CASES) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Truncation


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
def test_truncation(template_name):
    tok = tokenizer("bos")
    full = tokenize_conversation(MULTI_IMAGE, template_name, tok, [256, 256, 256])
    total = len(full["input_ids"])
    assert tokenize_conversation(MULTI_IMAGE, template_name, tok, [256, 256, 256], max_length=total) == full
    last_image_end = max(i for i, t in enumerate(full["input_ids"]) if t == tok.convert_tokens_to_ids(IMG_END_TOKEN))
    first_label = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    # A hard cut of ids and labels after the last image and inside the supervised text.
    cut = max(last_image_end + 1, first_label + 1)
    assert cut < total
    out = tokenize_conversation(MULTI_IMAGE, template_name, tok, [256, 256, 256], max_length=cut)
    assert out == {"input_ids": full["input_ids"][:cut], "labels": full["labels"][:cut]}
    # Cutting into an image block, or before the first supervised token, refuses the sample.
    with pytest.raises(SampleTooLongError, match="image"):
        tokenize_conversation(MULTI_IMAGE, template_name, tok, [256, 256, 256], max_length=last_image_end)
    text_only = tokenize_conversation(MULTI_IMAGE, template_name, tok, None, text_only=True)
    first_text_label = next(i for i, label in enumerate(text_only["labels"]) if label != IGNORE_INDEX)
    with pytest.raises(SampleTooLongError, match="no supervised"):
        tokenize_conversation(MULTI_IMAGE, template_name, tok, None, max_length=first_text_label, text_only=True)
    assert issubclass(SampleTooLongError, ValueError)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(MULTI_IMAGE, template_name, tok, None, max_length=0, text_only=True)


@pytest.mark.parametrize("flavour", ["bos", "qwen2"])
def test_empty_messages_render_as_the_bare_role_in_whole_prompt_templates(flavour):
    """internlm2-chat (stripped messages): an empty turn is its role header alone, as the official prompt writes it;
    an empty reply supervises nothing and the other replies keep their labels."""
    tok = tokenizer(flavour)
    system = get_template("internlm2-chat").system_message
    head = "<|im_start|>system\n" + system + "<|im_end|>"
    cases = [
        ([("human", "  "), ("gpt", "A")], head + "<|im_start|>user\n<|im_start|>assistant\nA<|im_end|>",
         ["A<|im_end|>"]),
        ([("human", "Q1"), ("gpt", "\t"), ("human", "Q2"), ("gpt", "A2")],
         head + "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\n<|im_start|>user\nQ2<|im_end|>"
         "<|im_start|>assistant\nA2<|im_end|>", ["A2<|im_end|>"]),
    ]
    for turns, prompt, supervised in cases:
        out = tokenize_conversation([{"from": r, "value": v} for r, v in turns], "internlm2-chat", tok, None,
                                    text_only=True)
        assert out["input_ids"] == tok(prompt)["input_ids"]
        assert tok.decode([t for t in out["labels"] if t != -100]) == "".join(supervised)
