"""The meta JSON (``--meta_path``): which annotation files to train on, from where, and how often.

A meta file maps a dataset name to an entry (official format, spec section 3.1)::

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMATS", "DatasetEntry", "MetaError", "load_meta", "expand_indices", "stable_seed"]

logger = logging.getLogger(__name__)

# Values of the optional "format" key; "auto" (or no key) detects the format per annotation file.
FORMATS = ("auto", "internvl", "llava", "swift")

_REQUIRED = ("root", "annotation", "data_augment", "repeat_time")
_KNOWN = (*_REQUIRED, "length", "max_dynamic_patch", "format")


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
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"repeat_time must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"repeat_time must be > 0 (1 = every line once, 0.3 = a random 30%), got {value!r}")


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


def load_meta(meta_path: str | os.PathLike) -> list[DatasetEntry]:
    """Read and validate a meta JSON file; one :class:`DatasetEntry` per dataset, in key order.

    Raises :class:`MetaError` (naming the file, the dataset and the key) for unreadable JSON, missing
    keys, wrong types, bad values and annotation files that do not exist.
    """
    meta_path = os.path.abspath(os.fspath(meta_path))
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise MetaError(f"meta file {meta_path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise MetaError(f"meta file {meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise MetaError(
            f"meta file {meta_path} must hold a JSON object mapping dataset names to entries, "
            f"got a {type(meta).__name__}"
        )
    if not meta:
        raise MetaError(f"meta file {meta_path} lists no dataset")
    meta_dir = Path(meta_path).parent
    return [_entry(meta_path, meta_dir, name, raw) for name, raw in meta.items()]


def _entry(meta_path: str, meta_dir: Path, name: str, raw: Any) -> DatasetEntry:
    where = f"meta file {meta_path}, dataset {name!r}"

    def fail(message: str) -> MetaError:
        return MetaError(f"{where}: {message}")

    if not isinstance(raw, dict):
        raise fail(f"the entry must be a JSON object, got {type(raw).__name__}")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise fail(f"missing required key(s) {', '.join(missing)} (required: {', '.join(_REQUIRED)})")

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
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        raise fail(f"'length' must be a non-negative integer, got {length!r}")
    patches = raw.get("max_dynamic_patch")
    if patches is not None and (isinstance(patches, bool) or not isinstance(patches, int) or patches < 1):
        raise fail(f"'max_dynamic_patch' must be a positive integer, got {patches!r}")
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise fail(f"'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")

    annotation, tried = _resolve(raw["annotation"], meta_dir)
    if not os.path.isfile(annotation):
        raise fail(f"annotation file {raw['annotation']!r} not found (tried {', '.join(tried)})")
    root = raw["root"]
    if root:
        root, tried = _resolve(root, meta_dir)
        if "://" not in root and not os.path.isdir(root):
            logger.warning("%s: image root %s does not exist (tried %s)", where, root, ", ".join(tried))
    extra = {key: value for key, value in raw.items() if key not in _KNOWN}
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
        extra=extra,
        meta_path=meta_path,
    )
