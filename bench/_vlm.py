"""Shared pieces of the training and generation benchmarks: the benchmark model, FLOP counts, memory.

The model is a random-weight InternVL in the official layout, small but with the real geometry and the real
vocabulary size (the LM head and embeddings of a Qwen2-based InternVL: 151,674 rows), so the share of the step that
the LM head takes is the real one. The tokenizer is the project's tiny one: only ids below its size occur. Batches
are tiny_model.synthetic_batch's (bench/_train_worker.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

QWEN2_VOCAB = 151_674  # InternVL2/2.5 with a Qwen2 LLM: vocabulary incl. the added image tokens


@dataclass(frozen=True)
class Shape:
    """Widths and depths of the benchmark model."""

    vit_layers: int = 6
    vit_hidden: int = 256
    llm_layers: int = 8
    llm_hidden: int = 512
    llm_heads: int = 8
    llm_kv_heads: int = 2
    vocab: int = QWEN2_VOCAB
    image_size: int = 448

    @property
    def tile_tokens(self) -> int:
        """LLM tokens per tile: patch 14, pixel shuffle 0.5 (256 for 448-px tiles)."""
        return (self.image_size // 28) ** 2

    @property
    def vit_tokens(self) -> int:
        """ViT tokens per tile: the patches and CLS (1,025 for 448-px tiles)."""
        return (self.image_size // 14) ** 2 + 1

    @property
    def llm_intermediate(self) -> int:
        return self.llm_hidden * 5 // 2  # as tiny_model.tiny_llm_config

    @property
    def vit_intermediate(self) -> int:
        return self.vit_hidden * 2  # as tiny_model.tiny_vision_config

    def describe(self) -> str:
        return (f"ViT {self.vit_layers} layers x {self.vit_hidden}, LLM (Qwen2) {self.llm_layers} layers x "
                f"{self.llm_hidden} ({self.llm_heads} heads, {self.llm_kv_heads} KV heads), vocabulary "
                f"{self.vocab:,}, {self.image_size}-px tiles -> {self.tile_tokens} image tokens per tile")


FULL_SHAPE = Shape()
# quick (CI smoke runs): every code path, tiny widths, 224-px tiles (64 image tokens per tile)
QUICK_SHAPE = Shape(vit_layers=2, vit_hidden=64, llm_layers=2, llm_hidden=128, llm_heads=4, vocab=8_192,
                    image_size=224)


def write_model(out: str | Path, shape: Shape, seed: int = 0) -> Path:
    """Save a random-weight official-layout checkpoint (config, safetensors, tiny tokenizer, chat files)."""
    from internvl_chat.model import InternVLChatConfig, InternVLChatModel
    from internvl_chat.serving import write_serving_files
    from internvl_chat.tiny_model import tiny_llm_config, tiny_vision_config
    from internvl_chat.tiny_tokenizer import build_tiny_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer("qwen2", out, seed=seed)
    llm = tiny_llm_config("qwen2", tokenizer, hidden_size=shape.llm_hidden, num_layers=shape.llm_layers)
    llm.update(vocab_size=shape.vocab, num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads,
               initializer_range=0.02)
    config = InternVLChatConfig(
        vision_config=tiny_vision_config("300m", hidden_size=shape.vit_hidden, num_layers=shape.vit_layers,
                                         image_size=shape.image_size),
        llm_config=llm, select_layer=-1, force_image_size=shape.image_size, downsample_ratio=0.5, template="Hermes-2",
        dynamic_image_size=True, use_thumbnail=True, ps_version="v2", min_dynamic_patch=1, max_dynamic_patch=6,
        architectures=["InternVLChatModel"],
    )
    torch.manual_seed(seed)
    model = InternVLChatModel(config)
    model.save_pretrained(out)
    write_serving_files(out, tokenizer, config.template)
    return out


def item_tokens(shape: Shape, spec: tuple[int, int, int]) -> int:
    """Tokens of the tiny_model.synthetic_items item of a (tiles, prompt tokens, answer tokens) triple."""
    tiles, prompt, answer = spec
    return prompt + answer + (tiles * shape.tile_tokens + 2 if tiles else 0)


# --------------------------------------------------------------------------------------------------- FLOPs


def step_flops(shape: Shape, segments: list[int], head_positions: int, vit_tiles: int, image_tokens: int,
               vit: str = "full", llm: str = "full") -> float:
    """Model FLOPs of one training step (forward + backward), counted analytically.

    Linear layers: 2 FLOPs per weight and token forward; backward 2 more for the input gradient when anything
    upstream trains and 2 more for the weight gradient when the weight trains (so 6 * params * tokens for a fully
    trained layer, 4 for a frozen layer under a LoRA, 2 for a frozen ViT). Attention: 4 * S^2 * width per layer
    forward for a segment of S tokens (the full square, the usual MFU convention), twice that backward. The LM
    head counts only at `head_positions` (all real tokens for full logits, the supervised ones for the chunked
    loss). Not counted: norms, activations, softmax, rotary, LoRA adapters, recomputation under checkpointing.
    """
    h, kv = shape.llm_hidden, shape.llm_hidden // shape.llm_heads * shape.llm_kv_heads
    llm_layer = h * (2 * h + 2 * kv) + 3 * h * shape.llm_intermediate
    tokens = sum(segments)
    llm_factor = 6 if llm == "full" else 4
    total = shape.llm_layers * (llm_factor * llm_layer * tokens + 3 * sum(4 * s * s * h for s in segments))
    total += llm_factor * h * shape.vocab * head_positions
    vh = shape.vit_hidden
    proj = 4 * vh * h + h * h
    total += (6 if vit == "full" else 4) * proj * image_tokens
    vit_layer = 4 * vh * vh + 2 * vh * shape.vit_intermediate
    n = shape.vit_tokens
    vit_fwd = shape.vit_layers * (2 * vit_layer * vit_tiles * n + vit_tiles * 4 * n * n * vh)
    vit_fwd += 2 * 3 * 14 * 14 * vh * vit_tiles * (n - 1)  # patch embedding
    total += vit_fwd * (3 if vit == "full" else 1)
    return float(total)


def matmul_flops(device: str = "cpu", repeats: int = 5) -> float:
    """The device's measured matmul throughput in FLOP/s, the ceiling for MFU: the best of `repeats` large
    square matmuls (float32 on CPU, bfloat16 on CUDA, the dtypes the training benchmark runs in)."""
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 2048
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for _ in range(4 if cuda else 1):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / (4 if cuda else 1))
    return 2 * n**3 / best


# --------------------------------------------------------------------------------------------------- devices


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def attn_implementation(device: str) -> str:
    """flash-attention 2 on CUDA when installed, SDPA otherwise."""
    import importlib.util

    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_dtype(device: str) -> torch.dtype:
    """bfloat16 weights on CUDA (how InternVL is fine-tuned), float32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "pixel_values":
                value = value.to(dtype)
        out[key] = value
    return out


class PeakMemory:
    """Peak memory of the process during a block of code (`total`), and its growth over the start (`growth`).

    CPU: the kernel's peak RSS (`VmHWM`), reset through /proc/self/clear_refs at the start. CUDA:
    `torch.cuda.max_memory_allocated`, reset at the start.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.growth = self.total = 0

    @staticmethod
    def _status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    @classmethod
    def current(cls, device: str) -> int:
        """What is in use now: RSS on CPU, allocated memory on CUDA."""
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return cls._status()["VmRSS"]

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = self._status()["VmRSS"]
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated()
        else:
            self.total = self._status()["VmHWM"]
        self.growth = self.total - self._start


def machine(device: str) -> str:
    """bench/machine.py's description when it is there (the orchestrator's), a short one otherwise."""
    try:
        from machine import describe  # bench/ is on sys.path when run as a script or through bench/run.py
    except ImportError:
        try:
            from bench.machine import describe
        except ImportError:
            describe = None
    if describe is not None:
        return describe(device)
    import platform

    if device.startswith("cuda"):
        return f"Machine: {torch.cuda.get_device_name()}, torch {torch.__version__}."
    return f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}."
