"""Packing: the plan, the map-style packed dataset, and packed batches that compute what unpacked ones do.

Items are tiny_model.synthetic_items: random text ids around `<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>`
(no tokenizer call), uint8 channels-last tiles, and text-only samples carrying one flag-0 tile.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from internvl_chat.constants import IGNORE_INDEX
from internvl_chat.data.collator import DataCollator, pop_trainer_keys
from internvl_chat.data.packing import (
    PackedCollator,
    PackedDataset,
    _merge_into_others,
    _split_largest,
    estimate_tiles,
    packing_stats,
    plan_packs,
)
from internvl_chat.tiny_model import SYNTHETIC_TEXT_IDS, make_tiny_model, synthetic_items
from tests.conftest import forward_backward, load_chat_model

# --------------------------------------------------------------------------------------------------- planning


def _random_lengths(n=600, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 900, n)
    tiles = rng.integers(1, 7, n)
    lengths[::97] = 5000  # a few over the budget
    return lengths, tiles


def _check_partition(packs, n):
    flat = sorted(i for pack in packs for i in pack)
    assert flat == list(range(n)), "every index must be in exactly one pack"


def _check_budgets(packs, lengths, budget, tiles=None, max_tiles=None):
    for pack in packs:
        if len(pack) == 1:
            continue
        assert sum(int(lengths[i]) for i in pack) <= budget
        assert all(lengths[i] <= budget for i in pack), "an oversize sample must be packed alone"
        if tiles is not None:
            assert sum(int(tiles[i]) for i in pack) <= max_tiles
            assert all(tiles[i] <= max_tiles for i in pack)


def test_plan_is_deterministic_partition_within_budgets():
    lengths, tiles = _random_lengths()
    packs = plan_packs(lengths, 2048, tiles=tiles, max_tiles=12, seed=5, chunk_size=128)
    assert packs == plan_packs(lengths.tolist(), 2048, tiles=tiles.tolist(), max_tiles=12, seed=5, chunk_size=128)
    assert packs != plan_packs(lengths, 2048, tiles=tiles, max_tiles=12, seed=6, chunk_size=128)
    _check_partition(packs, len(lengths))
    _check_budgets(packs, lengths, 2048, tiles, 12)
    oversize = [i for i in range(len(lengths)) if lengths[i] > 2048]
    assert oversize and all([i] in packs for i in oversize)
    # the tile budget binds: without it, packs hold more tiles than 12
    free = plan_packs(lengths, 2048, seed=5, chunk_size=128)
    _check_partition(free, len(lengths))
    assert max(sum(tiles[i] for i in p) for p in free) > 12
    assert len(free) < len(packs)


def test_plan_tile_budget_and_oversize_tiles():
    lengths = [10] * 6
    tiles = [3, 3, 3, 9, 1, 1]
    packs = plan_packs(lengths, 1000, tiles=tiles, max_tiles=4, shuffle=False)
    _check_partition(packs, 6)
    assert [3] in packs  # 9 tiles > 4: alone
    for pack in packs:
        if pack != [3]:
            assert sum(tiles[i] for i in pack) <= 4
    assert len(packs) == 4  # {3-tile + 1-tile} x 2, 3-tile alone, 9-tile alone


def test_plan_fills_packs_and_reports_fill_ratio():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 300, 4000)
    packs = plan_packs(lengths, 4096, seed=0)
    _check_partition(packs, len(lengths))
    _check_budgets(packs, lengths, 4096)
    stats = packing_stats(packs, lengths, 4096)
    assert stats.num_packs == len(packs) and stats.num_samples == len(lengths)
    assert stats.fill_ratio == pytest.approx(lengths.sum() / (len(packs) * 4096))
    assert stats.fill_ratio > 0.97  # small samples fill packs almost completely
    assert len(packs) <= math.ceil(lengths.sum() / 4096) + 2
    assert "packs" in str(stats) and stats.oversize_samples == 0


def test_plan_without_shuffle_keeps_windows_in_order():
    lengths = [100] * 40
    packs = plan_packs(lengths, 1000, shuffle=False, chunk_size=10)
    assert len(packs) == 4 and all(sorted(p) == list(range(10 * k, 10 * k + 10)) for k, p in enumerate(packs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lengths=[1, 2], max_packed_tokens=0), "max_packed_tokens"),
        (dict(lengths=[1, -2], max_packed_tokens=8), r"lengths\[1\]"),
        (dict(lengths=[1, 2], max_packed_tokens=8, max_tiles=4), "tiles"),
        (dict(lengths=[1, 2], max_packed_tokens=8, tiles=[1], max_tiles=4), "tiles has 1"),
    ],
)
def test_plan_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_packs(**kwargs)


def test_estimate_tiles_never_undercounts_image_tokens():
    assert estimate_tiles([5, 255, 256, 2 * 256 + 30, 7 * 256 + 2]) == [1, 1, 1, 2, 7]


def test_pack_count_helpers_keep_budgets():
    lengths = np.array([500, 400, 300, 50, 40, 30, 20, 10])
    tiles = np.ones(8, np.int64)
    packs = [[0, 3], [1, 4], [2, 5], [6], [7]]
    merged = _merge_into_others(packs, 3, lengths, tiles, 600, 10)
    _check_partition(merged, 8)
    assert len(merged) == 3
    _check_budgets(merged, lengths, 600, tiles, 10)
    assert _merge_into_others(packs, 1, lengths, tiles, 600, 10) is None  # no room for that
    split = _split_largest(merged, 6, lengths)
    _check_partition(split, 8)
    assert len(split) == 6


# --------------------------------------------------------------------------------------------- packed dataset


class _IndexDataset(torch.utils.data.Dataset):
    """Returns the index itself; records set_epoch calls."""

    def __init__(self, lengths, tiles=None):
        self.lengths = list(lengths)
        if tiles is not None:
            self.tiles = list(tiles)
        self.epochs = []

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        return int(index)

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def _identity(batch):
    return batch


def test_packed_dataset_length_items_and_epochs():
    lengths, tiles = _random_lengths(400, seed=2)
    inner = _IndexDataset(lengths, tiles)
    ds = PackedDataset(inner, 2048, max_tiles=10, seed=3, chunk_size=64)
    n = len(ds)
    assert n == len(plan_packs(lengths, 2048, tiles=tiles, max_tiles=10, seed=[3, 0], chunk_size=64))
    assert ds[0] == ds.packs[0] and ds[-1] == ds.packs[-1]
    with pytest.raises(IndexError):
        ds[n]
    assert ds.lengths == [int(sum(lengths[i] for i in p)) for p in ds.packs]
    assert ds.stats.num_packs == n and 0 < ds.stats.fill_ratio <= 1
    epoch0 = [list(p) for p in ds.packs]
    seen = []
    for epoch in (1, 2, 3, 4):
        ds.set_epoch(epoch)
        assert len(ds) == n, "the number of packs must not change between epochs"
        assert len(ds.packs) == n
        _check_partition(ds.packs, len(lengths))
        _check_budgets(ds.packs, lengths, 2048, tiles, 10)
        seen.append([list(p) for p in ds.packs])
    assert inner.epochs == [1, 2, 3, 4]
    assert seen[0] != epoch0 and seen[1] != seen[0], "a new epoch must re-plan the packs"
    # a resumed run rebuilds the dataset and lands on the same packs
    again = PackedDataset(_IndexDataset(lengths, tiles), 2048, max_tiles=10, seed=3, chunk_size=64)
    assert again.packs == epoch0
    again.set_epoch(3)
    assert again.packs == seen[2]
    ds.set_epoch(0)
    assert ds.packs == epoch0


def test_packed_dataset_falls_back_to_epoch0_packs_when_no_replan_fits(monkeypatch):
    import internvl_chat.data.packing as packing

    lengths, _ = _random_lengths(200, seed=6)
    ds = PackedDataset(_IndexDataset(lengths), 2048, seed=0, chunk_size=32)
    epoch0 = [list(p) for p in ds.packs]
    monkeypatch.setattr(packing, "_MAX_PLAN_ATTEMPTS", 0)
    ds.set_epoch(1)
    assert len(ds.packs) == len(epoch0) and ds.packs != epoch0
    assert sorted(map(sorted, ds.packs)) == sorted(map(sorted, epoch0))


def test_packed_dataset_estimates_tiles_when_the_dataset_has_none():
    lengths = [300, 300, 600, 600, 40, 40]  # estimated tiles 1, 1, 2, 2, 1, 1
    ds = PackedDataset(_IndexDataset(lengths), 10_000, max_tiles=2, seed=0)
    for pack in ds.packs:
        assert sum(max(1, lengths[i] // 256) for i in pack) <= 2
    with pytest.raises(ValueError, match="lengths"):
        PackedDataset(list(range(3)), 100)


def test_packed_dataset_uses_dataset_tiles_and_estimates_unknown_ones():
    lengths = [300, 300, 600, 600, 40, 40]  # estimated tiles 1, 1, 2, 2, 1, 1
    tiles = [2, -1, 1, 1, -1, 2]  # -1: unknown (a video, an image without a size): estimated from the length
    ds = PackedDataset(_IndexDataset(lengths, tiles), 10_000, max_tiles=2, seed=0)
    used = [2, 1, 1, 1, 1, 2]
    assert ds._tiles.tolist() == used and ds.estimated_tiles == 2
    for pack in ds.packs:
        assert sum(used[i] for i in pack) <= 2
    # without a tile budget the dataset's counts take no part (the plan is the one of lengths alone)
    assert PackedDataset(_IndexDataset(lengths, tiles), 10_000, seed=0).packs == \
        PackedDataset(_IndexDataset(lengths), 10_000, seed=0).packs
    with pytest.raises(ValueError, match="one count per sample"):
        PackedDataset(_IndexDataset(lengths, tiles[:3]), 10_000, max_tiles=2)


def test_packed_dataset_epoch_reaches_persistent_workers():
    lengths, _ = _random_lengths(300, seed=4)
    ds = PackedDataset(_IndexDataset(lengths), 2048, seed=1, chunk_size=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=1,
                                         persistent_workers=True, collate_fn=_identity)
    assert list(loader) == ds.packs
    ds.set_epoch(1)
    assert list(loader) == ds.packs  # the already-running worker re-planned too


# --------------------------------------------------------------------------------------------------- batches


def _items(tok):
    """Two tiles, text only (one flag-0 tile), one tile, and text only with every token supervised, the first too."""
    items = synthetic_items(tok, [(2, 9, 11), (0, 20, 9), (1, 7, 5), (0, 11, 14)], seed=1)
    last = items[-1]
    last["labels"] = last["input_ids"].clone()
    last["num_supervised"] = len(last["labels"])
    return items


def test_collator_layout():
    class Tok:
        @staticmethod
        def convert_tokens_to_ids(tokens):
            return [1410, 1411, 1412]

    items = _items(Tok)
    items[1]["skipped"] = ["bad.jsonl:3: broken [invalid_json]"]
    collate = PackedCollator(pad_token_id=1400, loss_reduction="square", max_packed_tokens=1000)
    batch = collate([items[:2], items[2:]])
    assert "attention_mask" not in batch and batch["use_cache"] is False
    lens = [len(it["input_ids"]) for it in items]
    width = max(lens[0] + lens[1], lens[2] + lens[3])
    assert batch["input_ids"].shape == (2, width)
    # rows: concatenated samples, position ids restarting at 0, first label of each sample masked
    row0 = torch.cat([items[0]["input_ids"], items[1]["input_ids"]])
    assert torch.equal(batch["input_ids"][0, : len(row0)], row0)
    assert torch.equal(batch["position_ids"][0, : len(row0)], torch.cat([torch.arange(lens[0]), torch.arange(lens[1])]))
    assert batch["labels"][1, lens[2]] == IGNORE_INDEX and items[3]["labels"][0] != IGNORE_INDEX
    assert torch.equal(batch["labels"][1, lens[2] + 1 : lens[2] + lens[3]], items[3]["labels"][1:])
    # padding tail: pad ids, ignored labels, own position segments no longer than the longest sample
    tail = width - lens[2] - lens[3]
    assert tail > 0
    assert (batch["input_ids"][1, -tail:] == 1400).all() and (batch["labels"][1, -tail:] == IGNORE_INDEX).all()
    assert batch["position_ids"][1, lens[2] + lens[3]] == 0
    assert int(batch["position_ids"].max()) == max(lens) - 1
    # tiles in sample order, flags kept (text-only samples contribute one flag-0 tile)
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))
    assert batch["image_flags"].tolist() == [1, 1, 0, 1, 0]
    # square weights: 1/sqrt(n) of each ORIGINAL sample on its supervised tokens
    w = batch["loss_weight"]
    assert torch.allclose(w[0, lens[0] - 1], torch.tensor(1 / math.sqrt(items[0]["num_supervised"])))
    assert torch.allclose(w[1, -tail - 1], torch.tensor(1 / math.sqrt(items[3]["num_supervised"])))
    assert (w[batch["labels"] == IGNORE_INDEX] == 0).all()
    # flash-attention varlen boundaries over the flattened batch
    cu = batch["cu_seq_lens_q"].tolist()
    assert cu[:3] == [0, lens[0], lens[0] + lens[1]]
    assert cu[-1] == 2 * width and width + lens[2] in cu and width + lens[2] + lens[3] in cu
    assert batch["max_length_q"] == max(np.diff(cu))
    assert batch["skipped_samples"] == ["bad.jsonl:3: broken [invalid_json]"]
    batch_skipped = batch["skipped_samples"]
    # the batch says it is packed; the trainer pops that and the other bookkeeping keys before the forward
    assert batch["packed"] is True and batch["num_samples"] == len(items)
    assert "packed" not in DataCollator(pad_token_id=1400)(items)
    about = pop_trainer_keys(batch)
    assert about == {"packed": True, "num_samples": len(items), "skipped_samples": batch_skipped}
    assert not {"packed", "num_samples", "skipped_samples"} & batch.keys()
    padded = PackedCollator(pad_token_id=1400, pad_to_multiple_of=64)([items[:2], items[2:]])
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["cu_seq_lens_q"][-1] == padded["input_ids"].numel()
    # a pack over the budget (lengths were estimates) becomes several rows; no sample is cut
    split = PackedCollator(pad_token_id=1400, max_packed_tokens=lens[0] + 1)([items])
    assert split["input_ids"].shape[0] >= 2 and "loss_weight" not in split
    assert int((split["position_ids"] == 0).sum()) >= 4
    kept = split["input_ids"][split["labels"] != IGNORE_INDEX].tolist()
    want = torch.cat([it["labels"][1:][it["labels"][1:] != IGNORE_INDEX] for it in items]).tolist()
    assert sorted(kept) == sorted(want)


def test_collator_rejects_bad_input():
    with pytest.raises(ValueError, match="loss_reduction"):
        PackedCollator(pad_token_id=0, loss_reduction="mean")
    with pytest.raises(ValueError, match="empty"):
        PackedCollator(pad_token_id=0)([])
    with pytest.raises(ValueError, match="pack 0"):
        PackedCollator(pad_token_id=0)([[]])


# ----------------------------------------------------------------------------------------- model equivalence


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    cache = {}

    def get(llm):
        if llm not in cache:
            model, tok = load_chat_model(make_tiny_model(root / llm, llm=llm, seed=7))
            cache[llm] = (model.eval(), tok)
        return cache[llm]

    return get


def _model_inputs(batch):
    """The batch without the keys the trainer pops (`packed`, `num_samples`, ...): what the model takes."""
    batch = dict(batch)
    pop_trainer_keys(batch)
    return batch


def _loss_and_grads(model, batch):
    model.train()
    try:
        out, grads = forward_backward(model, _model_inputs(batch))
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return out.loss.detach(), grads


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_packed_batch_matches_unpacked_loss_and_gradients(tiny_models, llm):
    model, tok = tiny_models(llm)
    items = _items(tok)
    ref_loss, ref_grads = _loss_and_grads(model, DataCollator(pad_token_id=tok.pad_token_id)(items))
    lens = [len(it["input_ids"]) for it in items]
    packings = {
        "two rows": PackedCollator(tok.pad_token_id)([items[:2], items[2:]]),
        "one row": PackedCollator(tok.pad_token_id)([items]),
        "split by budget": PackedCollator(tok.pad_token_id, max_packed_tokens=lens[0] + lens[1])([items]),
    }
    assert packings["split by budget"]["input_ids"].shape[0] == 2
    for name, batch in packings.items():
        loss, grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg=f"{llm} {name}: loss")
        assert grads.keys() == ref_grads.keys()
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=0,
                                       msg=lambda m, key=key: f"{llm} {name}: grad of {key}\n{m}")
    # the ViT and the projector really were trained through the packed image tokens
    assert ref_grads["mlp1.1.weight"].abs().sum() > 0


def _per_sample_ce(model, item):
    """Cross entropy of every supervised token of `item`, the sample run alone."""
    with torch.no_grad():
        logits = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
                       image_flags=item["image_flags"], use_cache=False).logits[0]
    labels = item["labels"]
    keep = labels[1:] != IGNORE_INDEX
    return F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="none")


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_sample_and_square_reductions_match_per_sample_formula(tiny_models, llm):
    model, tok = tiny_models(llm)
    items = _items(tok)[:3]  # first label of each is unsupervised, so every supervised token is predicted
    ce = [_per_sample_ce(model, it) for it in items]
    n = [it["num_supervised"] for it in items]
    assert [len(c) for c in ce] == n
    expected = {
        "sample": sum(c.sum() / k for c, k in zip(ce, n)) / len(items),
        "square": sum(c.sum() / math.sqrt(k) for c, k in zip(ce, n)) / sum(math.sqrt(k) for k in n),
        "token": torch.cat(ce).mean(),
    }
    for reduction, want in expected.items():
        batch = PackedCollator(tok.pad_token_id, loss_reduction=reduction)([items[:2], items[2:]])
        with torch.no_grad():
            loss = model(**_model_inputs(batch)).loss
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5, msg=f"{llm} {reduction}")
    assert not torch.isclose(expected["sample"], expected["square"])


@pytest.mark.parametrize("llm", ["qwen2", "internlm2", "llama", "phi3"])
def test_samples_in_a_pack_do_not_see_each_other(tiny_models, llm):
    """Packed logits equal each sample's logits alone; changing one sample leaves the others untouched.

    Rows are longer than 512 tokens while every sample is shorter, and one row has a long padding tail: the tiny
    Phi-3 switches to its long RoPE factors past 512 positions, so this also checks that packing and padding keep
    `max(position_ids)` at the longest sample's length.
    """
    model, tok = tiny_models(llm)
    a, b, c, e, d = synthetic_items(tok, [(0, 203, 60)] * 3 + [(0, 23, 10), (1, 8, 8)], seed=11)  # d: 1 tile
    packs = [[a, b, c, e], [d]]
    collate = PackedCollator(tok.pad_token_id)
    batch = collate(packs)
    tail = batch["input_ids"].shape[1] - len(d["input_ids"])
    assert tail > 512 and int(batch["position_ids"].max()) < 512
    with torch.no_grad():
        logits = model(**_model_inputs(batch)).logits
    starts = {0: np.cumsum([0] + [len(it["input_ids"]) for it in packs[0]]).tolist(), 1: [0]}
    for row, pack in enumerate(packs):
        for start, item in zip(starts[row], pack):
            with torch.no_grad():
                alone = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
                              image_flags=item["image_flags"], use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, start : start + len(alone)], alone, atol=1e-5, rtol=1e-5)

    # change the first sample's text: the other samples' logits stay exactly where they were
    changed = dict(a, input_ids=torch.randint(*SYNTHETIC_TEXT_IDS, a["input_ids"].shape, generator=torch.Generator()))
    b_slice = slice(starts[0][1], starts[0][-1])
    with torch.no_grad():
        after = model(**_model_inputs(collate([[changed, b, c, e], [d]]))).logits
    torch.testing.assert_close(after[0, b_slice], logits[0, b_slice], atol=1e-6, rtol=0)
    assert (after[0, : starts[0][1]] - logits[0, : starts[0][1]]).abs().max() > 1e-3

    # negative control: without restarting positions (one long sequence), the change leaks into the others
    flat = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    flat_changed = dict(collate([[changed, b, c, e], [d]]), position_ids=flat["position_ids"])
    with torch.no_grad():
        leak = (model(**_model_inputs(flat_changed)).logits[0, b_slice]
                - model(**_model_inputs(flat)).logits[0, b_slice]).abs().max()
    assert leak > 1e-3


_varlen_calls = []


def _varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                                **kwargs):
    """What flash_attn_varlen_func computes: causal attention inside each [cu[i], cu[i+1]) span of the flattened
    (batch x length) tokens, nothing across spans. Query/key/value arrive as [batch, heads, length, dim]."""
    assert attention_mask is None and cu_seq_lens_q is not None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    _varlen_calls.append(int(max_length_q))
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, -1, dim).repeat_interleave(groups, dim=1)
    v = value.transpose(1, 2).reshape(batch * length, -1, dim).repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    bounds = cu_seq_lens_q.tolist()
    assert bounds[-1] == batch * length
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert hi - lo <= max_length_q
        span = [t[lo:hi].transpose(0, 1) for t in (q, k, v)]
        out[lo:hi] = F.scaled_dot_product_attention(*span, is_causal=True, scale=scaling).transpose(0, 1)
    return out.reshape(batch, length, heads, dim), None


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_flash_varlen_boundaries_isolate_samples(tiny_models, llm):
    """The cu_seq_lens the collator passes reach the attention layers and give per-sample attention at any batch
    size (flash-attention is not on CPU: a reference implementation of its varlen semantics stands in)."""
    model, tok = tiny_models(llm)
    items = _items(tok)
    batch = PackedCollator(tok.pad_token_id)([items[:2], items[2:]])
    with torch.no_grad():
        expected = model(**_model_inputs(batch)).logits  # SDPA with the block-diagonal mask
    AttentionInterface.register("packing_test_varlen", _varlen_reference_attention)
    config = model.language_model.config
    saved = config._attn_implementation
    config._attn_implementation = "packing_test_varlen"
    try:
        _varlen_calls.clear()
        with torch.no_grad():
            got = model(**_model_inputs(batch)).logits
        assert len(_varlen_calls) == config.num_hidden_layers
        # mis-declared boundaries (one span per row) do change the result: the kwargs are really used
        width = batch["input_ids"].shape[1]
        wrong = dict(batch, cu_seq_lens_q=torch.tensor([0, width, 2 * width], dtype=torch.int32),
                     max_length_q=width, max_length_k=width)
        wrong["cu_seq_lens_k"] = wrong["cu_seq_lens_q"]
        with torch.no_grad():
            leaked = model(**_model_inputs(wrong)).logits
    finally:
        config._attn_implementation = saved
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (leaked - expected).abs().max() > 1e-3
