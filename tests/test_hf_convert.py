"""Official layout <-> transformers-native InternVL (internvl_chat/hf_convert.py, tools/convert_*_hf.py).

Per LLM family and ViT style a tiny model goes to the native layout: transformers' own class must give the same
logits as ours (float32, text + a 3-tile image) and the same greedy tokens, and the way back must return the same
safetensors keys and bytes. The exported tokenizer, chat template and image processor, run through transformers'
InternVLProcessor, give our prompt ids and tiles. Every refusal refuses with its reason.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_chat.hf_convert import (
    SOURCE_CONFIG_KEY,
    UnsupportedModelError,
    compare_logits,
    convert_from_hf,
    convert_to_hf,
    load_state_dict,
    probe_image,
)
from internvl_chat.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


to_hf_tool = _tool("convert_to_hf")
from_hf_tool = _tool("convert_from_hf")

TOL = 1e-4

# name -> make_tiny_model arguments, expected native text architecture
CASES = {
    "qwen2": (dict(llm="qwen2", template="internvl2_5"), "Qwen2ForCausalLM"),
    "llama": (dict(llm="llama"), "LlamaForCausalLM"),
    "phi3": (dict(llm="phi3"), "Phi3ForCausalLM"),
    "internlm2": (dict(llm="internlm2"), "LlamaForCausalLM"),
    # InternViT-6B style (RMSNorm, qk-norm, no qkv bias) and a feature layer other than the last
    "qwen2_vit6b_layer-2": (dict(llm="qwen2", vit="6b", select_layer=-2), "Qwen2ForCausalLM"),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_tiny_model(tmp_path_factory.mktemp(name) / "model", **CASES[name][0])
        return made[name]

    return get


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_matches_and_round_trips(name, tiny_dir, tmp_path):
    src = tiny_dir(name)
    hf = convert_to_hf(src, tmp_path / "hf")
    result = compare_logits(src, hf, generate_tokens=6)
    assert result["num_tiles"] == 3
    assert result["max_abs_diff"] <= TOL
    assert result["native_tokens"] == result["ours_tokens"]

    config = json.loads((hf / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert config["model_type"] == "internvl"
    assert config["text_config"]["architectures"] == [CASES[name][1]]
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    assert config["vision_feature_layer"] == source["select_layer"]
    assert config["vision_config"]["image_size"] == [448, 448]
    assert config["image_seq_length"] == 256 and config["downsample_ratio"] == 0.5
    assert config[SOURCE_CONFIG_KEY] == source
    from internvl_chat.model.tokenizer import load_tokenizer

    assert config["image_token_id"] == load_tokenizer(src).convert_tokens_to_ids("<IMG_CONTEXT>")

    back = convert_from_hf(hf, tmp_path / "back")
    _same_tensors(load_state_dict(src), load_state_dict(back))
    assert json.loads((back / "config.json").read_text()) == source


def test_native_key_names(tiny_dir, tmp_path):
    """Names written out independently from transformers' InternVL modeling code."""
    keys = set(load_file(str(convert_to_hf(tiny_dir("internlm2"), tmp_path / "hf") / "model.safetensors")))
    for key in [
        "model.vision_tower.embeddings.cls_token",
        "model.vision_tower.embeddings.position_embeddings",
        "model.vision_tower.embeddings.patch_embeddings.projection.weight",
        "model.vision_tower.encoder.layer.1.attention.q_proj.weight",
        "model.vision_tower.encoder.layer.1.attention.v_proj.bias",
        "model.vision_tower.encoder.layer.1.attention.projection_layer.weight",
        "model.vision_tower.encoder.layer.0.lambda_1",
        "model.vision_tower.encoder.layer.0.layernorm_after.weight",
        "model.vision_tower.encoder.layer.0.mlp.fc2.bias",
        "model.multi_modal_projector.layer_norm.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias",
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.1.self_attn.k_proj.weight",
        "model.language_model.layers.1.mlp.gate_proj.weight",
        "model.language_model.layers.1.post_attention_layernorm.weight",
        "model.language_model.norm.weight",
        "lm_head.weight",
    ]:
        assert key in keys
    assert not any("wqkv" in k or "attn.qkv" in k or k.startswith(("vision_model.", "mlp1.")) for k in keys)


