"""Configs in the official InternVL layout.

`config.json` of an official checkpoint holds the chat-model fields at the top level and two nested dicts:
`vision_config` (InternViT, `model_type: intern_vit_6b`) and `llm_config` (the LLM's own config, picked by
`architectures[0]`). We read those dicts into live config objects, and write them back as *the user's dict plus
what changed since loading*: transformers 5 drops or renames many legacy fields (`rope_theta`, `torch_dtype`,
generation defaults, ...) that the official toolchain (transformers 4.37 remote code, lmdeploy, vLLM) still reads,
so a plain `to_dict()` would silently change the checkpoint's meaning there.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

from transformers import PreTrainedConfig

from ..data.config import num_image_tokens

# architectures[0] of llm_config -> (module, config class, model class)
LLM_FAMILIES: dict[str, tuple[str, str, str]] = {
    "Qwen2ForCausalLM": ("transformers", "Qwen2Config", "Qwen2ForCausalLM"),
    "LlamaForCausalLM": ("transformers", "LlamaConfig", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("transformers", "Phi3Config", "Phi3ForCausalLM"),
    "InternLM2ForCausalLM": ("internvl_chat.model.internlm2", "InternLM2Config", "InternLM2ForCausalLM"),
    # InternVL3.5: experts live fused in memory (transformers 5) and per expert on disk (its conversion mapping)
    "Qwen3ForCausalLM": ("transformers", "Qwen3Config", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("transformers", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    # InternVL3-9B: the official InternLM3 remote code is Llama with Llama's key names (`qkv_bias` -> q/k/v biases,
    # `bias` -> o_proj and MLP biases); transformers runs it as LlamaForCausalLM on its InternLM3Config, which maps
    # those two fields onto attention_bias / mlp_bias and requires them equal (as every released InternLM3 has).
    "InternLM3ForCausalLM": ("transformers", "InternLM3Config", "LlamaForCausalLM"),
    # InternVL3.5-GPT-OSS-20B-A4B: experts are fused 3-D parameters in memory and on disk, under the same names.
    "GptOssForCausalLM": ("transformers", "GptOssConfig", "GptOssForCausalLM"),
}

# MoE families -> the class of a layer's MoE block (router and experts). Under DeepSpeed ZeRO-3 the block is made a
# "leaf" (deepspeed.utils.set_z3_leaf_modules: all its parameters gathered together on entry, no hooks inside), so
# ranks that route their tokens to different experts still issue the same gathers in the same order.
MOE_BLOCKS: dict[str, str] = {
    "Qwen3MoeForCausalLM": "Qwen3MoeSparseMoeBlock",
    "GptOssForCausalLM": "GptOssMLP",
}

# Families whose attention has learnt sinks: transformers' SDPA and flash-attention-2 paths drop them silently.
_SINK_ATTENTION = ("GptOssForCausalLM",)

# Families only the official InternVL3.5 code (`internvl_chat_gpt_oss`) runs. Its chat() decodes a reply with its
# special tokens (the older code dropped them, grounding's <ref>/<box> included).
_INTERNVL3_5_ONLY = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM")


def chat_keeps_special_tokens(llm_config: PreTrainedConfig) -> bool:
    """Whether the official chat() of this LLM family's InternVL code keeps special tokens in its replies."""
    return llm_family(llm_config) in _INTERNVL3_5_ONLY


def llm_attn_implementation(llm_config: PreTrainedConfig, requested: str) -> str:
    """The attention backend the LLM gets when `requested` is asked for the whole model.

    GPT-OSS runs eager instead of "sdpa" / "flash_attention_2", which would compute attention without its sinks;
    a sink-aware kernel named explicitly (e.g. "kernels-community/vllm-flash-attn3") is kept.
    """
    if llm_family(llm_config) in _SINK_ATTENTION and requested in ("sdpa", "flash_attention_2"):
        return "eager"
    return requested


# Keys that only make sense inside one process; never written to disk.
_RUNTIME_KEYS = ("_attn_implementation_internal", "_attn_implementation_autoset", "_commit_hash", "_name_or_path")


def llm_family(llm_config: PreTrainedConfig | dict) -> str:
    """The `architectures[0]` name of an LLM config, validated against the supported families."""
    archs = llm_config.get("architectures") if isinstance(llm_config, dict) else llm_config.architectures
    arch = (archs or [None])[0]
    if arch not in LLM_FAMILIES:
        raise ValueError(
            f"llm_config.architectures[0] is {arch!r}; supported LLM architectures: {sorted(LLM_FAMILIES)}"
        )
    return arch


def llm_classes(arch: str) -> tuple[type, type]:
    module, config_name, model_name = LLM_FAMILIES[arch]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, model_name)


