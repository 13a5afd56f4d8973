"""InternLM2 model: official key names and layout, parity with transformers' Llama, RoPE scaling, generation.

The parity tests build the InternLM2 weights from a random ``LlamaForCausalLM`` with a fusing routine written here
with explicit loops straight from the official layout description (per KV head: its query heads, then its key head,
then its value head), so a wrong ``wqkv`` interpretation in the model cannot hide behind the model file's own
converter. The converter is then checked separately against that same independent routine.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from internvl_chat.model.internlm2 import (
    InternLM2Config,
    InternLM2ForCausalLM,
    internlm2_to_llama_config,
    internlm2_to_llama_state_dict,
)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # large enough that greedy choices are not near-ties
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)


def tiny_config(**overrides) -> InternLM2Config:
    return InternLM2Config(**{**TINY, **overrides})


def llama_from_internlm2_config(config: InternLM2Config) -> LlamaForCausalLM:
    """A random Llama with the same shapes, written independently of `internlm2_to_llama_config`."""
    rope = None
    if config.rope_parameters.get("rope_type", "default") != "default":
        rope = {"rope_type": config.rope_parameters["rope_type"], "factor": config.rope_parameters["factor"]}
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range,
        attention_bias=config.bias,
        rope_parameters={"rope_theta": config.rope_theta, **(rope or {"rope_type": "default"})},
        pad_token_id=config.pad_token_id,
        attn_implementation="eager",
    )
    llama = LlamaForCausalLM(llama_config).eval()
    with torch.no_grad():  # random norm weights and biases too, so the renames of those are exercised
        for name, param in llama.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    return llama


def fuse_llama_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Official wqkv output rows: for each KV head h, query heads h*groups..h*groups+groups-1, then k_h, then v_h."""
    head_dim = k.shape[0] // kv_heads
    groups = heads // kv_heads
    rows = []
    for h in range(kv_heads):
        for g in range(groups):
            qh = h * groups + g
            rows.append(q[qh * head_dim : (qh + 1) * head_dim])
        rows.append(k[h * head_dim : (h + 1) * head_dim])
        rows.append(v[h * head_dim : (h + 1) * head_dim])
    return torch.cat(rows, dim=0)


