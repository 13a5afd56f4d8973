"""The meta JSON (``--meta_path``): which annotation files to train on, from where, and how often.

A meta file maps a dataset name to an entry (the official format)::

    {"my-data": {"root": "images/", "annotation": "train.jsonl", "data_augment": false,
                 "repeat_time": 1, "length": 1234, "max_dynamic_patch": 12, "format": "swift"}}

``root``, ``annotation``, ``data_augment`` and ``repeat_time`` are required, as in the official code;
``length`` (informational, filled in by ``tools/check_data.py``), ``max_dynamic_patch`` (per-dataset
tile budget) and ``format`` (ours: ``internvl``, ``llava``, ``swift``, or ``auto``/absent to detect it
per file) are optional. Other keys are kept in :attr:`DatasetEntry.extra`. Datasets keep the JSON key
order, which is the order in which they are concatenated.

Relative paths: the official scripts are run from ``internvl_chat/`` and open relative ``root`` /
``annotation`` paths against the current directory; we do the same, and when that path does not
exist but one relative to the meta file's own directory does, we use the latter (so a meta file and
its data can be moved together). Paths are stored absolute.

``repeat_time`` (differences from the official code, on purpose):

* ``r >= 1``: ``int(n * r)`` samples = ``floor(r)`` full passes over the file plus a seeded random
  subset for the fractional part (``2.5`` = two passes plus a random half). The official code only
  accepts integers here (``2.0`` and ``1.5`` fail an assertion); integers give the same list.
* ``0 < r < 1``: a seeded random ``int(n * r)`` of the lines. The official code keeps the FIRST
  ``int(n * r)`` lines (a prefix of the file), which silently drops whatever the file ends with.
* ``r <= 0`` is an error (the official code would train on nothing from that file).

The random part is drawn once from ``(seed, dataset name)`` (:func:`stable_seed`), so it is the same
in every epoch, every process and every resumed run.

Strict reading (the official code does ``json.loads(open(path).read())`` and trusts the result; each
rule below is a silent mistrain or a late traceback there). Every problem is one :class:`MetaError`
naming the file, the line and the dataset:

* a dataset name given twice (JSON keeps the last one, so the first dataset would silently vanish),
  and a key given twice inside an entry: both occurrences are named;
* a file that is not UTF-8 (byte offset and line of the first bad byte; a UTF-8 BOM is accepted),
  not a regular readable file, nested absurdly deep or holding an integer too long to convert;
* ``repeat_time`` that is not a number (``"2"`` in quotes, ``true``, ``null``), not finite, ``<= 0``;
* annotation files that are missing, not regular files (a FIFO would block), or unreadable.

What needs the record count is decided when the dataset indexes its files, by
:func:`samples_per_epoch` (training and ``tools/check_data.py`` call the same function, so they agree):
an annotation file without any record, a ``repeat_time`` so small that ``int(n * r)`` is 0, and more
than :data:`MAX_SAMPLES_PER_DATASET` samples per epoch (``repeat_time`` 1e12 would otherwise die in a
numpy allocation) are errors.

Unknown keys are kept in :attr:`DatasetEntry.extra` and are *warnings*, not errors: forks and tools
write their own keys (``data_type``, ``metric``, ...) that the official code ignores, and such meta
files must keep loading. Each warning names the nearest known key (``"repeat_times"`` -> did you mean
``repeat_time``); they are logged at load time and listed by the checker. A misspelled *required* key
is an error (the key is missing) whose message names the misspelling. ``length`` may be a digit string
(``"13330"``, seen in users' meta files; the official code never reads it).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMATS",
    "MAX_SAMPLES_PER_DATASET",
    "DatasetEntry",
    "MetaError",
    "load_meta",
    "expand_indices",
    "samples_per_epoch",
    "stable_seed",
]

logger = logging.getLogger(__name__)

# Values of the optional "format" key; "auto" (or no key) detects the format per annotation file.
FORMATS = ("auto", "internvl", "llava", "swift")

_REQUIRED = ("root", "annotation", "data_augment", "repeat_time")
_KNOWN = (*_REQUIRED, "length", "max_dynamic_patch", "format")
# Keys our own tools read from a meta entry (kept in ``extra``, no warning): ``metric`` of --eval_meta_path.
_TOLERATED = ("metric",)

# Samples one dataset may contribute per epoch. The epoch's index alone is 8 bytes per sample (8 GB here),
# far beyond any fine-tuning set; a larger count is a typo in repeat_time (1e12), not a plan.
MAX_SAMPLES_PER_DATASET = 10**9


class MetaError(ValueError):
    """The meta file itself is wrong; the message names the file, the dataset and the key."""


@dataclass
class DatasetEntry:
    """One dataset of a meta file, validated, with absolute paths."""

    name: str
    root: str
    annotation: str
    data_augment: bool = False
    repeat_time: float = 1
    length: int | None = None
    max_dynamic_patch: int | None = None
    format: str | None = None  # None = detect per file
    extra: dict[str, Any] = field(default_factory=dict)
    meta_path: str | None = None
    meta_line: int | None = None  # 1-based line of the dataset's name in the meta file
    warnings: list[str] = field(default_factory=list)  # unknown keys etc.; logged, and listed by the checker

    def where(self) -> str:
        """``meta file <path>:<line>, dataset '<name>'``: how every message about this entry starts."""
        return _where(self.meta_path, self.meta_line, self.name)


def _where(meta_path: str | None, line: int | None, name: str) -> str:
    if meta_path is None:
        return f"dataset {name!r}"
    return f"meta file {meta_path}{'' if line is None else f':{line}'}, dataset {name!r}"


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, identical across processes and Python runs.

    (Python's ``hash()`` of a string changes per process, so it cannot seed a resumable run.)
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def expand_indices(n_lines: int, repeat_time: float, seed: int | str | tuple = 0) -> np.ndarray:
    """Line indices (int64) that one epoch visits for a file of ``n_lines`` samples.

    ``floor(r)`` full passes in file order, then a sorted seeded random subset of the remaining
    ``int(n * r) - floor(r) * n`` lines (see the module docstring). ``seed`` may be an int or any
    printable value (e.g. ``(config_seed, dataset_name)``), hashed with :func:`stable_seed`.
    """
    if isinstance(n_lines, bool) or not isinstance(n_lines, Integral) or n_lines < 0:
        raise ValueError(f"n_lines must be a non-negative int, got {n_lines!r}")
    _check_repeat_time(repeat_time)
    n = int(n_lines)
    if n * repeat_time > MAX_SAMPLES_PER_DATASET:  # refuse before numpy tries to allocate it
        raise ValueError(f"repeat_time {_num(repeat_time)} on {n} lines gives more than {MAX_SAMPLES_PER_DATASET:.0e} "
                         "samples")
    total = int(n * repeat_time)
    passes, rest = divmod(total, n) if n else (0, 0)
    full = np.tile(np.arange(n, dtype=np.int64), passes)
    if not rest:
        return full
    if not isinstance(seed, Integral) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        seed = stable_seed(seed)
    rng = np.random.default_rng(int(seed))
    subset = np.sort(rng.choice(n, size=rest, replace=False)).astype(np.int64)
    return np.concatenate([full, subset])


def _check_repeat_time(value: Any) -> None:
    if isinstance(value, str):
        hint = f" (write {value.strip()} without quotes)" if _is_number_text(value) else ""
        raise ValueError(f"repeat_time must be a number, got the string {value!r}{hint}")
    if isinstance(value, bool) or not isinstance(value, Real):
        shown = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)  # JSON spelling
        raise ValueError(f"repeat_time must be a number, got {shown}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        raise ValueError(f"repeat_time is absurdly large (an integer of {value.bit_length()} bits)") from None
    if not finite:
        raise ValueError(f"repeat_time must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"repeat_time must be > 0 (1 = every line once, 0.3 = a random 30%), got {value!r}")


def _num(value: float) -> str:
    """A number for a message: as written when short, else 3 significant digits (1e+12, not 1000000000000)."""
    text = repr(value)
    try:
        return text if len(text) <= 12 else f"{float(value):.3g}"
    except OverflowError:
        return "more than 1e308"


def _is_number_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def samples_per_epoch(entry: DatasetEntry, num_records: int) -> int:
    """``int(num_records * repeat_time)``, the samples one epoch takes from ``entry``; :class:`MetaError` when
    that is nothing or absurd.

    The one place that decides whether a dataset's record count and ``repeat_time`` make sense: the training
    dataset calls it when it indexes each annotation file, and the checker calls it on the same counts, so a
    dataset the checker passes never stops training with "yields no samples".
    """
    where = entry.where()
    if num_records == 0:
        raise MetaError(f"{where}: annotation file {entry.annotation} holds no sample (it is empty or holds only "
                        "blank lines); fill it or remove the dataset from the meta file")
    repeat = entry.repeat_time
    if num_records * repeat > MAX_SAMPLES_PER_DATASET:  # compared before int(): 1e300 x n is no int
        raise MetaError(f"{where}: repeat_time {_num(repeat)} on {num_records} records gives "
                        f"{_num(num_records * repeat)} samples per epoch, more than the "
                        f"{MAX_SAMPLES_PER_DATASET:.0e} allowed (a typo?)")
    total = int(num_records * repeat)
    if total == 0:
        raise MetaError(f"{where}: repeat_time {_num(repeat)} on {num_records} records gives "
                        f"int({num_records} x {_num(repeat)}) = 0 samples per epoch; use at least "
                        f"{1 / num_records:.3g} or remove the dataset")
    return total


def _resolve(path: str, meta_dir: Path) -> tuple[str, list[str]]:
    """(absolute path, candidates tried): cwd-relative like the official scripts, else meta-relative."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded) or "://" in expanded:
        return expanded, [expanded]
    from_cwd = os.path.abspath(expanded)
    from_meta = os.path.abspath(meta_dir / expanded)
    if os.path.exists(from_cwd) or not os.path.exists(from_meta):
        return from_cwd, [from_cwd, from_meta] if from_meta != from_cwd else [from_cwd]
    return from_meta, [from_cwd, from_meta]


