#!/usr/bin/env python
"""Padding efficiency: the share of the LLM's attention and MLP FLOPs spent on real tokens, by batching strategy.

    python bench/padding.py            # 20,000 samples, a few seconds
    python bench/padding.py --quick    # 4,000 samples
    python bench/run.py --only padding # the same, as a section of BENCHMARKS.md

No model runs: the work of a batch follows from its token lengths. A length mix is drawn from token-count
distributions of a realistic InternVL fine-tuning set (photos with dynamic tiles, document pages, multi-image
samples, videos, text-only chats; tile grids from the project's own :func:`~internvl_chat.data.tiling.plan_tiles`
and :func:`~internvl_chat.data.config.image_tile_range`, frame counts from
:func:`~internvl_chat.data.video.choose_num_frames`), then batched three ways with the project's own code:

* **padding**: random order (the Trainer's default sampler), each row padded to the longest in the batch
  (:class:`~internvl_chat.data.collator.DataCollator`);
* **grouped**: ``--group_by_length`` order, :class:`~internvl_chat.train.trainer.EpochLengthGroupedSampler`;
* **packing**: ``--use_packed_ds``, :class:`~internvl_chat.data.packing.PackedDataset` with the training defaults
  (``max_packed_tokens`` 8192, ``num_images_expected`` 40 tiles), packs in random order, one row per pack; and
  packing with the packs length-grouped.

Work per batch. Linear layers (MLP and projections) cost the same per position, padding or not: their share is
real tokens / (rows x width). Attention costs per (query, key) pair, so it is quadratic in the attended length.
Two kernels: a dense mask (SDPA / eager) computes every pair of a row, ``width**2``; flash-attention 2 computes
only within segments: the real samples of a padded batch (transformers unpads them) and, in a packed row, each
sample plus the padding tail in pieces no longer than the longest sample (as :class:`PackedCollator` lays it out).
Real work is ``sum(length**2)`` over samples. Causal kernels halve real and computed pairs alike, so the shares
hold for them too. The whole-LLM share weighs both with the dimensions of InternLM2.5-7B (the LLM of
InternVL2.5-8B), per kernel; the ViT is not affected (tiles are never padded).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python bench/padding.py` from anywhere: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from internvl_chat.data.config import image_tile_range  # noqa: E402
from internvl_chat.data.packing import PackedDataset  # noqa: E402
from internvl_chat.data.tiling import plan_tiles  # noqa: E402
from internvl_chat.data.video import choose_num_frames  # noqa: E402
from internvl_chat.train.trainer import EpochLengthGroupedSampler  # noqa: E402

# Training defaults (train/arguments.py, the official launchers): 448-px tiles of 256 tokens, up to 12 tiles +
# thumbnail per image, 8-32 video frames, 8192-token sequences and packs, 40 tiles per pack.
NUM_IMAGE_TOKEN = 256
MAX_DYNAMIC_PATCH = 12
MIN_FRAMES, MAX_FRAMES = 8, 32
MAX_SEQ_LENGTH = 8192
MAX_PACKED_TOKENS = 8192
MAX_TILES = 40
BATCH_SIZES = (1, 4, 8)

# InternLM2.5-7B: hidden 4096, 32 layers, 8 KV heads of 128, MLP 14336. Per token and layer the linear layers
# (q, k, v, o, gate, up, down) cost 2 FLOPs per weight; per (query, key) pair attention costs 2 x 2 x hidden
# (scores and the weighted sum), halved by causal kernels.
_HIDDEN, _KV, _MLP = 4096, 8 * 128, 14336
LINEAR_FLOPS_PER_TOKEN = 2 * (2 * _HIDDEN * _HIDDEN + 2 * _HIDDEN * _KV + 3 * _HIDDEN * _MLP)
ATTENTION_FLOPS_PER_PAIR = 2 * _HIDDEN

# Share of each kind of sample in the mix: image-heavy, as InternVL's fine-tuning sets are.
MIX = {"photo": 0.40, "document": 0.15, "multi-image": 0.10, "video": 0.10, "text": 0.25}
_PHOTO_SIZES = [(4032, 3024), (3024, 4032), (1920, 1080), (1080, 1920), (1024, 768), (640, 480), (500, 375),
                (800, 800), (3000, 1000), (1280, 720)]
_PAGE_SIZES = [(1700, 2200), (2480, 3508), (1240, 1754), (1920, 1080), (800, 2400)]
_SYSTEM_PROMPT = 40  # tokens of a chat template's system prompt and role markers
_PER_TURN = 10  # role markers and end tokens per round


@dataclass(frozen=True)
class Sample:
    kind: str
    tokens: int
    tiles: int  # tiles in the pack's tile budget: a text-only sample still carries one dummy tile


def _text(rng: np.random.Generator, median: float, sigma: float, cap: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), 1, cap))


def _chat(rng: np.random.Generator, question: float, answer: float, max_turns: int) -> int:
    turns = min(max_turns, int(rng.geometric(0.55)))
    return _SYSTEM_PROMPT + sum(_PER_TURN + _text(rng, question, 0.7, 1000) + _text(rng, answer, 1.0, 3000)
                                for _ in range(turns))


def _image_tiles(rng: np.random.Generator, sizes: list[tuple[int, int]], num_images: int) -> int:
    min_num, max_num = image_tile_range(MAX_DYNAMIC_PATCH, num_images)
    width, height = sizes[rng.integers(len(sizes))]
    return plan_tiles(width, height, min_num, max_num, 448, use_thumbnail=True)[2]


def make_mix(num_samples: int, seed: int = 0) -> list[Sample]:
    """`num_samples` samples drawn from the token-count distributions of :data:`MIX` (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(MIX), size=num_samples, p=list(MIX.values()))
    samples = []
    for kind in kinds.tolist():
        if kind == "text":
            tiles, media = 1, 0
            text = _chat(rng, 60, 150, 8)
        elif kind == "video":
            frames = choose_num_frames(MIN_FRAMES, MAX_FRAMES, rng)
            tiles, media = frames, frames * (NUM_IMAGE_TOKEN + 2 + 6)  # <img></img> and "Frame-i: " per frame
            text = _chat(rng, 25, 60, 2)
        else:
            count = int(rng.integers(2, 6)) if kind == "multi-image" else 1
            sizes = _PAGE_SIZES if kind == "document" else _PHOTO_SIZES
            tiles = sum(_image_tiles(rng, sizes, count) for _ in range(count))
            media = tiles * NUM_IMAGE_TOKEN + 2 * count
            text = _chat(rng, 25, 120 if kind == "document" else 50, 4)
        samples.append(Sample(kind, min(MAX_SEQ_LENGTH, media + text), tiles))  # longer ones are truncated
    return samples


