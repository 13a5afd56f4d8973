"""Tiny random-weight InternVL checkpoints in the official layout, for tests, the demo and benchmarks.

The geometry is the real one (448-px tiles, patch 14, pixel shuffle 0.5 -> 256 image tokens per tile), only the
widths and depths are tiny, so every code path that depends on token counts runs as it would on a real model.
Output is deterministic for a seed: the same command writes byte-identical files. `synthetic_batch` makes
matching training batches from random ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from .data.collator import DataCollator, pop_trainer_keys
from .data.packing import PackedCollator
from .model import InternVisionConfig, InternVLChatConfig, InternVLChatModel
from .model.configuration import llm_classes
from .serving import write_serving_files

# LLM family -> (architecture, tiny-tokenizer flavour, default template)
LLM_PRESETS: dict[str, tuple[str, str, str]] = {
    "qwen2": ("Qwen2ForCausalLM", "qwen2", "Hermes-2"),
    "llama": ("LlamaForCausalLM", "llama", "Hermes-2"),
    "phi3": ("Phi3ForCausalLM", "phi3", "phi3-chat"),
    "internlm2": ("InternLM2ForCausalLM", "internlm2", "internlm2-chat"),
    "qwen3": ("Qwen3ForCausalLM", "qwen2", "internvl2_5"),  # Qwen3 keeps the Qwen2 vocabulary style
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen2", "internvl2_5"),
    # InternVL3-9B: InternLM3's tokenizer is sentencepiece with InternLM2's chat tokens; the tiny one reuses that
    "internlm3": ("InternLM3ForCausalLM", "internlm2", "internvl2_5"),
    # InternVL3.5-GPT-OSS: the harmony template; the tokenizer has its tokens
    "gpt_oss": ("GptOssForCausalLM", "gpt_oss", "internvl3_5_gpt_oss"),
}

VIT_STYLES: dict[str, dict[str, Any]] = {
    # InternViT-300M: LayerNorm, qkv bias, no qk-norm
    "300m": dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False, initializer_factor=1.0),
    # InternViT-6B: RMSNorm, qk-norm over the full width, no qkv bias
    "6b": dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True, initializer_factor=0.1),
}


def tiny_llm_config(llm: str, tokenizer, hidden_size: int = 64, num_layers: int = 2) -> dict[str, Any]:
    """An `llm_config` dict in the family's own field names, sized for CPU tests."""
    arch = LLM_PRESETS[llm][0]
    vocab = len(tokenizer)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = dict(
        architectures=[arch],
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 5 // 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=True,
        **ids,
    )
    head_dim = hidden_size // 4
    if llm == "qwen2":
        return dict(common, model_type="qwen2", max_position_embeddings=4096, rope_theta=1000000.0,
                    use_sliding_window=False, sliding_window=4096, max_window_layers=num_layers)
    if llm == "llama":
        return dict(common, model_type="llama", max_position_embeddings=4096, rope_theta=500000.0,
                    attention_bias=False, mlp_bias=False)
    if llm == "phi3":
        # Phi-3-mini-128k style: "su" (longrope) scaling with short/long factors; a small original context so
        # tests can cross into the long-factor regime.
        half = head_dim // 2
        return dict(common, model_type="phi3", max_position_embeddings=4096, original_max_position_embeddings=512,
                    rope_theta=10000.0, sliding_window=None,
                    rope_scaling={"type": "su", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                                  "long_factor": [1.5 + 0.25 * i for i in range(half)]})
    if llm == "internlm2":
        return dict(common, model_type="internlm2", max_position_embeddings=2048, rope_theta=1000000.0, bias=False,
                    rope_scaling={"type": "dynamic", "factor": 2.0}, attn_implementation="eager")
    qwen3 = dict(common, max_position_embeddings=4096, rope_theta=1000000.0, rope_scaling=None, attention_bias=False,
                 attention_dropout=0.0, use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    if llm == "qwen3":
        # head_dim wider than hidden_size / heads, as in Qwen3-0.6B / 4B / 32B
        return dict(qwen3, model_type="qwen3", head_dim=2 * head_dim)
    if llm == "qwen3_moe":
        # every layer sparse, as Qwen3-30B-A3B / 235B-A22B; router logits on so training adds the aux loss
        return dict(qwen3, model_type="qwen3_moe", head_dim=head_dim, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=hidden_size // 2, decoder_sparse_step=1, mlp_only_layers=[],
                    norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.001)
    if llm == "internlm3":
        # internlm3-8b-instruct's field names and RoPE (dynamic NTK, factor 6); its biases are off
        return dict(common, model_type="internlm3", head_dim=head_dim, max_position_embeddings=32768,
                    rope_theta=50000000, rope_scaling={"rope_type": "dynamic", "factor": 6.0}, qkv_bias=False,
                    bias=False, attention_dropout=0.0)
    if llm == "gpt_oss":
        # gpt-oss-20b's fields (YaRN RoPE, sliding/full layers alternating, window 128, attention biases, sinks)
        # with 4 experts, top-2; router logits on so training adds the aux loss, at gpt-oss-20b's coefficient
        return dict(common, model_type="gpt_oss", head_dim=head_dim, intermediate_size=hidden_size,
                    num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, max_position_embeddings=131072,
                    initial_context_length=4096, rope_theta=150000,
                    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "truncate": False, "original_max_position_embeddings": 4096},
                    sliding_window=128, layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                    + ["sliding_attention"] * (num_layers % 2), attention_bias=True, attention_dropout=0.0,
                    swiglu_limit=7.0, output_router_logits=True, router_aux_loss_coef=0.9)
    raise ValueError(f"unknown LLM family {llm!r}; choose one of {sorted(LLM_PRESETS)}")


