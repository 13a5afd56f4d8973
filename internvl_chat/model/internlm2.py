"""InternLM2 / InternLM2.5 causal LM whose parameter names are the official ones.

transformers 5 ships no InternLM2, and the official InternVL checkpoints (InternVL 1.5, Mini-InternVL-2B,
InternVL2-2B/8B/26B, InternVL2.5-2B/8B/26B) store the LLM under the InternLM2 names: ``model.tok_embeddings``,
``attention.wqkv`` / ``attention.wo``, ``feed_forward.w1/w2/w3``, ``attention_norm`` / ``ffn_norm``, ``output``.
Keeping exactly those names in memory means checkpoints load and save without renaming and the official peft LoRA
targets (``attention.wqkv, attention.wo, feed_forward.w1, feed_forward.w2, feed_forward.w3``) keep working.

The architecture is Llama with a fused, GQA-grouped ``wqkv`` projection, so everything except that projection is
taken from transformers' Llama building blocks (RMSNorm, rotary embedding incl. ``linear`` / ``dynamic`` scaling,
attention backends, causal masks, KV cache, gradient checkpointing, generation). :func:`internlm2_to_llama_state_dict`
and :func:`internlm2_to_llama_config` turn a model into a plain ``LlamaForCausalLM`` (used by the parity tests and by
export tools).
"""

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn

from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import RopeParameters
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import is_flash_attn_2_available, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

logger = logging.get_logger(__name__)

__all__ = [
    "InternLM2Config",
    "InternLM2PreTrainedModel",
    "InternLM2Model",
    "InternLM2ForCausalLM",
    "internlm2_to_llama_config",
    "internlm2_to_llama_state_dict",
]

# The official InternLM2 code implements exactly these two scalings (its `_rope_scaling_validation`).
_SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")


@strict
class InternLM2Config(PreTrainedConfig):
    """Configuration of an InternLM2 / InternLM2.5 LLM, with the field names of the official ``llm_config``.

    Official configs carry ``rope_theta`` and ``rope_scaling={"type": "dynamic" | "linear", "factor": f}``; they are
    turned into transformers' standard ``rope_parameters`` on load (so transformers' own ``linear`` / ``dynamic``
    RoPE code runs) and written back in the official form by :meth:`to_dict`, so a saved config still loads in the
    official code. ``attn_implementation`` is the official field (``"eager"`` / ``"flash_attention_2"``); it selects
    the attention backend unless one is chosen explicitly (e.g. ``from_pretrained(attn_implementation="sdpa")``).
    Legacy generic keys found in real checkpoints (``architectures``, ``auto_map``, ``torch_dtype``,
    ``_name_or_path``, generation defaults, ...) are accepted and handled by ``PreTrainedConfig``.
    """

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]
    # No tensor-parallel plan: sharding the fused, head-grouped `wqkv` needs more than transformers' colwise split.
    base_model_pp_plan = {
        "tok_embeddings": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    base_model_fsdp_plan = {
        "tok_embeddings": "free_full_weight",
        "layers.*": "free_full_weight",
        "norm": "keep_full_weight",
    }

    # Defaults follow the official InternLM2Config.
    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = True
    attn_implementation: str | None = None
    # Filled from the official `rope_theta` / `rope_scaling` keys (see class docstring).
    rope_parameters: RopeParameters | dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Checked here too (not only by `@strict`, which wraps the error) so bad sizes raise a plain ValueError.
        self.validate_architecture()
        # The base class standardizes these dicts in place; copy them so the caller's llm_config is left untouched.
        if isinstance(kwargs.get("rope_scaling"), Mapping):
            kwargs["rope_scaling"] = _official_rope_scaling_to_parameters(kwargs["rope_scaling"])
        if isinstance(self.rope_parameters, Mapping):
            self.rope_parameters = copy.deepcopy(dict(self.rope_parameters))
        super().__post_init__(**kwargs)
        self._check_rope()
        if self._attn_implementation is None and self.attn_implementation is not None:
            self._attn_implementation = _usable_attn_implementation(self.attn_implementation)

    @property
    def rope_theta(self) -> float:
        """The RoPE base (official field name); stored in ``rope_parameters``."""
        params = getattr(self, "rope_parameters", None) or {}
        return params.get("rope_theta", self.default_theta)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default"}
        self.rope_parameters["rope_theta"] = value

    @property
    def head_dim(self) -> int:
        """Per-head size; InternLM2 has no separate field for it."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per KV head: the middle axis of the fused ``wqkv`` layout (minus the k and v slots)."""
        return self.num_attention_heads // self.num_key_value_heads

    def _check_rope(self) -> None:
        params = self.rope_parameters or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"InternLM2Config: unsupported RoPE scaling type {rope_type!r}; the official InternLM2 supports "
                f"{', '.join(repr(t) for t in _SUPPORTED_ROPE_TYPES[1:])} (or no scaling)."
            )
        if rope_type != "default":
            factor = params.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0:
                raise ValueError(
                    f"InternLM2Config: rope_scaling of type {rope_type!r} needs a numeric 'factor' >= 1, "
                    f"got {factor!r}."
                )

    def validate_architecture(self):
        """Part of `@strict` validation: head counts must divide evenly, or ``wqkv`` has no valid layout."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"InternLM2Config: hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"InternLM2Config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )

    def to_dict(self) -> dict[str, Any]:
        """Serialize in the official form: ``rope_theta`` / ``rope_scaling`` instead of ``rope_parameters``, and an
        ``attn_implementation`` the official code accepts (``"sdpa"`` etc. are written as ``"eager"``)."""
        output = super().to_dict()
        params = output.pop("rope_parameters", None) or {}
        output["rope_theta"] = params.get("rope_theta", self.default_theta)
        rope_type = params.get("rope_type", "default")
        output["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "factor": params["factor"]}
        # The official model indexes its attention classes by this field and knows only these two values.
        if output.get("attn_implementation") not in (None, "eager", "flash_attention_2"):
            output["attn_implementation"] = "eager"
        return output


def _official_rope_scaling_to_parameters(rope_scaling: Mapping[str, Any]) -> dict[str, Any]:
    """Copy an official ``rope_scaling`` dict, naming its type under transformers' ``rope_type`` key."""
    params = copy.deepcopy(dict(rope_scaling))
    legacy_type = params.pop("type", None)
    if legacy_type is not None:
        params.setdefault("rope_type", legacy_type)
    if "rope_type" not in params:
        raise ValueError(f"InternLM2Config: rope_scaling {dict(rope_scaling)!r} has no 'type'.")
    return params


