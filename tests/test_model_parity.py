"""Parity with the official InternVL code on the tiny reference models in tests/fixtures."""

import json

import numpy as np
import pytest
import torch

from internvl_chat.inference import build_prompt
from internvl_chat.model import InternVLChatModel, load_tokenizer

MODELS = ["qwen2_hermes2", "qwen2_internvl2_5"]
ATOL = 1e-4


class Ref:
    def __init__(self, root, name):
        self.dir = root / name
        self.json = json.loads((self.dir / "reference.json").read_text())
        self.npz = np.load(self.dir / "reference.npz")
        pixels = np.load(root / "common" / "pixels_int8.npy").astype(np.float32) / 64.0  # exact, per README
        self.pixels = torch.from_numpy(pixels)

    def tiles(self, idx):
        return self.pixels[list(idx)]


@pytest.fixture(scope="module", params=MODELS)
def setup(request, fixtures_dir):
    ref = Ref(fixtures_dir, request.param)
    model = InternVLChatModel.from_pretrained(ref.dir, torch_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(ref.dir)
    return ref, model, tokenizer


def _forward(model, ref, tiles, flags):
    fw = ref.json["forward"]
    model.img_context_token_id = ref.json["img_context_token_id"]
    with torch.no_grad():
        return model(
            pixel_values=ref.tiles(tiles),
            input_ids=torch.tensor([fw["input_ids"]]),
            attention_mask=torch.tensor([fw["attention_mask"]]),
            image_flags=torch.tensor(flags),
            labels=torch.tensor([fw["labels"]]),
        )


def test_vit_embeds(setup):
    ref, model, _ = setup
    with torch.no_grad():
        embeds = model.extract_feature(ref.tiles(ref.json["pixel_values"]["tiles"]))
    torch.testing.assert_close(embeds, torch.from_numpy(ref.npz["vit_embeds"]), atol=ATOL, rtol=0)


def test_forward_logits_and_loss(setup):
    ref, model, _ = setup
    fw = ref.json["forward"]
    out = _forward(model, ref, ref.json["pixel_values"]["tiles"], fw["image_flags"])
    logits = out.logits[0]
    torch.testing.assert_close(logits[fw["positions"]], torch.from_numpy(ref.npz["forward_logits"]), atol=ATOL, rtol=0)
    assert logits.argmax(-1).tolist() == fw["argmax_all_positions"]
    assert out.loss.item() == pytest.approx(fw["loss"], abs=ATOL)


def test_flag0_tile_changes_nothing(setup):
    ref, model, _ = setup
    fw, dummy = ref.json["forward"], ref.json["forward_dummy_tile"]
    base = _forward(model, ref, ref.json["pixel_values"]["tiles"], fw["image_flags"])
    extra = _forward(model, ref, dummy["tiles"], dummy["image_flags"])
    assert torch.equal(base.logits, extra.logits)
    assert base.loss.item() == extra.loss.item()


def test_image_token_mismatch_raises(setup):
    """The official model zeroes the loss silently here; we refuse."""
    ref, model, _ = setup
    fw = ref.json["forward"]
    with pytest.raises(ValueError, match="image tokens and image features disagree"):
        _forward(model, ref, ref.json["pixel_values"]["tiles"][:1], [1])


def test_llm_only_logits(setup):
    ref, model, _ = setup
    ids = torch.tensor([ref.json["llm_text"]["input_ids"]])
    with torch.no_grad():
        logits = model.language_model(input_ids=ids).logits[0]
    torch.testing.assert_close(logits, torch.from_numpy(ref.npz["llm_text_logits"]), atol=ATOL, rtol=0)


def _call(ref, kind):
    return next(c for c in ref.json["generation"]["calls"] if c["kind"] == kind)


def _prompt_ids(tokenizer, prompt):
    return tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()


def test_chat_greedy(setup):
    ref, model, tok = setup
    call = _call(ref, "chat")
    config = dict(ref.json["generation"]["generation_config"])
    question = call["question"]
    prompt = build_prompt(model, "<image>\n" + question, None, call["num_patches_list"])
    assert _prompt_ids(tok, prompt) == call["input_ids"][0]
    response = model.chat(tok, ref.tiles(call["tiles"]), question, config, num_patches_list=call["num_patches_list"])
    assert response == call["response"]
    # the generated tokens themselves
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(pixel_values=ref.tiles(call["tiles"]), eos_token_id=call["eos_token_id"], **inputs, **config)
    assert out[0].tolist() == call["new_token_ids"][0]


def test_chat_with_history(setup):
    ref, model, tok = setup
    call = _call(ref, "chat_history")
    config = dict(ref.json["generation"]["generation_config"])
    history = [tuple(turn) for turn in call["history"]]
    prompt = build_prompt(model, call["question"], history, call["num_patches_list"])
    assert _prompt_ids(tok, prompt) == call["input_ids"][0]
    response, new_history = model.chat(
        tok, ref.tiles(call["tiles"]), call["question"], config, history=history, return_history=True,
        num_patches_list=call["num_patches_list"],
    )
    assert response == call["response"]
    assert [list(turn) for turn in new_history] == call["returned_history"]


def test_batch_chat_left_padding(setup):
    ref, model, tok = setup
    call = _call(ref, "batch_chat")
    config = dict(ref.json["generation"]["generation_config"])
    responses = model.batch_chat(
        tok, ref.tiles(call["tiles"]), call["questions"], config, num_patches_list=call["num_patches_list"]
    )
    assert responses == call["response"]
    # the padded prompt batch is the official one
    prompts = [
        build_prompt(model, q if "<image>" in q else "<image>\n" + q, None, [n])
        for q, n in zip(call["questions"], call["num_patches_list"])
    ]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"].tolist() == call["input_ids"]
    assert batch["attention_mask"].tolist() == call["attention_mask"]
    out = model.generate(
        pixel_values=ref.tiles(call["tiles"]), eos_token_id=call["eos_token_id"], **batch, **config
    )
    # rows may end early at eos; compare up to the reference length
    for row, expected in zip(out.tolist(), call["new_token_ids"]):
        assert row[: len(expected)] == expected


def test_chat_streaming(setup):
    from threading import Thread

    from transformers import TextIteratorStreamer

    ref, model, tok = setup
    call = _call(ref, "chat")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=30)
    config = dict(ref.json["generation"]["generation_config"], streamer=streamer)
    thread = Thread(
        target=model.chat,
        args=(tok, ref.tiles(call["tiles"]), call["question"], config),
        kwargs={"num_patches_list": call["num_patches_list"]},
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text.strip() == call["response"]
