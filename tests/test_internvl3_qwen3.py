"""InternVL3.5's Qwen3 and Qwen3-MoE LLMs on transformers' own classes, as tiny models.

On disk every tensor keeps its official name (an MoE layer's experts one by one: `mlp.experts.E.gate_proj`), while
transformers 5 holds them fused in memory; a load/save round trip is bit-identical. The supervised-positions loss
equals the full-logits loss, the MoE router's load-balancing loss included; the routed experts and the router learn;
LoRA, chat and the export to the native layout work as for the older families.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internvl_chat.model import InternVLChatModel
from internvl_chat.model.modeling import LLM_LORA_TARGETS
from internvl_chat.tiny_model import make_tiny_model, synthetic_batch
from tests.conftest import (assert_same_loss_and_grads, forward_backward, load_chat_model, load_tool,
                            read_safetensors)

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen3", "qwen3_moe"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    assert load_tool("make_tiny_model").main([str(root / "qwen3"), "--llm", "qwen3", "--seed", "3"]) == 0  # the tool takes it
    return {"qwen3": root / "qwen3", "qwen3_moe": make_tiny_model(root / "qwen3_moe", llm="qwen3_moe", seed=4)}


# ------------------------------------------------------------------------------------------------ checkpoints


def test_official_key_names_and_bit_identical_round_trip(tiny, tmp_path):
    moe = read_safetensors(tiny["qwen3_moe"])
    layer = "language_model.model.layers.1."
    for key in ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                layer + "self_attn.q_norm.weight", layer + "self_attn.k_norm.weight", layer + "mlp.gate.weight",
                layer + "mlp.experts.0.gate_proj.weight", layer + "mlp.experts.3.up_proj.weight",
                layer + "mlp.experts.2.down_proj.weight"]:
        assert key in moe, key
    assert not any("gate_up_proj" in k or k.endswith(("experts.down_proj", "experts.gate_up_proj")) for k in moe)
    dense = read_safetensors(tiny["qwen3"])
    assert dense[layer + "self_attn.q_proj.weight"].shape == (128, 64)  # head_dim 32 x 4 heads, hidden 64
    assert layer + "mlp.gate_proj.weight" in dense and layer + "self_attn.q_norm.weight" in dense
    config = json.loads((tiny["qwen3"] / "config.json").read_text())
    assert config["llm_config"]["architectures"] == ["Qwen3ForCausalLM"] and config["template"] == "internvl2_5"
    assert "rope_theta" in config["llm_config"]

    for llm in FAMILIES:
        model, _ = load_chat_model(tiny[llm])
        out = tmp_path / llm
        model.save_pretrained(out)
        a, b = read_safetensors(tiny[llm]), read_safetensors(out)
        assert a.keys() == b.keys(), llm
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert json.loads((tiny[llm] / "config.json").read_text()) == json.loads((out / "config.json").read_text())

    # in memory the experts are fused; each on-disk expert is the right slice (gate rows first, then up)
    model, _ = load_chat_model(tiny["qwen3_moe"])
    experts = model.language_model.model.layers[1].mlp.experts
    inter = model.config.llm_config.moe_intermediate_size
    for e in range(4):
        assert torch.equal(experts.gate_up_proj[e, :inter], moe[layer + f"mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[e, inter:], moe[layer + f"mlp.experts.{e}.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], moe[layer + f"mlp.experts.{e}.down_proj.weight"])


# ------------------------------------------------------------------------------------------------ training


# two tiles, text only, one tile (tiles, prompt, answer tokens); prompts and image tokens unsupervised
LAYOUT = [(2, 9, 11), (0, 20, 9), (1, 7, 5)]


def _batch(tok, layout, reduction="square"):
    return synthetic_batch(tok, LAYOUT, packed=layout == "packed", loss_reduction=reduction)


@pytest.mark.parametrize("llm", FAMILIES)
def test_chunked_loss_equals_full_logits_loss(tiny, llm):
    model, tok = load_chat_model(tiny[llm])
    model.train()
    layouts = ("padded", "packed") if llm == "qwen3_moe" else ("packed",)  # padded: the aux loss skips padding
    for layout in layouts:
        batch = _batch(tok, layout)
        ref = forward_backward(model, batch, return_logits=True)
        got = forward_backward(model, batch)
        assert got[0].logits is None and ref[0].logits is not None
        assert torch.isfinite(got[0].loss) and got[0].loss > 0
        assert any(k.startswith("vision_model.") for k in got[1]) and "mlp1.1.weight" in got[1]
        if llm == "qwen3_moe":  # the aux loss is in both (same value), so the comparison covers it
            assert got[0].aux_loss is not None and ref[0].aux_loss is not None
            torch.testing.assert_close(got[0].aux_loss, ref[0].aux_loss)
        else:
            assert not hasattr(got[0], "aux_loss")
        assert_same_loss_and_grads(got, ref, f"{llm} {layout}")


def test_moe_aux_loss_and_expert_gradients(tiny):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model, tok = load_chat_model(tiny["qwen3_moe"])
    model.train()
    cfg = model.config.llm_config
    batch = _batch(tok, "padded")
    out, grads = forward_backward(model, batch)
    # the official formula, over the non-padding tokens of every layer's router
    expected = load_balancing_loss_func(out.router_logits, 4, 2, batch["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected)
    assert len(out.router_logits) == cfg.num_hidden_layers and out.aux_loss > 0

    cfg.router_aux_loss_coef = 0.5  # the coefficient is the config's field, read at every forward
    heavy, heavy_grads = forward_backward(model, batch)
    torch.testing.assert_close(heavy.loss - out.loss, (0.5 - 0.001) * out.aux_loss, atol=1e-6, rtol=1e-5)
    router = "language_model.model.layers.0.mlp.gate.weight"
    assert not torch.allclose(heavy_grads[router], grads[router])  # the aux loss trains the router
    cfg.output_router_logits = False  # off: the plain LM loss, no aux
    plain, _ = forward_backward(model, batch)
    assert not hasattr(plain, "aux_loss")
    torch.testing.assert_close(out.loss - plain.loss, 0.001 * out.aux_loss, atol=1e-6, rtol=1e-5)

    for layer in range(cfg.num_hidden_layers):
        prefix = f"language_model.model.layers.{layer}.mlp."
        assert grads[prefix + "gate.weight"].abs().sum() > 0
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            per_expert = grads[prefix + name].flatten(1).abs().sum(1)
            assert (per_expert > 0).all(), (prefix + name, per_expert)  # every expert was routed some tokens


def test_moe_aux_loss_under_activation_checkpointing(tiny):
    """The router logits are collected inside checkpointed layers; recomputation must neither drop nor double them."""
    model, tok = load_chat_model(tiny["qwen3_moe"])
    model.train()
    batch = _batch(tok, "packed")
    ref = forward_backward(model, batch)
    model.set_llm_gradient_checkpointing(True)
    got = forward_backward(model, batch)
    torch.testing.assert_close(got[0].aux_loss, ref[0].aux_loss)
    assert_same_loss_and_grads(got, ref, "qwen3_moe checkpointed")


# ------------------------------------------------------------------------------------------------ LoRA, chat, export


@pytest.mark.parametrize("llm", FAMILIES)
def test_llm_lora(tiny, llm, tmp_path):
    model, tok = load_chat_model(tiny[llm])
    model.wrap_llm_lora(r=4, lora_dropout=0.0)
    arch = model.config.llm_config.architectures[0]
    wrapped = {n.split(".layers.0.", 1)[1].rsplit(".lora_A", 1)[0]
               for n, _ in model.named_modules() if ".layers.0." in n and n.endswith(".lora_A")}
    assert wrapped == set(LLM_LORA_TARGETS[arch])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable if n.startswith("language_model."))
    for name, p in model.named_parameters():  # peft initialises B to zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    batch = _batch(tok, "packed", "sample")
    ref, got = forward_backward(model, batch, return_logits=True), forward_backward(model, batch)
    assert any("lora_A" in k for k in got[1])
    assert_same_loss_and_grads(got, ref, f"{llm} LoRA")

    model.save_pretrained(tmp_path)  # wrapped: peft's names, the experts still one by one
    keys = set(read_safetensors(tmp_path))
    if llm == "qwen3_moe":
        assert any(k.endswith("layers.0.mlp.experts.1.up_proj.weight") for k in keys)
        assert not any("gate_up_proj" in k for k in keys)
    again = InternVLChatModel.from_pretrained(tmp_path)
    state = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("llm", FAMILIES)
def test_chat_generates(tiny, llm):
    model, tok = load_chat_model(tiny[llm])
    model.eval()
    config = dict(max_new_tokens=4, do_sample=False)
    tile = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    answer, history = model.chat(tok, tile, "What is this?", config, return_history=True)
    assert isinstance(answer, str) and history[0][0].startswith("<image>\n")
    again = model.chat(tok, None, "And now?", config, history=history)
    assert isinstance(again, str)
    assert len(model.batch_chat(tok, torch.cat([tile, tile]), ["a?", "b?"], config, num_patches_list=[1, 1])) == 2


@pytest.mark.parametrize("llm", FAMILIES)
def test_export_round_trip(tiny, llm, tmp_path):
    from internvl_chat.hf_convert import compare_logits, convert_from_hf, convert_to_hf

    src = tiny[llm]
    hf = convert_to_hf(src, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["text_config"]["architectures"] == [json.loads((src / "config.json").read_text())
                                                      ["llm_config"]["architectures"][0]]
    result = compare_logits(src, hf, generate_tokens=4)
    assert result["max_abs_diff"] <= 1e-4
    assert result["native_tokens"] == result["ours_tokens"]
    back = convert_from_hf(hf, tmp_path / "back")
    a, b = read_safetensors(src), read_safetensors(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