def tiny_vision_config(style: str = "300m", hidden_size: int = 48, num_layers: int = 2,
                       image_size: int = 448) -> dict[str, Any]:
    if style not in VIT_STYLES:
        raise ValueError(f"unknown ViT style {style!r}; choose one of {sorted(VIT_STYLES)}")
    return InternVisionConfig(
        architectures=["InternVisionModel"], hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_attention_heads=4, num_hidden_layers=num_layers, patch_size=14, image_size=image_size,
        layer_norm_eps=1e-6, use_flash_attn=False, drop_path_rate=0.0, **VIT_STYLES[style],
    ).to_dict()


def make_tiny_model(
    out_dir: str | Path,
    llm: str = "qwen2",
    vit: str = "300m",
    template: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write config.json, model.safetensors, a trained-offline tokenizer and the serving files to `out_dir`."""
    from .tiny_tokenizer import build_tiny_tokenizer

    if llm not in LLM_PRESETS:
        raise ValueError(f"unknown LLM family {llm!r}; choose one of {sorted(LLM_PRESETS)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    arch, flavour, default_template = LLM_PRESETS[llm]
    tokenizer = build_tiny_tokenizer(flavour, out, seed=seed)
    fields = dict(
        select_layer=-1, force_image_size=448, downsample_ratio=0.5, template=template or default_template,
        dynamic_image_size=True, use_thumbnail=True, ps_version="v2", min_dynamic_patch=1, max_dynamic_patch=12,
        pad2square=False, architectures=["InternVLChatModel"],
    )
    fields.update(config_overrides)
    config = InternVLChatConfig(
        vision_config=tiny_vision_config(vit),
        llm_config=tiny_llm_config(llm, tokenizer),
        **fields,
    )
    llm_classes(arch)  # fail early on a missing family module
    torch.manual_seed(seed)
    model = InternVLChatModel(config)
    with torch.no_grad():  # small non-trivial values everywhere (norm weights, layer scales, biases included)
        gen = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    write_serving_files(out, tokenizer, config.template, getattr(config, "system_message", None))
    (out / "tiny_model.json").write_text(
        json.dumps({"llm": llm, "vit": vit, "template": config.template, "seed": seed, "dtype": dtype}, indent=2)
        + "\n"
    )
    return out


# Ordinary-text ids in every tiny tokenizer: the learnt vocabularies hold 1,400 ids, InternLM2's placeholder chat
# tokens start at 1,389 and the lowest ids are control pieces in the sentencepiece ones.
SYNTHETIC_TEXT_IDS = (10, 1380)


def synthetic_items(
    tokenizer,
    layout: list[tuple[int, int, int]],
    seed: int = 0,
    image_size: int = 448,
    float_pixels: bool = False,
    text_ids: tuple[int, int] = SYNTHETIC_TEXT_IDS,
) -> list[dict[str, Any]]:
    """Dataset items as the collators take them, built from random ids: for tests and benchmarks that need a
    training batch for a tiny model without data files or tokenizing text.

    `layout` gives (tiles, prompt tokens, answer tokens) per item: half the prompt, an `<img>` block of
    `tiles` x (image_size / 28)^2 context tokens (patch 14, pixel shuffle 0.5), the rest of the prompt, then the
    answer, the only supervised tokens. A text-only item (0 tiles) carries one flag-0 tile, as the dataset's do.
    Tiles are uint8 channels-last, as data workers ship them, or with `float_pixels` normalised float
    [n, 3, S, S] (for models without the uint8 path, such as the native export). One generator seeded with `seed`
    draws every item in turn, so the items depend on the seed and on the items before them.
    """
    start, end, context = tokenizer.convert_tokens_to_ids([IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN])
    gen = torch.Generator().manual_seed(seed)
    tile_tokens = (image_size // 28) ** 2
    text = lambda n: torch.randint(*text_ids, (n,), generator=gen)  # noqa: E731
    items = []
    for index, (tiles, prompt, answer) in enumerate(layout):
        parts = [text(prompt // 2)]
        if tiles:
            parts.append(torch.tensor([start] + [context] * (tile_tokens * tiles) + [end]))
        parts += [text(prompt - prompt // 2), text(answer)]
        input_ids = torch.cat(parts)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(input_ids) - answer:] = input_ids[len(input_ids) - answer:]
        n = max(tiles, 1)
        if float_pixels:
            pixel_values = torch.randn((n, 3, image_size, image_size), generator=gen).clamp(-2, 2)
        else:
            pixel_values = torch.randint(0, 256, (n, image_size, image_size, 3), generator=gen, dtype=torch.uint8)
        items.append({
            "input_ids": input_ids, "labels": labels, "pixel_values": pixel_values,
            "image_flags": torch.full((n,), 1 if tiles else 0, dtype=torch.long), "num_supervised": answer,
            "sample_id": f"synthetic:{index}",
        })
    return items


def synthetic_batch(
    tokenizer,
    layout: list[tuple[int, int, int]],
    packed: bool = False,
    loss_reduction: str = "token",
    **item_options: Any,
) -> dict[str, Any]:
    """`synthetic_items` collated into one right-padded batch, or with `packed` one packed row, without the
    trainer's bookkeeping keys: what the model's forward takes."""
    items = synthetic_items(tokenizer, layout, **item_options)
    if packed:
        batch = PackedCollator(tokenizer.pad_token_id, loss_reduction=loss_reduction)([items])
    else:
        batch = DataCollator(tokenizer.pad_token_id, loss_reduction=loss_reduction)(items)
    pop_trainer_keys(batch)
    return batch