# --------------------------------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class Work:
    """What a set of batches computes, in tokens (linear layers) and attention pairs, next to its real part."""

    real_tokens: int = 0
    computed_tokens: int = 0
    real_pairs: int = 0
    dense_pairs: int = 0  # SDPA / eager with a mask: every pair of every row
    varlen_pairs: int = 0  # flash-attention 2: within samples (and padding pieces of packed rows)
    rows: int = 0
    steps: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))

    @property
    def mlp_share(self) -> float:
        return self.real_tokens / self.computed_tokens

    @property
    def dense_share(self) -> float:
        return self.real_pairs / self.dense_pairs

    @property
    def varlen_share(self) -> float:
        return self.real_pairs / self.varlen_pairs

    def llm_flops(self, dense: bool = False) -> float:
        """Forward FLOPs of the reference LLM's layers for this work, flash-attention's or (`dense`) SDPA's."""
        pairs = self.dense_pairs if dense else self.varlen_pairs
        return self.computed_tokens * LINEAR_FLOPS_PER_TOKEN + pairs * ATTENTION_FLOPS_PER_PAIR / 2

    def llm_share(self, dense: bool = False) -> float:
        real = self.real_tokens * LINEAR_FLOPS_PER_TOKEN + self.real_pairs * ATTENTION_FLOPS_PER_PAIR / 2
        return real / self.llm_flops(dense)


