"""Packing several samples into one sequence: planning, the map-style packed dataset, and the packed collator.

Why packing: InternVL samples vary from a few dozen tokens (text) to thousands (multi-image, video). Padding a batch
of them wastes most of the compute; concatenating several samples into one row of up to `max_packed_tokens` tokens
wastes almost none, and with per-sample attention isolation the model computes exactly what it would for each
sample alone (same logits, same loss, same gradients under token reduction).

How this differs from the official `PackedDataset` (an IterableDataset that streams buffers), on purpose:

* The packing is *planned* over the map-style dataset from its length estimates (:func:`plan_packs`), so
  :class:`PackedDataset` has a `len()`: the HF Trainer needs no `--max_steps`, epochs work, and a resumed run sees
  the same packs as an uninterrupted one (the plan depends only on the lengths, the seed and the epoch).
* The batch says it is packed (`packed: True`, popped by the trainer with the other bookkeeping keys of
  :data:`internvl_chat.data.collator.TRAINER_KEYS`), so nothing downstream guesses packing from missing keys.
* Attention isolation needs no patched attention classes. :class:`PackedCollator` restarts `position_ids` at 0
  for every sample and passes NO `attention_mask`: transformers' `create_causal_mask` then detects the packed
  format from the position ids and builds a block-diagonal causal mask (SDPA, eager), and the collator also
  passes the flash-attention varlen boundaries (`cu_seq_lens_q/k`, `max_length_q/k`) that flash-attention 2 uses
  at any batch size (it only infers them from position ids for a batch of one row).
* A pack whose real length exceeds `max_packed_tokens` (the lengths were estimates) is split into extra rows;
  no sample is ever cut (the official `split_buffer` cuts buffers at image boundaries).
* Per-sample loss weights (`sample` / `square` reductions) use the same `len2weight` rule on each ORIGINAL
  sample's supervised-token count (:func:`internvl_chat.data.collator.token_weight`).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..constants import IGNORE_INDEX
from .collator import add_bookkeeping, token_weight

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PackedCollator",
    "PackedDataset",
    "PackingStats",
    "estimate_tiles",
    "packing_stats",
    "plan_packs",
]

# Samples per first-fit-decreasing window. Larger windows give fuller packs (more small samples to fill the gaps
# that long ones leave) but group samples more by length; a few thousand keeps the fill ratio within a percent
# or so of whole-dataset FFD while every pack still holds a random mix of the datasets.
DEFAULT_CHUNK_SIZE = 2048

# Re-planning an epoch must keep `len()` fixed (the Trainer sizes its schedule and resume position from it): a
# plan with more packs than epoch 0's first tries to dissolve its emptiest packs into the free room of the others,
# then tries another shuffle; after this many tries the epoch reuses epoch 0's packs in a new order.
_MAX_PLAN_ATTEMPTS = 8


# --------------------------------------------------------------------------------------------------- planning


def _as_counts(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of ints, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"{name} must hold whole numbers")
    array = array.astype(np.int64)
    if array.size and int(array.min()) < 0:
        bad = int(np.argmin(array))
        raise ValueError(f"{name}[{bad}] = {int(array[bad])} is negative")
    return array


def _check_budget(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _first_fit_decreasing(
    members: np.ndarray, lengths: np.ndarray, tiles: np.ndarray, budget: int, max_tiles: int
) -> list[list[int]]:
    """Pack `members` (dataset indices) first-fit in decreasing (length, tiles) order; oversize ones go alone."""
    order = members[np.lexsort((tiles[members], lengths[members]))[::-1]]
    room_tokens = np.empty(len(order), np.int64)
    room_tiles = np.empty(len(order), np.int64)
    packs: list[list[int]] = []
    open_bins = 0  # bins 0..open_bins-1 take part in first-fit; oversize packs are kept aside
    solo: list[list[int]] = []
    for index in order.tolist():
        n_tok, n_til = int(lengths[index]), int(tiles[index])
        if n_tok > budget or n_til > max_tiles:
            solo.append([index])
            continue
        fits = (room_tokens[:open_bins] >= n_tok) & (room_tiles[:open_bins] >= n_til)
        slot = int(fits.argmax()) if open_bins else 0
        if open_bins and fits[slot]:
            packs[slot].append(index)
            room_tokens[slot] -= n_tok
            room_tiles[slot] -= n_til
        else:
            packs.append([index])
            room_tokens[open_bins] = budget - n_tok
            room_tiles[open_bins] = max_tiles - n_til
            open_bins += 1
    return solo + packs


def plan_packs(
    lengths: Sequence[int] | np.ndarray,
    max_packed_tokens: int,
    *,
    tiles: Sequence[int] | np.ndarray | None = None,
    max_tiles: int | None = None,
    seed: int | Sequence[int] = 0,
    shuffle: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[list[int]]:
    """Group dataset indices into packs of at most `max_packed_tokens` tokens (and `max_tiles` tiles).

    Algorithm: the indices are shuffled with `numpy.random.default_rng(seed)` (or kept in order when `shuffle` is
    False), cut into windows of `chunk_size` samples, and each window is packed first-fit-decreasing. The packs are
    then shuffled as a whole. Trade-off: FFD over the whole dataset would fill packs best but put samples of
    similar length (often: of the same dataset) together, and give the same packs every epoch; small windows mix
    datasets and change with the seed but leave more room unused. A sample longer than the token budget, or with
    more tiles than the tile budget, gets a pack of its own. Every index appears in exactly one pack.

    Deterministic: the same arguments give the same packs on every machine. `tiles` (tiles per sample, dummy
    tiles of text-only samples included) is needed when `max_tiles` is given.
    """
    budget = _check_budget(max_packed_tokens, "max_packed_tokens")
    chunk_size = _check_budget(chunk_size, "chunk_size")
    lengths = _as_counts(lengths, "lengths")
    if max_tiles is None:
        tile_budget = np.iinfo(np.int64).max
        tiles_array = np.zeros_like(lengths)
    else:
        tile_budget = _check_budget(max_tiles, "max_tiles")
        if tiles is None:
            raise ValueError("max_tiles needs the tile count of every sample (tiles=...)")
    if tiles is not None:
        tiles_array = _as_counts(tiles, "tiles")
        if len(tiles_array) != len(lengths):
            raise ValueError(f"tiles has {len(tiles_array)} entries but lengths has {len(lengths)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    packs: list[list[int]] = []
    for start in range(0, len(order), chunk_size):
        packs += _first_fit_decreasing(order[start:start + chunk_size], lengths, tiles_array, budget, tile_budget)
    if shuffle:
        packs = [packs[k] for k in rng.permutation(len(packs))]
    return packs


def estimate_tiles(lengths: Sequence[int] | np.ndarray, num_image_token: int = 256) -> list[int]:
    """A tile count per sample from its token length alone: `max(1, length // num_image_token)`.

    Every tile puts `num_image_token` context tokens into the sequence and a text-only sample still carries one
    dummy tile, so when `length` is exact (or an over-estimate) this never under-counts; text adds to it, so it
    over-counts samples with long text. Used for the tile budget when the dataset exposes no tile counts.
    """
    num_image_token = _check_budget(num_image_token, "num_image_token")
    return np.maximum(1, _as_counts(lengths, "lengths") // num_image_token).tolist()


@dataclass(frozen=True)
class PackingStats:
    """How well a plan fills its packs. `fill_ratio` = planned tokens / (packs x max_packed_tokens)."""

    num_samples: int
    num_packs: int
    fill_ratio: float
    samples_per_pack: float
    oversize_samples: int
    tile_fill_ratio: float | None = None

    def __str__(self) -> str:
        text = (
            f"{self.num_samples} samples in {self.num_packs} packs ({self.samples_per_pack:.2f} per pack), "
            f"token fill {100 * self.fill_ratio:.1f}%"
        )
        if self.tile_fill_ratio is not None:
            text += f", tile fill {100 * self.tile_fill_ratio:.1f}%"
        if self.oversize_samples:
            text += f", {self.oversize_samples} samples over the token/tile budget packed alone"
        return text


def packing_stats(
    packs: Sequence[Sequence[int]],
    lengths: Sequence[int] | np.ndarray,
    max_packed_tokens: int,
    *,
    tiles: Sequence[int] | np.ndarray | None = None,
    max_tiles: int | None = None,
) -> PackingStats:
    """Fill ratio and counts of a plan (oversize samples count with their full length)."""
    lengths = _as_counts(lengths, "lengths")
    budget = _check_budget(max_packed_tokens, "max_packed_tokens")
    members = [int(i) for pack in packs for i in pack]
    oversize = sum(1 for i in members if lengths[i] > budget)
    tile_fill = None
    if tiles is not None and max_tiles is not None:
        tiles = _as_counts(tiles, "tiles")
        oversize += sum(1 for i in members if tiles[i] > max_tiles and lengths[i] <= budget)
        tile_fill = float(tiles[members].sum()) / max(1, len(packs) * max_tiles)
    return PackingStats(
        num_samples=len(members),
        num_packs=len(packs),
        fill_ratio=float(lengths[members].sum()) / max(1, len(packs) * budget),
        samples_per_pack=len(members) / max(1, len(packs)),
        oversize_samples=oversize,
        tile_fill_ratio=tile_fill,
    )


def _merge_into_others(
    packs: list[list[int]], target: int, lengths: np.ndarray, tiles: np.ndarray, budget: int, max_tiles: int
) -> list[list[int]] | None:
    """Dissolve the emptiest packs into the free room of the others until `target` packs remain (None: no room)."""
    packs = [list(p) for p in packs]
    used_tokens = np.array([lengths[p].sum() for p in packs], np.int64)
    used_tiles = np.array([tiles[p].sum() for p in packs], np.int64)
    alive = np.ones(len(packs), bool)
    for victim in np.argsort(used_tokens, kind="stable").tolist():
        if int(alive.sum()) <= target:
            break
        alive[victim] = False
        for index in sorted(packs[victim], key=lambda i: -int(lengths[i])):
            fits = alive & (used_tokens + lengths[index] <= budget) & (used_tiles + tiles[index] <= max_tiles)
            if not fits.any():
                return None
            slot = int(fits.argmax())
            packs[slot].append(index)
            used_tokens[slot] += lengths[index]
            used_tiles[slot] += tiles[index]
    return [p for p, keep in zip(packs, alive) if keep]


def _split_largest(packs: list[list[int]], target: int, lengths: np.ndarray) -> list[list[int]]:
    """Split the fullest multi-sample packs in two (balanced by tokens) until there are `target` packs."""
    packs = [list(p) for p in packs]
    heap = [(-int(lengths[p].sum()), k) for k, p in enumerate(packs) if len(p) > 1]
    heapq.heapify(heap)
    while len(packs) < target and heap:
        _, k = heapq.heappop(heap)
        halves: list[list[int]] = [[], []]
        sums = [0, 0]
        for index in sorted(packs[k], key=lambda i: -int(lengths[i])):
            side = 0 if sums[0] <= sums[1] else 1
            halves[side].append(index)
            sums[side] += int(lengths[index])
        packs[k] = halves[0]
        packs.append(halves[1])
        for j in (k, len(packs) - 1):
            if len(packs[j]) > 1:
                heapq.heappush(heap, (-int(lengths[packs[j]].sum()), j))
    return packs


# --------------------------------------------------------------------------------------------- packed dataset


class PackedDataset(torch.utils.data.Dataset):
    """A map-style view of `dataset` in which item `k` is the list of samples of pack `k`.

    `len()` is the number of packs of epoch 0's plan and stays the same in every epoch, so the Trainer's step
    count, LR schedule and resume position hold. `set_epoch(e)` re-plans with seed `(seed, e)` (nudging the plan
    to the same number of packs, see `_MAX_PLAN_ATTEMPTS`) and forwards the epoch to `dataset` when it has
    `set_epoch`. The epoch is kept in shared memory and each dataloader worker re-plans on its next item, so
    persistent workers follow too; the plan is a pure function of (lengths, seed, epoch), identical everywhere.

    Lengths come from `dataset.lengths` (estimates are fine: the collator splits an over-long pack into extra
    rows). Tiles for the `max_tiles` budget come from `tiles`, else `dataset.tiles` (one count per sample, as
    `SupervisedDataset.tiles` gives them from the start-up scan); a sample whose count is negative (unknown, e.g.
    a video) or a dataset without `tiles` gets :func:`estimate_tiles` from its length. Without `max_tiles` only an
    explicit `tiles` takes part (it breaks length ties in the plan).
    """

    def __init__(
        self,
        dataset: Any,
        max_packed_tokens: int,
        max_tiles: int | None = None,
        seed: int = 0,
        *,
        lengths: Sequence[int] | None = None,
        tiles: Sequence[int] | None = None,
        num_image_token: int = 256,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.dataset = dataset
        self.max_packed_tokens = _check_budget(max_packed_tokens, "max_packed_tokens")
        self.max_tiles = None if max_tiles is None else _check_budget(max_tiles, "max_tiles")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self.chunk_size = _check_budget(chunk_size, "chunk_size")
        if lengths is None:
            lengths = getattr(dataset, "lengths", None)
            if lengths is None:
                raise ValueError(
                    f"{type(dataset).__name__} has no `lengths`; PackedDataset needs a token length (estimate) per "
                    f"sample: give the dataset a `lengths` attribute or pass lengths=..."
                )
        self._lengths = _as_counts(lengths, "lengths")
        if len(self._lengths) != len(dataset):
            raise ValueError(f"{len(self._lengths)} lengths for a dataset of {len(dataset)} samples")
        if len(self._lengths) == 0:
            raise ValueError("cannot pack an empty dataset")
        self.estimated_tiles = 0  # samples whose tile count for the tile budget is estimated from their length
        if tiles is None and self.max_tiles is not None:
            tiles, self.estimated_tiles = self._dataset_tiles(getattr(dataset, "tiles", None), num_image_token)
        self._tiles = None if tiles is None else _as_counts(tiles, "tiles")
        if self._tiles is not None and len(self._tiles) != len(self._lengths):
            raise ValueError(f"{len(self._tiles)} tile counts for a dataset of {len(self._lengths)} samples")

        self._base = self._plan(self.seed, 0)
        self._packs = self._base
        self._planned_epoch = 0
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.stats = packing_stats(self._packs, self._lengths, self.max_packed_tokens,
                                   tiles=self._tiles, max_tiles=self.max_tiles)
        guessed = f", tiles of {self.estimated_tiles} samples estimated from their length"
        logger.info("packing: %s%s", self.stats, guessed if self.estimated_tiles else "")

    # --- planning ---------------------------------------------------------------------------------------------
    def _dataset_tiles(self, known: Sequence[int] | None, num_image_token: int) -> tuple[np.ndarray, int]:
        """(tiles per sample, how many estimated): the dataset's counts, with unknown (negative) ones and all of a
        dataset without counts estimated from the length."""
        estimated = np.asarray(estimate_tiles(self._lengths, num_image_token), np.int64)
        if known is None:
            return estimated, len(estimated)
        known = np.asarray(known)
        if known.ndim != 1 or len(known) != len(self._lengths):
            raise ValueError(f"dataset.tiles has shape {known.shape}; need one count per sample ({len(self._lengths)})")
        known = known.astype(np.int64)
        return np.where(known < 0, estimated, known), int((known < 0).sum())

    def _plan(self, *seed: int) -> list[list[int]]:
        return plan_packs(self._lengths, self.max_packed_tokens, tiles=self._tiles, max_tiles=self.max_tiles,
                          seed=list(seed), chunk_size=self.chunk_size)

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        if epoch == 0:
            return self._base
        target = len(self._base)
        tiles = self._tiles if self._tiles is not None else np.zeros_like(self._lengths)
        max_tiles = self.max_tiles if self.max_tiles is not None else np.iinfo(np.int64).max
        for attempt in range(_MAX_PLAN_ATTEMPTS):
            packs = self._plan(self.seed, epoch, attempt)
            if len(packs) > target:
                packs = _merge_into_others(packs, target, self._lengths, tiles, self.max_packed_tokens, max_tiles)
                if packs is None:
                    continue
            return _split_largest(packs, target, self._lengths)
        logger.warning("packing: epoch %d reuses epoch 0's packs (no re-plan met the pack count)", epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(target)
        return [self._base[k] for k in order]

    def _sync_epoch(self) -> None:
        epoch = int(self._epoch.item())
        if epoch != self._planned_epoch:
            self._packs = self._plan_epoch(epoch)
            self._planned_epoch = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Re-plan the packs for `epoch` (same `len()`) and forward the epoch to the wrapped dataset."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch.fill_(int(epoch))
        self._sync_epoch()
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(epoch))

    # --- map-style access -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._base)

    @property
    def packs(self) -> list[list[int]]:
        """The dataset indices of each pack in the current epoch."""
        self._sync_epoch()
        return self._packs

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"pack index must be an int, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"pack index {index} out of range for {n} packs")
        return [self.dataset[i] for i in self.packs[int(index) % n]]

    @property
    def lengths(self) -> list[int]:
        """Planned tokens per pack in the current epoch (for length-grouped sampling)."""
        return [int(self._lengths[p].sum()) for p in self.packs]

    @property
    def length(self) -> list[int]:
        """Alias of :attr:`lengths` (the official datasets' attribute name)."""
        return self.lengths


# --------------------------------------------------------------------------------------------- packed collator


def _split_rows(items: list[dict[str, Any]], limit: int | None) -> list[list[dict[str, Any]]]:
    """Cut a pack into consecutive rows of at most `limit` real tokens; a sample longer than `limit` rides alone."""
    if limit is None:
        return [items]
    rows: list[list[dict[str, Any]]] = []
    used = 0
    for item in items:
        n = len(item["input_ids"])
        if not rows or used + n > limit:
            rows.append([])
            used = 0
        rows[-1].append(item)
        used += n
    return rows


@dataclass
class PackedCollator:
    """Turns a list of packs (each a list of dataset items) into a batch with one row per pack.

    Per row: the samples' `input_ids` / `labels` concatenated, `position_ids` restarting at 0 at every sample, and
    the first label of every sample set to -100 (nothing before it in its own sample predicts it). There is no
    `attention_mask`: transformers builds the block-diagonal causal mask from the restarting position ids, and
    `cu_seq_lens_q/k` + `max_length_q/k` give flash-attention 2 the same boundaries (unless
    `flash_attn_kwargs=False`). Rows are right-padded to the longest one with `pad_token_id` / -100; the padding
    forms its own segments whose position ids restart at 0, each no longer than the longest sample in the batch,
    so `max(position_ids)` (which Phi-3 longrope and dynamic-NTK RoPE read) is what it is without packing.

    `pixel_values` / `image_flags` are concatenated in sample order. `loss_weight` (for `sample` / `square`) gives
    each supervised token of a sample `token_weight(num_supervised of that ORIGINAL sample)`. A pack longer than
    `max_packed_tokens` real tokens becomes several rows; no sample is ever cut. `use_cache=False` is passed
    because a KV cache in the forward disables transformers' packed-sequence detection (the mask would then be
    plainly causal across samples).

    For the trainer (collator.TRAINER_KEYS, popped before the forward): `packed: True`, `num_samples` (samples in
    the batch), `skipped_samples` (what the dataset skipped) and, with `with_sample_ids`, `sample_ids`, as in
    `DataCollator`.
    """

    pad_token_id: int
    loss_reduction: str = "token"
    max_packed_tokens: int | None = None
    pad_to_multiple_of: int | None = None
    flash_attn_kwargs: bool = True
    with_sample_ids: bool = False

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("PackedCollator needs the tokenizer's pad_token_id")
        token_weight(1, self.loss_reduction)  # validates the name
        if self.max_packed_tokens is not None:
            _check_budget(self.max_packed_tokens, "max_packed_tokens")
        if self.pad_to_multiple_of is not None:
            _check_budget(self.pad_to_multiple_of, "pad_to_multiple_of")

    def __call__(self, packs: list[list[dict[str, Any]] | dict[str, Any]]) -> dict[str, Any]:
        rows = self._rows(packs)
        width = max(sum(len(item["input_ids"]) for item in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out, weights, segments, items = self._place(rows, width)
        out.update(_media(items))
        if self.loss_reduction != "token":
            out["loss_weight"] = weights * (out["labels"] != IGNORE_INDEX)
        if self.flash_attn_kwargs:
            out.update(_varlen_kwargs(segments))
        return add_bookkeeping(out, items, self.with_sample_ids)

    def _rows(self, packs: list[list[dict[str, Any]] | dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The batch's packs (a pack or a lone item each) as rows of at most ``max_packed_tokens`` tokens."""
        if not packs:
            raise ValueError("PackedCollator got an empty batch")
        rows: list[list[dict[str, Any]]] = []
        for k, pack in enumerate(packs):
            items = [pack] if isinstance(pack, dict) else list(pack)
            if not items:
                raise ValueError(f"pack {k} of the batch holds no sample")
            for item in items:
                if len(item["input_ids"]) == 0:
                    raise ValueError(f"sample {item.get('sample_id', '?')} has no tokens")
            rows += _split_rows(items, self.max_packed_tokens)
        return rows

    def _place(self, rows: list[list[dict[str, Any]]], width: int):
        """Lay the samples out side by side: token tensors, per-token loss weights, the segment lengths of the
        flattened batch (samples and padding pieces, for flash-attention varlen) and the items in order."""
        longest_sample = max(len(item["input_ids"]) for row in rows for item in row)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        weights = torch.zeros((len(rows), width), dtype=torch.float32)
        segments: list[int] = []
        items_in_order: list[dict[str, Any]] = []
        for r, row in enumerate(rows):
            start = 0
            for item in row:
                ids = torch.as_tensor(item["input_ids"]).reshape(-1)
                lab = torch.as_tensor(item["labels"]).reshape(-1)
                if lab.shape != ids.shape:
                    raise ValueError(f"sample {item.get('sample_id', '?')}: labels has {lab.numel()} entries, "
                                     f"input_ids {ids.numel()}")
                n = ids.numel()
                end = start + n
                input_ids[r, start:end] = ids
                labels[r, start:end] = lab
                labels[r, start] = IGNORE_INDEX  # the first token of a sample is never a prediction target
                position_ids[r, start:end] = torch.arange(n)
                n_sup = item.get("num_supervised")
                if n_sup is None:
                    n_sup = int((lab != IGNORE_INDEX).sum())
                weights[r, start:end] = token_weight(int(n_sup), self.loss_reduction)
                segments.append(n)
                items_in_order.append(item)
                start = end
            while start < width:  # padding tail: own segments, none longer than the longest sample
                n = min(width - start, longest_sample)
                position_ids[r, start:start + n] = torch.arange(n)
                segments.append(n)
                start += n
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "use_cache": False,
            "packed": True,
            "num_samples": len(items_in_order),  # rows hold several samples: throughput and bad-data accounting
        }
        return out, weights, segments, items_in_order


def _media(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every sample's tiles and image flags, concatenated in the order the samples were placed."""
    try:
        return {
            "pixel_values": torch.cat([torch.as_tensor(item["pixel_values"]) for item in items]),
            "image_flags": torch.cat([torch.as_tensor(item["image_flags"]).reshape(-1) for item in items]),
        }
    except KeyError as err:
        raise ValueError(
            f"every dataset item needs {err.args[0]!r} (text-only samples carry one dummy tile with flag 0)"
        ) from None


def _varlen_kwargs(segments: list[int]) -> dict[str, Any]:
    """flash-attention varlen boundaries: cumulative segment lengths and the longest segment."""
    cu_seq_lens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
    longest = max(segments)
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens.clone(),
            "max_length_q": longest, "max_length_k": longest}