def test_tied_embeddings_stay_tied(tiny_dir, tmp_path):
    src = tmp_path / "tied"
    shutil.copytree(tiny_dir("qwen2"), src)
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    weights = load_file(str(src / "model.safetensors"))
    del weights["language_model.lm_head.weight"]
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})

    hf = convert_to_hf(src, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    assert compare_logits(src, hf)["max_abs_diff"] <= TOL
    _same_tensors(load_state_dict(src), load_state_dict(convert_from_hf(hf, tmp_path / "back")))


def test_bfloat16_sharded_round_trip_is_bit_exact(tmp_path):
    src = make_tiny_model(tmp_path / "src", llm="internlm2", dtype="bfloat16", max_shard_size="300KB")
    assert len(list(src.glob("*.safetensors"))) > 1
    hf = convert_to_hf(src, tmp_path / "hf", max_shard_bytes=300_000)
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and set(index) == set(load_state_dict(hf))
    assert compare_logits(src, hf)["max_abs_diff"] <= TOL  # the native class reads the sharded export
    back = convert_from_hf(hf, tmp_path / "back", max_shard_bytes=300_000)
    a, b = load_state_dict(src), load_state_dict(back)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def _legacy_key(key: str) -> str:
    """The key prefixes of older native checkpoints (transformers' `_checkpoint_conversion_mapping`)."""
    renames = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]
    for new, old in renames:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def test_native_resave_and_plain_native_checkpoint(tiny_dir, tmp_path):
    """A model saved by transformers (as LLaMA-Factory / TRL do) converts back; without our stored config too."""
    from transformers import InternVLForConditionalGeneration

    src = tiny_dir("qwen2")
    hf = convert_to_hf(src, tmp_path / "hf")
    resaved = tmp_path / "resaved"
    InternVLForConditionalGeneration.from_pretrained(str(hf)).save_pretrained(str(resaved))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy2(hf / name, resaved / name)
    _same_tensors(load_state_dict(src), load_state_dict(convert_from_hf(resaved, tmp_path / "back")))

    # an -HF release: no stored official config, older key prefixes
    plain = tmp_path / "plain"
    shutil.copytree(hf, plain)
    config = json.loads((plain / "config.json").read_text())
    del config[SOURCE_CONFIG_KEY]
    (plain / "config.json").write_text(json.dumps(config))
    weights = load_file(str(plain / "model.safetensors"))
    legacy = {_legacy_key(k): v for k, v in weights.items()}
    save_file(legacy, str(plain / "model.safetensors"), metadata={"format": "pt"})
    back = convert_from_hf(plain, tmp_path / "plain_back")
    _same_tensors(load_state_dict(src), load_state_dict(back))
    official = json.loads((back / "config.json").read_text())
    assert official["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert official["llm_config"]["rope_theta"] == 1000000.0
    assert (official["ps_version"], official["max_dynamic_patch"], official["use_thumbnail"]) == ("v2", 12, True)
    result = compare_logits(back, hf, generate_tokens=4)
    assert result["max_abs_diff"] <= TOL and result["native_tokens"] == result["ours_tokens"]


def test_processor_files_reproduce_our_tiling(tiny_dir, tmp_path):
    """The exported image processor (PIL backend, no torchvision) gives our tiles bit for bit."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from internvl_chat.data.transforms import image_to_tiles, normalize_tiles

    hf = convert_to_hf(tiny_dir("qwen2"), tmp_path / "hf")
    processor = AutoImageProcessor.from_pretrained(str(hf))
    for size in [(896, 448), (500, 1300), (123, 77)]:
        image = probe_image().resize(size)
        ours = normalize_tiles(image_to_tiles(image, dynamic=True, max_num=12, image_size=448, use_thumbnail=True))
        native = processor(images=[image], return_tensors="pt")["pixel_values"]
        assert native.shape == ours.shape and torch.equal(native, ours)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    config = json.loads((hf / "config.json").read_text())
    assert tokenizer.context_image_token_id == config["image_token_id"]
    assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
    assert json.loads((hf / "processor_config.json").read_text())["image_seq_length"] == 256

    single = tmp_path / "single"  # no dynamic tiling: one tile, the whole image resized
    shutil.copytree(tiny_dir("qwen2"), single)
    config = json.loads((single / "config.json").read_text())
    config["dynamic_image_size"] = False
    (single / "config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(str(convert_to_hf(single, tmp_path / "single_hf")))
    image = probe_image().resize((500, 1300))
    ours = normalize_tiles(image_to_tiles(image, dynamic=False, image_size=448))
    assert torch.equal(processor(images=[image], return_tensors="pt")["pixel_values"], ours)


def _edit(config: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"ps_version": "v1"}, "pixel shuffle v1"),
        ({"vision_config.layer_norm_eps": 1e-5, "vision_config.qk_normalization": True,
          "vision_config.qkv_bias": False}, "qk-norm with eps"),
        ({"force_image_size": 224}, "force_image_size"),
        ({"use_llm_lora": 8}, "unmerged LoRA"),
        ({"pad2square": True}, "pad2square"),
        ({"use_thumbnail": False}, "thumbnail"),
        ({"llm_config.architectures": ["MistralForCausalLM"]}, "cannot be exported"),
    ],
)
def test_refusals(edits, message, tiny_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir("qwen2"), src)
    config = json.loads((src / "config.json").read_text())
    for path, value in edits.items():
        _edit(config, path, value)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=message):
        convert_to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert to_hf_tool.main([str(src), str(tmp_path / "hf2")]) == 2
    assert message in capsys.readouterr().err


def test_tools(tiny_dir, tmp_path, capsys, monkeypatch):
    src = tiny_dir("llama")
    assert to_hf_tool.main([str(src), str(tmp_path / "hf")]) == 0
    assert "max |logits diff| = 0" in capsys.readouterr().out
    assert from_hf_tool.main([str(tmp_path / "hf"), str(tmp_path / "back"), "--check"]) == 0
    assert "max |logits diff|" in capsys.readouterr().out
    assert to_hf_tool.main([str(src), str(tmp_path / "hf")]) == 2  # not empty, no --overwrite
    # a self-check above the tolerance fails the command
    import internvl_chat.hf_convert as hf_convert

    monkeypatch.setattr(hf_convert, "compare_logits",
                        lambda *a, **k: {"max_abs_diff": 1e-3, "num_tiles": 3, "num_tokens": 10})
    assert to_hf_tool.main([str(src), str(tmp_path / "hf"), "--overwrite"]) == 1
    assert from_hf_tool.main([str(src), str(tmp_path / "x")]) == 2  # not a native checkpoint


@pytest.mark.parametrize("name", ["qwen2", "llama", "phi3", "internlm2"])
def test_native_prompt_equals_ours(name, tiny_dir, tmp_path):
    """The exported tokenizer (no remote code) and chat_template, with the image part expanded the way the native
    InternVLProcessor does, give our prompt's token ids; generation stops at the template's end token."""
    from transformers import AutoTokenizer

    from internvl_chat import inference
    from internvl_chat.data.templates import get_template
    from internvl_chat.model import InternVLChatModel
    from internvl_chat.model.tokenizer import load_tokenizer

    src = tiny_dir(name)
    hf = convert_to_hf(src, tmp_path / "hf")
    native_tokenizer = AutoTokenizer.from_pretrained(str(hf))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = native_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<IMG_CONTEXT>") == 1 and "<image>" not in text
    text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 256 * 3 + "</img>")  # InternVLProcessor
    native_ids = native_tokenizer(text, add_special_tokens=False).input_ids

    model = InternVLChatModel.from_pretrained(str(src))
    tokenizer = load_tokenizer(src)
    ours = tokenizer(inference.build_prompt(model, "<image>\nWhat is this?", num_patches_list=[3])).input_ids
    assert native_ids == ours

    eos = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    assert inference.stop_token_id(get_template(model.template), tokenizer) in eos
    back = convert_from_hf(hf, tmp_path / "back")
    assert "'<image>\\n'" in json.loads((back / "tokenizer_config.json").read_text())["chat_template"]


def _image_only_processor(folder: Path):
    """transformers' InternVLProcessor from the exported files, minus its video processor (which imports
    torchvision, not installed here); everything an image request goes through is transformers' own code."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    settings = json.loads((folder / "processor_config.json").read_text())
    return ImageOnlyInternVLProcessor(AutoImageProcessor.from_pretrained(str(folder)), tokenizer,
                                      image_seq_length=settings["image_seq_length"],
                                      chat_template=tokenizer.chat_template)


