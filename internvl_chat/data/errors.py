"""Errors for problems with one data sample, the bad-data policy, and the count of bad samples.

A bad sample must be reported with where it lives (annotation file and 1-based line) and why it is
bad, instead of being swapped for a random one as the official dataset does. Lower layers (video
decoding, record normalisation) often do not know the file and line; they raise :class:`DataError`
with just a reason and a ``kind``, and the dataset fills in ``file`` and ``line`` before reporting.

Every exception raised while reading, validating or tokenising one record is a data error: the
dataset turns it into a :class:`DataError` with :func:`record_error`, which names it with a kind
(``too_deep``, ``number_too_large``, ``invalid_unicode``, ``out_of_memory``, ``tokenizer_error``, or
``unexpected`` with the exception's type and message). Only exceptions that say nothing about the
record propagate: ``KeyboardInterrupt``/``SystemExit`` (not ``Exception`` subclasses), CUDA
out-of-memory and :class:`TooMuchBadDataError`. ``MemoryError`` counts as the record's: CPython
raises it when one allocation cannot be served (a huge image or string: Linux overcommits, so real
memory exhaustion ends in the OOM killer, not in an exception); if every sample ran out of memory the
bad-fraction limit stops the run with that kind in its message.

Two policies (``--bad_data``): ``fail`` raises the first :class:`DataError`; ``skip`` (the training
default) replaces the bad sample by the next good one and hands the report upwards. Dataloader
workers cannot share counters, so a skipped sample travels with the item that replaced it as a
*report line* (:meth:`DataError.report`, ``"<file>:<line>: <reason> [<kind>]"``), and one
:class:`BadDataTracker` in the main process counts them.

What is counted (the same definition as ``tools/check_data.py``'s bad fraction, see
:attr:`internvl_chat.data.check.Report.bad_fraction`): **distinct records**, identified by
``"<file>:<line>"`` (the good items' ``sample_id``, the bad ones' report location). A record that
replaced a skipped one and is later drawn itself, a bad record reported by several consecutive
``__getitem__`` calls, or a record of a second epoch counts once; a record that was bad once stays
bad. So after one epoch over a set with ``repeat_time`` 1 the tracker's fraction is exactly the
checker's ``bad_records / records``. (Counting items instead, as before, gave 24.3 % where the
checker said 34.6 % on the same corpus.) Items without a ``sample_id`` are counted each time they
are seen.

When the run stops (:meth:`BadDataTracker.check`, after every batch): when ``bad > allowed`` with
``allowed = f*N + z*sqrt(N*f*(1-f))``, ``N = max(seen, min_samples)``, ``f`` the ``max_bad_fraction``
and ``z`` = 3 by default. The floor ``min_samples`` (100) keeps the first samples from deciding
alone, and the ``z`` binomial standard deviations keep a set that is within the limit from being
stopped by chance: simulated over 2,000 shuffles, the rule without the slack stopped 32 % of runs
over a 1,000-record set with 0.5 % bad records (86 % at 0.9 %); with it, 0.1 % (1 %). A mostly bad
set still stops at once: under the 1 % default at most 3 bad records pass before 100 are seen (the
4th stops the run; 22 bad of 60 stop it after about 10 samples), and ``f = 0`` stops at the first.
The slack shrinks relative to ``N`` (0.94 percentage points at 1,000 samples, 0.09 at 100,000), and
:meth:`BadDataTracker.final_check` applies the exact limit (``bad / seen > f``) to the whole run's
totals at its end (``finetune.py``, over all ranks), so nothing over the limit passes.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "BAD_DATA_POLICIES",
    "DataError",
    "TooMuchBadDataError",
    "BadDataTracker",
    "check_policy",
    "parse_report",
    "is_run_error",
    "record_error",
]

BAD_DATA_POLICIES = ("skip", "fail")


class DataError(ValueError):
    """A problem with one sample; ``str()`` names file, line and reason.

    ``kind`` is a short machine-readable category for counting reports, e.g. ``"missing_file"``,
    ``"corrupt_image"``, ``"corrupt_video"``, ``"placeholder_count"``, ``"bad_roles"``,
    ``"empty_conversation"``, ``"box_out_of_range"``, ``"invalid_json"``, ``"invalid_unicode"``,
    ``"too_long"``, ``"unknown_format"``, media kinds ``"not_a_file"``, ``"unreadable_file"``,
    ``"image_too_large"``, ``"truncated_image"``, ``"video_too_long"``, ``"path_outside_root"``, and
    ``"unexpected"`` (see :func:`record_error`). ``file`` and
    ``line`` (1-based) may be set after construction.
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