def batch_work(rows: Sequence[Sequence[int]], packed: bool) -> Work:
    """The work of one batch: `rows` lists the sample lengths of each row (one sample per row unless `packed`).

    Rows are right-padded to the widest. Flash-attention skips the padding of a padded batch (transformers unpads
    it) but computes the padding tail of a packed row, cut into pieces no longer than the longest sample.
    """
    width = max(sum(row) for row in rows)
    longest = max(n for row in rows for n in row)
    real_pairs = sum(n * n for row in rows for n in row)
    varlen = real_pairs
    if packed:
        for row in rows:
            tail = width - sum(row)
            varlen += (tail // longest) * longest * longest + (tail % longest) ** 2
    return Work(
        real_tokens=sum(sum(row) for row in rows),
        computed_tokens=width * len(rows),
        real_pairs=real_pairs,
        dense_pairs=width * width * len(rows),
        varlen_pairs=varlen,
        rows=len(rows),
        steps=1,
    )


def total_work(batches: Iterable[Sequence[Sequence[int]]], packed: bool) -> Work:
    return sum((batch_work(rows, packed) for rows in batches), Work())


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    order = list(order)
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]  # the last batch is kept


class _Lengths:
    """What PackedDataset reads from a dataset: token lengths and tiles per sample."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.lengths = [s.tokens for s in samples]
        self.tiles = [s.tiles for s in samples]

    def __len__(self) -> int:
        return len(self.lengths)


def strategies(samples: Sequence[Sample], batch_size: int, seed: int = 0) -> dict[str, Work]:
    """The work of one epoch over `samples` per batching strategy, at `batch_size` rows per step."""
    lengths = [s.tokens for s in samples]
    generator = torch.Generator().manual_seed(seed)
    random_order = torch.randperm(len(lengths), generator=generator).tolist()  # the Trainer's RandomSampler
    grouped = EpochLengthGroupedSampler(batch_size, lengths, seed)
    packed = PackedDataset(_Lengths(samples), MAX_PACKED_TOKENS, max_tiles=MAX_TILES, seed=seed,
                           num_image_token=NUM_IMAGE_TOKEN)
    packs = [[lengths[i] for i in pack] for pack in packed.packs]
    pack_order = torch.randperm(len(packs), generator=generator).tolist()
    packs_grouped = EpochLengthGroupedSampler(batch_size, packed.lengths, seed)

    def rows(order, of):
        return [[of[i] for i in batch] for batch in _batches(order, batch_size)]

    singles = [[n] for n in lengths]
    return {
        "padding": total_work(rows(random_order, singles), packed=False),
        "grouped": total_work(rows(list(grouped), singles), packed=False),
        "packing": total_work(rows(pack_order, packs), packed=True),
        "packing + grouped": total_work(rows(list(packs_grouped), packs), packed=True),
    }


# --------------------------------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _mix_table(samples: Sequence[Sample]) -> list[str]:
    lines = ["| kind | share | tokens: median | p90 | max | tiles: median | max |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in MIX:
        tokens = np.array([s.tokens for s in samples if s.kind == kind])
        tiles = np.array([s.tiles for s in samples if s.kind == kind])
        if not len(tokens):
            continue
        lines.append(f"| {kind} | {_pct(len(tokens) / len(samples))} | {int(np.median(tokens))} | "
                     f"{int(np.percentile(tokens, 90))} | {tokens.max()} | "
                     f"{'0 (1 dummy)' if kind == 'text' else int(np.median(tiles))} | {tiles.max()} |")
    return lines


def run(num_samples: int, seed: int = 0) -> dict:
    samples = make_mix(num_samples, seed)
    results = {b: strategies(samples, b, seed) for b in BATCH_SIZES}
    return {"samples": samples, "results": results, "seed": seed}


def format_result(result: dict, command: str, machine: str) -> str:
    samples, results = result["samples"], result["results"]
    lengths = [s.tokens for s in samples]
    stats = PackedDataset(_Lengths(samples), MAX_PACKED_TOKENS, max_tiles=MAX_TILES, seed=result["seed"],
                          num_image_token=NUM_IMAGE_TOKEN).stats
    lines = [
        "## Padding efficiency",
        "",
        "The share of the LLM's work spent on real tokens (not padding, not attention across packed samples), per "
        "batching strategy, on one epoch of a generated length mix. No model runs: the work follows from the token "
        "lengths (linear layers per position, attention per pair of positions in a row or segment). The batching "
        "decisions are the project's own code: `EpochLengthGroupedSampler` (`--group_by_length`) and "
        f"`PackedDataset` (`--use_packed_ds`, {MAX_PACKED_TOKENS} tokens / {MAX_TILES} tiles per pack). "
        "*SDPA mask*: a dense masked kernel computes every pair of a row; *flash varlen*: flash-attention 2 "
        "computes within samples only (padding of a packed row in pieces). *Whole LLM*: linear + attention "
        "FLOPs with InternLM2.5-7B's dimensions, attention by SDPA or flash-attention; *LLM FLOPs vs padding*: "
        "the epoch's computed FLOPs over plain padding's at the same batch size (lower is better). The ViT is "
        "unaffected: tiles are never padded.",
        "",
        f"Reproduce: `{command}`. The figures are deterministic and do not depend on the machine. "
        f"{' '.join(machine.split())}",
        "",
        f"Mix: {len(samples)} samples, {sum(lengths)} tokens, mean {np.mean(lengths):.0f}, sequences truncated "
        f"at {MAX_SEQ_LENGTH} tokens; 448-px tiles of {NUM_IMAGE_TOKEN} tokens, up to {MAX_DYNAMIC_PATCH} + "
        f"thumbnail per image (shared by the images of a multi-image sample), {MIN_FRAMES}-{MAX_FRAMES} frames "
        "per video.",
        "",
        *_mix_table(samples),
        "",
        f"Packing plan: {stats}.",
        "",
        "| batching | batch | steps | real tokens / row | MLP | attention, SDPA mask | attention, flash varlen "
        "| whole LLM, SDPA | whole LLM, flash | LLM FLOPs vs padding, flash |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, works in results.items():
        base = works["padding"].llm_flops()
        for name, work in works.items():
            lines.append(
                f"| {name} | {batch} | {work.steps} | {work.real_tokens / work.rows:.0f} | {_pct(work.mlp_share)} | "
                f"{_pct(work.dense_share)} | {_pct(work.varlen_share)} | {_pct(work.llm_share(dense=True))} | "
                f"{_pct(work.llm_share())} | {work.llm_flops() / base:.2f}x |")
    top = max(results)
    works = results[top]
    lines += [
        "",
        f"<!-- headline: Padding efficiency at batch {top} (flash-attention): plain padding spends "
        f"{_pct(works['padding'].llm_share())} of the LLM's FLOPs on real tokens, length grouping "
        f"{_pct(works['grouped'].llm_share())}, packing {_pct(works['packing'].llm_share())} "
        f"({works['packing'].llm_flops() / works['padding'].llm_flops():.2f}x padding's FLOPs per epoch); "
        f"packing under SDPA without flash-attention: {_pct(works['packing'].llm_share(dense=True))} -->",
    ]
    return "\n".join(lines) + "\n"


def section(quick: bool = False, device: str = "cpu") -> str:
    """The BENCHMARKS.md section (the figures do not depend on `device`: nothing runs on it)."""
    from bench.machine import describe

    command = "python bench/run.py --only padding" + (" --quick" if quick else "")
    return format_result(run(4000 if quick else 20000), command, describe("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,000 samples instead of 20,000")
    parser.add_argument("--samples", type=int, help="samples in the mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num = args.samples or (4000 if args.quick else 20000)
    command = "python bench/padding.py" + (" --quick" if args.quick else "") + \
        (f" --samples {args.samples}" if args.samples else "") + (f" --seed {args.seed}" if args.seed else "")
    from bench.machine import describe

    print(format_result(run(num, args.seed), command, describe("cpu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
