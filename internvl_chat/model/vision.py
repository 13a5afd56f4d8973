"""InternViT with the official parameter names.

Parameter names are those of official checkpoints (`embeddings.class_embedding`, `encoder.layers.N.attn.qkv`,
`norm1`, `ls1`, ...), so a state dict loads and saves with no renaming and peft's LoRA targets
(`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`) are the official ones. The numerics come from transformers'
InternVL vision pieces (MLP, RMSNorm, the SDPA / flash-attention / eager kernels), which match InternViT 300M and
6B; what transformers lacks and we add here: a fused qkv projection, drop-path (stochastic depth), position
embeddings interpolated in float32, and stopping at `select_layer` instead of running layers whose output is
thrown away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.internvl.modeling_internvl import (
    InternVLVisionMLP,
    InternVLVisionRMSNorm,
    eager_attention_forward,
)

from .configuration import InternVisionConfig


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones by 1/keep."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


@torch.no_grad()
def init_linear_and_norm(module: nn.Module, std: float) -> bool:
    """Normal(0, std) weights and zero biases for linear/conv layers, identity norms; True if `module` was one."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        module.weight.normal_(mean=0.0, std=std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, (nn.LayerNorm, InternVLVisionRMSNorm)):
        module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    else:
        return False
    return True


def _norm(config: InternVisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternVLVisionRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.position_embedding = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, self.embed_dim))

    def patch_position_embedding(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Patch position embeddings for a (height x width) patch grid; bicubic in float32 when it differs."""
        pos = self.position_embedding[:, 1:, :]
        if (height, width) == (self.grid, self.grid):
            return pos.to(dtype)
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [n, C, h, w]
        n, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)
        pos = torch.cat(
            [self.position_embedding[:, :1, :].to(dtype), self.patch_position_embedding(height, width, dtype)], dim=1
        )
        return torch.cat([cls, patches], dim=1) + pos


class InternAttention(nn.Module):
    """Multi-head self-attention with the fused `qkv` projection of official checkpoints (rows: q, k, v)."""

    is_causal = False

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = config.attention_dropout
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)
        if config.qk_normalization:
            # RMSNorm over the full width (all heads at once), as InternViT-6B does
            self.q_norm = InternVLVisionRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternVLVisionRMSNorm(self.embed_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        if self.config.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (batch, seq, self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(
            self,
            q,
            k,
            v,
            None,
            dropout=self.attn_drop if self.training else 0.0,
            scaling=self.scale,
            is_causal=False,
        )
        return self.proj_drop(self.proj(out.reshape(batch, seq, self.embed_dim)))


class InternVisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InternVisionConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.attn = InternAttention(config)
        self.mlp = InternVLVisionMLP(config)
        self.norm1 = _norm(config)
        self.norm2 = _norm(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        branch = self.attn(self.norm1(hidden_states).to(dtype)) * self.ls1
        hidden_states = hidden_states + drop_path(branch, self.drop_path_rate, self.training)
        branch = self.mlp(self.norm2(hidden_states).to(dtype)) * self.ls2
        return hidden_states + drop_path(branch, self.drop_path_rate, self.training)


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, rate) for rate in rates)

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first layer to `rate` at the last."""
        n = len(self.layers)
        for layer, r in zip(self.layers, torch.linspace(0, rate, n).tolist()):
            layer.drop_path_rate = r


class InternVisionPreTrainedModel(PreTrainedModel):
    config_class = InternVisionConfig
    config: InternVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if init_linear_and_norm(module, std):
            return
        if isinstance(module, InternVisionEmbeddings):
            module.class_embedding.normal_(mean=0.0, std=std)
            module.position_embedding.normal_(mean=0.0, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            module.ls1.fill_(self.config.initializer_factor)
            module.ls2.fill_(self.config.initializer_factor)


class InternVisionModel(InternVisionPreTrainedModel):
    """InternViT: embeddings + encoder layers (no final norm, as in the official model)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        select_layer: int | None = None,
        return_dict: bool = True,
    ) -> BaseModelOutput:
        """Run the ViT.

        `select_layer` follows the official meaning: -1 = last layer, -k = `hidden_states[-k]` where
        `hidden_states[0]` is the embedding output. With `select_layer` set, layers after it are not run and
        `last_hidden_state` is that layer's output.
        """
        n_layers = len(self.encoder.layers)
        stop = n_layers
        if select_layer is not None:
            stop = select_layer % (n_layers + 1) if select_layer < 0 else select_layer
            if not 0 <= stop <= n_layers or select_layer < -(n_layers + 1):
                raise ValueError(f"select_layer={select_layer} is out of range for a ViT of {n_layers} layers")
        hidden = self.embeddings(pixel_values)
        states = [hidden] if output_hidden_states else None
        for layer in self.encoder.layers[:stop]:
            hidden = layer(hidden)
            if states is not None:
                states.append(hidden)
        out = BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states) if states else None)
        return out if return_dict else out.to_tuple()
