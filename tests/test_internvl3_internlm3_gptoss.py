"""InternVL3-9B's InternLM3 and InternVL3.5's GPT-OSS LLMs on transformers' own classes, as tiny models.

InternLM3 runs as transformers' LlamaForCausalLM on its InternLM3Config (the official remote code uses Llama's key
names); GPT-OSS as GptOssForCausalLM, whose experts are fused 3-D parameters both in memory and on disk. A load/save
round trip is bit-identical under the official names; the supervised-positions loss equals the full-logits loss
(GPT-OSS's router aux loss included); routed experts, router and attention sinks learn; LoRA wraps the official
targets; cached generation equals a greedy loop over full forwards (sliding-window layers and sinks included).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from internvl_chat.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_chat.data.collator import DataCollator, pop_trainer_keys
from internvl_chat.data.packing import PackedCollator
from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.model.modeling import LLM_LORA_TARGETS
from internvl_chat.tiny_model import make_tiny_model
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


def _make_tiny_tool():
    spec = importlib.util.spec_from_file_location("_tools_make_tiny_model", REPO / "tools" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl3")
    assert _make_tiny_tool().main([str(root / "gpt_oss"), "--llm", "gpt_oss", "--seed", "5"]) == 0  # the tool
    return {"internlm3": make_tiny_model(root / "internlm3", llm="internlm3", seed=6), "gpt_oss": root / "gpt_oss"}


def _read(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _load(path, **kwargs) -> tuple[InternVLChatModel, object]:
    model = InternVLChatModel.from_pretrained(path, **kwargs)
    tok = load_tokenizer(path)
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return model, tok


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("llm", FAMILIES)
def test_official_key_names_and_bit_identical_round_trip(tiny, llm, tmp_path):
    weights = _read(tiny[llm])
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

    model, _ = _load(tiny[llm])
    state = model.state_dict()
    assert state.keys() == weights.keys()
    model.save_pretrained(tmp_path)
    again = _read(tmp_path)
    assert again.keys() == weights.keys()
    for k, v in weights.items():
        assert v.dtype == again[k].dtype == state[k].dtype and torch.equal(v, again[k]) and torch.equal(v, state[k]), k
    assert json.loads((tiny[llm] / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())


def test_gpt_oss_attention_keeps_its_sinks(tiny):
    """SDPA would drop the sinks silently: GPT-OSS runs eager whatever backend the chat model is given."""
    model, tok = _load(tiny["gpt_oss"], attn_implementation="sdpa")
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
    start, end, ctx = tok.convert_tokens_to_ids([IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN])
    gen = torch.Generator().manual_seed(0)
    items = []
    for n_tiles, n_prompt, n_answer in ((1, 6, 11), (0, 17, 9)):
        text = lambda n: torch.randint(3, 1380, (n,), generator=gen)  # noqa: E731
        block = [torch.tensor([start] + [ctx] * 256 * n_tiles + [end])] if n_tiles else []
        ids = torch.cat([text(n_prompt), *block, text(3), text(n_answer)])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-n_answer:] = ids[-n_answer:]
        items.append({
            "input_ids": ids, "labels": labels,
            "pixel_values": torch.randint(0, 256, (max(n_tiles, 1), 448, 448, 3), generator=gen, dtype=torch.uint8),
            "image_flags": torch.tensor([1] * n_tiles if n_tiles else [0]),
            "num_supervised": n_answer, "sample_id": f"synthetic:{n_prompt}",
        })
    if packed:
        batch = PackedCollator(tok.pad_token_id, loss_reduction="square")([items])
    else:
        batch = DataCollator(tok.pad_token_id, loss_reduction="square")(items)
    pop_trainer_keys(batch)
    return batch


def _run(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, ref, what):
    (out, grads), (ref_out, ref_grads) = got, ref
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-6, rtol=1e-5, msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys(), what
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=2e-6, rtol=1e-4,
                                   msg=lambda m, key=key: f"{what}: grad of {key}\n{m}")


@pytest.mark.parametrize("llm", FAMILIES)
def test_chunked_loss_equals_full_logits_loss(tiny, llm):
    model, tok = _load(tiny[llm])
    model.train()
    batch = _batch(tok)
    ref = _run(model, batch, return_logits=True)
    got = _run(model, batch)
    assert got[0].logits is None and ref[0].logits is not None
    assert torch.isfinite(got[0].loss) and got[0].loss > 0
    assert any(k.startswith("vision_model.") for k in got[1]) and "mlp1.1.weight" in got[1]
    if llm == "gpt_oss":  # the router aux loss is in both paths
        torch.testing.assert_close(got[0].aux_loss, ref[0].aux_loss)
    _assert_same(got, ref, llm)


@pytest.mark.parametrize("llm", ["internlm3", "gpt_oss"])
def test_packed_equals_padded(tiny, llm):
    """GPT-OSS: transformers builds its masks without the position ids; the chat model passes packed masks."""
    model, tok = _load(tiny[llm])
    model.eval()
    with torch.no_grad():
        padded, packed = model(**_batch(tok)).loss, model(**_batch(tok, packed=True)).loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_gpt_oss_aux_loss_experts_router_and_sinks_learn(tiny):
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    model, tok = _load(tiny["gpt_oss"])
    model.train()
    cfg = model.config.llm_config
    batch = _batch(tok)
    out, grads = _run(model, batch)
    expected = load_balancing_loss_func(out.router_logits, 4, 2, batch["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected)
    assert len(out.router_logits) == cfg.num_hidden_layers and out.aux_loss > 0
    cfg.output_router_logits = False  # off: the plain LM loss, no aux
    plain, _ = _run(model, batch)
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
    model, tok = _load(tiny[llm])
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
    ref, got = _run(model, batch, return_logits=True), _run(model, batch)
    assert any("lora_A" in k for k in got[1])
    _assert_same(got, ref, f"{llm} LoRA")


@pytest.mark.parametrize("llm", FAMILIES)
def test_cached_generation_equals_greedy_full_forwards(tiny, llm):
    model, tok = _load(tiny[llm])
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