def llama_to_official_state_dict(llama_sd: dict, config: InternLM2Config) -> dict:
    """Independent inverse of the converter: Llama keys -> official InternLM2 keys."""
    out = {
        "model.tok_embeddings.weight": llama_sd["model.embed_tokens.weight"],
        "model.norm.weight": llama_sd["model.norm.weight"],
        "output.weight": llama_sd["lm_head.weight"],
    }
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        params = ["weight"] + (["bias"] if config.bias else [])
        for p in params:
            out[dst + f"attention.wqkv.{p}"] = fuse_llama_qkv(
                *(llama_sd[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"), heads, kv
            )
            out[dst + f"attention.wo.{p}"] = llama_sd[src + f"self_attn.o_proj.{p}"]
        out[dst + "feed_forward.w1.weight"] = llama_sd[src + "mlp.gate_proj.weight"]
        out[dst + "feed_forward.w3.weight"] = llama_sd[src + "mlp.up_proj.weight"]
        out[dst + "feed_forward.w2.weight"] = llama_sd[src + "mlp.down_proj.weight"]
        out[dst + "attention_norm.weight"] = llama_sd[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = llama_sd[src + "post_attention_layernorm.weight"]
    return out


def twin_models(config: InternLM2Config) -> tuple[InternLM2ForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    llama = llama_from_internlm2_config(config)
    model = InternLM2ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(llama_to_official_state_dict(llama.state_dict(), config), strict=True)
    assert not missing and not unexpected
    return model, llama


PARITY_CASES = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "gqa_bias": dict(bias=True),
    "mha_bias": dict(num_key_value_heads=4, bias=True),
    "gqa_no_bias": dict(bias=False),
    "dynamic": dict(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0}, rope_theta=1e6),
    "dynamic_bias_mha": dict(
        num_key_value_heads=4, bias=True, max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 3.0}
    ),
    "linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_match_llama(case):
    config = tiny_config(**PARITY_CASES[case])
    model, llama = twin_models(config)
    # 24 tokens > max_position_embeddings 16 in the dynamic cases, so the NTK rescaling is active.
    ids = torch.randint(3, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        ref = llama(ids).logits
    assert ours.shape == (2, 24, config.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["gqa_bias", "mha", "dynamic"])
def test_converter_reproduces_llama(case):
    config = tiny_config(**PARITY_CASES[case])
    model, llama = twin_models(config)
    converted = internlm2_to_llama_state_dict(model.state_dict(), config)
    assert set(converted) == set(llama.state_dict())
    for key, value in llama.state_dict().items():
        torch.testing.assert_close(converted[key], value, atol=0, rtol=0, msg=key)

    # The exported config builds a Llama that, loaded with the converted weights, gives the same logits.
    exported = LlamaForCausalLM(internlm2_to_llama_config(config)).eval()
    exported.load_state_dict(converted, strict=True)
    ids = torch.randint(3, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_converter_rejects_unknown_and_lora_keys():
    config = tiny_config(num_hidden_layers=1)
    sd = InternLM2ForCausalLM(config).state_dict()
    with pytest.raises(KeyError, match="model.layers.0.attention.extra.weight"):
        internlm2_to_llama_state_dict({**sd, "model.layers.0.attention.extra.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="LoRA"):
        internlm2_to_llama_state_dict({"model.layers.0.attention.wqkv.lora_A.default.weight": torch.zeros(1)}, config)
    bad = dict(sd)
    bad["model.layers.0.attention.wqkv.weight"] = torch.zeros(10, config.hidden_size)
    with pytest.raises(ValueError, match="output features"):
        internlm2_to_llama_state_dict(bad, config)


def official_dynamic_inv_freq(base: float, dim: int, factor: float, max_pos: int, seq_len: int) -> torch.Tensor:
    """Dynamic-NTK frequencies as the official InternLM2 code defines them (float64 here)."""
    if seq_len > max_pos:
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


@pytest.mark.parametrize("seq_len", [10, 16, 40])
def test_dynamic_rope_follows_official_formula(seq_len):
    config = tiny_config(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0}, rope_theta=1e6)
    model = InternLM2ForCausalLM(config).eval()
    x = torch.zeros(1, seq_len, config.hidden_size)
    position_ids = torch.arange(seq_len)[None]
    cos, sin = model.model.rotary_emb(x, position_ids)
    inv = official_dynamic_inv_freq(1e6, config.head_dim, 2.0, 16, seq_len)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None]
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0].double(), angles.cos(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin[0].double(), angles.sin(), atol=2e-5, rtol=0)


def test_linear_rope_follows_official_formula():
    config = tiny_config(rope_scaling={"type": "linear", "factor": 4.0})
    model = InternLM2ForCausalLM(config).eval()
    cos, _ = model.model.rotary_emb(torch.zeros(1, 12, config.hidden_size), torch.arange(12)[None])
    dim = config.head_dim
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = (torch.arange(12, dtype=torch.float64) / 4.0)[:, None] * inv[None]  # official: t / scaling_factor
    torch.testing.assert_close(cos[0].double(), torch.cat([angles, angles], -1).cos(), atol=2e-6, rtol=0)


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=-1)
    return ids


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_cache_matches_recomputation(attn):
    config = tiny_config(attn_implementation=attn)
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(config).eval()
    assert model.config._attn_implementation == attn
    ids = torch.randint(3, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = greedy_without_cache(model, ids, 8)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_matches_single_prompts(attn):
    config = tiny_config(attn_implementation=attn)
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    pad = config.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()

    kwargs = dict(
        max_new_tokens=8, do_sample=False, eos_token_id=None, output_scores=True, return_dict_in_generate=True
    )
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        assert torch.equal(batch.sequences[row, width:], alone.sequences[0, len(prompt) :])
        for step_batch, step_alone in zip(batch.scores, alone.scores):
            torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-4, rtol=0)


def test_generate_from_inputs_embeds():
    config = tiny_config()
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    embeds = model.get_input_embeddings()(ids)
    out = model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, eos_token_id=None
    )
    # With inputs_embeds only the new tokens come back; they must continue the same text as from the ids.
    assert torch.equal(out, greedy_without_cache(model, ids, 5)[:, 6:])


OFFICIAL_KEYS_ONE_LAYER = [
    "model.layers.0.attention.wo.bias",
    "model.layers.0.attention.wo.weight",
    "model.layers.0.attention.wqkv.bias",
    "model.layers.0.attention.wqkv.weight",
    "model.layers.0.attention_norm.weight",
    "model.layers.0.feed_forward.w1.weight",
    "model.layers.0.feed_forward.w2.weight",
    "model.layers.0.feed_forward.w3.weight",
    "model.layers.0.ffn_norm.weight",
    "model.norm.weight",
    "model.tok_embeddings.weight",
    "output.weight",
]


def test_state_dict_has_official_names_and_shapes(tmp_path):
    config = tiny_config(num_hidden_layers=1, bias=True)
    model = InternLM2ForCausalLM(config)
    sd = model.state_dict()
    assert sorted(sd) == OFFICIAL_KEYS_ONE_LAYER
    assert sorted(InternLM2ForCausalLM(tiny_config(num_hidden_layers=1, bias=False)).state_dict()) == [
        k for k in OFFICIAL_KEYS_ONE_LAYER if not k.endswith(".bias")
    ]
    # 2 KV heads x (2 query heads + k + v) x head_dim 16
    assert sd["model.layers.0.attention.wqkv.weight"].shape == (2 * 4 * 16, 64)
    assert sd["model.layers.0.attention.wo.weight"].shape == (64, 64)
    assert sd["model.layers.0.feed_forward.w1.weight"].shape == (96, 64)
    assert sd["model.layers.0.feed_forward.w2.weight"].shape == (64, 96)

    # save_pretrained writes the same names and from_pretrained restores the same model
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == OFFICIAL_KEYS_ONE_LAYER
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "internlm2" and saved["bias"] is True
    reloaded = InternLM2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)


