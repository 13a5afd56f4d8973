"""InternVLChatModel behaviour beyond fixture parity: batches, loss weights, attention backends, checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from internvl_chat.model import InternVLChatModel, causal_lm_loss, load_tokenizer
from internvl_chat.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", llm="qwen2", seed=3)
    return path


def _batch(model, tok, n_tiles=(2, 0, 1)):
    """A right-padded batch of three samples with 2, 0 (text only: one flag-0 tile) and 1 tiles."""
    model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    block = lambda n: "<img>" + "<IMG_CONTEXT>" * (model.num_image_token * n) + "</img>"  # noqa: E731
    texts = [
        (block(n) if n else "") + f"question {i}<|im_end|>answer number {i}<|im_end|>" for i, n in enumerate(n_tiles)
    ]
    enc = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[ids == model.img_context_token_id] = -100
    tiles = sum(max(n, 1) for n in n_tiles)
    flags = torch.tensor([f for n in n_tiles for f in ([1] * n if n else [0])])
    torch.manual_seed(0)
    pixels = torch.randn(tiles, 3, 448, 448)
    return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, image_flags=flags)


def test_padded_batch_rows_match_single_samples(tiny):
    model = InternVLChatModel.from_pretrained(tiny).eval()
    tok = load_tokenizer(tiny)
    batch = _batch(model, tok)
    with torch.no_grad():
        logits = model(**batch).logits
    # row 0 alone: its two tiles only
    one = {k: v[:1] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    n = int(batch["attention_mask"][0].sum())
    with torch.no_grad():
        alone = model(pixel_values=batch["pixel_values"][:2], image_flags=batch["image_flags"][:2], **one).logits
    torch.testing.assert_close(logits[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_forward_takes_the_official_keywords_and_nothing_unknown(tiny):
    model = InternVLChatModel.from_pretrained(tiny).eval()
    batch = _batch(model, load_tokenizer(tiny))
    with torch.no_grad():
        out = model(**batch)
        # official packed callers pass `statistics` and may ask for a tuple
        loss, logits = model(**batch, statistics=torch.tensor([3, 0, 0]), return_dict=False)[:2]
        torch.testing.assert_close(loss, out.loss)
        torch.testing.assert_close(logits, out.logits)
        with pytest.raises(TypeError, match="packed"):  # bookkeeping keys are the trainer's to pop
            model(**batch, packed=True)


def test_loss_weight_reductions_match_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, 1, 2, 3, -100, -100], [-100, -100, 4, 5, 6, 7]])
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none",
                         ignore_index=-100).reshape(2, 5)
    sup = labels[:, 1:] != -100
    token = ce[sup].mean()
    assert causal_lm_loss(logits, labels).item() == pytest.approx(token.item(), rel=1e-6)
    # sample reduction: every sample's mean weighted equally -> weights 1/n_k per token
    n = sup.sum(1, keepdim=True).float()
    weight = torch.cat([torch.zeros(2, 1), (1 / n).expand(2, 5)], dim=1)
    expected = ((ce[0][sup[0]]).mean() + (ce[1][sup[1]]).mean()) / 2
    assert causal_lm_loss(logits, labels, weight).item() == pytest.approx(expected.item(), rel=1e-6)
    # square reduction: weights 1/sqrt(n_k)
    weight = torch.cat([torch.zeros(2, 1), (1 / n.sqrt()).expand(2, 5)], dim=1)
    num = sum(ce[k][sup[k]].sum() / n[k, 0].sqrt() for k in range(2))
    den = sum(n[k, 0].sqrt() for k in range(2))
    assert causal_lm_loss(logits, labels, weight).item() == pytest.approx((num / den).item(), rel=1e-6)


def test_no_supervised_tokens_gives_zero_loss_with_graph():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((1, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_flag0_tiles_still_receive_gradient_hooks(tiny):
    """Text-only batches run the ViT (so every data-parallel rank touches it) without using its features."""
    model = InternVLChatModel.from_pretrained(tiny).train()
    tok = load_tokenizer(tiny)
    batch = _batch(model, tok, n_tiles=(0, 0))
    model(**batch).loss.backward()
    vit_grads = [p.grad for p in model.vision_model.parameters()]
    assert all(g is not None for g in vit_grads)
    assert all(torch.count_nonzero(g) == 0 for g in vit_grads)
    assert model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_attention_backends_agree(tiny):
    tok = load_tokenizer(tiny)
    outs = {}
    for impl in ("eager", "sdpa"):
        model = InternVLChatModel.from_pretrained(tiny, attn_implementation=impl).eval()
        assert model.language_model.config._attn_implementation == impl
        assert model.vision_model.config._attn_implementation == impl
        with torch.no_grad():
            outs[impl] = model(**_batch(model, tok)).logits
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-4, rtol=1e-4)


def test_default_attention_is_sdpa_on_cpu(tiny):
    model = InternVLChatModel.from_pretrained(tiny, use_flash_attn=True)  # flash needs a GPU: falls back
    assert model.config._attn_implementation == "sdpa"


def test_gradient_checkpointing_switches_separately(tiny):
    model = InternVLChatModel.from_pretrained(tiny).train()
    tok = load_tokenizer(tiny)
    batch = _batch(model, tok)
    torch.manual_seed(0)
    model(**batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_vision_gradient_checkpointing(True)
    vit_layers = list(model.vision_model.encoder.layers)
    llm_layers = list(model.language_model.model.layers)
    assert all(l.gradient_checkpointing for l in vit_layers)
    assert not any(l.gradient_checkpointing for l in llm_layers)
    model.set_llm_gradient_checkpointing(True)
    model.set_vision_gradient_checkpointing(False)
    assert not any(l.gradient_checkpointing for l in vit_layers)
    assert all(l.gradient_checkpointing for l in llm_layers)
    model.set_vision_gradient_checkpointing(True)
    torch.manual_seed(0)
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_drop_path_from_config(tmp_path):
    path = make_tiny_model(tmp_path / "m", llm="qwen2", seed=0)
    model = InternVLChatModel.from_pretrained(path)
    assert [l.drop_path_rate for l in model.vision_model.encoder.layers] == [0.0, 0.0]
    model.config.vision_config.drop_path_rate = 0.2
    model.save_pretrained(tmp_path / "dp")
    again = InternVLChatModel.from_pretrained(tmp_path / "dp")
    assert [l.drop_path_rate for l in again.vision_model.encoder.layers] == pytest.approx([0.0, 0.2])


def test_select_layer_and_ps_v1_from_config(tmp_path):
    path = make_tiny_model(tmp_path / "m", llm="qwen2", seed=0, select_layer=-2, ps_version="v1")
    model = InternVLChatModel.from_pretrained(path).eval()
    pixels = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        feats = model.extract_feature(pixels)
        hidden = model.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        grid = hidden.reshape(2, 32, 32, -1)
        # v1 token order: column-major groups of 2x2 patches
        from internvl_chat.model import pixel_shuffle

        expected = model.mlp1(pixel_shuffle(grid, 0.5, "v1").reshape(2, 256, -1))
    torch.testing.assert_close(feats, expected)


def test_uint8_tiles_are_normalised_on_the_device(tiny):
    from internvl_chat.data.transforms import normalize_tiles

    model = InternVLChatModel.from_pretrained(tiny).eval()
    torch.manual_seed(0)
    tiles = torch.randint(0, 256, (2, 448, 448, 3), dtype=torch.uint8)
    with torch.no_grad():
        from_uint8 = model.extract_feature(tiles)
        from_float = model.extract_feature(normalize_tiles(tiles, "imagenet"))
        chw = model.extract_feature(tiles.permute(0, 3, 1, 2).contiguous())
    assert torch.equal(from_uint8, from_float)
    assert torch.equal(chw, from_float)
    assert "_pixel_normalizer" not in dict(model.named_modules())
    model.config.normalize_type = "clip"
    with torch.no_grad():
        clip = model.extract_feature(tiles)
    assert torch.equal(clip, model.extract_feature(normalize_tiles(tiles, "clip")))
