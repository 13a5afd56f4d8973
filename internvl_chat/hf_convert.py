"""Official InternVL layout <-> transformers-native `InternVLForConditionalGeneration` (the `-hf` layout).

`to_hf` renames the weights (vision tower with q/k/v split, layer scales, projector, LLM under
`model.language_model`), writes an `InternVLConfig` and the processor files; `from_hf` is the exact inverse.
Every tensor is copied or sliced/concatenated, never recomputed, so `to_hf` then `from_hf` gives back the same
safetensors keys and bytes. InternLM2 LLMs become Llama (the grouped `wqkv` de-interleaved into q/k/v), InternLM3
ones a Llama text config over the same weights; the export keeps the whole official `config.json` under
`SOURCE_CONFIG_KEY`, which is what lets `from_hf` give InternLM2 and InternLM3 back.

What the native class cannot express is refused before anything is written (`UnsupportedModelError`, one reason
each): pixel shuffle v1, an InternViT qk-norm eps other than the native fixed 1e-6, a tile size other than the
ViT's trained one, unmerged LoRA, `pad2square`, tiling without thumbnail, LLM families it has no class for.

The processor files reproduce our tiling (the GotOcr2 image processor gives our tiles bit for bit with its PIL
backend), and the tokenizer gets our training template as `chat_template` (serving.py; image parts become the
native `<IMG_CONTEXT>` placeholder) and its end token as eos in `generation_config.json`. The self-check
(`compare_logits`) runs both models in float32 on a probe of text and a several-tile image tiled by our own
`data/transforms.py`, so it needs no torchvision (which transformers 5's InternVL video processor imports).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

# config.json field of an export that holds the official config.json it came from (read back by `from_hf`)
SOURCE_CONFIG_KEY = "internvl_chat_config"
# the native processor reads these named tokens from the tokenizer; `<video>` is its video placeholder
PROCESSOR_TOKENS = {
    "start_image_token": IMG_START_TOKEN,
    "end_image_token": IMG_END_TOKEN,
    "context_image_token": IMG_CONTEXT_TOKEN,
    "video_token": "<video>",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "tokenization_internlm2.py", "tokenization_internlm2_fast.py")
# architectures[0] of llm_config -> the architecture the native text model has
NATIVE_LLM = {
    "Qwen2ForCausalLM": "Qwen2ForCausalLM",
    "LlamaForCausalLM": "LlamaForCausalLM",
    "Phi3ForCausalLM": "Phi3ForCausalLM",
    "InternLM2ForCausalLM": "LlamaForCausalLM",
    # same key names both sides; MoE experts stay per expert on disk in both layouts
    "Qwen3ForCausalLM": "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "Qwen3MoeForCausalLM",
    # InternVL3-9B: the official InternLM3 code already uses Llama's key names; only the config becomes a LlamaConfig
    "InternLM3ForCausalLM": "LlamaForCausalLM",
    # fused experts, sinks and router under the same names both sides
    "GptOssForCausalLM": "GptOssForCausalLM",
}
# native text model_type -> official architecture, for a native checkpoint whose text config names no class
_OFFICIAL_ARCH_OF_TYPE = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM",
                          "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                          "gpt_oss": "GptOssForCausalLM"}
NATIVE_QK_NORM_EPS = 1e-6  # InternVLVisionAttention builds q_norm/k_norm with the RMSNorm default eps


class UnsupportedModelError(ValueError):
    """The checkpoint uses a feature `InternVLForConditionalGeneration` cannot express."""


# --------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files (single-file or sharded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weight file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in load_file(str(file)).items():
            if key in state:
                raise ValueError(f"{key!r} is stored twice in {folder}")
            state[key] = tensor
    return state


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` above `max_shard_bytes`."""
    state = {k: v.contiguous() for k, v in sorted(state.items())}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------------------
