"""InternLM3 and GPT-OSS LLMs to the transformers-native InternVL layout and back, and 16-bit loading of the MoE LLMs.

The export is read by transformers' own `InternVLForConditionalGeneration` (InternLM3 as a Llama text model, GPT-OSS
as gpt_oss) with the same logits and greedy tokens as ours; converting back gives the original weights bit for bit.
A bfloat16 load through our loader (the chat CLI's path) gives every tensor the dtype transformers' own class gives
it, and the same logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from internvl_chat import hf_convert, inference
from internvl_chat.constants import IMG_CONTEXT_TOKEN
from internvl_chat.data.templates import get_template
from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.serving import end_token_ids
from internvl_chat.tiny_model import make_tiny_model
from tests.conftest import load_tool

# official llm_config architecture -> the native text config's model_type and architecture
NATIVE_TEXT = {"internlm3": ("llama", "LlamaForCausalLM"), "gpt_oss": ("gpt_oss", "GptOssForCausalLM")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_families")
    return {llm: make_tiny_model(root / llm, llm=llm, seed=7) for llm in ("internlm3", "gpt_oss", "qwen3_moe")}


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """Each tiny model exported by tools/convert_to_hf.py (the test runs the self-check's comparison itself)."""
    root = tmp_path_factory.mktemp("native")
    tool = load_tool("convert_to_hf")
    out = {}
    for llm, src in tiny.items():
        out[llm] = root / llm
        assert tool.main([str(src), str(out[llm]), "--no-check"]) == 0, llm
    return out


def _native(path, dtype=torch.float32):
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs"), info  # nothing missing, unexpected, mismatched
    return model.eval()


@pytest.mark.parametrize("llm", ["internlm3", "gpt_oss"])
def test_export_matches_ours_and_converts_back_bit_exact(llm, tiny, exported, tmp_path, capsys):
    src, hf = tiny[llm], exported[llm]
    config = json.loads((hf / "config.json").read_text())
    official = json.loads((src / "config.json").read_text())
    model_type, arch = NATIVE_TEXT[llm]
    assert config["model_type"] == "internvl" and config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["text_config"]["model_type"] == model_type and config["text_config"]["architectures"] == [arch]
    # the tokenizer's own ids (the released -HF GPT-OSS has 200021 / 200002 in its full vocabulary)
    tok = load_tokenizer(src)
    assert config["image_token_id"] == tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    eos = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    assert eos == end_token_ids(get_template(official["template"]), tok)
    if llm == "internlm3":  # qkv_bias / bias arrive as Llama's attention_bias / mlp_bias, the RoPE unchanged
        text = config["text_config"]
        assert text["attention_bias"] is False and text["mlp_bias"] is False and "qkv_bias" not in text
        assert text["rope_parameters"]["rope_type"] == "dynamic" and text["rope_parameters"]["factor"] == 6.0
    else:  # sinks, router and fused experts keep their names; the native text model runs eager (sinks kept)
        assert any(k.endswith("layers.0.self_attn.sinks") for k in hf_convert.load_state_dict(hf))
        native = _native(hf)
        assert native.model.language_model.config._attn_implementation == "eager"
        assert config["text_config"]["layer_types"] == ["sliding_attention", "full_attention"]

    # same logits on text + a 3-tile image (past GPT-OSS's 128-token window), same greedy tokens
    result = hf_convert.compare_logits(src, hf, generate_tokens=4)
    assert result["max_abs_diff"] <= 1e-4 and result["num_tiles"] == 3 and result["num_tokens"] > 128
    assert result["native_tokens"] == result["ours_tokens"]

    back = tmp_path / "back"
    assert load_tool("convert_from_hf").main([str(hf), str(back)]) == 0
    a, b = hf_convert.load_state_dict(src), hf_convert.load_state_dict(back)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((back / "config.json").read_text()) == official

    # a native checkpoint without our source config (as a released -HF one) also comes back and runs the same
    plain = tmp_path / "plain"
    shutil.copytree(hf, plain)
    stripped = {k: v for k, v in config.items() if k != hf_convert.SOURCE_CONFIG_KEY}
    stripped["text_config"] = {k: v for k, v in config["text_config"].items() if k != "architectures"}
    (plain / "config.json").write_text(json.dumps(stripped))
    again = hf_convert.convert_from_hf(plain, tmp_path / "plain_back")
    rebuilt = json.loads((again / "config.json").read_text())
    assert rebuilt["llm_config"]["architectures"] == [arch]  # InternLM3 comes back as the equivalent Llama
    b = hf_convert.load_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([tok("What is in the picture? Describe the colours.")["input_ids"]])
    with torch.no_grad():
        ref = InternVLChatModel.from_pretrained(src).eval()(input_ids=ids).logits
        got = InternVLChatModel.from_pretrained(again).eval()(input_ids=ids).logits
    assert torch.equal(ref, got)


def _llm_dtypes(ours: InternVLChatModel, native) -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
    """{name inside the decoder (+ lm_head): dtype} of both models, under the same names."""
    a = {n: p.dtype for n, p in ours.language_model.named_parameters()}
    b = {"model." + n: p.dtype for n, p in native.model.language_model.named_parameters()}
    b["lm_head.weight"] = native.lm_head.weight.dtype
    return a, b


@pytest.mark.parametrize("llm", ["gpt_oss", "qwen3_moe"])
def test_bfloat16_load_through_our_loader(llm, tiny, exported):
    src = tiny[llm]
    ours = InternVLChatModel.from_pretrained(src, torch_dtype=torch.bfloat16).eval()  # as cli/chat.py loads
    native = _native(exported[llm], torch.bfloat16)
    a, b = _llm_dtypes(ours, native)
    assert a == b  # what transformers' own class keeps in float32 under bf16, we keep too: nothing
    assert set(a.values()) == {torch.bfloat16}
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    if llm == "gpt_oss":
        layer = ours.language_model.model.layers[0]
        assert layer.self_attn.sinks.dtype == layer.mlp.router.weight.dtype == torch.bfloat16
        assert ours.language_model.config._attn_implementation == "eager"
        # under float16 transformers keeps GPT-OSS's norms in float32 (_keep_in_fp32_modules): so do we
        half = InternVLChatModel.from_pretrained(src, torch_dtype=torch.float16)
        a16, b16 = _llm_dtypes(half, _native(exported[llm], torch.float16))
        assert a16 == b16 and a16["model.norm.weight"] == torch.float32
        assert a16["model.layers.0.self_attn.sinks"] == torch.float16

    tok = load_tokenizer(src)
    ours.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    prompt = inference.build_prompt(ours, "<image>\nWhat is in the picture?", num_patches_list=[1])
    ids = torch.tensor([tok(prompt)["input_ids"]])
    tile = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        logits = ours(pixel_values=tile, input_ids=ids, image_flags=torch.ones(1, dtype=torch.long)).logits
        reference = native(input_ids=ids, pixel_values=tile).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference)


def test_bfloat16_gpt_oss_checkpoint_round_trips_and_loads_as_saved(tmp_path):
    """A bf16 checkpoint (as released) exports and comes back bit-exact; "auto" loads it in its saved dtype."""
    src = make_tiny_model(tmp_path / "src", llm="gpt_oss", seed=8, dtype="bfloat16")
    hf = hf_convert.convert_to_hf(src, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    back = hf_convert.convert_from_hf(hf, tmp_path / "back")
    a, b = hf_convert.load_state_dict(src), hf_convert.load_state_dict(back)
    assert a.keys() == b.keys() and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    model = InternVLChatModel.from_pretrained(back, torch_dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