# --------------------------------------------------------------------------------------------
# Naming any exception raised while one record was processed

_MAX_MESSAGE = 300  # characters of a foreign exception's message kept in a reason (reprs of records can be huge)


def _message(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def is_run_error(exc: BaseException) -> bool:
    """True for exceptions that say nothing about the record being processed and must stop the run."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit, GeneratorExit
        return type(exc).__name__ != "PanicException"  # a Rust tokenizer's panic (BaseException) is the input's
    if isinstance(exc, TooMuchBadDataError):
        return True
    # torch.cuda.OutOfMemoryError (a RuntimeError): the device is full, not the record bad. Named, not imported,
    # so this module needs no torch.
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch")


def record_error(exc: BaseException, what: str = "") -> DataError | None:
    """The :class:`DataError` for an exception raised while processing one record, or None when it must
    propagate (:func:`is_run_error`). A :class:`DataError` is returned as is. ``what`` (e.g. ``"tokenizing"``)
    goes into the reason of foreign exceptions."""
    if isinstance(exc, DataError):
        return exc
    if is_run_error(exc):
        return None
    doing = f" while {what}" if what else ""
    name = type(exc).__name__
    if isinstance(exc, RecursionError):
        return DataError(f"nested too deeply{doing} (RecursionError: {_message(exc)})", kind="too_deep")
    if isinstance(exc, MemoryError):
        return DataError(f"out of memory{doing} (MemoryError {_message(exc)!r}): one allocation for this sample "
                         "could not be served", kind="out_of_memory")
    if isinstance(exc, UnicodeError):
        return DataError(f"invalid Unicode text{doing} ({name}: {_message(exc)})", kind="invalid_unicode")
    if isinstance(exc, OverflowError) or (isinstance(exc, ValueError) and "integer string conversion" in str(exc)):
        return DataError(f"number too large{doing} ({name}: {_message(exc)})", kind="number_too_large")
    return DataError(f"unexpected {name}{doing}: {_message(exc)}", kind="unexpected")


# --------------------------------------------------------------------------------------------
# Counting bad records


def _record_key(record_id: str) -> int:
    """A stable 64-bit key of ``"<file>:<line>"`` (collisions: ~3e-6 for ten million records)."""
    digest = hashlib.blake2b(record_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class _KeySet:
    """A set of 64-bit keys in about 8 bytes each: a sorted int64 array plus a small pending Python set.

    A Python set of strings would take ~150 bytes per record, over a gigabyte for ten million samples.
    """

    _FLUSH = 1 << 16

    def __init__(self, keys: np.ndarray | None = None) -> None:
        self._sorted = np.unique(np.asarray(keys, np.int64)) if keys is not None else np.zeros(0, np.int64)
        self._pending: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._pending)

    def __contains__(self, key: int) -> bool:
        if key in self._pending:
            return True
        i = int(np.searchsorted(self._sorted, key))
        return i < len(self._sorted) and int(self._sorted[i]) == key

    def add(self, key: int) -> bool:
        """Add ``key``; True when it was new."""
        if key in self:
            return False
        self._pending.add(key)
        if len(self._pending) >= self._FLUSH:
            self._flush()
        return True

    def _flush(self) -> None:
        if self._pending:
            merged = np.concatenate([self._sorted, np.fromiter(self._pending, np.int64, len(self._pending))])
            self._sorted = np.unique(merged)
            self._pending.clear()

    def array(self) -> np.ndarray:
        self._flush()
        return self._sorted


class BadDataTracker:
    """Counts distinct bad records per kind and per file and stops the run when too many are bad.

    Feed it every item the training loop receives (:meth:`update`, which reads the item's ``skipped``
    report lines and counts the item itself as good), or call :meth:`add_good` / :meth:`add_bad`
    directly. What is counted and when it stops: the module docstring.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 100, max_messages: int = 20,
                 z: float = 3.0) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        if min_samples < 0 or max_messages < 0 or z < 0:
            raise ValueError("min_samples, max_messages and z must be >= 0")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.max_messages = int(max_messages)
        self.z = float(z)
        self._seen_keys = _KeySet()  # every identified record seen, good or bad
        self._bad_keys = _KeySet()
        self._anonymous_good = 0  # samples without an id: counted each time
        self._anonymous_bad = 0
        self.reports = 0  # report lines received, repeats included
        self.by_kind: Counter[str] = Counter()
        self.by_file: Counter[str] = Counter()
        self.messages: list[str] = []

    # ------------------------------------------------------------ totals

    @property
    def bad(self) -> int:
        """Distinct bad records (plus bad samples without a location)."""
        return len(self._bad_keys) + self._anonymous_bad

    @property
    def seen(self) -> int:
        """Distinct records seen, good or bad (plus samples without an id)."""
        return len(self._seen_keys) + self._anonymous_good + self._anonymous_bad

    @property
    def good(self) -> int:
        return self.seen - self.bad

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def allowed_bad(self) -> float:
        """How many bad records :meth:`check` tolerates at the current count (module docstring)."""
        n = max(self.seen, self.min_samples)
        f = self.max_bad_fraction
        return f * n + self.z * math.sqrt(n * f * (1.0 - f))

    # ------------------------------------------------------------ counting

    def add_good(self, count: int = 1, sample_id: str | None = None) -> None:
        """Count a good sample by its ``sample_id`` (``"<file>:<line>"``), or ``count`` samples without one."""
        if sample_id is None:
            self._anonymous_good += count
        else:
            self._seen_keys.add(_record_key(sample_id))

    def add_bad(self, error: DataError | str, check: bool = True) -> None:
        """Count one bad sample (a :class:`DataError` or a report line); a record already counted bad is not
        counted again."""
        err = parse_report(error) if isinstance(error, str) else error
        self.reports += 1
        if err.file is not None and err.line is not None:
            key = _record_key(f"{err.file}:{err.line}")
            self._seen_keys.add(key)
            new = self._bad_keys.add(key)
        else:
            self._anonymous_bad += 1
            new = True
        if new:
            self.by_kind[err.kind] += 1
            self.by_file[err.file or "<unknown file>"] += 1
            if len(self.messages) < self.max_messages:
                self.messages.append(err.report())
        if check:
            self.check()

    def update(self, item: Mapping[str, Any] | Iterable[str] | int, skipped: Iterable[str] | None = None,
               sample_ids: Iterable[str | None] | None = None) -> None:
        """Count what the training loop received, then check the limit. Accepts:

        * a dataset item: one good sample (its ``sample_id``) plus its ``skipped`` report lines;
        * ``(num_good_samples, report_lines, sample_ids)``: a batch, the collator's ``skipped_samples`` and
          ``sample_ids`` (without ids the batch's samples are counted as anonymous ones);
        * a list of report lines alone: bad samples only (count the good ones with :meth:`add_good`).
        """
        if isinstance(item, Mapping):
            reports = item.get("skipped", ()) or ()
            self.add_good(sample_id=item.get("sample_id"))
        elif isinstance(item, int) and not isinstance(item, bool):
            reports = skipped or ()
            ids = list(sample_ids) if sample_ids is not None else []
            for sample_id in ids:
                self.add_good(sample_id=sample_id)
            if item > len(ids):
                self.add_good(item - len(ids))
        else:
            reports = item
        for report in reports:
            self.add_bad(report, check=False)
        self.check()

    # ------------------------------------------------------------ limits

    def check(self) -> None:
        """Raise :class:`TooMuchBadDataError` when more records are bad than :meth:`allowed_bad` tolerates."""
        if self.bad > self.allowed_bad():
            raise TooMuchBadDataError(
                f"{self.bad} of the {self.seen} records seen so far are bad ({self.bad_fraction:.2%}), more than "
                f"max_bad_fraction={self.max_bad_fraction:g} allows so far (at most {math.floor(self.allowed_bad())}: "
                f"the fraction of max(seen, {self.min_samples}) plus {self.z:g} standard deviations); fix the data "
                f"(tools/check_data.py lists every bad line) or raise --max_bad_fraction.\n{self.summary()}"
            )

    def final_check(self) -> None:
        """The exact limit over everything counted (the end of a run): ``bad / seen > max_bad_fraction`` raises."""
        if self.bad_fraction > self.max_bad_fraction:
            raise TooMuchBadDataError(
                f"{self.bad} of the {self.seen} records this run saw are bad ({self.bad_fraction:.2%}), more than "
                f"max_bad_fraction={self.max_bad_fraction:g}; fix the data (tools/check_data.py lists every bad "
                f"line) or raise --max_bad_fraction.\n{self.summary()}"
            )

    # ------------------------------------------------------------ distributed runs

    def state(self) -> dict[str, Any]:
        """What :meth:`merge` needs from another process (plain numbers, arrays and lists)."""
        return {
            "seen": self._seen_keys.array(), "bad": self._bad_keys.array(),
            "anonymous_good": self._anonymous_good, "anonymous_bad": self._anonymous_bad, "reports": self.reports,
            "by_kind": dict(self.by_kind), "by_file": dict(self.by_file), "messages": list(self.messages),
        }

    @classmethod
    def merged(cls, states: Iterable[dict[str, Any]], max_bad_fraction: float, max_messages: int = 20,
               ) -> BadDataTracker:
        """One tracker over several processes' :meth:`state`: records seen on two ranks count once.

        ``by_kind``/``by_file`` are summed, so a record reported bad on two ranks counts twice there."""
        states = list(states)
        out = cls(max_bad_fraction, max_messages=max_messages)
        out._seen_keys = _KeySet(np.concatenate([s["seen"] for s in states] or [np.zeros(0, np.int64)]))
        out._bad_keys = _KeySet(np.concatenate([s["bad"] for s in states] or [np.zeros(0, np.int64)]))
        for s in states:
            out._anonymous_good += s["anonymous_good"]
            out._anonymous_bad += s["anonymous_bad"]
            out.reports += s["reports"]
            out.by_kind.update(s["by_kind"])
            out.by_file.update(s["by_file"])
            out.messages += s["messages"][: max(0, max_messages - len(out.messages))]
        return out

    # ------------------------------------------------------------ output

    def summary(self) -> str:
        """A few lines for the log: totals, counts per kind and per file, the first messages."""
        if not self.bad:
            return f"bad data: none in {self.seen} records"
        lines = [f"bad data: {self.bad} of {self.seen} records ({self.bad_fraction:.2%}) skipped"]
        lines.append("  by kind: " + ", ".join(f"{k} {n}" for k, n in self.by_kind.most_common()))
        lines.append("  by file: " + ", ".join(f"{f} {n}" for f, n in self.by_file.most_common()))
        shown = len(self.messages)
        lines.append(f"  first {shown}:" if shown < self.bad else "  all:")
        lines.extend(f"    {message}" for message in self.messages)
        return "\n".join(lines)