def _usable_attn_implementation(requested: str) -> str | None:
    """Map the official ``attn_implementation`` field to a backend this machine can run.

    Official training configs say ``"flash_attention_2"``; the official model code itself falls back to eager when
    flash-attn is missing. Here the fallback is ``None``, which lets transformers pick its default (SDPA), which
    computes the same attention.
    """
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        logger.info("llm_config asks for flash_attention_2 but flash-attn is not available; using the default backend.")
        return None
    return requested


class InternLM2MLP(nn.Module):
    """SiLU-gated MLP with the official names: ``w1`` = gate, ``w3`` = up, ``w2`` = down (always bias-free)."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2Attention(nn.Module):
    """Grouped-query attention with one fused ``wqkv`` projection in the official layout.

    ``wqkv``'s output features are ``(num_key_value_heads, groups + 2, head_dim)``: for each KV head its ``groups``
    query heads, then its key head, then its value head. Query head ``h * groups + g`` therefore belongs to KV head
    ``h``, which is the order ``repeat_kv`` in the attention backends expects.
    """

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_key_value_groups
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = 0.0  # InternLM2 has no attention dropout
        self.is_causal = True

        qkv_features = self.num_key_value_heads * (self.num_key_value_groups + 2) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_features, bias=config.bias)
        self.wo = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        groups = self.num_key_value_groups

        qkv = self.wqkv(hidden_states).view(*input_shape, self.num_key_value_heads, groups + 2, self.head_dim)
        # -> (batch, heads, seq, head_dim), the layout of the attention backends
        query_states = qkv[..., :groups, :].flatten(-3, -2).transpose(1, 2)
        key_states = qkv[..., groups, :].transpose(1, 2)
        value_states = qkv[..., groups + 1, :].transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.wo(attn_output), attn_weights


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``attention_norm`` -> ``attention`` -> residual, ``ffn_norm`` -> ``feed_forward`` -> residual."""

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        # The official RMSNorm is numerically Llama's (fp32 variance, weight applied in the input dtype).
        self.attention_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.attention(
            self.attention_norm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


class InternLM2PreTrainedModel(PreTrainedModel):
    """Shared settings: official split unit for device maps, the attention backends this model can use."""

    config: InternLM2Config
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": InternLM2DecoderLayer,
        "attentions": InternLM2Attention,
    }


