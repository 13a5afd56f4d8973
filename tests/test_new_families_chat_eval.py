"""Chat and evaluation on the InternVL3 / InternVL3.5 LLM families (Qwen3, Qwen3-MoE, InternLM3, GPT-OSS), as tiny

`model.chat()` (single and multi-turn), `model.batch_chat()` (left-padded) and one eval/evaluate.py run answer what a
plain greedy loop of full forwards (no KV cache) gives on the prompt `inference.build_prompt` writes, stopped at the
template's end token; the eval run writes its predictions and metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_chat import inference
from internvl_chat.constants import IMG_CONTEXT_TOKEN
from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `eval` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

FAMILIES = ["qwen3", "qwen3_moe", "internlm3", "gpt_oss"]
MAX_NEW = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_eval")
    return {llm: make_tiny_model(root / llm, llm=llm, seed=11) for llm in FAMILIES}


def _load(path):
    model = InternVLChatModel.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return model, tok


@torch.no_grad()
def _greedy(model, tok, prompt: str, pixels, min_new_tokens: int = 0) -> tuple[str, int]:
    """Argmax of full LLM forwards (no KV cache) on the prompt's embeddings, the image features put at the
    `<IMG_CONTEXT>` positions, up to the template's stop token; (answer, tokens generated)."""
    template = inference.chat_template(model)
    stop = inference.stop_token_id(template, tok)
    ids = torch.tensor(tok(prompt)["input_ids"])
    embed = model.language_model.get_input_embeddings()
    embeds = embed(ids)
    if pixels is not None:
        features = model.extract_feature(pixels).reshape(-1, embeds.shape[-1])
        positions = (ids == model.img_context_token_id).nonzero().flatten()
        assert len(positions) == len(features)
        embeds[positions] = features
    new: list[int] = []
    for step in range(MAX_NEW):
        logits = model.language_model(inputs_embeds=embeds[None]).logits[0, -1]
        if step < min_new_tokens:
            logits[stop] = float("-inf")
        token = int(logits.argmax())
        new.append(token)
        if token == stop:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([token]))])
    skip = inference.skips_special_tokens(model, template)
    text = tok.decode([t for t in new if t != stop], skip_special_tokens=skip)
    return template.reply_text(text), len(new)


def _tiles(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("llm", FAMILIES)
def test_chat_and_batch_chat_equal_greedy_from_build_prompt(llm, tiny):
    model, tok = _load(tiny[llm])
    config = dict(max_new_tokens=MAX_NEW, do_sample=False)
    tiles = _tiles(1, 2)
    answer, history = model.chat(tok, tiles[:1], "What is this?", config, return_history=True)
    prompt = inference.build_prompt(model, "<image>\nWhat is this?", num_patches_list=[1])
    expected, generated = _greedy(model, tok, prompt, tiles[:1])
    assert answer == expected and history == [("<image>\nWhat is this?", answer)]
    lengths = [generated]

    follow = model.chat(tok, None, "And the colours?", config, history=history)  # text-only turn on the history
    expected, generated = _greedy(model, tok, inference.build_prompt(model, "And the colours?", history), None)
    assert follow == expected
    lengths.append(generated)

    questions = ["a?", "<image>\nDescribe the picture in more words, please."]  # different lengths: left padding
    batch = model.batch_chat(tok, tiles, questions, config, num_patches_list=[1, 1])
    for i, question in enumerate(questions):
        question = question if "<image>" in question else "<image>\n" + question
        prompt = inference.build_prompt(model, question, None, [1])
        expected, generated = _greedy(model, tok, prompt, tiles[i:i + 1])
        assert batch[i] == expected, (llm, i)
        lengths.append(generated)
    assert max(lengths) > 1  # the comparisons cover more than an immediate stop


def test_eval_run_writes_results_and_answers_greedy(tiny, tmp_path):
    from eval.evaluate import main as evaluate_main

    Image.new("RGB", (320, 240), (200, 40, 40)).save(tmp_path / "red.png")
    records = [
        {"id": "img", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": "red"}]},
        {"id": "txt", "metric": "exact_match", "conversations": [
            {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    ]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    predictions = []
    for llm in FAMILIES:
        out = tmp_path / llm
        args = [str(tiny[llm]), str(data), "--out-dir", str(out), "--max-new-tokens", str(MAX_NEW)]
        assert evaluate_main(args) == 0, llm
        lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        metrics = json.loads((out / "metrics.json").read_text())
        assert [x["id"] for x in lines] == ["img", "txt"] and metrics["n"] == 2
        assert {row["metric"] for row in metrics["results"]} == {"vqa_acc", "exact_match"}
        model, tok = _load(tiny[llm])
        # evaluate.py's default: the whole image as one tile; at least one new token (official min_new_tokens=1)
        tile = inference.load_image_tiles(tmp_path / "red.png", image_size=448, dynamic=False)
        prompts = [(inference.build_prompt(model, "<image>\nWhat colour is the picture?", None, [1]), tile),
                   (inference.build_prompt(model, "Say hello."), None)]
        for line, (prompt, pixels) in zip(lines, prompts):
            assert line["prediction"] == _greedy(model, tok, prompt, pixels, min_new_tokens=1)[0], (llm, line["id"])
            predictions.append(line["prediction"])
    assert any(predictions)  # not only empty answers
