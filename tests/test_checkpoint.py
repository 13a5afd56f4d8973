"""Checkpoint layout: official key names on disk, bit-identical save/load round trips for every LLM family."""

import json

import pytest
import torch
from safetensors import safe_open

from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.tiny_model import make_tiny_model

FAMILIES = ["qwen2", "llama", "phi3", "internlm2"]

# official names that must be on disk, per family (one layer shown)
OFFICIAL_LLM_KEYS = {
    "qwen2": ["language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.q_proj.bias",
              "language_model.model.layers.0.mlp.gate_proj.weight", "language_model.lm_head.weight"],
    "llama": ["language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.k_proj.weight",
              "language_model.model.layers.0.mlp.down_proj.weight", "language_model.lm_head.weight"],
    "phi3": ["language_model.model.layers.0.self_attn.qkv_proj.weight",
             "language_model.model.layers.0.mlp.gate_up_proj.weight", "language_model.lm_head.weight"],
    "internlm2": ["language_model.model.tok_embeddings.weight", "language_model.model.layers.0.attention.wqkv.weight",
                  "language_model.model.layers.0.attention.wo.weight",
                  "language_model.model.layers.0.feed_forward.w1.weight",
                  "language_model.model.layers.0.attention_norm.weight", "language_model.model.layers.0.ffn_norm.weight",
                  "language_model.output.weight"],
}
VISION_KEYS_300M = ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                    "vision_model.embeddings.position_embedding", "vision_model.encoder.layers.0.attn.qkv.weight",
                    "vision_model.encoder.layers.0.attn.qkv.bias", "vision_model.encoder.layers.0.attn.proj.weight",
                    "vision_model.encoder.layers.0.norm1.bias", "vision_model.encoder.layers.0.ls1",
                    "vision_model.encoder.layers.0.mlp.fc1.weight", "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.bias"]
VISION_KEYS_6B = ["vision_model.encoder.layers.0.attn.q_norm.weight", "vision_model.encoder.layers.0.attn.k_norm.weight"]


def read_safetensors(directory):
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dirs = {llm: make_tiny_model(root / llm, llm=llm, vit="300m", seed=1) for llm in FAMILIES}
    dirs["6b"] = make_tiny_model(root / "6b", llm="qwen2", vit="6b", seed=2)
    return dirs


@pytest.mark.parametrize("llm", FAMILIES)
def test_official_key_names_on_disk(tiny_dirs, llm):
    keys = set(read_safetensors(tiny_dirs[llm]))
    for key in OFFICIAL_LLM_KEYS[llm] + VISION_KEYS_300M:
        assert key in keys, key
    assert not any(k.startswith(("model.", "vision_tower.", "multi_modal_projector.")) for k in keys)
    config = json.loads((tiny_dirs[llm] / "config.json").read_text())
    assert config["model_type"] == "internvl_chat"
    assert config["vision_config"]["model_type"] == "intern_vit_6b"
    assert config["llm_config"]["architectures"] == [OFFICIAL_ARCH[llm]]
    assert "rope_theta" in config["llm_config"]  # transformers 4.x readers need the legacy spelling


OFFICIAL_ARCH = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM",
                 "internlm2": "InternLM2ForCausalLM"}


def test_6b_style_keys(tiny_dirs):
    keys = set(read_safetensors(tiny_dirs["6b"]))
    for key in VISION_KEYS_6B:
        assert key in keys
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in keys
    assert "vision_model.encoder.layers.0.norm1.bias" not in keys  # RMSNorm