class InternLM2Model(InternLM2PreTrainedModel):
    """The decoder stack: ``tok_embeddings``, ``layers``, final ``norm`` (no LM head)."""

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [InternLM2DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # One shared rotary module (its buffers are not persistent, so it adds no state-dict keys).
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("InternLM2Model: pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """InternLM2 decoder plus the ``output`` LM head; drop-in for the official ``InternLM2ForCausalLM``."""

    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}
    _pp_plan = {"output": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"output": "keep_full_weight"}

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.output = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted next-token loss when ``labels`` is given; -100 labels are ignored).

        ``logits_to_keep``: an int keeps the last that many positions (0 = all), a tensor selects positions.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.output(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# --------------------------------------------------------------------------------------------------------------------
# Conversion to transformers' Llama (parity tests, export)
# --------------------------------------------------------------------------------------------------------------------

# Per-layer renames besides the fused wqkv, which is split.
_LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def internlm2_to_llama_config(config: InternLM2Config) -> LlamaConfig:
    """The ``LlamaConfig`` of the same network (same sizes, RoPE, norms; ``bias`` -> ``attention_bias``)."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.bias,
        mlp_bias=False,
        rope_parameters=copy.deepcopy(config.rope_parameters),
    )


def _split_wqkv(tensor: torch.Tensor, config: InternLM2Config, key: str) -> tuple[torch.Tensor, ...]:
    """Split a fused ``wqkv`` weight (out, in) or bias (out,) into q, k, v along the output features."""
    kv_heads, groups, head_dim = config.num_key_value_heads, config.num_key_value_groups, config.head_dim
    expected = kv_heads * (groups + 2) * head_dim
    if tensor.shape[0] != expected:
        raise ValueError(
            f"{key}: expected {expected} output features (num_key_value_heads {kv_heads} x (groups {groups} + 2) x "
            f"head_dim {head_dim}), got shape {tuple(tensor.shape)}."
        )
    grouped = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
    q = grouped[:, :groups].reshape(kv_heads * groups * head_dim, *tensor.shape[1:])
    k = grouped[:, groups].reshape(kv_heads * head_dim, *tensor.shape[1:])
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *tensor.shape[1:])
    return q.clone(), k.clone(), v.clone()


def internlm2_to_llama_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: InternLM2Config
) -> dict[str, torch.Tensor]:
    """Rename an ``InternLM2ForCausalLM`` state dict to ``LlamaForCausalLM`` keys, splitting ``wqkv`` into q/k/v.

    Keys must be relative to the causal LM (strip e.g. ``language_model.`` first). LoRA-wrapped keys are refused:
    merge the adapters first, since a split of the low-rank factors is not a split of the merged weight.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if "lora_" in key or ".base_layer." in key:
            raise ValueError(f"internlm2_to_llama_state_dict: {key!r} is a LoRA key; merge the adapters first.")
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = tensor
            continue
        parts = key.split(".")
        # model.layers.{i}.<module path>.<weight|bias>
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            raise KeyError(f"internlm2_to_llama_state_dict: unexpected key {key!r} for an InternLM2ForCausalLM.")
        layer, module, param = ".".join(parts[:3]), ".".join(parts[3:-1]), parts[-1]
        if module == "attention.wqkv":
            for name, piece in zip(("q_proj", "k_proj", "v_proj"), _split_wqkv(tensor, config, key)):
                out[f"{layer}.self_attn.{name}.{param}"] = piece
        elif module in _LAYER_RENAMES:
            out[f"{layer}.{_LAYER_RENAMES[module]}.{param}"] = tensor
        else:
            raise KeyError(f"internlm2_to_llama_state_dict: unexpected key {key!r} for an InternLM2ForCausalLM.")
    return out