def test_peft_lora_targets_are_the_official_ones():
    peft = pytest.importorskip("peft")
    model = InternLM2ForCausalLM(tiny_config())
    targets = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    wrapped = {name for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert len(wrapped) == len(targets) * 2  # every target in both layers
    assert all(any(name.endswith(t) for t in targets) for name in wrapped)


def test_training_features():
    config = tiny_config()
    model = InternLM2ForCausalLM(config)
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    ids = torch.randint(3, config.vocab_size, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    out.loss.backward()
    assert model.model.layers[0].attention.wqkv.weight.grad is not None
    # the loss is the mean next-token cross entropy over supervised positions
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, config.vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)

    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, full[:, -1:])

    model.resize_token_embeddings(136, mean_resizing=False)
    assert model.get_input_embeddings().weight.shape == (136, 64)
    assert model.get_output_embeddings().weight.shape == (136, 64)
    assert model.config.vocab_size == 136


def official_llm_config() -> dict:
    """An llm_config as found in an InternVL2-8B style config.json (written by hand, tiny sizes)."""
    return {
        "_name_or_path": "internlm/internlm2_5-7b-chat",
        "add_cross_attention": False,
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bad_words_ids": None,
        "begin_suppress_tokens": None,
        "bias": False,
        "bos_token_id": 1,
        "chunk_size_feed_forward": 0,
        "cross_attention_hidden_size": None,
        "decoder_start_token_id": None,
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": False,
        "encoder_no_repeat_ngram_size": 0,
        "eos_token_id": 2,
        "exponential_decay_length_penalty": None,
        "finetuning_task": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "hidden_act": "silu",
        "hidden_size": 64,
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "is_decoder": False,
        "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1},
        "length_penalty": 1.0,
        "max_length": 20,
        "max_position_embeddings": 32,
        "min_length": 0,
        "model_type": "internlm2",
        "no_repeat_ngram_size": 0,
        "num_attention_heads": 4,
        "num_beam_groups": 1,
        "num_beams": 1,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_return_sequences": 1,
        "output_attentions": False,
        "output_hidden_states": False,
        "output_scores": False,
        "pad_token_id": 2,
        "prefix": None,
        "pretraining_tp": 1,
        "problem_type": None,
        "pruned_heads": {},
        "remove_invalid_values": False,
        "repetition_penalty": 1.0,
        "return_dict": True,
        "return_dict_in_generate": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"},
        "rope_theta": 1000000,
        "sep_token_id": None,
        "suppress_tokens": None,
        "task_specific_params": None,
        "temperature": 1.0,
        "tf_legacy_loss": False,
        "tie_encoder_decoder": False,
        "tie_word_embeddings": False,
        "tokenizer_class": None,
        "top_k": 50,
        "top_p": 1.0,
        "torch_dtype": "bfloat16",
        "torchscript": False,
        "transformers_version": "4.37.2",
        "typical_p": 1.0,
        "use_bfloat16": False,
        "use_cache": True,
        "vocab_size": 128,
    }