def load_meta(meta_path: str | os.PathLike, *, log_warnings: bool = True) -> list[DatasetEntry]:
    """Read and validate a meta JSON file; one :class:`DatasetEntry` per dataset, in key order.

    Raises :class:`MetaError` (naming the file, the line, the dataset and the key) for every rule of the
    module docstring. Unknown keys are kept in :attr:`DatasetEntry.warnings` and logged as warnings, unless
    ``log_warnings`` is False (the checker, which lists them in its report instead).
    """
    meta_path = os.path.abspath(os.fspath(meta_path))
    text = _read_text(meta_path)
    try:
        items = _top_level_items(text)
    except _DuplicateKey as dup:
        where = f"meta file {meta_path}:{_line_of(text, dup.pos)}"
        if dup.first_pos is not None:  # a dataset name
            raise MetaError(f"{where}: dataset {dup.key!r} is defined twice (lines {_line_of(text, dup.first_pos)} "
                            f"and {_line_of(text, dup.pos)}); JSON would keep only the last one, so rename "
                            "or merge them") from None
        raise MetaError(f"{where}, dataset {dup.dataset!r}: key {dup.key!r} is given twice in the entry (JSON "
                        "would silently keep only the last value); keep one") from None
    except json.JSONDecodeError as exc:
        raise MetaError(f"meta file {meta_path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                        f"{exc.colno}") from None
    except _NotAnObject as exc:
        raise MetaError(f"meta file {meta_path} must hold a JSON object mapping dataset names to entries, "
                        f"got a {exc.args[0]}") from None
    except RecursionError:
        raise MetaError(f"meta file {meta_path} is nested too deeply to be a meta file") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts (4300 digits)
        raise MetaError(f"meta file {meta_path} holds a value that cannot be read: {exc}") from None
    if not items:
        raise MetaError(f"meta file {meta_path} lists no dataset")
    meta_dir = Path(meta_path).parent
    entries = [_entry(meta_path, meta_dir, name, raw, _line_of(text, pos)) for name, pos, raw in items]
    if log_warnings:
        for warning in (w for entry in entries for w in entry.warnings):
            logger.warning("%s", warning)
    return entries


def _read_text(meta_path: str) -> str:
    """The meta file as text: a regular, readable, UTF-8 file (a BOM is dropped), else :class:`MetaError`."""
    try:
        if not stat.S_ISREG(os.stat(meta_path).st_mode):  # a FIFO would block the read forever
            raise MetaError(f"meta file {meta_path} is not a regular file")
        with open(meta_path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise MetaError(f"meta file {meta_path} does not exist") from None
    except OSError as exc:
        raise MetaError(f"meta file {meta_path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise MetaError(f"meta file {meta_path} is not UTF-8 text{hint}: byte 0x{data[exc.start]:02x} at byte "
                        f"offset {exc.start} (line {line}) ({exc.reason}); save it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


class _DuplicateKey(ValueError):
    """A key given twice: a dataset name (``first_pos`` set) or a key inside ``dataset``'s entry."""

    def __init__(self, key: str, pos: int, first_pos: int | None = None, dataset: str | None = None) -> None:
        super().__init__(key)
        self.key, self.pos, self.first_pos, self.dataset = key, pos, first_pos, dataset


class _NotAnObject(ValueError):
    pass


_WS = re.compile(r"[ \t\n\r]*")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a key given twice inside an entry (the position is unknown here;
    :func:`_top_level_items` fills in the entry's)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key, -1)
        seen[key] = value
    return seen


def _top_level_items(text: str) -> list[tuple[str, int, Any]]:
    """``(name, offset of the name, entry)`` for each key of the top-level object, in file order.

    The top level is walked by hand (each value parsed with :meth:`json.JSONDecoder.raw_decode`) because a
    plain ``json.loads`` forgets where a key was, and a duplicate dataset name is only useful with both lines.
    """
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    pos = _WS.match(text, 0).end()
    if text[pos : pos + 1] != "{":
        raise _NotAnObject(type(json.loads(text)).__name__)  # json.loads raises the JSON error, if any
    items: list[tuple[str, int, Any]] = []
    first: dict[str, int] = {}
    pos = _WS.match(text, pos + 1).end()
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos : pos + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
            key_pos = pos
            name, pos = json.decoder.scanstring(text, pos + 1)
            if name in first:
                raise _DuplicateKey(name, key_pos, first[name])
            first[name] = key_pos
            pos = _WS.match(text, pos).end()
            if text[pos : pos + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
            pos = _WS.match(text, pos + 1).end()
            try:
                value, pos = decoder.raw_decode(text, pos)
            except _DuplicateKey as dup:
                raise _DuplicateKey(dup.key, key_pos, dataset=name) from None  # the entry's line at least
            items.append((name, key_pos, value))
            pos = _WS.match(text, pos).end()
            if text[pos : pos + 1] == ",":
                pos = _WS.match(text, pos + 1).end()
                continue
            if text[pos : pos + 1] == "}":
                pos += 1
                break
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    end = _WS.match(text, pos).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return items


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _entry(meta_path: str, meta_dir: Path, name: str, raw: Any, line: int) -> DatasetEntry:
    where = _where(meta_path, line, name)

    def fail(message: str) -> MetaError:
        return MetaError(f"{where}: {message}")

    if not isinstance(raw, dict):
        raise fail(f"the entry must be a JSON object, got {type(raw).__name__}")
    unknown = [key for key in raw if key not in _KNOWN and key not in _TOLERATED]
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise fail(f"missing required key(s) {', '.join(missing)}{_misspelled(missing, unknown)} "
                   f"(required: {', '.join(_REQUIRED)})")

    if not isinstance(raw["root"], str):
        raise fail(f"'root' must be a path string (may be empty), got {raw['root']!r}")
    if not isinstance(raw["annotation"], str) or not raw["annotation"]:
        raise fail(f"'annotation' must be a non-empty path string, got {raw['annotation']!r}")
    if not isinstance(raw["data_augment"], bool):
        raise fail(f"'data_augment' must be true or false, got {raw['data_augment']!r}")
    try:
        _check_repeat_time(raw["repeat_time"])
    except ValueError as exc:
        raise fail(str(exc)) from None
    length = raw.get("length")
    if isinstance(length, str) and length.strip().isdigit():  # "13330": in users' meta files, never read officially
        length = int(length)
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        raise fail(f"'length' must be a non-negative integer, got {length!r}")
    patches = raw.get("max_dynamic_patch")
    if patches is not None and (isinstance(patches, bool) or not isinstance(patches, int) or patches < 1):
        raise fail(f"'max_dynamic_patch' must be a positive integer, got {patches!r}")
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise fail(f"'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")

    annotation, tried = _resolve(raw["annotation"], meta_dir)
    problem = _unreadable(annotation)
    if problem:
        raise fail(f"annotation file {raw['annotation']!r} {problem}" + (
            f" (tried {', '.join(tried)})" if problem == "not found" else f" ({annotation})"))
    root = raw["root"]
    if root:
        root, tried = _resolve(root, meta_dir)
        if "://" not in root and not os.path.isdir(root):
            logger.warning("%s: image root %s does not exist (tried %s)", where, root, ", ".join(tried))
    warnings = [f"{where}: unknown key {key!r} is ignored{_suggestion(key)}" for key in unknown]
    repeat = raw["repeat_time"]
    return DatasetEntry(
        name=name,
        root=root,
        annotation=annotation,
        data_augment=raw["data_augment"],
        repeat_time=int(repeat) if float(repeat).is_integer() else float(repeat),
        length=length,
        max_dynamic_patch=patches,
        format=None if fmt in (None, "auto") else fmt,
        extra={key: value for key, value in raw.items() if key not in _KNOWN},
        meta_path=meta_path,
        meta_line=line,
        warnings=warnings,
    )


def _suggestion(key: str) -> str:
    near = difflib.get_close_matches(key, _KNOWN, n=1, cutoff=0.6) or difflib.get_close_matches(
        key.lower(), _KNOWN, n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else f" (known keys: {', '.join(_KNOWN)})"


def _misspelled(missing: list[str], unknown: list[str]) -> str:
    """``"; found 'repeat_times' (a misspelling of 'repeat_time'?)"`` when an unknown key is close to a missing one."""
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(key.lower(), missing, n=1, cutoff=0.6)
        if near:
            hints.append(f"found {key!r} (a misspelling of {near[0]!r}?)")
    return "; " + "; ".join(hints) if hints else ""


def _unreadable(path: str) -> str | None:
    """Why an annotation file cannot be read (None when it can): missing, not a regular file, no permission.

    Opening is the only test of permission that also holds for root and ACLs; only regular files are opened,
    since opening a FIFO would block until a writer appears.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe or device cannot be indexed)"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None
