"""Batching dataset items for InternVLChatModel.forward.

Differences from the official `concat_pad_data_collator`, on purpose: padding uses the tokenizer's pad id and an
explicit attention mask (the official collator pads with id 0 and then masks every token whose id is 0, which hides
real tokens — id 0 is `!` in Qwen and Llama-3 vocabularies), and per-token loss weights are built in every mode, so
`--loss_reduction sample|square` is honoured without packing (officially it only works with packed data).

The batch contract, shared with :class:`internvl_chat.data.packing.PackedCollator`: a batch is a dict of the
model's forward arguments plus the :data:`TRAINER_KEYS`, which describe the batch to the trainer and which the
trainer pops before calling the model. A padded batch (this collator) has an `attention_mask`; a packed batch says
so with `packed: True`, has no `attention_mask` and holds `num_samples` samples in fewer rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..constants import IGNORE_INDEX

LOSS_REDUCTIONS = ("token", "sample", "square")


def default_loss_reduction(conv_style: str | None) -> str:
    """``--loss_reduction auto``: ``square`` for InternVL3.5-GPT-OSS's template (its official forward weights every
    unpacked sample by 1/sqrt of its supervised tokens, whatever the flag), ``token`` otherwise."""
    return "square" if conv_style == "internvl3_5_gpt_oss" else "token"

# Batch keys for the trainer, never passed to the model: `packed` (True for PackedCollator batches), `num_samples`
# (samples in the batch, when rows hold several), `skipped_samples` (the bad samples the dataset replaced) and
# `sample_ids` (one "<file>:<line>" per sample, for counting distinct bad records).
TRAINER_KEYS = ("packed", "num_samples", "skipped_samples", "sample_ids")


def pop_trainer_keys(batch: dict[str, Any]) -> dict[str, Any]:
    """Remove the :data:`TRAINER_KEYS` from a collated batch and return them; what stays is `model(**batch)`."""
    return {k: batch.pop(k) for k in TRAINER_KEYS if k in batch}


def add_bookkeeping(batch: dict[str, Any], items: list[dict[str, Any]], with_sample_ids: bool) -> dict[str, Any]:
    """Add the trainer's bad-data keys to a collated batch: the report lines of the samples the dataset skipped
    (``skipped_samples``) and, when asked, each placed item's ``"file:line"`` (``sample_ids``)."""
    skipped = [s for item in items for s in item.get("skipped", ())]
    if skipped:
        batch["skipped_samples"] = skipped
    if with_sample_ids:
        batch["sample_ids"] = [item.get("sample_id") for item in items]
    return batch


def token_weight(num_supervised: int, reduction: str) -> float:
    """Weight of each supervised token of a sample with `num_supervised` supervised tokens (official len2weight)."""
    if num_supervised == 0:
        return 0.0
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / num_supervised
    if reduction == "square":
        return 1.0 / math.sqrt(num_supervised)
    raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")


@dataclass
class DataCollator:
    """Right-pads a list of dataset items into one batch.

    Output keys: input_ids, labels, attention_mask, position_ids, pixel_values (all tiles concatenated),
    image_flags, and, unless the reduction is `token`, loss_weight. `skipped_samples` lists the bad samples the
    dataset replaced (reported by the trainer, not fed to the model). With `with_sample_ids`, `sample_ids` lists
    the items' `"<file>:<line>"`, so the trainer's bad-data tracker counts distinct records (the trainer pops it;
    off by default because the model does not take it).
    """

    pad_token_id: int
    loss_reduction: str = "token"
    pad_to_multiple_of: int | None = None
    with_sample_ids: bool = False

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("DataCollator needs the tokenizer's pad_token_id")
        token_weight(1, self.loss_reduction)  # validates the name

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("DataCollator got an empty batch")
        lengths = [len(item["input_ids"]) for item in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (item, n) in enumerate(zip(items, lengths)):
            input_ids[row, :n] = torch.as_tensor(item["input_ids"])
            labels[row, :n] = torch.as_tensor(item["labels"])
            attention_mask[row, :n] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "pixel_values": torch.cat([torch.as_tensor(item["pixel_values"]) for item in items]),
            "image_flags": torch.cat([torch.as_tensor(item["image_flags"]).reshape(-1) for item in items]),
        }
        if self.loss_reduction != "token":
            weight = torch.zeros((batch, width), dtype=torch.float32)
            for row, item in enumerate(items):
                n_sup = int(item.get("num_supervised", int((torch.as_tensor(item["labels"]) != IGNORE_INDEX).sum())))
                weight[row] = token_weight(n_sup, self.loss_reduction)
            out["loss_weight"] = weight * (labels != IGNORE_INDEX)
        return add_bookkeeping(out, items, self.with_sample_ids)
