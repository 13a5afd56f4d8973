"""Errors for problems with one data sample, the bad-data policy, and the count of bad samples.

A bad sample must be reported with where it lives (annotation file and 1-based line) and why it is
bad, instead of being swapped for a random one as the official dataset does. Lower layers (video
decoding, record normalisation) often do not know the file and line; they raise :class:`DataError`
with just a reason and a ``kind``, and the dataset fills in ``file`` and ``line`` before reporting.

Two policies (``--bad_data``): ``fail`` raises the first :class:`DataError`; ``skip`` (the training
default) replaces the bad sample by the next good one and hands the report upwards. Dataloader
workers cannot share counters, so a skipped sample travels with the item that replaced it as a
*report line* (:meth:`DataError.report`, ``"<file>:<line>: <reason> [<kind>]"``), and one
:class:`BadDataTracker` in the main process counts them, keeps the first messages, and stops the run
with :class:`TooMuchBadDataError` once more than ``max_bad_fraction`` of the samples seen are bad.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "BAD_DATA_POLICIES",
    "DataError",
    "TooMuchBadDataError",
    "BadDataTracker",
    "check_policy",
    "parse_report",
]

BAD_DATA_POLICIES = ("skip", "fail")


class DataError(ValueError):
    """A problem with one sample; ``str()`` names file, line and reason.

    ``kind`` is a short machine-readable category for counting reports, e.g. ``"missing_file"``,
    ``"corrupt_image"``, ``"corrupt_video"``, ``"placeholder_count"``, ``"bad_roles"``,
    ``"empty_conversation"``, ``"box_out_of_range"``, ``"invalid_json"``, ``"too_long"``,
    ``"unknown_format"``. ``file`` and ``line`` (1-based) may be set after construction.
    """

    def __init__(
        self, reason: str, file: str | None = None, line: int | None = None, kind: str = "invalid"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.file = file
        self.line = line
        self.kind = kind

    def __str__(self) -> str:
        # Built on demand: the dataset sets file/line after a lower layer raised.
        if self.file is None:
            where = "" if self.line is None else f"line {self.line}: "
        else:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        return f"{where}{self.reason}"

    def __reduce__(self):
        # Keep file/line/kind when the error crosses a process boundary (dataloader workers).
        return (type(self), (self.reason, self.file, self.line, self.kind))

    def located(self, file: str | None, line: int | None) -> DataError:
        """Fill in ``file``/``line`` where a lower layer left them empty; returns ``self``."""
        if self.file is None:
            self.file = file
        if self.line is None:
            self.line = line
        return self

    def report(self) -> str:
        """One report line, ``"<file>:<line>: <reason> [<kind>]"``; :func:`parse_report` reads it back."""
        return f"{self} [{self.kind}]"


_REPORT = re.compile(r"^(?:(?P<file>.+?):(?P<line>\d+): )?(?P<reason>.*?)(?: \[(?P<kind>[A-Za-z0-9_]+)\])?$", re.S)


def parse_report(text: str) -> DataError:
    """A :class:`DataError` back from a report line (or any string: then kind ``"invalid"``, no location)."""
    match = _REPORT.match(text)
    if match is None:  # pragma: no cover - the pattern matches every string
        return DataError(text)
    line = match["line"]
    return DataError(
        match["reason"],
        file=match["file"],
        line=int(line) if line is not None else None,
        kind=match["kind"] or "invalid",
    )


def check_policy(policy: str) -> str:
    """Validate a ``--bad_data`` value (``skip`` or ``fail``) and return it."""
    if policy not in BAD_DATA_POLICIES:
        raise ValueError(f"bad_data policy must be one of {', '.join(BAD_DATA_POLICIES)}, got {policy!r}")
    return policy


class TooMuchBadDataError(RuntimeError):
    """More than the allowed fraction of the samples seen so far were bad: the data needs fixing first."""


class BadDataTracker:
    """Counts bad samples per kind and per file and stops the run when too many are bad.

    Feed it every item the training loop receives (:meth:`update`, which reads the item's ``skipped``
    report lines and counts the item itself as good), or call :meth:`add_good` / :meth:`add_bad`
    directly. The limit is checked once at least ``min_samples`` samples were seen, so a few bad lines
    at the start of a file do not stop a run that would stay far below the limit.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 100, max_messages: int = 20) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        if min_samples < 0 or max_messages < 0:
            raise ValueError("min_samples and max_messages must be >= 0")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.max_messages = int(max_messages)
        self.good = 0
        self.bad = 0
        self.by_kind: Counter[str] = Counter()
        self.by_file: Counter[str] = Counter()
        self.messages: list[str] = []

    @property
    def seen(self) -> int:
        return self.good + self.bad

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def add_good(self, count: int = 1) -> None:
        self.good += count

    def add_bad(self, error: DataError | str, check: bool = True) -> None:
        """Count one bad sample (a :class:`DataError` or a report line)."""
        err = parse_report(error) if isinstance(error, str) else error
        self.bad += 1
        self.by_kind[err.kind] += 1
        self.by_file[err.file or "<unknown file>"] += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(err.report())
        if check:
            self.check()

    def update(self, item: Mapping[str, Any] | Iterable[str] | int, skipped: Iterable[str] | None = None) -> None:
        """Count what the training loop received, then check the limit. Accepts:

        * a dataset item: one good sample plus its ``skipped`` report lines;
        * ``(num_good_samples, report_lines)``: a batch and the collator's ``skipped_samples``;
        * a list of report lines alone: bad samples only (count the good ones with :meth:`add_good`).
        """
        if isinstance(item, Mapping):
            reports = item.get("skipped", ()) or ()
            self.add_good()
        elif isinstance(item, int) and not isinstance(item, bool):
            reports = skipped or ()
            self.add_good(item)
        else:
            reports = item
        for report in reports:
            self.add_bad(report, check=False)
        self.check()

    def check(self) -> None:
        """Raise :class:`TooMuchBadDataError` when the bad fraction is over the limit."""
        if self.seen >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            raise TooMuchBadDataError(
                f"{self.bad} of {self.seen} samples seen ({self.bad_fraction:.2%}) are bad, more than "
                f"max_bad_fraction={self.max_bad_fraction:g}; fix the data (tools/check_data.py lists every bad "
                f"line) or raise --max_bad_fraction.\n{self.summary()}"
            )

    def summary(self) -> str:
        """A few lines for the log: totals, counts per kind and per file, the first messages."""
        if not self.bad:
            return f"bad data: none in {self.seen} samples"
        lines = [f"bad data: {self.bad} of {self.seen} samples ({self.bad_fraction:.2%}) skipped"]
        lines.append("  by kind: " + ", ".join(f"{k} {n}" for k, n in self.by_kind.most_common()))
        lines.append("  by file: " + ", ".join(f"{f} {n}" for f, n in self.by_file.most_common()))
        shown = len(self.messages)
        lines.append(f"  first {shown}:" if shown < self.bad else "  all:")
        lines.extend(f"    {message}" for message in self.messages)
        return "\n".join(lines)