@pytest.mark.parametrize("llm", FAMILIES + ["6b"])
def test_round_trip_bit_identical(tiny_dirs, tmp_path, llm):
    src = tiny_dirs[llm]
    model = InternVLChatModel.from_pretrained(src).eval()
    model.save_pretrained(tmp_path)
    a, b = read_safetensors(src), read_safetensors(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca = json.loads((src / "config.json").read_text())
    cb = json.loads((tmp_path / "config.json").read_text())
    assert ca == cb
    # and the reloaded model computes the same thing
    tok = load_tokenizer(src)
    again = InternVLChatModel.from_pretrained(tmp_path).eval()
    ids = tok("<|im_start|>user\nhello there<|im_end|>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.language_model(input_ids=ids).logits, again.language_model(input_ids=ids).logits)


def test_sharded_round_trip(tiny_dirs, tmp_path):
    model = InternVLChatModel.from_pretrained(tiny_dirs["internlm2"])
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(read_safetensors(tiny_dirs["internlm2"]))
    again = InternVLChatModel.from_pretrained(tmp_path)
    ref = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_bf16_round_trip(tiny_dirs, tmp_path):
    model = InternVLChatModel.from_pretrained(tiny_dirs["phi3"], torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = InternVLChatModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    for k, v in again.state_dict().items():
        assert torch.equal(v, tensors[k]), k


def test_unknown_fields_survive(tiny_dirs, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((tiny_dirs["qwen2"] / "config.json").read_text())
    config["my_top_level_field"] = {"a": 1}
    config["system_message"] = "You are a tiny test model."
    config["llm_config"]["legacy_generation_field"] = 0.7
    config["llm_config"]["max_length"] = 20
    config["vision_config"]["some_vision_extra"] = [1, 2]
    (src / "config.json").write_text(json.dumps(config))
    for f in tiny_dirs["qwen2"].glob("*.safetensors"):
        (src / f.name).write_bytes(f.read_bytes())
    model = InternVLChatModel.from_pretrained(src)
    assert model.system_message == "You are a tiny test model."
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["my_top_level_field"] == {"a": 1}
    assert saved["system_message"] == "You are a tiny test model."
    assert saved["llm_config"]["legacy_generation_field"] == 0.7
    assert saved["llm_config"]["max_length"] == 20
    assert saved["vision_config"]["some_vision_extra"] == [1, 2]


def test_changed_fields_are_written(tiny_dirs, tmp_path):
    model = InternVLChatModel.from_pretrained(tiny_dirs["qwen2"])
    model.config.template = "internvl2_5"
    model.config.max_dynamic_patch = 6
    model.config.llm_config.use_cache = False
    model.config.vision_config.drop_path_rate = 0.1
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["template"] == "internvl2_5" and saved["max_dynamic_patch"] == 6
    assert saved["llm_config"]["use_cache"] is False
    assert saved["vision_config"]["drop_path_rate"] == 0.1


def test_remote_code_is_never_run(tiny_dirs, tmp_path):
    """auto_map + *.py in the checkpoint (as released checkpoints have) load without executing anything."""
    for f in tiny_dirs["qwen2"].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_internvl_chat.py").write_text("raise RuntimeError('remote code executed')\n")
    model = InternVLChatModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert isinstance(model, InternVLChatModel)


def test_deterministic_tiny_model(tmp_path):
    a = make_tiny_model(tmp_path / "a", llm="qwen2", seed=5)
    b = make_tiny_model(tmp_path / "b", llm="qwen2", seed=5)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = make_tiny_model(tmp_path / "c", llm="qwen2", seed=6)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path / "a", llm="qwen2", seed=5)


@pytest.mark.parametrize("llm", FAMILIES + ["6b"])
def test_chat_on_every_family(tiny_dirs, llm):
    model = InternVLChatModel.from_pretrained(tiny_dirs[llm]).eval()
    tok = load_tokenizer(tiny_dirs[llm])
    pixels = torch.randn(3, 3, 448, 448)
    gen = dict(max_new_tokens=4, do_sample=False)
    answer, history = model.chat(tok, pixels, "What is this?", gen, return_history=True)
    assert isinstance(answer, str) and history[0][0] == "<image>\nWhat is this?"
    follow = model.chat(tok, None, "And then?", gen, history=history)
    assert isinstance(follow, str)
    batch = model.batch_chat(tok, pixels, ["a?", "<image>\nb?"], gen, num_patches_list=[1, 2])
    assert len(batch) == 2
    # batch rows equal single-question chats (left padding must not change greedy results)
    single = model.chat(tok, pixels[1:], "<image>\nb?", gen)
    assert batch[1] == single


def test_weight_files_follow_the_umask(tiny_dirs, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        InternVLChatModel.from_pretrained(tiny_dirs["qwen2"]).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == oct(0o644)


def test_official_loading_keywords(tiny_dirs, tmp_path):
    """The official eval scripts pass load_in_8bit/load_in_4bit=False and torch_dtype; without a dtype the weights
    load in float32 (transformers 4 and the official code), whatever the config's torch_dtype says."""
    bf16 = tmp_path / "bf16"
    InternVLChatModel.from_pretrained(tiny_dirs["qwen2"], torch_dtype=torch.bfloat16).save_pretrained(bf16)
    model = InternVLChatModel.from_pretrained(bf16, load_in_8bit=False, load_in_4bit=False, low_cpu_mem_usage=True,
                                              use_flash_attn=True, trust_remote_code=True)
    assert model.dtype == torch.float32
    assert InternVLChatModel.from_pretrained(bf16, torch_dtype="bfloat16").dtype == torch.bfloat16
    assert InternVLChatModel.from_pretrained(bf16, torch_dtype="auto").dtype == torch.bfloat16


def test_phi3_su_rope_follows_the_official_formula(tiny_dirs):
    """Phi-3 'su' scaling: inv_freq / factor (short below the original context, long above), cos/sin scaled by
    sqrt(1 + ln(max / original) / ln(original)), as the official Phi3SuScaledRotaryEmbedding computes it."""
    import math

    model = InternVLChatModel.from_pretrained(tiny_dirs["phi3"])
    cfg = model.config.llm_config
    scaling = cfg.rope_scaling if getattr(cfg, "rope_scaling", None) else cfg.rope_parameters
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    base = getattr(cfg, "rope_theta", None) or scaling.get("rope_theta", 10000.0)
    original, longest = cfg.original_max_position_embeddings, cfg.max_position_embeddings
    rotary = model.language_model.model.rotary_emb
    for length in (100, original + 300):
        factors = torch.tensor(scaling["long_factor"] if length > original else scaling["short_factor"],
                               dtype=torch.float32)
        inv_freq = 1.0 / (factors * base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(length).float(), inv_freq)
        emb = torch.cat([angles, angles], dim=-1)
        scale = math.sqrt(1 + math.log(longest / original) / math.log(original))
        positions = torch.arange(length)[None]
        cos, sin = rotary(torch.zeros(1, length, head_dim), positions)
        torch.testing.assert_close(cos[0], emb.cos() * scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sin[0], emb.sin() * scale, atol=1e-5, rtol=1e-5)
