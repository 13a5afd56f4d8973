"""What :func:`~internvl_chat.data.check.check_dataset` finds, and the report it prints and writes.

:class:`Collector` turns the per-record results (:class:`RecordResult`) into per-dataset numbers and the
problem and warning lists of a :class:`Report`; :meth:`Report.format` is the text ``check_data`` prints,
:meth:`Report.to_dict` the JSON it writes, :meth:`Report.exit_code` its exit status.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from internvl_chat.data import formats
from internvl_chat.data.errors import DataError, check_policy
from internvl_chat.data.meta import DatasetEntry, expand_indices
from internvl_chat.data.records import read_records
from internvl_chat.data.validation import SAMPLE_TYPES

__all__ = ["FATAL_KINDS", "Collector", "DatasetSummary", "Problem", "RecordResult", "Report", "distribution"]

# Problems that stop a training run whatever the bad-data policy.
FATAL_KINDS = ("unexpected_error", "unusable_file")

_FORMAT_PROBE = 50  # records read to name a file's format
# Per-type counts, with the records that have no type (unreadable or not convertible), so they add up.
_TYPE_COLUMNS = (*SAMPLE_TYPES, "invalid")


# --------------------------------------------------------------------------------------------
# What the check finds


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
class RecordResult:
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

    def assumptions(self) -> list[str]:
        """The header lines of a check without a checkpoint: the settings its numbers assume (the flags given,
        else the training defaults, which may not be the run's) and how to match the training run."""
        s = self.settings
        tiling = "on" if s["dynamic_image_size"] else "off"
        lines = [f"  no --model: the statistics assume template {s['template']}, dynamic tiling {tiling}, "
                 f"max_dynamic_patch {s['max_dynamic_patch']}, thumbnail {'on' if s['use_thumbnail'] else 'off'} "
                 "(the flags given, else the defaults)",
                 "  to match training, pass --model CHECKPOINT or the launcher's flags, e.g. --template X "
                 "--dynamic_image_size True --use_thumbnail True --max_dynamic_patch N"]
        own = [f"{d.name} ({d.max_dynamic_patch})" for d in self.datasets if d.max_dynamic_patch]
        if own:
            lines.append("  the meta file's max_dynamic_patch is used for: " + ", ".join(own))
        return lines

    def to_dict(self, policy: str = "fail", max_bad_fraction: float = 0.01,
                from_model: bool = True) -> dict[str, Any]:
        code = self.exit_code(policy, max_bad_fraction)
        return {
            "meta_path": self.meta_path,
            "settings": self.settings,
            "assumptions": None if from_model else [line.strip() for line in self.assumptions()],
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

    def format(self, policy: str = "fail", max_bad_fraction: float = 0.01, max_examples: int = 10,
               from_model: bool = True) -> str:
        """A plain-text summary: datasets, types, distributions, problems by kind (first ``max_examples``
        of each), warnings, the sidecars written and the verdict. ``from_model=False`` (no checkpoint given)
        adds what the statistics assume and how to make them match training."""
        out: list[str] = []
        s = self.settings
        out.append(f"check_data: {self.meta_path or '<entries>'}")
        if not from_model:
            out += self.assumptions()
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
        header = ["dataset", "records", "per-epoch", "bad", *_TYPE_COLUMNS, "max_patch", "format", "annotation"]
        rows = [[d.name, d.records, d.samples_per_epoch, d.bad_records, *(d.types.get(t, 0) for t in _TYPE_COLUMNS),
                 d.max_dynamic_patch or s["max_dynamic_patch"], d.format, d.annotation] for d in self.datasets]
        out += _table(header, rows)
        out.append("")
        by_type = ", ".join(f"{t} {self.types.get(t, 0)}" for t in _TYPE_COLUMNS)
        out.append(f"samples by type (records, bad ones included; invalid: no type, as the record is unreadable or "
                   f"not convertible): {by_type}; total {self.records} records, "
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
# Collecting


class Collector:
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

    def expected_total(self, checker: Any) -> int:
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
        records = list(read_records(entry.annotation))
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

    def add(self, result: RecordResult) -> None:
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
            types = {t: self.types[k].get(t, 0) for t in _TYPE_COLUMNS}
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
            types={t: all_types.get(t, 0) for t in _TYPE_COLUMNS},
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
        return formats.detect_file_format(itertools.islice(read_records(entry.annotation), _FORMAT_PROBE))
    except (OSError, DataError):
        return "?"