def _llm_config_from_dict(raw: dict[str, Any]) -> PreTrainedConfig:
    arch = llm_family(raw)
    config_cls, _ = llm_classes(arch)
    # a deep copy: transformers standardizes nested dicts (rope_scaling) in place, which would change the raw dict
    kwargs = copy.deepcopy({k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    attn = kwargs.pop("attn_implementation", None)
    rope_scaling = kwargs.get("rope_scaling")
    if arch == "Phi3ForCausalLM" and isinstance(rope_scaling, dict):
        # Phi-3 "su"/"longrope" configs keep original_max_position_embeddings at the top level;
        # transformers 5 expects it inside the rope parameters.
        rope_scaling = dict(rope_scaling)
        if "original_max_position_embeddings" in raw:
            rope_scaling.setdefault("original_max_position_embeddings", raw["original_max_position_embeddings"])
        kwargs["rope_scaling"] = rope_scaling
    if "torch_dtype" in kwargs and "dtype" not in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    else:
        kwargs.pop("torch_dtype", None)
    config = config_cls(**kwargs)
    if attn is not None:
        config.attn_implementation = attn  # kept as a plain field, as the official configs do
    return config


def _with_legacy_llm_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Add the field spellings that transformers 4.x configs read (rope_theta, rope_scaling, torch_dtype)."""
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and "rope_type" in rope:
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
        if rope["rope_type"] != "default":
            legacy = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
            legacy["type"] = rope["rope_type"]
            d.setdefault("rope_scaling", legacy)
        else:
            d.setdefault("rope_scaling", None)
    if "dtype" in d:
        d.setdefault("torch_dtype", d["dtype"])
    return d


def _merge_changes(raw: dict[str, Any], baseline: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """The raw dict with every value that changed after loading (live vs baseline) written over it."""
    out = copy.deepcopy(raw)
    for key, value in live.items():
        if key in _RUNTIME_KEYS or key == "transformers_version":
            continue
        if key not in baseline or baseline[key] != value:
            out[key] = value
    return out


class InternVisionConfig(PreTrainedConfig):
    """InternViT, in both styles: 300M (LayerNorm, qkv bias) and 6B (RMSNorm, qk-norm over the full width)."""

    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 14,
        image_size: int = 224,  # the official default, for a vision_config without the key
        qkv_bias: bool = False,
        hidden_size: int = 3200,
        num_attention_heads: int = 25,
        intermediate_size: int = 12800,
        qk_normalization: bool = True,
        num_hidden_layers: int = 48,
        use_flash_attn: bool = True,
        hidden_act: str = "gelu",
        norm_type: str = "rms_norm",
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"vision_config.norm_type must be 'rms_norm' or 'layer_norm', got {norm_type!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({hidden_size}) is not divisible by num_attention_heads "
                f"({num_attention_heads})"
            )
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        super().__init__(**kwargs)


class InternVLChatConfig(PreTrainedConfig):
    """The chat model's `config.json`: official field names and defaults of released checkpoints.

    Fields we do not know are kept as attributes and written back unchanged.
    """

    model_type = "internvl_chat"

    def __init__(
        self,
        vision_config: dict | InternVisionConfig | None = None,
        llm_config: dict | PreTrainedConfig | None = None,
        use_backbone_lora: int = 0,
        use_llm_lora: int = 0,
        select_layer: int = -1,
        force_image_size: int | None = None,
        downsample_ratio: float = 0.5,
        template: str | None = None,
        dynamic_image_size: bool = False,
        use_thumbnail: bool = False,
        ps_version: str = "v1",
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        **kwargs: Any,
    ) -> None:
        if isinstance(vision_config, InternVisionConfig):
            self._vision_raw = vision_config.to_dict()
            self.vision_config = vision_config
        else:
            self._vision_raw = copy.deepcopy(vision_config or {})
            self.vision_config = InternVisionConfig(
                **{k: v for k, v in self._vision_raw.items() if k not in ("model_type", "transformers_version")}
            )
        if isinstance(llm_config, PreTrainedConfig):
            self._llm_raw = _with_legacy_llm_fields(llm_config.to_dict())
            self.llm_config = llm_config
        else:
            raw = copy.deepcopy(llm_config) if llm_config else {"architectures": ["LlamaForCausalLM"]}
            self._llm_raw = raw
            self.llm_config = _llm_config_from_dict(raw)
        self._vision_baseline = self.vision_config.to_dict()
        self._llm_baseline = self.llm_config.to_dict()

        if ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {ps_version!r}")
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        kwargs.setdefault("tie_word_embeddings", False)
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        else:
            kwargs.pop("torch_dtype", None)
        super().__init__(**kwargs)
        self.hidden_size = self.llm_config.hidden_size  # read by DeepSpeed "auto" bucket sizes

    # --- derived geometry -------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Tile size in pixels: `force_image_size` wins over the ViT's trained size."""
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """Context tokens per tile (256 for 448-px tiles, patch 14, ratio 0.5)."""
        return num_image_tokens(self.image_size, self.vision_config.patch_size, self.downsample_ratio)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.llm_config

    # --- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("_vision_raw", "_llm_raw", "_vision_baseline", "_llm_baseline", *_RUNTIME_KEYS):
            out.pop(key, None)
        out["vision_config"] = _merge_changes(self._vision_raw, self._vision_baseline, self.vision_config.to_dict())
        out["vision_config"].setdefault("model_type", InternVisionConfig.model_type)
        llm = _merge_changes(self._llm_raw, self._llm_baseline, self.llm_config.to_dict())
        out["llm_config"] = _with_legacy_llm_fields(llm)
        if "dtype" in out:
            out["torch_dtype"] = out["dtype"]
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # Official checkpoints carry full configs; a diff against transformers 5 defaults would drop fields
        # that older readers need.
        return self.to_dict()