@pytest.mark.parametrize("how", ["kwargs", "from_dict"])
def test_loads_official_llm_config(how):
    raw = official_llm_config()
    pristine = copy.deepcopy(raw)
    config = InternLM2Config(**raw) if how == "kwargs" else InternLM2Config.from_dict(raw)
    assert raw == pristine, "the caller's dict must not be modified"

    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 4, 2)
    assert config.bias is False and config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert config.rope_theta == 1000000
    assert config.rope_parameters["rope_type"] == "dynamic" and config.rope_parameters["factor"] == 2.0
    assert config.dtype == torch.bfloat16
    assert config._attn_implementation == "eager"

    model = InternLM2ForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert model(torch.randint(3, 128, (1, 40))).logits.shape == (1, 40, 128)  # 40 > 32: dynamic scaling on


def test_serialized_config_keeps_official_rope_keys():
    config = InternLM2Config(**official_llm_config())
    for d in (config.to_dict(), config.to_diff_dict()):
        assert d["rope_theta"] == 1000000
        assert d["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
        assert "rope_parameters" not in d
        assert d["model_type"] == "internlm2" and d["attn_implementation"] == "eager"
    again = InternLM2Config.from_dict(json.loads(config.to_json_string(use_diff=False)))
    assert again.rope_parameters == config.rope_parameters
    assert again.to_dict() == config.to_dict()

    plain = tiny_config().to_dict()
    assert plain["rope_scaling"] is None and plain["rope_theta"] == 10000.0
    # the official model only has "eager" and "flash_attention_2" attention classes
    assert tiny_config(attn_implementation="sdpa").to_dict()["attn_implementation"] == "eager"
    assert tiny_config(attn_implementation="flash_attention_2").to_dict()["attn_implementation"] == "flash_attention_2"


def test_flash_attention_request_falls_back_without_flash_attn():
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    model = InternLM2ForCausalLM(tiny_config(attn_implementation="flash_attention_2"))
    assert model.config.attn_implementation == "flash_attention_2"  # kept for the saved config
    assert model.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "unsupported RoPE scaling type 'yarn'"),
        (dict(rope_scaling={"type": "dynamic"}), "needs a numeric 'factor'"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "needs a numeric 'factor'"),
        (dict(rope_scaling={"factor": 2.0}), "has no 'type'"),
        (dict(num_attention_heads=5), "not a multiple of num_attention_heads"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    ],
)
def test_bad_config_is_rejected_with_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_wrongly_typed_field_is_rejected():
    with pytest.raises(Exception, match="Field 'bias' expected bool"):
        tiny_config(bias="yes")


def test_hidden_states_output():
    config = tiny_config()
    model = InternLM2ForCausalLM(config).eval()
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        base = model.model(ids)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(ids))
    torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state)
    assert math.isfinite(out.logits.abs().sum().item())