def check_exportable(config: dict[str, Any], keys: list[str] | None = None) -> None:
    """Raise `UnsupportedModelError` naming the first feature of an official config the native class lacks."""
    vision = config.get("vision_config") or {}
    llm = config.get("llm_config") or {}
    arch = (llm.get("architectures") or [None])[0]
    if arch not in NATIVE_LLM:
        raise UnsupportedModelError(
            f"LLM {arch!r} cannot be exported: supported LLM families are {sorted(NATIVE_LLM)}"
        )
    if config.get("ps_version", "v1") != "v2":
        raise UnsupportedModelError(
            "pixel shuffle v1 (ps_version='v1', InternVL 1.x) orders the image tokens differently; "
            "InternVLForConditionalGeneration implements only ps_version='v2'"
        )
    if config.get("use_backbone_lora") or config.get("use_llm_lora") or any("lora_" in k for k in keys or []):
        raise UnsupportedModelError(
            "the checkpoint holds unmerged LoRA adapters; merge them first (tools/merge_lora.py) and export the result"
        )
    if vision.get("qk_normalization") and vision.get("layer_norm_eps", 1e-6) != NATIVE_QK_NORM_EPS:
        raise UnsupportedModelError(
            f"InternViT qk-norm with eps {vision.get('layer_norm_eps')}: the native vision attention's q_norm/k_norm "
            f"use a fixed eps of {NATIVE_QK_NORM_EPS}, so the outputs would differ"
        )
    vit_size = vision.get("image_size", 224)
    tile = config.get("force_image_size") or vit_size
    if tile != vit_size:
        raise UnsupportedModelError(
            f"tiles of {tile} px on a ViT trained at {vit_size} px (force_image_size): the native config has one "
            "image size; resize the position embeddings to the tile size first (tools/resize_pos_embed.py)"
        )
    if config.get("pad2square"):
        raise UnsupportedModelError("pad2square=True: the native image processor cannot pad images to a square")
    if config.get("dynamic_image_size") and not config.get("use_thumbnail"):
        raise UnsupportedModelError(
            "dynamic tiling without a thumbnail (use_thumbnail=False): the native image processor always adds one"
        )
    select = config.get("select_layer", -1)
    n_layers = vision.get("num_hidden_layers", 48)
    if not -(n_layers + 1) <= select <= n_layers:  # both index the n+1 hidden states, embeddings first
        raise UnsupportedModelError(f"select_layer={select} is out of range for a ViT of {n_layers} layers")