@pytest.mark.parametrize("name", ["qwen2", "internlm2"])
def test_native_processor_and_generate_end_to_end(name, tiny_dir, tmp_path):
    """A chat request through the native processor and model gives our prompt, our tiles and our greedy reply."""
    from transformers import InternVLForConditionalGeneration

    from internvl_chat import inference
    from internvl_chat.model import InternVLChatModel
    from internvl_chat.model.tokenizer import load_tokenizer

    src = tiny_dir(name)
    hf = convert_to_hf(src, tmp_path / "hf")
    processor = _image_only_processor(hf)
    messages = [{"role": "user", "content": [{"type": "image", "image": probe_image()},
                                             {"type": "text", "text": "What is this?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")

    model = InternVLChatModel.from_pretrained(str(src)).eval()
    tokenizer = load_tokenizer(src)
    pixel_values, num_patches = inference.images_for_model(model, [probe_image()])
    prompt = inference.build_prompt(model, "<image>\nWhat is this?", num_patches_list=num_patches)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert inputs["input_ids"].tolist() == input_ids.tolist()
    assert torch.equal(inputs["pixel_values"], pixel_values)

    native = InternVLForConditionalGeneration.from_pretrained(str(hf)).eval()
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = native.generate(**inputs, **settings)[0, input_ids.shape[1]:]
        ours = model.generate(pixel_values=pixel_values, input_ids=input_ids,
                              attention_mask=torch.ones_like(input_ids), **settings)[0]
    assert theirs.tolist() == ours.tolist()


def test_from_hf_refuses_what_has_no_official_class():
    from internvl_chat.hf_convert import hf_to_official_config

    native = {"model_type": "internvl", "vision_config": {"hidden_size": 8, "num_hidden_layers": 1,
                                                          "num_attention_heads": 1, "intermediate_size": 8},
              "text_config": {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}}
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        hf_to_official_config(native, {})
    native["text_config"] = {"model_type": "qwen2"}
    native["vision_config"]["use_mean_pooling"] = False
    with pytest.raises(UnsupportedModelError, match="final layernorm"):
        hf_to_official_config(native, {})
