"""InternVL3-9B's InternLM3 and InternVL3.5's GPT-OSS LLMs on transformers' own classes, as tiny models.

InternLM3 runs as transformers' LlamaForCausalLM on its InternLM3Config (the official remote code uses Llama's key
names); GPT-OSS as GptOssForCausalLM, whose experts are fused 3-D parameters both in memory and on disk. A load/save
round trip is bit-identical under the official names; the supervised-positions loss equals the full-logits loss
(GPT-OSS's router aux loss included); routed experts, router and attention sinks learn; LoRA wraps the official
targets; cached generation equals a greedy loop over full forwards (sliding-window layers and sinks included).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internvl_chat.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_chat.model.modeling import LLM_LORA_TARGETS
from internvl_chat.tiny_model import make_tiny_model, synthetic_batch
from tests.conftest import (assert_same_loss_and_grads, forward_backward, load_chat_model, load_tool,
                            read_safetensors)
from internvl_chat.tiny_tokenizer import GPT_OSS_HARMONY_TOKENS

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["internlm3", "gpt_oss"]
ARCH = {"internlm3": "InternLM3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}

# Every tensor of LLM layer 0 under its official name, with the tiny sizes: hidden 64, 4 heads x 16, 2 KV heads,
# InternLM3 MLP 160 (no biases: internlm3-8b's qkv_bias / bias are off); GPT-OSS 4 experts of width 64, biases on.
LAYER0 = {
    "internlm3": {
        "self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64), "self_attn.v_proj.weight": (32, 64),
        "self_attn.o_proj.weight": (64, 64), "mlp.gate_proj.weight": (160, 64), "mlp.up_proj.weight": (160, 64),
        "mlp.down_proj.weight": (64, 160), "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
    },
    "gpt_oss": {
        "self_attn.q_proj.weight": (64, 64), "self_attn.q_proj.bias": (64,), "self_attn.k_proj.weight": (32, 64),
        "self_attn.k_proj.bias": (32,), "self_attn.v_proj.weight": (32, 64), "self_attn.v_proj.bias": (32,),
        "self_attn.o_proj.weight": (64, 64), "self_attn.o_proj.bias": (64,), "self_attn.sinks": (4,),
        "mlp.router.weight": (4, 64), "mlp.router.bias": (4,),
        "mlp.experts.gate_up_proj": (4, 64, 128), "mlp.experts.gate_up_proj_bias": (4, 128),
        "mlp.experts.down_proj": (4, 64, 64), "mlp.experts.down_proj_bias": (4, 64),
        "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl3")
    assert load_tool("make_tiny_model").main([str(root / "gpt_oss"), "--llm", "gpt_oss", "--seed", "5"]) == 0  # the tool
    return {"internlm3": make_tiny_model(root / "internlm3", llm="internlm3", seed=6), "gpt_oss": root / "gpt_oss"}


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("llm", FAMILIES)
def test_official_key_names_and_bit_identical_round_trip(tiny, llm, tmp_path):
    weights = read_safetensors(tiny[llm])
    prefix = "language_model.model.layers.0."
    layer0 = {k.removeprefix(prefix): tuple(v.shape) for k, v in weights.items() if k.startswith(prefix)}
    assert layer0 == LAYER0[llm]
    for key in ("language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
                "language_model.lm_head.weight"):
        assert key in weights, key
    llm_config = json.loads((tiny[llm] / "config.json").read_text())["llm_config"]
    assert llm_config["architectures"] == [ARCH[llm]]
    if llm == "internlm3":  # the official field names stay; transformers' aliases are not written
        assert llm_config["qkv_bias"] is False and llm_config["bias"] is False
        assert "attention_bias" not in llm_config and "mlp_bias" not in llm_config
        assert llm_config["rope_scaling"] == {"rope_type": "dynamic", "factor": 6.0}
    else:
        assert llm_config["layer_types"] == ["sliding_attention", "full_attention"]
        assert llm_config["rope_scaling"]["rope_type"] == "yarn" and llm_config["experts_per_token"] == 2

    model, _ = load_chat_model(tiny[llm])
    state = model.state_dict()
    assert state.keys() == weights.keys()
    model.save_pretrained(tmp_path)
    again = read_safetensors(tmp_path)
    assert again.keys() == weights.keys()
    for k, v in weights.items():
        assert v.dtype == again[k].dtype == state[k].dtype and torch.equal(v, again[k]) and torch.equal(v, state[k]), k
    assert json.loads((tiny[llm] / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())


def test_gpt_oss_attention_keeps_its_sinks(tiny):
    """SDPA would drop the sinks silently: GPT-OSS runs eager whatever backend the chat model is given."""
    model, tok = load_chat_model(tiny["gpt_oss"], attn_implementation="sdpa")
    assert model.language_model.config._attn_implementation == "eager"
    assert model.vision_model.config._attn_implementation == "sdpa"
    ids = torch.tensor([tok("Describe this image in detail.")["input_ids"]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for layer in model.language_model.model.layers:
            layer.self_attn.sinks.add_(3.0)
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the sinks take part in the attention
    harmony = tok.convert_tokens_to_ids(list(GPT_OSS_HARMONY_TOKENS))
    assert len(set(harmony)) == len(GPT_OSS_HARMONY_TOKENS) and tok.eos_token == "<|return|>"
    text = "<|start|>assistant<|channel|>final<|message|>Hi<|return|>"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    for token in ("<|start|>", "<|channel|>", "<|message|>", "<|return|>"):
        assert encoded.count(tok.convert_tokens_to_ids(token)) == 1, token


# ------------------------------------------------------------------------------------------------ training


def _batch(tok, packed: bool = False):
    """A padded (or packed) batch of two samples: one tile, and text only (one flag-0 tile); answers supervised."""
    return synthetic_batch(tok, [(1, 9, 11), (0, 20, 9)], packed=packed, loss_reduction="square")


@pytest.mark.parametrize("llm", FAMILIES)
def test_chunked_loss_equals_full_logits_loss(tiny, llm):
    model, tok = load_chat_model(tiny[llm])
    model.train()
    batch = _batch(tok)
    ref = forward_backward(model, batch, return_logits=True)
    got = forward_backward(model, batch)
    assert got[0].logits is None and ref[0].logits is not None
    assert torch.isfinite(got[0].loss) and got[0].loss > 0
    assert any(k.startswith("vision_model.") for k in got[1]) and "mlp1.1.weight" in got[1]
    if llm == "gpt_oss":  # the router aux loss is in both paths
        torch.testing.assert_close(got[0].aux_loss, ref[0].aux_loss)
    assert_same_loss_and_grads(got, ref, llm)


@pytest.mark.parametrize("llm", ["internlm3", "gpt_oss"])
def test_packed_equals_padded(tiny, llm):
    """GPT-OSS: transformers builds its masks without the position ids; the chat model passes packed masks."""
    model, tok = load_chat_model(tiny[llm])
    model.eval()
    with torch.no_grad():
        padded, packed = model(**_batch(tok)).loss, model(**_batch(tok, packed=True)).loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_gpt_oss_aux_loss_experts_router_and_sinks_learn(tiny):
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    model, tok = load_chat_model(tiny["gpt_oss"])
    model.train()
    cfg = model.config.llm_config
    batch = _batch(tok)
    out, grads = forward_backward(model, batch)
    expected = load_balancing_loss_func(out.router_logits, 4, 2, batch["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected)
    assert len(out.router_logits) == cfg.num_hidden_layers and out.aux_loss > 0
    cfg.output_router_logits = False  # off: the plain LM loss, no aux
    plain, _ = forward_backward(model, batch)
    torch.testing.assert_close(out.loss - plain.loss, cfg.router_aux_loss_coef * out.aux_loss, atol=1e-6, rtol=1e-5)
    for layer in range(cfg.num_hidden_layers):
        prefix = f"language_model.model.layers.{layer}."
        for name in ("mlp.router.weight", "mlp.router.bias", "self_attn.sinks"):
            assert grads[prefix + name].abs().sum() > 0, prefix + name
        routed = torch.zeros(4, dtype=torch.bool)
        routed[out.router_logits[layer].topk(2, dim=-1).indices.flatten()] = True
        for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.experts.down_proj_bias"):
            learns = grads[prefix + name].flatten(1).abs().sum(1) > 0
            # the routed experts learn (at least top-k of them), an expert no token was routed to gets nothing
            assert int(learns.sum()) >= 2 and not (learns & ~routed).any(), (prefix + name, learns, routed)


# ------------------------------------------------------------------------------------------------ LoRA, generation


@pytest.mark.parametrize("llm", FAMILIES)
def test_llm_lora(tiny, llm):
    model, tok = load_chat_model(tiny[llm])
    model.wrap_llm_lora(r=4, lora_dropout=0.0)
    wrapped = {n.split(".layers.0.", 1)[1].rsplit(".lora_A", 1)[0]
               for n, _ in model.named_modules() if ".layers.0." in n and n.endswith(".lora_A")}
    assert wrapped == set(LLM_LORA_TARGETS[ARCH[llm]])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("language_model.")]
    assert trainable and all("lora_" in n for n in trainable)  # experts, router, sinks frozen
    for name, p in model.named_parameters():  # peft initialises B to zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    batch = _batch(tok)
    ref, got = forward_backward(model, batch, return_logits=True), forward_backward(model, batch)
    assert any("lora_A" in k for k in got[1])
    assert_same_loss_and_grads(got, ref, f"{llm} LoRA")


@pytest.mark.parametrize("llm", FAMILIES)
def test_cached_generation_equals_greedy_full_forwards(tiny, llm):
    model, tok = load_chat_model(tiny[llm])
    model.eval()
    tile = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    prompt = "<|im_start|>user\n" + IMG_START_TOKEN + IMG_CONTEXT_TOKEN * model.num_image_token + IMG_END_TOKEN
    ids = torch.tensor([tok(prompt + "\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    new = model.generate(pixel_values=tile, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False)[0]
    assert len(new) >= 1
    seq = ids
    with torch.no_grad():  # past the 128-token window of the sliding layers, without a KV cache
        for token in new.tolist():
            logits = model(pixel_values=tile, input_ids=seq, image_flags=torch.ones(1, dtype=torch.long)).logits
            assert int(logits[0, -1].argmax()) == token
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    answer = model.chat(tok, tile, "What is this?", dict(max_new_tokens=3, do_sample=False))
    assert isinstance(answer, str)
