"""InternVL3.5-GPT-OSS's harmony template (``internvl3_5_gpt_oss``): ids and labels against the official prompt
builder's strings written out by hand, chat prompts that are training prefixes, reply parsing (streamed too), the
thinking mode, and the square loss of an all-masked sample on the tiny GPT-OSS model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from internvl_chat.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl_chat.data.collator import DataCollator, default_loss_reduction
from internvl_chat.data.templates import (
    THINKING_SYSTEM_PROMPT,
    get_template,
    image_block,
    thinking_system_message,
    tokenize_conversation,
)
from internvl_chat.inference import build_prompt
from internvl_chat.tiny_model import make_tiny_model

NAME = "internvl3_5_gpt_oss"
SYSTEM = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
          "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
          "message.")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gpt_oss") / "model", llm="gpt_oss")


@pytest.fixture(scope="module")
def tiny(folder):
    """The tiny GPT-OSS chat model (its tokenizer has the harmony tokens), loaded once."""
    from internvl_chat.model import InternVLChatModel, load_tokenizer

    return InternVLChatModel.from_pretrained(folder).eval(), load_tokenizer(folder)


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


def official(tok, conversation, image_tokens=()):
    """The official GPT-OSS preprocessing, as strings: one per message, each tokenized alone; a reply's
    ``<|start|>assistant`` masked and the rest supervised; the last message ends with ``<|return|>``, earlier replies
    with ``<|end|>`` (its intent; its code picked the end with a stale loop variable)."""
    turns = list(conversation)
    system = turns.pop(0)["value"] if turns[0]["from"] == "system" else SYSTEM
    pending = list(image_tokens)
    blocks = [(f"<|start|>system<|message|>{system}<|end|>", False)]
    for index, turn in enumerate(turns):
        if turn["from"] == "human":
            text = turn["value"]
            while pending and "<image>" in text:
                text = text.replace("<image>", image_block(pending.pop(0)), 1)
            blocks.append((f"<|start|>user<|message|>{text}<|end|>", False))
        else:
            end = "<|return|>" if index == len(turns) - 1 else "<|end|>"
            blocks.append((f"<|start|>assistant<|channel|>final<|message|>{turn['value']}{end}", True))
    head = len(tok("<|start|>assistant", add_special_tokens=False)["input_ids"])
    ids, labels = [], []
    for text, is_reply in blocks:
        block = tok(text, add_special_tokens=False)["input_ids"]
        ids += block
        labels += ([IGNORE_INDEX] * head + block[head:]) if is_reply else [IGNORE_INDEX] * len(block)
    return ids, labels


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


CASES = {
    # the official code raised NameError on every text-only sample
    "text_only": ([human("Hello, who are you?"), gpt("I am InternVL.")], ()),
    "single_image": ([human("<image>\nDescribe this image."), gpt("A red car on a street.")], (8,)),
    # two images in the last user turn: the official code ended the last reply with <|end|> here
    "multi_image_multi_turn": ([human("Image-1: <image>\nImage-2: <image>\nWhat differs?"), gpt("The colour."),
                                human("Which is brighter?"), gpt("The first one.\n"), human("Sure?"), gpt("Yes.")],
                               (4, 12)),
    "system_and_images_later": ([{"from": "system", "value": "Answer briefly."}, human("Hi"), gpt("Hello."),
                                 human("<image>\nAnd this?"), gpt(" A cat. ")], (4,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_labels_are_the_official_ones(tok, case):
    conversation, images = CASES[case]
    ours = tokenize_conversation(conversation, NAME, tok, list(images) or None, text_only=not images)
    ids, labels = official(tok, conversation, images)
    assert ours["input_ids"] == ids
    assert ours["labels"] == labels
    # only replies are supervised, each with its final-channel header and its end token
    supervised = tok.decode([i for i in labels if i != IGNORE_INDEX], skip_special_tokens=False)
    replies = [turn["value"] for turn in conversation if turn["from"] == "gpt"]
    ends = ["<|end|>"] * (len(replies) - 1) + ["<|return|>"]
    assert supervised == "".join(f"<|channel|>final<|message|>{r}{e}" for r, e in zip(replies, ends))


@pytest.mark.parametrize("num_images", [1, 2, 3])
def test_the_last_reply_ends_with_return_whatever_the_images(tok, num_images):
    question = "".join(f"Image-{i + 1}: <image>\n" for i in range(num_images)) + "Q"
    out = tokenize_conversation([human("Hi"), gpt("A"), human(question), gpt("B")], NAME, tok, [4] * num_images)
    end, ret = tok.convert_tokens_to_ids(["<|end|>", "<|return|>"])
    assert out["input_ids"][-1] == out["labels"][-1] == ret
    assert out["input_ids"].count(ret) == 1 and end in [i for i in out["labels"] if i != IGNORE_INDEX]


def test_chat_prompt_is_the_official_one_and_a_training_prefix(tok):
    template = get_template(NAME)
    assert (template.stop_str, tok.convert_tokens_to_ids(template.stop_str)) == ("<|return|>", tok.eos_token_id)
    model = SimpleNamespace(template=NAME, system_message=None, num_image_token=4)
    history = [("<image>\nWhat is it?", "A cat.")]
    prompt = build_prompt(model, "Sure?", history, [2])
    assert prompt == (f"<|start|>system<|message|>{SYSTEM}<|end|>"
                      f"<|start|>user<|message|>{image_block(8)}\nWhat is it?<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>A cat.<|end|>"
                      "<|start|>user<|message|>Sure?<|end|><|start|>assistant")
    # the prompt model.chat() feeds is the start of the training sample of the same conversation, and what follows
    # it there is exactly what the model learnt to generate: the header, the reply, <|return|>
    sample = tokenize_conversation([human("<image>\nWhat is it?"), gpt("A cat."), human("Sure?"), gpt("Yes.")],
                                   NAME, tok, [8])
    prompt_ids = tok(prompt)["input_ids"]
    assert sample["input_ids"][:len(prompt_ids)] == prompt_ids
    rest = sample["labels"][len(prompt_ids):]
    assert IGNORE_INDEX not in rest
    assert tok.decode(rest, skip_special_tokens=False) == "<|channel|>final<|message|>Yes.<|return|>"


REPLIES = [
    ("<|channel|>final<|message|>Hello there.<|return|>", "Hello there."),
    ("<|channel|>final<|message|> spaced <|return|><|endoftext|>", "spaced"),
    ("no header at all<|return|>", "no header at all"),
    ("<|channel|>analysis<|message|>Two plus two.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
     "<think>\nTwo plus two.\n</think>\n\n4"),
    ("<|channel|>analysis<|message|>cut short", "<think>\ncut short"),
]


@pytest.mark.parametrize(("raw", "answer"), REPLIES)
def test_reply_parsing_whole_and_streamed(tok, raw, answer):
    template = get_template(NAME)
    assert template.reply_text(raw) == answer
    # streamed token by token, the visible answer only grows and ends as the whole one
    ids = tok(raw, add_special_tokens=False)["input_ids"]
    shown = ""
    for k in range(1, len(ids) + 1):
        visible = template.reply_text(tok.decode(ids[:k], skip_special_tokens=False), partial=True)
        assert visible.startswith(shown), (shown, visible)
        shown = visible
        assert "<|channel|>" not in visible and "<|message|>" not in visible
    assert shown.strip() == answer


def test_greedy_chat_is_the_official_procedure(tiny):
    """model.chat(): the official prompt, generation stopped at <|return|>, decoded with the special tokens, split
    at <|return|>; then the final-channel header, if the model wrote one, is removed."""
    model, tok = tiny
    pixel_values = torch.randn(2, 3, 448, 448)
    config = dict(max_new_tokens=12, do_sample=False)
    answer, history = model.chat(tok, pixel_values, "Describe.", dict(config), return_history=True)
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    prompt = build_prompt(model, "<image>\nDescribe.", None, [2])
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                         attention_mask=inputs["attention_mask"], eos_token_id=tok.eos_token_id, **config)
    raw = tok.decode(out[0], skip_special_tokens=False).split("<|return|>")[0].strip()
    assert answer == raw.removeprefix("<|channel|>final<|message|>").strip()
    assert history == [("<image>\nDescribe.", answer)]
    assert model.batch_chat(tok, None, ["Hi", "Hello"], dict(config)) == [
        model.chat(tok, None, "Hi", dict(config)), model.chat(tok, None, "Hello", dict(config))]


def test_chat_removes_the_header_and_keeps_it_in_the_next_prompt(tiny, monkeypatch):
    model, tok = tiny
    reply = tok("<|channel|>final<|message|>A cat.<|return|>", add_special_tokens=False)["input_ids"]
    seen = []

    def generate(input_ids=None, **kwargs):
        seen.append((tok.decode(input_ids[0], skip_special_tokens=False), kwargs["eos_token_id"]))
        return torch.tensor([reply])

    monkeypatch.setattr(model, "generate", generate)
    answer, history = model.chat(tok, None, "What is it?", {}, return_history=True)
    assert answer == "A cat." and seen[0][1] == tok.convert_tokens_to_ids("<|return|>")
    model.chat(tok, None, "Sure?", {}, history=history)
    assert seen[1][0].endswith("<|start|>assistant<|channel|>final<|message|>A cat.<|end|>"
                               "<|start|>user<|message|>Sure?<|end|><|start|>assistant")


def test_thinking_mode_system_messages(tok):
    harmony = thinking_system_message(NAME)
    assert "Reasoning: high" in harmony and "# Valid channels: analysis, final." in harmony
    assert harmony.replace("high", "low").replace("analysis, final", "final") == SYSTEM
    assert thinking_system_message("internvl2_5") == THINKING_SYSTEM_PROMPT
    assert THINKING_SYSTEM_PROMPT.startswith("You are an AI assistant that rigorously follows this response protocol")
    assert "<think> and </think>" in THINKING_SYSTEM_PROMPT and THINKING_SYSTEM_PROMPT.endswith(".\n")
    # a thinking-mode sample trains with that system message like any other
    sample = tokenize_conversation([{"from": "system", "value": harmony}, human("2+2?"), gpt("4")], NAME, tok, None,
                                   text_only=True)
    assert tok.decode(sample["input_ids"], skip_special_tokens=False).startswith(
        f"<|start|>system<|message|>{harmony}<|end|>")


def test_chat_cli_thinking_flag(folder, capsys):
    from internvl_chat.cli.chat import build_parser, load, main

    model, _ = load(build_parser().parse_args([str(folder), "--thinking"]))
    assert model.system_message == thinking_system_message(NAME)
    model, _ = load(build_parser().parse_args([str(folder)]))
    assert model.system_message is None  # the template's own
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--thinking", "--system", "Be brief."])
    assert exit_info.value.code == 2 and "either --thinking or --system" in capsys.readouterr().err


def test_square_loss_is_the_default_and_an_all_masked_sample_gives_no_nan(tiny):
    assert default_loss_reduction(NAME) == "square" and default_loss_reduction("internvl2_5") == "token"
    model, tok = tiny
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    sample = tokenize_conversation([human("<image>\nWhat?"), gpt("A cat.")], NAME, tok, [model.num_image_token])
    item = dict(sample, pixel_values=torch.randn(1, 3, 448, 448), image_flags=torch.ones(1, dtype=torch.long))
    masked = dict(item, labels=[IGNORE_INDEX] * len(sample["labels"]))
    collate = DataCollator(pad_token_id=tok.pad_token_id, loss_reduction="square")
    model.train()
    try:
        for items in ([item, masked], [masked, masked]):
            batch = collate(items)
            weights = batch["loss_weight"][batch["labels"] != IGNORE_INDEX]
            assert torch.allclose(weights, torch.full_like(weights, 1 / math.sqrt(len(weights) or 1)))
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            assert torch.isfinite(loss)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        model.zero_grad()
        model.eval()


@pytest.mark.parametrize(("llm", "kept"), [("qwen3", True), ("qwen2", False)])
def test_replies_keep_special_tokens_as_the_official_chat_of_their_generation(tmp_path, monkeypatch, llm, kept):
    """InternVL3.5's chat() (Qwen3, Qwen3-MoE, GPT-OSS LLMs) decodes replies with their special tokens, so a grounding
    answer keeps its <ref>/<box>; the older code's dropped them."""
    from internvl_chat.model import InternVLChatModel, load_tokenizer

    folder = make_tiny_model(tmp_path / llm, llm=llm, template="internvl2_5")
    model, tok = InternVLChatModel.from_pretrained(folder).eval(), load_tokenizer(folder)
    reply = tok("<ref>the cat</ref><box>[[1, 2, 3, 4]]</box><|im_end|>", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(model, "generate", lambda **kwargs: torch.tensor([reply]))
    answer = model.chat(tok, None, "Where is the cat?", {})
    assert answer == ("<ref>the cat</ref><box>[[1, 2, 3, 4]]</box>" if kept else "the cat[[1, 2, 3, 4]]")


def test_split_thinking():
    from internvl_chat.data.templates import split_thinking

    assert split_thinking("<think>\nTwo plus two.\n</think>\n\n4") == ("Two plus two.", "4")
    assert split_thinking("4") == (None, "4")
    assert split_thinking("<think>\ncut by the token limit") == ("cut by the token limit", "")


def test_eval_thinking_mode_asks_with_the_thinking_system_and_scores_the_answer(folder, tmp_path, monkeypatch):
    """eval/evaluate.py --thinking: the harmony thinking system message in the prompt, the analysis channel kept as
    the line's reasoning, the final answer scored."""
    import json
    import sys

    from internvl_chat.model import InternVLChatModel, load_tokenizer

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # `eval` is a top-level folder of the repository, not an installed package
        sys.path.insert(0, repo)
    from eval.evaluate import main as evaluate_main

    tok = load_tokenizer(folder)
    reply = tok("<|channel|>analysis<|message|>Two plus two.<|end|><|start|>assistant<|channel|>final<|message|>4"
                "<|return|>", add_special_tokens=False)["input_ids"]
    prompts = []

    def generate(self, input_ids=None, **kwargs):
        prompts.append(tok.decode(input_ids[0], skip_special_tokens=False))
        return torch.tensor([reply])

    monkeypatch.setattr(InternVLChatModel, "generate", generate)
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"id": "sum", "metric": "exact_match", "conversations": [
        {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}) + "\n")
    assert evaluate_main([str(folder), str(data), "--out-dir", str(tmp_path / "out"), "--thinking"]) == 0
    line = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert (line["prediction"], line["reasoning"], line["score"]) == ("4", "Two plus two.", 1.0)
    assert prompts[0].startswith(f"<|start|>system<|message|>{thinking_system_message(NAME)}<|end|>")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["thinking"] is True
