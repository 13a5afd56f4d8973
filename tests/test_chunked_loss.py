"""The supervised-positions loss (model/loss.py) equals the full-logits loss, value and gradients, everywhere."""

import pytest
import torch
from torch import nn

from internvl_chat.constants import IGNORE_INDEX
from internvl_chat.model.loss import causal_lm_loss, chunk_rows, supervised_lm_loss
from internvl_chat.tiny_model import make_tiny_model, synthetic_batch
from tests.conftest import assert_same_loss_and_grads, forward_backward, load_chat_model

# ------------------------------------------------------------------------------------------------ the function


def _case(seed, vocab=37, hidden=8, bias=False):
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=gen))
    states = torch.randn(2, 11, hidden, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 11), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    return head, states, labels


def _weights(labels, reduction):
    """Per-token weights of the collator's reductions (sample: 1/n, square: 1/sqrt(n) per sample)."""
    if reduction == "token":
        return None
    n = (labels[:, 1:] != IGNORE_INDEX).sum(1, keepdim=True).float()
    per = 1 / n if reduction == "sample" else 1 / n.sqrt()
    return per.expand_as(labels) * (labels != IGNORE_INDEX)


def _value_and_grads(loss_fn, head, states):
    head.zero_grad(set_to_none=True)
    states.grad = None
    loss = loss_fn()
    (loss * 3.0).backward()  # a scaled loss, as under gradient accumulation: backward must scale the gradients
    grads = [states.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    return loss.detach(), grads


class _Hooked(nn.Module):
    """A head that is not a plain nn.Linear (as peft LoRA, a 4-bit layer or ZeRO-3 make it): the module path."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
@pytest.mark.parametrize("path", ["fused", "module"])
def test_supervised_loss_equals_full_logits_loss(reduction, path):
    head, states, labels = _case(seed=1, bias=(path == "fused"))
    weight = _weights(labels, reduction)
    module = head if path == "fused" else _Hooked(head)
    ref, ref_grads = _value_and_grads(lambda: causal_lm_loss(head(states), labels, weight), head, states)
    for rows in (3, 64):  # several chunks (one ragged) and a single chunk
        got, grads = _value_and_grads(lambda: supervised_lm_loss(states, labels, module, weight, rows=rows),
                                      head, states)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ref_grads[0][1, 7:].abs().sum() == 0  # positions predicting nothing get no gradient


def test_tied_head_and_embedding_gets_both_gradients():
    torch.manual_seed(0)
    embed = nn.Embedding(29, 8)
    head = nn.Linear(8, 29, bias=False)
    head.weight = embed.weight
    ids = torch.randint(0, 29, (1, 10))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    grads = []
    for fn in (lambda h: causal_lm_loss(head(h), labels), lambda h: supervised_lm_loss(h, labels, head, rows=4)):
        embed.zero_grad(set_to_none=True)
        fn(torch.tanh(embed(ids))).backward()
        grads.append(embed.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_nothing_supervised_and_no_grad():
    head, states, labels = _case(seed=2)
    loss = supervised_lm_loss(states, torch.full_like(labels, IGNORE_INDEX), head)
    assert loss.item() == 0.0
    loss.backward()  # the graph stays connected (every rank must run the same backward)
    assert states.grad.abs().sum() == 0
    with torch.no_grad():  # an eval loss: same value, no gradient work
        torch.testing.assert_close(supervised_lm_loss(states, labels, head, rows=3),
                                   causal_lm_loss(head(states), labels), atol=1e-6, rtol=1e-6)
    assert chunk_rows(151_674) * 151_674 * 4 <= 128 * 2**20


# ------------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    return {llm: make_tiny_model(root / llm, llm=llm, seed=5) for llm in ("qwen2", "internlm2")}


# two tiles, text only, one tile (tiles, prompt, answer tokens); prompts and image tokens unsupervised
LAYOUT = [(2, 9, 11), (0, 20, 9), (1, 7, 5)]


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_model_training_forward_uses_supervised_positions_only(tiny, llm):
    model, tok = load_chat_model(tiny[llm])
    model.train()
    reductions = ("token", "square") if llm == "qwen2" else ("token",)
    for reduction in reductions:
        for layout in ("padded", "packed"):
            batch = synthetic_batch(tok, LAYOUT, packed=layout == "packed", loss_reduction=reduction)
            ref = forward_backward(model, batch, return_logits=True)
            got = forward_backward(model, batch)
            assert got[0].logits is None and ref[0].logits is not None  # the default never builds full logits
            assert "language_model.lm_head.weight" in got[1] or "language_model.output.weight" in got[1]
            assert_same_loss_and_grads(got, ref, f"{llm} {reduction} {layout}")
    model.eval()  # eval mode keeps the official output (logits) unless asked otherwise
    batch = synthetic_batch(tok, LAYOUT)
    with torch.no_grad():
        full, short = model(**batch), model(**batch, return_logits=False)
    assert full.logits is not None and short.logits is None
    torch.testing.assert_close(short.loss, full.loss, atol=1e-6, rtol=1e-6)


def test_model_with_llm_lora(tiny):
    model, tok = load_chat_model(tiny["qwen2"])
    model.wrap_llm_lora(r=4, lora_dropout=0.0)  # no dropout: both forwards see the same adapters
    for name, p in model.named_parameters():  # peft initialises B to zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    batch = synthetic_batch(tok, LAYOUT, packed=True, loss_reduction="sample")
    ref, got = forward_backward(model, batch, return_logits=True), forward_backward(model, batch)
    assert any("lora_A" in k for k in got[1])
    assert_same_loss_and_grads(got, ref, "qwen2 LoRA packed sample")
