"""Pre-flight check of a whole meta file: every line of every dataset, before a GPU is rented.

:func:`check_dataset` visits every record of every annotation file once and reports what the
training would trip over, with file, line, kind and reason for each problem, plus the numbers a
user wants before a run (samples per type, tiles, token lengths, supervised tokens). It is the
engine of ``tools/check_data.py``; tests and the training start-up call it directly.

How a record is checked (nothing here re-implements the dataset; the checker *is* the dataset):

* With a tokenizer, each record goes through :meth:`SupervisedDataset.build_item
  <internvl_chat.data.dataset.SupervisedDataset.build_item>`, the exact code path of training:
  JSON, format conversion and validation (roles and order, placeholders vs media, boxes), image
  files opened and fully decoded and tiled, videos decoded, and tokenization with the real template
  and tokenizer. Two settings differ from training, on purpose: every video is read with
  ``max_num_frame`` frames (the worst case of the per-epoch draw, so an over-length video is caught
  even if epoch 0 would draw few frames, and the length written is an upper bound for grouping),
  and the sample is tokenized without ``max_seq_length`` so its full length is known. Over-length
  samples are then classified as the template code would treat them: *refused* (the cut would go
  through an image block or leave no supervised token: training skips them) or *truncated*
  (training keeps the first ``max_seq_length`` tokens and loses the rest of the answer). Both are
  ``too_long`` problems; ``allow_truncation=True`` turns the truncated ones into warnings.
* Without a tokenizer, the same dataset code runs with :class:`StandInTokenizer`, a
  character-level stand-in: every structural check (JSON, format, roles, placeholders, boxes,
  images decoded and tiled, videos decoded, template rules) runs as in training, and no token
  numbers (lengths, supervised tokens, over-length) are reported or written.

The dataset turns every exception raised while building one record into a
:class:`~internvl_chat.data.errors.DataError` with a specific kind (``invalid_json`` for deep nesting and
huge integers, ``invalid_unicode``, ``tokenizer_error``, ... and ``unexpected`` with the exception's type
for the rest), which training skips and counts, so the checker reports those kinds too. What still
escapes (never a data problem in practice) is reported as kind ``unexpected_error`` and is *fatal*, as it
would stop a run. A ``.json`` list that does not parse is fatal too (the dataset refuses
the whole file at start-up).

Lengths: with a tokenizer, the token length of every record (what ``dataset[i]["input_ids"]``
holds: ``min(length, max_seq_length)``; 0 for a bad record) can be written as the sidecar
:func:`~internvl_chat.data.dataset.write_lengths_sidecar` defines, next to the annotation file.
The annotation and meta files are never modified. The lengths belong to the settings of the check
(template, tiles, ``max_seq_length``, frames): re-run the check when those change.

Warnings (listed, never a reason to fail): consecutive turns of the same role (``same_role_turns``), image and
video paths that resolve outside the dataset ``root`` (``path_outside_root``, with the resolved path; with
``confine_paths`` training refuses those, so they are problems instead), and unknown meta keys
(``unknown_meta_key``, with the nearest known key). The meta file is read by training's
:func:`~internvl_chat.data.meta.load_meta` and its record-count rules are training's
:func:`~internvl_chat.data.meta.samples_per_epoch`, so a meta file is refused here exactly when training would
refuse it (:class:`~internvl_chat.data.meta.MetaError`, same message).

Bad fraction (:attr:`Report.bad_fraction`): the **distinct records** training skips over the distinct
records one epoch visits (``repeat_time`` >= 1: every record, so ``bad_records / records`` unless some
are over-long samples that training truncates and keeps, which are problems here but not skipped
there; a fractional ``repeat_time``: its seeded subset, the one training draws). This is what
training's :class:`~internvl_chat.data.errors.BadDataTracker` counts (records by ``file:line``, each
once), so after one epoch the two fractions are equal, and ``--max_bad_fraction`` means the same in
both. Repeats do not weigh: ``bad_per_epoch / samples_per_epoch`` is reported beside it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from internvl_chat.constants import IGNORE_INDEX, IMG_END_TOKEN, INTERNVL_SPECIAL_TOKENS
from internvl_chat.data import formats, video
from internvl_chat.data.dataset import (
    SAMPLE_TYPES,
    DataConfig,
    SupervisedDataset,
    resolve_outside_root,
    sample_type,
    write_lengths_sidecar,
)
from internvl_chat.data.errors import DataError, check_policy, record_error
from internvl_chat.data.meta import DatasetEntry, expand_indices, load_meta, samples_per_epoch

__all__ = [
    "FATAL_KINDS",
    "Problem",
    "Report",
    "StandInTokenizer",
    "check_dataset",
    "data_config_from_model",
    "distribution",
    "image_tile_range",
    "num_image_tokens",
]

# Problems that stop a training run whatever the bad-data policy.
FATAL_KINDS = ("unexpected_error", "unusable_file")

_CHUNK = 16  # records per task sent to a worker process
_FORMAT_PROBE = 50  # records read to name a file's format


# --------------------------------------------------------------------------------------------
# Report types


@dataclass
class Problem:
    """One bad (or suspicious) record: where it is, what kind of problem, and why."""

    kind: str
    file: str | None
    line: int | None
    reason: str
    dataset: str | None = None

    @classmethod
    def from_error(cls, err: DataError, dataset: str | None, file: str | None = None,
                   line: int | None = None) -> Problem:
        return cls(err.kind, err.file or file, err.line if err.line is not None else line, err.reason, dataset)

    def location(self) -> str:
        if self.file is None:
            return "<unknown file>"
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        return f"{self.location()}: {self.reason} [{self.kind}]"


@dataclass
class _Result:
    """What one record gave (sent back from worker processes, so plain and small)."""

    entry: int
    record: int
    line: int | None
    type: str | None = None
    tiles: int = 0
    length: int | None = None  # full token length, before any truncation
    trained_length: int | None = None  # what dataset[i]["input_ids"] holds
    supervised: int | None = None  # supervised tokens the training sees
    problem: Problem | None = None
    warning: Problem | None = None
    warnings: list[Problem] = field(default_factory=list)  # same-role turns, paths outside the root
    kept: bool = False  # a problem training does not skip: an over-long sample it truncates and trains on


@dataclass
class DatasetSummary:
    """Per dataset of the meta file."""

    name: str
    annotation: str
    format: str
    records: int
    samples_per_epoch: int
    bad_records: int = 0
    bad_per_epoch: int = 0
    records_per_epoch: int = 0  # distinct records an epoch visits (all of them unless repeat_time < 1)
    skipped_records_per_epoch: int = 0  # of those, the bad ones training skips (not the truncated it keeps)
    types: dict[str, int] = field(default_factory=dict)
    max_dynamic_patch: int | None = None  # the dataset's own tile budget, when the meta file sets one
    sidecar: str | None = None
    meta_length: int | None = None


def distribution(values: Iterable[float]) -> dict[str, float] | None:
    """``{"count", "total", "min", "mean", "p50", "p95", "max"}`` of some numbers (None when empty)."""
    array = np.fromiter(values, dtype=np.float64)
    if array.size == 0:
        return None
    p50, p95 = np.percentile(array, [50, 95])
    as_number = lambda v: int(v) if float(v).is_integer() else round(float(v), 2)  # noqa: E731
    return {
        "count": int(array.size),
        "total": as_number(array.sum()),
        "min": as_number(array.min()),
        "mean": round(float(array.mean()), 2),
        "p50": as_number(p50),
        "p95": as_number(p95),
        "max": as_number(array.max()),
    }


@dataclass
class Report:
    """The outcome of :func:`check_dataset`; :meth:`format` for people, :meth:`to_dict` for machines."""

    meta_path: str | None
    settings: dict[str, Any]
    tokenized: bool
    datasets: list[DatasetSummary]
    types: dict[str, int]
    tiles: dict[str, float] | None
    tokens: dict[str, float] | None
    supervised: dict[str, float] | None
    problems: list[Problem]
    problem_counts: dict[str, int]
    warnings: list[Problem]
    warning_counts: dict[str, int]
    sidecars: list[str]
    seconds: float = 0.0

    # ------------------------------------------------------------ totals

    @property
    def records(self) -> int:
        return sum(d.records for d in self.datasets)

    @property
    def samples_per_epoch(self) -> int:
        return sum(d.samples_per_epoch for d in self.datasets)

    @property
    def bad_records(self) -> int:
        return sum(d.bad_records for d in self.datasets)

    @property
    def bad_per_epoch(self) -> int:
        return sum(d.bad_per_epoch for d in self.datasets)

    @property
    def records_per_epoch(self) -> int:
        return sum(d.records_per_epoch for d in self.datasets)

    @property
    def skipped_records_per_epoch(self) -> int:
        return sum(d.skipped_records_per_epoch for d in self.datasets)

    @property
    def bad_fraction(self) -> float:
        """Bad distinct records over the distinct records an epoch visits: what training's
        :class:`~internvl_chat.data.errors.BadDataTracker` counts (module docstring)."""
        if self.records_per_epoch:
            return self.skipped_records_per_epoch / self.records_per_epoch
        return 1.0 if self.bad_records else 0.0

    @property
    def fatal(self) -> list[Problem]:
        """Problems that stop training whatever the policy (crashes, files the dataset refuses)."""
        return [p for p in self.problems if p.kind in FATAL_KINDS]

    def exit_code(self, policy: str = "fail", max_bad_fraction: float = 0.01) -> int:
        """0 when training can start: ``fail`` needs no problem at all; ``skip`` tolerates a bad
        fraction up to ``max_bad_fraction`` (but nothing fatal)."""
        check_policy(policy)
        if any(self.problem_counts.get(kind) for kind in FATAL_KINDS):
            return 1
        if policy == "fail":
            return 1 if self.bad_records else 0
        return 1 if self.bad_fraction > max_bad_fraction else 0

    # ------------------------------------------------------------ output

    def to_dict(self, policy: str = "fail", max_bad_fraction: float = 0.01) -> dict[str, Any]:
        code = self.exit_code(policy, max_bad_fraction)
        return {
            "meta_path": self.meta_path,
            "settings": self.settings,
            "tokenized": self.tokenized,
            "datasets": [asdict(d) for d in self.datasets],
            "records": self.records,
            "samples_per_epoch": self.samples_per_epoch,
            "bad_records": self.bad_records,
            "bad_per_epoch": self.bad_per_epoch,
            "records_per_epoch": self.records_per_epoch,
            "skipped_records_per_epoch": self.skipped_records_per_epoch,
            "bad_fraction": self.bad_fraction,
            "types": self.types,
            "tiles": self.tiles,
            "tokens": self.tokens,
            "supervised": self.supervised,
            "problems": {"count": sum(self.problem_counts.values()), "by_kind": self.problem_counts,
                         "items": [asdict(p) for p in self.problems]},
            "warnings": {"count": sum(self.warning_counts.values()), "by_kind": self.warning_counts,
                         "items": [asdict(p) for p in self.warnings]},
            "fatal": bool(self.fatal),
            "sidecars": self.sidecars,
            "policy": policy,
            "max_bad_fraction": max_bad_fraction,
            "seconds": round(self.seconds, 3),
            "exit_code": code,
            "ok": code == 0,
        }

    def format(self, policy: str = "fail", max_bad_fraction: float = 0.01, max_examples: int = 10) -> str:
        """A plain-text summary: datasets, types, distributions, problems by kind (first ``max_examples``
        of each), warnings, the sidecars written and the verdict."""
        out: list[str] = []
        s = self.settings
        out.append(f"check_data: {self.meta_path or '<entries>'}")
        if self.tokenized:
            out.append(f"  template {s['template']}, tokenizer {s.get('tokenizer') or '?'}, "
                       f"{s['num_image_token']} tokens per tile, max_seq_length {s['max_seq_length']}")
        else:
            out.append(f"  template {s['template']}; no tokenizer given: token lengths, supervised tokens and "
                       "max_seq_length are not checked (pass --model, or --tokenizer and --template)")
        tiling = (f"dynamic {s['min_dynamic_patch']}..{s['max_dynamic_patch']} tiles"
                  + (" + thumbnail" if s["use_thumbnail"] else "")) if s["dynamic_image_size"] else "1 tile per image"
        out.append(f"  images: {tiling} of {s['image_size']} px; video: {s['max_num_frame']} frames "
                   f"(the most a sample can draw), sample={s['video_sample']}, backend {s['video_backend']}")
        out.append("")
        header = ["dataset", "records", "per-epoch", "bad", *SAMPLE_TYPES, "max_patch", "format", "annotation"]
        rows = [[d.name, d.records, d.samples_per_epoch, d.bad_records, *(d.types.get(t, 0) for t in SAMPLE_TYPES),
                 d.max_dynamic_patch or s["max_dynamic_patch"], d.format, d.annotation] for d in self.datasets]
        out += _table(header, rows)
        out.append("")
        by_type = ", ".join(f"{t} {self.types.get(t, 0)}" for t in SAMPLE_TYPES)
        out.append(f"samples by type (records, bad ones included): {by_type}; total {self.records} records, "
                   f"{self.samples_per_epoch} samples per epoch")
        out.append("tiles per image/video sample: " + _format_distribution(self.tiles))
        if self.tokenized:
            out.append("tokens per sample (before truncation, over-long ones included): "
                       + _format_distribution(self.tokens))
            out.append("supervised tokens per good sample (after truncation): "
                       + _format_distribution(self.supervised))
        out.append("")
        if self.bad_records:
            out.append(f"bad samples: {self.bad_records} of {self.records} records; bad fraction "
                       f"{self.bad_fraction:.2%} (training skips {self.skipped_records_per_epoch} of the "
                       f"{self.records_per_epoch} records an epoch visits; {self.bad_per_epoch} of "
                       f"{self.samples_per_epoch} samples per epoch are bad)")
            out += _format_problems(self.problems, self.problem_counts, max_examples)
        else:
            out.append(f"bad samples: none in {self.records} records")
        if self.warning_counts:
            out.append(f"warnings: {sum(self.warning_counts.values())}")
            out += _format_problems(self.warnings, self.warning_counts, max_examples)
        for path in self.sidecars:
            out.append(f"token lengths written to {path} (read by the dataset for length-grouped sampling)")
        code = self.exit_code(policy, max_bad_fraction)
        if code == 0:
            verdict = "OK" if not self.bad_records else (
                f"OK under --policy skip ({self.bad_fraction:.2%} bad <= max {max_bad_fraction:g})")
        elif self.fatal:
            verdict = f"FAIL: {len(self.fatal)} problem(s) that stop training whatever the policy"
        elif policy == "fail":
            verdict = f"FAIL: {self.bad_records} bad sample(s) under --policy fail"
        else:
            verdict = f"FAIL: {self.bad_fraction:.2%} bad > --max-bad-fraction {max_bad_fraction:g}"
        out.append(f"result: {verdict} (checked in {self.seconds:.1f} s)")
        return "\n".join(out)


def _format_distribution(stats: dict[str, float] | None) -> str:
    if not stats:
        return "none"
    return (f"min {stats['min']} / mean {stats['mean']} / p50 {stats['p50']} / p95 {stats['p95']} / "
            f"max {stats['max']} (total {stats['total']} over {stats['count']})")


def _format_problems(problems: list[Problem], counts: dict[str, int], max_examples: int) -> list[str]:
    lines = []
    by_kind: dict[str, list[Problem]] = {}
    for problem in problems:
        by_kind.setdefault(problem.kind, []).append(problem)
    for kind, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {kind}: {count}")
        shown = by_kind.get(kind, [])[:max_examples]
        lines += [f"    {p.location()}: {p.reason}" for p in shown]
        if count > len(shown):
            lines.append(f"    ... and {count - len(shown)} more")
    return lines


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int) for row in rows) and rows for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


# --------------------------------------------------------------------------------------------
# Settings from a checkpoint


def data_config_from_model(model_path: str | os.PathLike, downsample_ratio: float | None = None,
                           **overrides: Any) -> DataConfig:
    """A :class:`DataConfig` with the data settings of a checkpoint's ``config.json``.

    ``template``, tile geometry (``num_image_token`` from ``force_image_size``, the ViT patch size and
    ``downsample_ratio``), ``dynamic_image_size``, ``use_thumbnail``, ``min/max_dynamic_patch`` and
    ``pad2square`` come from the checkpoint; ``overrides`` that are not None (the command-line flags)
    win; an ``image_size`` or ``downsample_ratio`` override recomputes ``num_image_token`` unless that
    is given too.
    Training takes these from its own flags, so pass the flags you will train with.
    """
    import json

    path = os.path.join(os.fspath(model_path), "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            cfg = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{model_path} has no config.json (is it an InternVL checkpoint folder?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    vision = cfg.get("vision_config") or {}
    image_size = overrides.get("image_size") or cfg.get("force_image_size") or vision.get("image_size") or 448
    if isinstance(image_size, list):
        image_size = image_size[0]
    values: dict[str, Any] = {
        "num_image_token": num_image_tokens(image_size, vision.get("patch_size") or 14,
                                            downsample_ratio or cfg.get("downsample_ratio", 0.5)),
        "image_size": int(image_size),
    }
    for key in ("template", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch",
                "pad2square", "normalize_type"):
        if cfg.get(key) is not None:
            values[key] = cfg[key]
    values.update(overrides)
    return DataConfig(**values)


def num_image_tokens(image_size: int, patch_size: int = 14, downsample_ratio: float = 0.5) -> int:
    """Context tokens per tile: ``(image_size // patch) ** 2 * downsample_ratio ** 2`` (official formula)."""
    return int((int(image_size) // int(patch_size)) ** 2 * downsample_ratio**2)


def image_tile_range(config: DataConfig, dataset_max_patch: int | None, num_images: int) -> tuple[int, int]:
    """``(min_num, max_num)`` tiles for each image of a sample with ``num_images`` images, as the dataset
    tiles them: the dataset's ``max_dynamic_patch`` (else the config's), divided by the number of images
    for multi-image samples (at least 1); a budget below ``min_dynamic_patch`` leaves one tile."""
    budget = dataset_max_patch or config.max_dynamic_patch
    if num_images > 1:
        budget = max(1, budget // num_images)
    return (config.min_dynamic_patch, budget) if config.min_dynamic_patch <= budget else (1, 1)


# --------------------------------------------------------------------------------------------
# Checking one record


class _ItemChecker:
    """Builds each record with the training dataset; without a real tokenizer (``tokenizer=None``) with
    :class:`StandInTokenizer`, and then no token numbers are kept."""

    def __init__(self, entries: Sequence[DatasetEntry], tokenizer: Any, config: DataConfig,
                 allow_truncation: bool) -> None:
        self.tokenized = tokenizer is not None
        tokenizer = tokenizer if self.tokenized else StandInTokenizer()
        self.config = config
        self.allow_truncation = allow_truncation
        check_config = replace(config, bad_data="fail", max_seq_length=None, min_num_frame=config.max_num_frame)
        self.entries = list(entries)
        self.datasets: list[SupervisedDataset | None] = []
        for entry in self.entries:
            try:
                dataset = SupervisedDataset([replace(entry, repeat_time=1)], tokenizer, check_config)
            except DataError:
                dataset = None  # a .json list that does not parse: reported by the caller
            self.datasets.append(dataset)
        ids = tokenizer(IMG_END_TOKEN, add_special_tokens=False)["input_ids"]
        self.end_id = ids[0] if len(ids) == 1 else None

    def num_records(self, entry: int) -> int | None:
        dataset = self.datasets[entry]
        return None if dataset is None else len(dataset)

    def check(self, entry: int, record: int) -> _Result:
        dataset = self.datasets[entry]
        name = self.entries[entry].name
        file, line = dataset.locate(record)
        result = _Result(entry, record, line)
        try:
            official = dataset.record(record)
            result.type = sample_type(official)
            item = dataset.build_item(record)
            result.warnings = self._warnings(entry, official, file, line)
        except DataError as err:
            result.problem = Problem.from_error(err, name, file, line)
            return result
        except Exception as exc:  # noqa: BLE001 - anything else would crash a training run: report it
            result.problem = _unexpected(exc, name, file, line)
            return result
        result.tiles = int(item["image_flags"].sum())
        if not self.tokenized:
            return result
        ids = item["input_ids"].tolist()
        labels = item["labels"].tolist()
        result.length = len(ids)
        result.trained_length = len(ids)
        result.supervised = int(item["num_supervised"])
        limit = self.config.max_seq_length
        if limit is not None and len(ids) > limit:
            self._over_length(result, ids, labels, limit, name, file, line)
        return result

    def _warnings(self, entry: int, record: dict, file: str, line: int) -> list[Problem]:
        """What training accepts but is likely a mistake: consecutive turns of one role, and media paths that
        resolve outside the dataset root (not with ``confine_paths``: then training refuses them, a problem)."""
        meta = self.entries[entry]
        found = [Problem("same_role_turns", file, line, message, meta.name)
                 for message in formats.repeated_roles(record.get("conversations"))]
        if self.config.confine_paths:
            return found
        for key, path in _media_paths(record):
            outside = resolve_outside_root(meta.root, path)
            if outside is not None:
                found.append(Problem("path_outside_root", file, line,
                                     f"{key} {path!r} resolves to {outside}, outside the dataset root {meta.root} "
                                     "(training reads it; --confine_paths would skip the sample)", meta.name))
        return found

    def _over_length(self, result: _Result, ids: list[int], labels: list[int], limit: int, name: str,
                     file: str, line: int) -> None:
        """Classify an over-long sample the way the template code treats it at ``max_length``."""
        kept_supervised = sum(1 for label in labels[:limit] if label != IGNORE_INDEX)
        ends = [i for i, token in enumerate(ids) if token == self.end_id] if self.end_id is not None else []
        needed = ends[-1] + 1 if ends else 0
        where = f"{len(ids)} tokens > max_seq_length {limit}"
        if result.type == "video":
            where += f" (with max_num_frame={self.config.max_num_frame} frames)"
        if needed > limit or kept_supervised == 0:
            why = "cutting it would go through an image block" if needed > limit else \
                "no supervised token is left after the cut"
            when = " in every epoch that draws that many frames" if result.type == "video" else ""
            result.problem = Problem("too_long", file, line, f"{where}: {why}, so training skips it{when}", name)
            result.trained_length = result.supervised = None  # training never sees it
        else:
            lost = result.supervised - kept_supervised
            reason = (f"{where}: training cuts it and loses {lost} of its {result.supervised} supervised "
                      f"tokens (raise --max_seq_length or shorten the sample)")
            problem = Problem("too_long", file, line, reason, name)
            result.trained_length = limit
            result.supervised = kept_supervised
            result.kept = True
            if self.allow_truncation:
                result.warning = replace(problem, kind="truncated")
            else:
                result.problem = problem


class StandInTokenizer:
    """A character-level tokenizer for checks without the real one (one id per character, one per
    InternVL special token).

    It lets the checker run the training dataset's own code on every record, so placeholders,
    roles, templates, tiles and media are checked exactly as in training; the token counts it gives
    mean nothing and are never reported.
    """

    name_or_path = "<structural stand-in>"

    def __init__(self) -> None:
        self._special = {token: i for i, token in enumerate(INTERNVL_SPECIAL_TOKENS)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in INTERNVL_SPECIAL_TOKENS) + ")")

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special:
                ids.append(self._special[piece])
            else:
                ids.extend(len(self._special) + ord(c) for c in piece)
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        names = list(self._special)

        def name(i: int) -> str:
            return names[i] if i < len(names) else chr(i - len(names))

        return name(ids) if isinstance(ids, int) else [name(i) for i in ids]

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self._special)


def _media_paths(record: dict) -> list[tuple[str, str]]:
    """``(field, path)`` of every image and video path of an official record."""
    image, video_path = record.get("image"), record.get("video")
    images = [image] if isinstance(image, str) else image if isinstance(image, list) else []
    paths = [("image", p) for p in images if isinstance(p, str) and p]
    return paths + ([("video", video_path)] if isinstance(video_path, str) and video_path else [])


def _unexpected(exc: BaseException, dataset: str, file: str | None, line: int | None) -> Problem:
    """A problem for an exception that was not a :class:`DataError`: its real kind when
    :func:`~internvl_chat.data.errors.record_error` names it (deep nesting, Unicode, huge numbers, memory),
    else ``unexpected_error`` (fatal)."""
    err = record_error(exc)
    if err is not None and err.kind != "unexpected":
        return Problem(err.kind, file, line, err.reason, dataset)
    return Problem("unexpected_error", file, line,
                   f"{type(exc).__name__}: {exc} (not a recognised data problem: this sample would stop training)",
                   dataset)


# --------------------------------------------------------------------------------------------
# Worker processes

_WORKER: _ItemChecker | None = None


def _init_worker(entries, tokenizer, config, allow_truncation) -> None:
    global _WORKER
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    _WORKER = _ItemChecker(entries, tokenizer, config, allow_truncation)


def _run_tasks(tasks: list[tuple]) -> list[_Result]:
    assert _WORKER is not None
    return [_WORKER.check(*task) for task in tasks]


# --------------------------------------------------------------------------------------------
# The check


def check_dataset(
    meta: str | os.PathLike | Sequence[DatasetEntry],
    tokenizer: Any = None,
    config: DataConfig | None = None,
    *,
    workers: int = 1,
    write_lengths: bool | None = None,
    allow_truncation: bool = False,
    keep_per_kind: int = 10_000,
    tokenizer_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Check every record of every dataset of a meta file (a path, or loaded entries); see the module docstring.

    ``tokenizer``: the training tokenizer (None: no token checks). ``config``: the data settings of the
    run (default :class:`DataConfig`). ``workers > 1`` checks records in that many processes.
    ``write_lengths`` (default: when a tokenizer is given) writes the token-length sidecars.
    ``keep_per_kind`` caps the problems kept per kind (counts stay exact). ``progress(done, total)`` is
    called now and then. Raises :class:`~internvl_chat.data.meta.MetaError` for a bad meta file.
    """
    started = time.perf_counter()
    config = config or DataConfig()
    if write_lengths is None:
        write_lengths = tokenizer is not None
    if write_lengths and tokenizer is None:
        raise ValueError("token lengths need a tokenizer: pass one, or write_lengths=False")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if isinstance(meta, (str, os.PathLike)):
        meta_path: str | None = os.path.abspath(os.fspath(meta))
        entries = load_meta(meta_path, log_warnings=False)  # listed in the report instead
    else:
        meta_path, entries = None, list(meta)

    collector = _Collector(entries, keep_per_kind)
    local = _ItemChecker(entries, tokenizer, config, allow_truncation)
    _check_entries(local, collector)
    tasks = _item_tasks(local, collector)
    total = collector.expected_total(local)

    if workers == 1:
        for task in tasks:
            collector.add(local.check(*task))
            if progress is not None and collector.done % 256 == 0:
                progress(collector.done, total)
    else:
        context = multiprocessing.get_context("spawn")  # no forked tokenizer threads or torch state
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker,
            initargs=(entries, tokenizer, config, allow_truncation),
        ) as pool:
            chunks = _chunked(tasks, _CHUNK)
            # Keep a bounded number of chunks in flight so huge files do not queue up in memory.
            pending: list[concurrent.futures.Future] = []
            for chunk in chunks:
                pending.append(pool.submit(_run_tasks, chunk))
                if len(pending) >= 4 * workers:
                    for result in pending.pop(0).result():
                        collector.add(result)
                    if progress is not None:
                        progress(collector.done, total)
            for future in pending:
                for result in future.result():
                    collector.add(result)
    if progress is not None:
        progress(collector.done, total)

    report = collector.report(meta_path, _settings(config, tokenizer, tokenizer_name), tokenizer is not None,
                              config.seed)
    if write_lengths:
        for k, summary in enumerate(report.datasets):
            lengths = collector.lengths[k]
            if lengths is None:
                continue
            try:
                summary.sidecar = write_lengths_sidecar(entries[k].annotation, lengths)
                report.sidecars.append(summary.sidecar)
            except OSError as exc:
                collector.warn(Problem("sidecar_not_written", entries[k].annotation, None,
                                       f"cannot write the token-length sidecar: {exc}", entries[k].name))
        report.warnings, report.warning_counts = collector.kept_warnings, dict(collector.warning_counts)
    report.seconds = time.perf_counter() - started
    return report


def _check_entries(checker: _ItemChecker, collector: _Collector) -> None:
    """The meta file's rules that need the record counts (MetaError, as training raises at start-up: the same
    :func:`~internvl_chat.data.meta.samples_per_epoch`), and its unknown keys as warnings."""
    for k, entry in enumerate(checker.entries):
        num_records = checker.num_records(k)
        if num_records is not None:
            samples_per_epoch(entry, num_records)
        for message in entry.warnings:
            reason = f"dataset {entry.name!r}: " + message.removeprefix(entry.where() + ": ")
            collector.warn(Problem("unknown_meta_key", entry.meta_path, entry.meta_line, reason, entry.name))


def _chunked(tasks: Iterable[tuple], size: int) -> Iterable[list[tuple]]:
    iterator = iter(tasks)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _item_tasks(checker: _ItemChecker, collector: _Collector) -> Iterable[tuple]:
    for k, entry in enumerate(checker.entries):
        n = checker.num_records(k)
        if n is None:
            collector.unusable_list(k)
            continue
        collector.start(k, n)
        for record in range(n):
            yield (k, record)


def _settings(config: DataConfig, tokenizer: Any, name: str | None) -> dict[str, Any]:
    keys = ("template", "num_image_token", "image_size", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch",
            "max_dynamic_patch", "pad2square", "max_seq_length", "min_num_frame", "max_num_frame", "video_sample",
            "video_backend", "seed", "max_image_pixels", "allow_truncated_images", "max_video_frames",
            "max_video_seconds", "confine_paths")
    settings = {key: getattr(config, key) for key in keys}
    if tokenizer is not None:
        settings["tokenizer"] = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    return settings


class _Collector:
    """Accumulates per-record results into per-dataset numbers and the problem lists."""

    def __init__(self, entries: Sequence[DatasetEntry], keep_per_kind: int) -> None:
        self.entries = list(entries)
        self.keep_per_kind = keep_per_kind
        n = len(self.entries)
        self.records = [0] * n
        self.bad = [np.zeros(0, bool) for _ in range(n)]
        self.truncated = [np.zeros(0, bool) for _ in range(n)]  # bad, but training keeps them (truncated)
        self.types: list[Counter[str]] = [Counter() for _ in range(n)]
        self.lengths: list[np.ndarray | None] = [None] * n
        self.unusable: set[int] = set()
        self.tiles: list[int] = []
        self.tokens: list[int] = []
        self.supervised: list[int] = []
        self.kept_problems: list[Problem] = []
        self.problem_counts: Counter[str] = Counter()
        self.kept_warnings: list[Problem] = []
        self.warning_counts: Counter[str] = Counter()
        self.done = 0

    def expected_total(self, checker: _ItemChecker) -> int:
        return sum(checker.num_records(k) or 0 for k in range(len(self.entries)))

    def start(self, k: int, num_records: int) -> None:
        self.records[k] = num_records
        self.bad[k] = np.zeros(num_records, bool)
        self.truncated[k] = np.zeros(num_records, bool)
        self.lengths[k] = np.zeros(num_records, np.int64)
        meta_length = self.entries[k].length
        if meta_length is not None and meta_length != num_records:
            self.warn(Problem("meta_length", self.entries[k].meta_path, None,
                              f"dataset {self.entries[k].name!r}: the meta 'length' says {meta_length} but "
                              f"{self.entries[k].annotation} holds {num_records} records (informational only)",
                              self.entries[k].name))

    def unusable_list(self, k: int) -> None:
        """A ``.json`` list the dataset cannot parse: find the element and mark the file unusable."""
        entry = self.entries[k]
        records = list(formats.read_records(entry.annotation))
        self.start(k, len(records))
        self.lengths[k] = None
        self.unusable.add(k)
        self.types[k]["invalid"] += len(records)
        for record, (line, raw) in enumerate(records):
            if isinstance(raw, DataError):
                self.bad[k][record] = True
                self.problem(Problem.from_error(raw, entry.name))
        self.refuse_file(k)

    def refuse_file(self, k: int) -> None:
        """Every record of a JSON list that does not parse is lost: the dataset refuses the file."""
        entry = self.entries[k]
        self.problem(Problem("unusable_file", entry.annotation, None,
                             "the JSON list does not parse, so the training dataset refuses the whole file "
                             "(fix the element named above)", entry.name))
        self.bad[k][:] = True

    def problem(self, problem: Problem) -> None:
        self.problem_counts[problem.kind] += 1
        if self.problem_counts[problem.kind] <= self.keep_per_kind:
            self.kept_problems.append(problem)

    def warn(self, warning: Problem) -> None:
        self.warning_counts[warning.kind] += 1
        if self.warning_counts[warning.kind] <= self.keep_per_kind:
            self.kept_warnings.append(warning)

    def add(self, result: _Result) -> None:
        self.done += 1
        k = result.entry
        if result.warning is not None:
            self.warn(result.warning)
        for warning in result.warnings:
            self.warn(warning)
        self.types[k]["invalid" if result.type is None else result.type] += 1
        if result.length is not None:  # over-long samples too: they are the distribution's tail
            self.tokens.append(result.length)
        if result.trained_length is not None:  # what training builds, truncated ones included
            self.lengths[k][result.record] = result.trained_length
        if result.problem is not None:
            self.bad[k][result.record] = True
            self.truncated[k][result.record] = result.kept
            self.problem(result.problem)
            return
        if result.type != "text":
            self.tiles.append(result.tiles)
        if result.supervised is not None:
            self.supervised.append(result.supervised)

    def report(self, meta_path: str | None, settings: dict[str, Any], tokenized: bool, seed: int) -> Report:
        summaries = []
        all_types: Counter[str] = Counter()
        for k, entry in enumerate(self.entries):
            indices = expand_indices(self.records[k], entry.repeat_time, (seed, entry.name))
            bad_per_epoch = int(self.bad[k][indices].sum()) if len(indices) else 0
            visited = np.unique(indices)
            skipped = self.bad[k] & ~self.truncated[k]
            skipped_visited = int(skipped[visited].sum()) if len(visited) else 0
            types = {t: self.types[k].get(t, 0) for t in (*SAMPLE_TYPES, "invalid")}
            all_types.update(self.types[k])
            summaries.append(DatasetSummary(
                name=entry.name, annotation=entry.annotation, format=_file_format(entry),
                records=self.records[k], samples_per_epoch=len(indices), bad_records=int(self.bad[k].sum()),
                bad_per_epoch=bad_per_epoch, records_per_epoch=len(visited),
                skipped_records_per_epoch=skipped_visited,
                types=types, max_dynamic_patch=entry.max_dynamic_patch,
                meta_length=entry.length,
            ))
        # Order problems by file position so a report reads top to bottom.
        order = {entry.annotation: k for k, entry in enumerate(self.entries)}
        self.kept_problems.sort(key=lambda p: (order.get(p.file, len(order)), p.line or 0))
        return Report(
            meta_path=meta_path,
            settings=settings,
            tokenized=tokenized,
            datasets=summaries,
            types={t: all_types.get(t, 0) for t in (*SAMPLE_TYPES, "invalid")},
            tiles=distribution(self.tiles),
            tokens=distribution(self.tokens) if tokenized else None,
            supervised=distribution(self.supervised) if tokenized else None,
            problems=self.kept_problems,
            problem_counts=dict(self.problem_counts),
            warnings=self.kept_warnings,
            warning_counts=dict(self.warning_counts),
            sidecars=[],
        )


def _file_format(entry: DatasetEntry) -> str:
    """The meta entry's format, else the one detected from the file's first records."""
    if entry.format:
        return entry.format
    try:
        return formats.detect_file_format(itertools.islice(formats.read_records(entry.annotation), _FORMAT_PROBE))
    except (OSError, DataError):
        return "?"


# --------------------------------------------------------------------------------------------
# Command-line helpers, shared by tools/check_data.py and tools/inspect_data.py


class SetupError(ValueError):
    """The command line does not describe a usable tokenizer / data configuration."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


_bool.__name__ = "bool"  # argparse names the type in its error messages


def add_data_arguments(parser: Any) -> None:
    """The tokenizer and data flags, with the official training flag names (unset flags: the
    checkpoint's ``config.json`` with ``--model``, else the training defaults)."""
    group = parser.add_argument_group("model, tokenizer and data settings (as for training)")
    group.add_argument("--model", help="InternVL checkpoint folder: its tokenizer and config.json data settings")
    group.add_argument("--tokenizer", help="tokenizer folder (with --template), instead of --model")
    group.add_argument("--template", "--conv_style", dest="template", help="conversation template (conv_style)")
    group.add_argument("--trust_remote_code", action="store_true", help="load a remote-code tokenizer's own code")
    group.add_argument("--max_seq_length", type=int, help="token limit (training default 8192)")
    group.add_argument("--force_image_size", type=int, help="tile size in pixels (default 448)")
    group.add_argument("--down_sample_ratio", type=float, help="pixel-shuffle ratio, for tokens per tile (0.5)")
    group.add_argument("--num_image_token", type=int, help="context tokens per tile (default from the above)")
    for name in ("dynamic_image_size", "use_thumbnail", "pad2square"):
        group.add_argument(f"--{name}", type=_bool, nargs="?", const=True, metavar="BOOL")
    group.add_argument("--min_dynamic_patch", type=int)
    group.add_argument("--max_dynamic_patch", type=int)
    group.add_argument("--min_num_frame", type=int)
    group.add_argument("--max_num_frame", type=int)
    group.add_argument("--video_sample", help="rand | middle | fpsX (default rand)")
    group.add_argument("--video_backend", choices=video.BACKENDS)
    group.add_argument("--seed", type=int, help="seed of fractional repeat_time subsets and frame draws (42)")
    group.add_argument("--max_image_pixels", type=int,
                       help="images / video frames with more pixels are bad (image_too_large); default 178956970 "
                            "(PIL's own bomb limit), 0 = no limit")
    group.add_argument("--allow_truncated_images", type=_bool, nargs="?", const=True, metavar="BOOL",
                       help="accept truncated image files (grey fill, the official behaviour) instead of reporting "
                            "them (truncated_image)")
    group.add_argument("--max_video_frames", type=int, help="videos with more frames are bad (video_too_long); "
                                                            "default 1000000, 0 = no limit")
    group.add_argument("--max_video_seconds", type=float, help="longer videos are bad (video_too_long); default "
                                                               "36000, 0 = no limit")
    group.add_argument("--confine_paths", action="store_true", default=None,
                       help="image/video paths that resolve outside the dataset root are bad samples (as training "
                            "with --confine_paths), not warnings")


def setup_from_args(args: Any) -> tuple[Any, DataConfig, str | None]:
    """``(tokenizer or None, DataConfig, tokenizer path)`` from :func:`add_data_arguments` flags.

    Raises :class:`SetupError` for contradictory or incomplete flags and unloadable tokenizers.
    """
    overrides: dict[str, Any] = {
        "template": args.template,
        "max_seq_length": args.max_seq_length,
        "image_size": args.force_image_size,
        "num_image_token": args.num_image_token,
        "dynamic_image_size": args.dynamic_image_size,
        "use_thumbnail": args.use_thumbnail,
        "pad2square": args.pad2square,
        "min_dynamic_patch": args.min_dynamic_patch,
        "max_dynamic_patch": args.max_dynamic_patch,
        "min_num_frame": args.min_num_frame,
        "max_num_frame": args.max_num_frame,
        "video_sample": args.video_sample,
        "video_backend": args.video_backend,
        "seed": args.seed,
        "confine_paths": args.confine_paths,
        "max_image_pixels": args.max_image_pixels,
        "allow_truncated_images": args.allow_truncated_images,
        "max_video_frames": args.max_video_frames,
        "max_video_seconds": args.max_video_seconds,
    }
    if args.model and args.tokenizer:
        raise SetupError("pass --model or --tokenizer, not both")
    tokenizer_path = args.model or args.tokenizer
    has_config = bool(tokenizer_path) and os.path.isfile(os.path.join(tokenizer_path, "config.json"))
    ratio = args.down_sample_ratio
    try:
        if args.model or (args.tokenizer and has_config and not args.template):
            config = data_config_from_model(tokenizer_path, downsample_ratio=ratio, **overrides)
        else:
            if args.tokenizer and not args.template:
                raise SetupError(f"--tokenizer {args.tokenizer} needs --template (the conv_style you train with)")
            if overrides["num_image_token"] is None and (overrides["image_size"] or ratio is not None):
                overrides["num_image_token"] = num_image_tokens(overrides["image_size"] or 448, 14,
                                                                0.5 if ratio is None else ratio)
            config = DataConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        if isinstance(exc, SetupError):
            raise
        raise SetupError(str(exc)) from exc
    if not tokenizer_path:
        return None, config, None
    from internvl_chat.model.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    return tokenizer, config, os.path.abspath(tokenizer_path)