# --------------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------------
# The ViT's names, official (after `vision_model.`) <-> native (after `model.vision_tower.`): both directions are
# read from this one table. `{field}` matches `_FIELDS[field]` and is carried over; a trailing `$` ends a whole name.
_VISION_NAMES = [
    ("embeddings.class_embedding$", "embeddings.cls_token$"),
    ("embeddings.position_embedding$", "embeddings.position_embeddings$"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("encoder.layers.{layer}.attn.proj.", "encoder.layer.{layer}.attention.projection_layer."),
    ("encoder.layers.{layer}.attn.{norm}.", "encoder.layer.{layer}.attention.{norm}."),
    ("encoder.layers.{layer}.ls{digit}$", "encoder.layer.{layer}.lambda_{digit}$"),
    ("encoder.layers.{layer}.norm1.", "encoder.layer.{layer}.layernorm_before."),
    ("encoder.layers.{layer}.norm2.", "encoder.layer.{layer}.layernorm_after."),
    ("encoder.layers.{layer}.mlp.", "encoder.layer.{layer}.mlp."),
]
_FIELDS = {"layer": r"\d+", "digit": r"\d", "norm": "q_norm|k_norm"}


def _rename_rules(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(regex, replacement) rules for `_rename` from (source, target) name templates."""
    rules = []
    for source, target in pairs:
        parts = re.split(r"\{(\w+)\}", source.rstrip("$"))
        pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for i, p in enumerate(parts))
        rules.append(("^" + pattern + ("$" if source.endswith("$") else ""),
                      re.sub(r"\{(\w+)\}", r"\\g<\1>", target.rstrip("$"))))
    return rules


_VISION_RENAMES = _rename_rules(_VISION_NAMES)
_VISION_RENAMES_BACK = _rename_rules([(native, official) for official, native in _VISION_NAMES])
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_PROJECTOR_BACK = {v: k for k, v in _PROJECTOR.items()}
# older native checkpoints (transformers' `_checkpoint_conversion_mapping`)
_LEGACY_NATIVE_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def _rename(name: str, rules: list[tuple[str, str]], what: str) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(f"unexpected {what} key {name!r}")


def _llm_config_object(llm: dict[str, Any]):
    """The live transformers config of an official `llm_config` dict, read as our model reads it."""
    from .model.configuration import _llm_config_from_dict

    return _llm_config_from_dict(llm)


def official_to_hf_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Official keys -> native keys; the ViT's fused qkv split in thirds, InternLM2's wqkv de-interleaved."""
    hidden = config["vision_config"]["hidden_size"]
    arch = config["llm_config"]["architectures"][0]
    out: dict[str, torch.Tensor] = {}
    llm: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("vision_model."):
            name = key[len("vision_model."):]
            qkv = re.match(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
            if qkv:
                layer, param = qkv.groups()
                if tensor.shape[0] != 3 * hidden:
                    raise ValueError(f"{key}: expected {3 * hidden} rows (q, k, v), got {tuple(tensor.shape)}")
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split(hidden, dim=0)):
                    out[f"model.vision_tower.encoder.layer.{layer}.attention.{part}.{param}"] = piece.clone()
            else:
                out["model.vision_tower." + _rename(name, _VISION_RENAMES, "vision")] = tensor
        elif key.startswith("mlp1."):
            index, param = key[len("mlp1."):].split(".", 1)
            if index not in _PROJECTOR:
                raise KeyError(f"unexpected projector key {key!r}")
            out[f"model.multi_modal_projector.{_PROJECTOR[index]}.{param}"] = tensor
        elif key.startswith("language_model."):
            llm[key[len("language_model."):]] = tensor
        else:
            raise KeyError(f"unexpected key {key!r}: not under vision_model., mlp1. or language_model.")
    if arch == "InternLM2ForCausalLM":
        from .model.internlm2 import internlm2_to_llama_state_dict

        llm = internlm2_to_llama_state_dict(llm, _llm_config_object(config["llm_config"]))
    for key, tensor in llm.items():
        if key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = tensor
        elif key == "lm_head.weight":
            out[key] = tensor
        else:
            raise KeyError(f"unexpected LLM key language_model.{key}")
    return out


def _llama_to_internlm2(llm: dict[str, torch.Tensor], icfg) -> dict[str, torch.Tensor]:
    """Inverse of `internlm2_to_llama_state_dict`: q/k/v interleaved back into the grouped `wqkv`."""
    from .model.internlm2 import _LAYER_RENAMES, _TOP_RENAMES

    top = {v: k for k, v in _TOP_RENAMES.items()}
    layer_back = {v: k for k, v in _LAYER_RENAMES.items()}
    kv_heads, groups, head_dim = icfg.num_key_value_heads, icfg.num_key_value_groups, icfg.head_dim
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in llm.items():
        if key in top:
            out[top[key]] = tensor
            continue
        m = re.match(r"^(model\.layers\.\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise KeyError(f"unexpected Llama key {key!r} for an InternLM2 LLM")
        layer, module, param = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            pending.setdefault((layer, param), {})[module[-6]] = tensor
        elif module in layer_back:
            out[f"{layer}.{layer_back[module]}.{param}"] = tensor
        else:
            raise KeyError(f"unexpected Llama key {key!r} for an InternLM2 LLM")
    for (layer, param), parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{layer}: q/k/v {param} incomplete ({sorted(parts)})")
        rest = parts["q"].shape[1:]
        q = parts["q"].reshape(kv_heads, groups, head_dim, *rest)
        k = parts["k"].reshape(kv_heads, 1, head_dim, *rest)
        v = parts["v"].reshape(kv_heads, 1, head_dim, *rest)
        out[f"{layer}.attention.wqkv.{param}"] = torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    return out


def hf_to_official_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Native keys -> official keys (the inverse of `official_to_hf_state_dict`); `config` is the official one."""
    arch = config["llm_config"]["architectures"][0]
    out: dict[str, torch.Tensor] = {}
    llm: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for old, new in _LEGACY_NATIVE_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key.startswith("model.vision_tower."):
            name = key[len("model.vision_tower."):]
            m = re.match(r"^encoder\.layer\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)$", name)
            if m:
                layer, part, param = m.groups()
                qkv.setdefault((layer, param), {})[part] = tensor
            else:
                out["vision_model." + _rename(name, _VISION_RENAMES_BACK, "native vision")] = tensor
        elif key.startswith("model.multi_modal_projector."):
            module, param = key[len("model.multi_modal_projector."):].split(".", 1)
            if module not in _PROJECTOR_BACK:
                raise KeyError(f"unexpected projector key {key!r}")
            out[f"mlp1.{_PROJECTOR_BACK[module]}.{param}"] = tensor
        elif key.startswith("model.language_model."):
            llm["model." + key[len("model.language_model."):]] = tensor
        elif key == "lm_head.weight":
            llm[key] = tensor
        else:
            raise KeyError(f"unexpected native key {key!r}")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"vision layer {layer}: q/k/v {param} incomplete ({sorted(parts)})")
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if arch == "InternLM2ForCausalLM":
        llm = _llama_to_internlm2(llm, _llm_config_object(config["llm_config"]))
    for key, tensor in llm.items():
        out["language_model." + key] = tensor
    return out


# --------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------
def _text_config(llm: dict[str, Any]) -> dict[str, Any]:
    """The LLM config as transformers 5 reads it (InternLM2 and InternLM3 as the equivalent LlamaConfig)."""
    from transformers import LlamaConfig

    from .model.internlm2 import internlm2_to_llama_config

    config = _llm_config_object(llm)
    if llm["architectures"][0] == "InternLM2ForCausalLM":
        config = internlm2_to_llama_config(config)
    elif llm["architectures"][0] == "InternLM3ForCausalLM":
        # InternLM3Config holds Llama's fields (qkv_bias / bias read as attention_bias / mlp_bias): the native
        # InternVL builds its text model from model_type, which must be "llama"
        config = LlamaConfig(**{k: v for k, v in config.to_dict().items()
                                if k not in ("model_type", "transformers_version")})
    text = config.to_dict()
    for key in ("attn_implementation", "_attn_implementation_internal", "transformers_version", "_name_or_path",
                "use_flash_attn", "auto_map"):
        text.pop(key, None)
    text["architectures"] = [NATIVE_LLM[llm["architectures"][0]]]
    return text


def _vision_config(vision: dict[str, Any], image_size: int) -> dict[str, Any]:
    patch = vision.get("patch_size", 14)
    return {
        "model_type": "internvl_vision",
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "hidden_act": vision.get("hidden_act", "gelu"),
        "attention_bias": bool(vision.get("qkv_bias", False)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "image_size": [image_size, image_size],
        "patch_size": [patch, patch],
        "num_channels": vision.get("num_channels", 3),
        "attention_dropout": vision.get("attention_dropout", 0.0),
        "projection_dropout": vision.get("dropout", 0.0),
        "initializer_range": vision.get("initializer_range", 0.02),
        "layer_scale_init_value": vision.get("initializer_factor", 0.1),
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,  # = no final norm, as InternViT
        "use_mask_token": False,
    }


def image_token_id(tokenizer_dir: Path) -> int:
    """The id of `<IMG_CONTEXT>` in the source tokenizer (never a hard-coded per-family number)."""
    from .model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no {IMG_CONTEXT_TOKEN} token")
    return int(token_id)


def official_to_hf_config(config: dict[str, Any], img_token_id: int) -> dict[str, Any]:
    """The native `config.json` of an official one; the official dict itself rides along (`SOURCE_CONFIG_KEY`)."""
    from .data.config import num_image_tokens

    vision = config["vision_config"]
    image_size = config.get("force_image_size") or vision.get("image_size", 224)
    text = _text_config(config["llm_config"])
    tie = bool(config["llm_config"].get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = tie
    out = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": _vision_config(vision, image_size),
        "text_config": text,
        "image_token_id": img_token_id,
        "image_seq_length": num_image_tokens(image_size, vision.get("patch_size", 14), config["downsample_ratio"]),
        "downsample_ratio": config["downsample_ratio"],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": tie,  # explicit: the native default (True) would tie an untied LLM
    }
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype:
        out["dtype"] = dtype
    out[SOURCE_CONFIG_KEY] = copy.deepcopy(config)
    return out


# PreTrainedConfig bookkeeping a transformers 5 `to_dict()` adds to a text config; not part of an LLM config
_NATIVE_ONLY_TEXT_KEYS = ("id2label", "label2id", "problem_type", "return_dict", "output_hidden_states",
                          "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "transformers_version",
                          "_name_or_path")


def _template_for(arch: str) -> str:
    """The official template of a family, for a native checkpoint that does not carry its source config."""
    return {"Phi3ForCausalLM": "phi3-chat", "InternLM2ForCausalLM": "internlm2-chat",
            "GptOssForCausalLM": "internvl3_5_gpt_oss"}.get(arch, "internvl2_5")


def hf_to_official_config(hf: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
    """The official `config.json` of a native one: the stored source config if the export kept it, else built
    from the native fields (LLM class kept as is; tiling from the image processor settings)."""
    from .model.configuration import _with_legacy_llm_fields

    if SOURCE_CONFIG_KEY in hf:
        return copy.deepcopy(hf[SOURCE_CONFIG_KEY])
    vision = hf["vision_config"]
    text = {k: v for k, v in copy.deepcopy(hf["text_config"]).items() if k not in _NATIVE_ONLY_TEXT_KEYS}
    arch = (text.get("architectures") or [None])[0]
    if arch is None:
        arch = _OFFICIAL_ARCH_OF_TYPE.get(text.get("model_type"))
        if arch is None:
            raise UnsupportedModelError(
                f"text model type {text.get('model_type')!r} has no official-layout class here; "
                f"supported: {', '.join(_OFFICIAL_ARCH_OF_TYPE)}"
            )
        text["architectures"] = [arch]
    if arch not in _OFFICIAL_ARCH_OF_TYPE.values():
        raise UnsupportedModelError(f"text model {arch!r} has no official-layout class here")
    size = vision.get("image_size", 448)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = vision.get("patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if vision.get("use_mean_pooling") is False:
        raise UnsupportedModelError("a native vision tower with a final layernorm has no InternViT equivalent")
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    dtype = hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype")
    crop = processor.get("crop_to_patches", True)
    out = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"], "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"], "intermediate_size": vision["intermediate_size"],
            "hidden_act": vision.get("hidden_act", "gelu"), "qkv_bias": vision.get("attention_bias", False),
            "qk_normalization": vision.get("use_qk_norm", False), "norm_type": vision.get("norm_type", "layer_norm"),
            "layer_norm_eps": vision.get("layer_norm_eps", 1e-6), "image_size": size, "patch_size": patch,
            "num_channels": vision.get("num_channels", 3), "dropout": vision.get("projection_dropout", 0.0),
            "attention_dropout": vision.get("attention_dropout", 0.0), "drop_path_rate": 0.0,
            "initializer_range": vision.get("initializer_range", 0.02),
            "initializer_factor": vision.get("layer_scale_init_value", 0.1), "use_flash_attn": False,
        },
        "llm_config": _with_legacy_llm_fields(text),  # rope_theta / rope_scaling for transformers-4 readers
        "select_layer": hf.get("vision_feature_layer", -1),
        "force_image_size": size,
        "downsample_ratio": hf.get("downsample_ratio", 0.5),
        "template": _template_for(arch),
        "dynamic_image_size": bool(crop),
        "use_thumbnail": bool(crop),
        "ps_version": "v2",
        "min_dynamic_patch": processor.get("min_patches", 1),
        "max_dynamic_patch": processor.get("max_patches", 12),
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    if dtype:
        out["torch_dtype"] = out["dtype"] = dtype
    return out


# --------------------------------------------------------------------------------------------------------------
# processor and tokenizer files
# --------------------------------------------------------------------------------------------------------------
def image_processor_settings(config: dict[str, Any]) -> dict[str, Any]:
    """GotOcr2 image-processor settings that reproduce our tiling (tile size, tile range, thumbnail, mean/std)."""
    from .data.transforms import mean_std

    size = config.get("force_image_size") or config["vision_config"].get("image_size", 448)
    mean, std = mean_std(config.get("normalize_type") or "imagenet")
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # PIL bicubic, as our tiles
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
        "crop_to_patches": bool(config.get("dynamic_image_size", False)),
        "min_patches": config.get("min_dynamic_patch", 1),
        "max_patches": config.get("max_dynamic_patch", 12),
    }


def _copy_tokenizer(src: Path, out: Path, add_processor_tokens: bool) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    tok = read_json(path)
    if add_processor_tokens:
        tok.update(PROCESSOR_TOKENS)  # named tokens the native InternVLProcessor reads
    else:
        for key, value in PROCESSOR_TOKENS.items():
            if tok.get(key) == value:
                del tok[key]
        named = tok.get("extra_special_tokens")
        if isinstance(named, dict):  # an -HF release's named tokens: keep them special, drop the names
            tok["extra_special_tokens"] = [v for k, v in named.items() if k != "video_token"]
    write_json(path, tok)


def write_processor_files(config: dict[str, Any], out: Path) -> None:
    """preprocessor_config.json + processor_config.json (+ tokenizer files copied by the caller)."""
    from .data.config import num_image_tokens

    settings = image_processor_settings(config)
    write_json(out / "preprocessor_config.json", settings)
    size = settings["size"]["height"]
    seq = num_image_tokens(size, config["vision_config"].get("patch_size", 14), config["downsample_ratio"])
    write_json(out / "processor_config.json", {"processor_class": "InternVLProcessor", "image_seq_length": seq})


# --------------------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------------------
def convert_to_hf(src: str | Path, out: str | Path, overwrite: bool = False,
                  max_shard_bytes: int = 5 * 2**30) -> Path:
    """Official-layout folder `src` -> native folder `out` (weights, config, processor, tokenizer, generation)."""
    src, out = Path(src), Path(out)
    config = read_json(src / "config.json")
    state = load_state_dict(src)
    check_exportable(config, list(state))
    hf_config = official_to_hf_config(config, image_token_id(src))
    hf_state = official_to_hf_state_dict(state, config)
    _prepare_out(out, overwrite)
    save_state_dict(hf_state, out, max_shard_bytes)
    write_json(out / "config.json", hf_config)
    write_processor_files(config, out)
    _copy_tokenizer(src, out, add_processor_tokens=True)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
    write_chat_files(config, out, native=True)
    return out


def write_chat_files(config: dict[str, Any], out: Path, native: bool) -> None:
    """The training template as the tokenizer's `chat_template` and its end token as eos (serving.py), written
    afresh over whatever template was copied; for `native`, image parts become the native processor's placeholder
    `<IMG_CONTEXT>` instead of our `<image>`."""
    from .model.tokenizer import load_tokenizer
    from .serving import CHAT_TEMPLATE_FILE, write_serving_files

    template = config.get("template")
    if not template or not (out / "tokenizer_config.json").is_file():
        return
    tokenizer_config = read_json(out / "tokenizer_config.json")
    tokenizer_config.pop("chat_template", None)
    write_json(out / "tokenizer_config.json", tokenizer_config)
    (out / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    write_serving_files(out, load_tokenizer(out), template, config.get("system_message"))
    if not native:
        return
    ours, theirs = "{{- '<image>\\n' -}}", "{{- '" + IMG_CONTEXT_TOKEN + "\\n' -}}"
    tokenizer_config = read_json(out / "tokenizer_config.json")
    text = tokenizer_config["chat_template"]
    if text.count(ours) != 1:
        raise ValueError("serving.build_chat_template changed: its image placeholder literal was not found")
    tokenizer_config["chat_template"] = text = text.replace(ours, theirs)
    write_json(out / "tokenizer_config.json", tokenizer_config)
    (out / CHAT_TEMPLATE_FILE).write_text(text, encoding="utf-8")


def convert_from_hf(src: str | Path, out: str | Path, overwrite: bool = False,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Native folder `src` -> official-layout folder `out`; an export of ours comes back bit-exact."""
    src, out = Path(src), Path(out)
    hf = read_json(src / "config.json")
    if hf.get("model_type") != "internvl":
        raise UnsupportedModelError(f"{src}/config.json has model_type {hf.get('model_type')!r}, not 'internvl'")
    processor = read_json(src / "preprocessor_config.json") if (src / "preprocessor_config.json").is_file() else {}
    config = hf_to_official_config(hf, processor)
    state = hf_to_official_state_dict(load_state_dict(src), config)
    _prepare_out(out, overwrite)
    save_state_dict(state, out, max_shard_bytes)
    write_json(out / "config.json", config)
    _copy_tokenizer(src, out, add_processor_tokens=False)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
    write_chat_files(config, out, native=False)  # an -HF release's generic ChatML is replaced by our template
    return out


def probe_image(image_size: int = 448):
    """A deterministic 2:1 picture: two tiles plus the thumbnail under the usual tiling."""
    import numpy as np
    from PIL import Image

    h, w = image_size, 2 * image_size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 7) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@torch.no_grad()
def compare_logits(official_dir: str | Path, hf_dir: str | Path, generate_tokens: int = 0,
                   device: str = "cpu") -> dict[str, Any]:
    """Run ours (`official_dir`) and the native model (`hf_dir`) in float32 on text + a several-tile image.

    Returns {"max_abs_diff", "num_tiles", "num_tokens"} and, with `generate_tokens`, both greedy continuations.
    """
    from transformers import InternVLForConditionalGeneration

    from . import inference
    from .data.transforms import image_to_tiles, normalize_tiles
    from .model import InternVLChatModel
    from .model.tokenizer import load_tokenizer

    ours = InternVLChatModel.from_pretrained(str(official_dir), dtype=torch.float32).eval().to(device)
    native, info = InternVLForConditionalGeneration.from_pretrained(
        str(hf_dir), dtype=torch.float32, output_loading_info=True
    )
    native.eval().to(device)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad:  # a key the native class does not read would be silently random-initialised
        raise ValueError(f"the native model did not load {hf_dir} cleanly: {bad}")
    tokenizer = load_tokenizer(official_dir)
    cfg = ours.config
    tiles = image_to_tiles(
        probe_image(cfg.image_size), dynamic=cfg.dynamic_image_size, min_num=cfg.min_dynamic_patch,
        max_num=cfg.max_dynamic_patch, image_size=cfg.image_size, use_thumbnail=cfg.use_thumbnail,
    )
    pixel_values = normalize_tiles(tiles, getattr(cfg, "normalize_type", None) or "imagenet").to(device)
    prompt = inference.build_prompt(ours, "<image>\nWhat is in the picture? Describe the colours.",
                                    num_patches_list=[len(pixel_values)])
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    ours.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    flags = torch.ones(len(pixel_values), dtype=torch.long, device=device)
    ref = ours(pixel_values=pixel_values, input_ids=input_ids, image_flags=flags).logits
    got = native(input_ids=input_ids, pixel_values=pixel_values).logits
    result = {"max_abs_diff": float((ref - got).abs().max()), "num_tiles": len(pixel_values),
              "num_tokens": int(input_ids.shape[1])}
    if generate_tokens:
        kwargs = dict(max_new_tokens=generate_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=tokenizer.pad_token_id)
        mask = torch.ones_like(input_ids)
        a = ours.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask, **kwargs)
        b = native.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, **kwargs)
        result["ours_tokens"] = a[0].tolist()
        result["native_tokens"] = b[0, input_ids.shape[1]:].tolist()
    return result


def self_check(official_dir: str | Path, hf_dir: str | Path, tolerance: float, device: str = "cpu") -> int:
    """The tools' self-check: both models on the probe, the max |logits diff| printed; 1 above `tolerance`."""
    result = compare_logits(official_dir, hf_dir, device=device)
    diff = result["max_abs_diff"]
    print(f"self-check: max |logits diff| = {diff:.3g} on {result['num_tokens']} tokens with "
          f"{result['num_tiles']} tiles (tolerance {tolerance:g})")
    if not diff <= tolerance:
        print("self-check FAILED: the converted model does not reproduce the source", file=sys.stderr)
        return 1
    return 0
