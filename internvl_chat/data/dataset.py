"""The supervised training dataset: meta JSON -> annotation files -> one model-ready item per index.

:class:`SupervisedDataset` is a map-style dataset over the datasets of a meta file, concatenated in
meta order. ``dataset[i]`` reads one record, normalises it to the official JSONL form
(:func:`internvl_chat.data.formats.to_official`), dispatches on its type exactly like the official
``LazySupervisedDataset`` and returns the item the collator and the model consume::

    {"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": uint8[N, S, S, 3],
     "image_flags": LongTensor[N], "num_supervised": int, "sample_id": "<file>:<line>",
     "skipped": ["<file>:<line>: <reason> [<kind>]", ...]}

Sample types (official dispatch: ``image`` list, ``image`` string, ``video``, else text):

* multi-image: one ``<image>`` per image is required; each image is tiled with at most
  ``max(1, max_dynamic_patch // n_images)`` tiles (``max_dynamic_patch``: the meta entry's, else the
  config's). A one-element list is treated as a single image.
* single image: ``"<image>\\n"`` is prepended to the first human turn when no turn holds ``<image>``.
* video: frames (count drawn in ``[min_num_frame, max_num_frame]``) are one ``image_size`` tile each
  (no tiling, no thumbnail); ``<video>\\n`` becomes the official training's ``Frame-i: <image>`` lines.
* pure text: one white dummy tile with ``image_flags == [0]`` (the official white 224 x 224 image
  tiled with ``max_num=1`` gives one white 448 tile; its features are dropped by the model).

Tiles stay uint8 channels-last (:func:`~internvl_chat.data.transforms.image_to_tiles`); the model
normalises them on the device. Tokens come from
:func:`~internvl_chat.data.templates.tokenize_conversation` with ``num_image_token`` context tokens
per tile. Attention masks, positions and padding are the collator's job.

Start-up cost: a JSONL file is indexed by the byte offsets of its non-blank lines (numpy int64, two
numbers per line) instead of keeping every line as a Python string; a ``.json`` list is parsed once
and its elements are kept re-serialised in one bytes buffer (so dataloader workers do not slowly
copy millions of Python objects). A ``.json`` file is a JSON list unless it starts with ``{``; any
other file is JSON lines (the rule of :func:`~internvl_chat.data.formats.read_records`, so line
numbers agree with ``tools/check_data.py``).

Randomness (frame count, frame choice, JPEG quality) comes from a generator seeded by
``(config.seed, epoch, index)``, never from global state, so a resumed run sees the same samples.
:meth:`SupervisedDataset.set_epoch` changes the epoch in every dataloader worker, persistent ones
included (the epoch lives in a shared-memory tensor).

Bad data (file, 1-based line; for a ``.json`` list the ``line`` is the 1-based position of the
element in the list): every problem becomes a :class:`~internvl_chat.data.errors.DataError` with a
``kind``. ``bad_data="fail"`` raises it; ``"skip"`` returns the next good sample in index order
(wrapping) instead and lists the skipped samples in the item's ``skipped`` (report lines, see
:mod:`~internvl_chat.data.errors`); after ``max_consecutive_bad`` bad samples in a row it gives up
with :class:`~internvl_chat.data.errors.TooMuchBadDataError`. Never a silent random replacement.
*Every* exception raised while reading, validating, loading or tokenising one record is that record's
error (:func:`~internvl_chat.data.errors.record_error` names it: JSON nested deeper than 64 levels,
integers past Python's 4300-digit limit and non-UTF-8 lines are ``invalid_json``, lone surrogates
``invalid_unicode``, tokenizer failures ``tokenizer_error``, anything else ``unexpected`` with its type
and message, and its traceback logged once as it may be a bug); only ``KeyboardInterrupt``,
``SystemExit`` and CUDA out-of-memory propagate. The start-up length scan never raises for a record
(an unreadable one gets length 1 and is named when built). No item ever has every label ``-100``.

Validation is :func:`~internvl_chat.data.formats.validate_official`'s (roles, placeholders, boxes,
reserved tokens, ...). Stricter than the official code, on purpose (each is a silent mistrain or a
crash there): the number of ``<image>`` placeholders must equal the number of images (official: extra
placeholders stayed in the text as plain words), ``<image>``/``<video>`` in a text-only sample is an
error (it almost always lost its ``image`` field), and over-long samples that would lose image tokens
or every supervised token are errors (``too_long``). A missing placeholder is inserted in the first
*human* turn (official: ``conversations[0]``, whatever its role, which broke samples with a system
turn).

Lengths for length-grouped sampling (:attr:`SupervisedDataset.lengths`), per annotation file, first
found wins: a sidecar ``<annotation>.lengths.npy`` (see :func:`write_lengths_sidecar`), the record's
``length`` field, a cheap estimate (text characters / 3 + image tokens of the planned tiles, from
``width``/``height`` when present, else the maximum tiles). Computed on first use only.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from internvl_chat.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_END_TOKEN, VIDEO_PLACEHOLDER
from internvl_chat.data import formats, video
from internvl_chat.data.errors import DataError, TooMuchBadDataError, check_policy, is_run_error, record_error
from internvl_chat.data.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_VIDEO_FRAMES,
    DEFAULT_MAX_VIDEO_SECONDS,
    MediaLimits,
)
from internvl_chat.data.meta import DatasetEntry, expand_indices, load_meta, samples_per_epoch
from internvl_chat.data.templates import SampleTooLongError, TokenizerError, get_template, tokenize_conversation
from internvl_chat.data.tiling import plan_tiles
from internvl_chat.data.transforms import ImageLoadError, image_size, image_to_tiles, load_image

__all__ = [
    "SAMPLE_TYPES",
    "DataConfig",
    "SupervisedDataset",
    "build_dataset",
    "lengths_sidecar_path",
    "read_lengths_sidecar",
    "resolve_outside_root",
    "write_lengths_sidecar",
    "sample_type",
]

logger = logging.getLogger(__name__)

SAMPLE_TYPES = ("text", "image", "multi_image", "video")
_INVALID = "invalid"

_USER_ROLES = ("human", "user")
_WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 24  # bytes scanned at a time while indexing


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DataConfig:
    """What the official ``DataTrainingArguments`` mean for the dataset (defaults are the official ones).

    ``normalize_type`` is only used here for the ``pad2square`` fill colour; the model normalises.
    Ours: ``video_sample`` (``rand``/``middle``/``fpsX``), ``video_backend`` (``pyav``/``decord``),
    ``seed`` (of all per-sample randomness), ``bad_data`` (``skip``/``fail``), ``max_bad_fraction``
    (read by the training loop's :class:`~internvl_chat.data.errors.BadDataTracker`),
    ``max_consecutive_bad``, and the two image-conversion switches of
    :func:`~internvl_chat.data.transforms.load_image` (``False`` restores the official pixels for
    EXIF-rotated and 16-bit images). Decoding bounds (ours: the official code has none, and loads truncated
    images; see :mod:`~internvl_chat.data.media`; 0 = no limit):
    ``max_image_pixels`` (images and video frames, from the header, before decoding),
    ``max_video_frames``, ``max_video_seconds``; ``allow_truncated_images`` loads cut-off image files
    with a grey fill (the official behaviour) instead of skipping them.
    ``confine_paths`` (``--confine_paths``): an image or video path that
    resolves outside the dataset root (absolute, ``../``, a symlink out) is a bad sample, kind
    ``path_outside_root`` (default off, as the official code: the checker only warns).
    """

    template: str = "internlm2-chat"
    num_image_token: int = 256
    image_size: int = 448
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    pad2square: bool = False
    normalize_type: str = "imagenet"
    max_seq_length: int | None = 8192
    min_num_frame: int = 8
    max_num_frame: int = 32
    video_sample: str = "rand"
    video_backend: str = "pyav"
    seed: int = 42
    bad_data: str = "skip"
    max_bad_fraction: float = 0.01
    max_consecutive_bad: int = 50
    exif_transpose: bool = True
    rescale_high_bit_depth: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_truncated_images: bool = False
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    confine_paths: bool = False

    def __post_init__(self) -> None:
        get_template(self.template)
        check_policy(self.bad_data)
        for name in ("num_image_token", "image_size", "min_dynamic_patch", "max_dynamic_patch",
                     "min_num_frame", "max_num_frame", "max_consecutive_bad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ValueError(
                f"min_dynamic_patch ({self.min_dynamic_patch}) > max_dynamic_patch ({self.max_dynamic_patch})"
            )
        if self.min_num_frame > self.max_num_frame:
            raise ValueError(f"min_num_frame ({self.min_num_frame}) > max_num_frame ({self.max_num_frame})")
        if self.max_seq_length is not None and (
            isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) or self.max_seq_length < 1
        ):
            raise ValueError(f"DataConfig.max_seq_length must be a positive int or None, got {self.max_seq_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"DataConfig.seed must be a non-negative int, got {self.seed!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"DataConfig.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")
        if not _valid_sample_rule(self.video_sample):
            raise ValueError(
                f"DataConfig.video_sample must be 'rand', 'middle' or 'fpsX' (X > 0), got {self.video_sample!r}"
            )
        if self.video_backend not in video.BACKENDS:
            raise ValueError(f"DataConfig.video_backend must be one of {video.BACKENDS}, got {self.video_backend!r}")
        try:
            self.media_limits  # noqa: B018 - validates the four media bounds
        except ValueError as exc:
            raise ValueError(f"DataConfig.{exc}") from None

    @property
    def media_limits(self) -> MediaLimits:
        """The decoding bounds of :mod:`~internvl_chat.data.media` (pixels, video frames and seconds,
        truncated images) as one object for the image and video loaders."""
        return MediaLimits(self.max_image_pixels, self.max_video_frames, self.max_video_seconds,
                           self.allow_truncated_images)

    @classmethod
    def from_args(cls, data_args: Any, **overrides: Any) -> DataConfig:
        """Build from official-style ``DataTrainingArguments`` (``conv_style`` -> ``template``,
        ``force_image_size`` -> ``image_size``); other fields are taken by name when present, and
        ``overrides`` (e.g. ``num_image_token=model.num_image_token, seed=training_args.seed``) win.
        Without an override, ``num_image_token`` is the official
        ``(force_image_size // 14) ** 2 * down_sample_ratio ** 2`` (InternViT patch size 14).
        """
        renamed = {"template": "conv_style", "image_size": "force_image_size"}
        values: dict[str, Any] = {}
        for f in fields(cls):
            source = renamed.get(f.name, f.name)
            if hasattr(data_args, source):
                values[f.name] = getattr(data_args, source)
        if "num_image_token" not in values and hasattr(data_args, "down_sample_ratio") and "image_size" in values:
            values["num_image_token"] = int((values["image_size"] // 14) ** 2 * data_args.down_sample_ratio**2)
        values.update(overrides)
        return cls(**values)


def _valid_sample_rule(rule: Any) -> bool:
    """Frame sampling rules of :func:`~internvl_chat.data.video.read_frames`: rand, middle, fpsX."""
    if rule in ("rand", "middle"):
        return True
    if not isinstance(rule, str) or not rule.startswith("fps"):
        return False
    try:
        rate = float(rule[3:])
    except ValueError:
        return False
    return math.isfinite(rate) and rate > 0


# --------------------------------------------------------------------------------------------
# Annotation files: indexing and raw access


@dataclass
class _Source:
    """One annotation file: where each record's bytes are, and which records an epoch visits."""

    entry: DatasetEntry
    starts: np.ndarray  # int64 byte offset of each record (in the file, or in ``blob``)
    ends: np.ndarray  # int64 exclusive end of each record
    line_numbers: np.ndarray | None  # 1-based line of each record; None: record k is on line k + 1
    blob: bytes | None  # JSON lists: the elements re-serialised back to back
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # record per local index

    @property
    def path(self) -> str:
        return self.entry.annotation

    @property
    def num_records(self) -> int:
        return len(self.starts)

    def line_of(self, record: int) -> int:
        return int(self.line_numbers[record]) if self.line_numbers is not None else record + 1

    def raw(self, record: int) -> bytes:
        start, end = int(self.starts[record]), int(self.ends[record])
        if self.blob is not None:
            return self.blob[start:end]
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    def iter_raw(self) -> Iterator[tuple[int, bytes]]:
        """Every record in file order, read sequentially in large blocks."""
        if self.blob is not None:
            for k in range(self.num_records):
                yield k, self.blob[int(self.starts[k]) : int(self.ends[k])]
            return
        with open(self.path, "rb") as handle:
            k, n = 0, self.num_records
            while k < n:
                block_start = int(self.starts[k])
                stop = int(np.searchsorted(self.ends, block_start + _CHUNK, side="right"))
                stop = max(stop, k + 1)
                handle.seek(block_start)
                block = handle.read(int(self.ends[stop - 1]) - block_start)
                for j in range(k, stop):
                    yield j, block[int(self.starts[j]) - block_start : int(self.ends[j]) - block_start]
                k = stop


def _is_json_list(path: str) -> bool:
    """The rule of :func:`formats.read_records` (so line numbers agree with the checker): a ``.json`` file is
    a JSON list unless its first non-blank character is ``{`` (JSON lines misnamed); anything else is JSONL."""
    if not path.lower().endswith(".json"):
        return False
    with open(path, "rb") as handle:
        head = handle.read(3)
        if head != _BOM:
            handle.seek(0)
        while chunk := handle.read(1 << 16):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1] != b"{"
    return True


def _index_jsonl(entry: DatasetEntry) -> _Source:
    """Byte offsets of the non-blank lines of a JSONL file (vectorised newline search)."""
    path = entry.annotation
    size = os.path.getsize(path)
    if size == 0:
        empty = np.zeros(0, np.int64)
        return _Source(entry, empty, empty, None, None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        newlines = [np.flatnonzero(data[pos : pos + _CHUNK] == 10) + pos for pos in range(0, size, _CHUNK)]
        newline_pos = np.concatenate(newlines).astype(np.int64)
        starts = np.concatenate([[0], newline_pos + 1]).astype(np.int64)
        ends = np.concatenate([newline_pos, [size]]).astype(np.int64)
        if starts[-1] == size:  # the file ends with a newline: no last line
            starts, ends = starts[:-1], ends[:-1]
        keep = ends > starts
        # A line starting with whitespace may be blank (e.g. "\r" or spaces): look at those few only.
        first = np.zeros(len(starts), np.uint8)
        first[keep] = data[starts[keep]]
        suspect = np.flatnonzero(keep & np.isin(first, list(_WHITESPACE)))
        if bytes(data[:3]) == _BOM:
            suspect = np.union1d(suspect, [0])
            starts[0] = 3  # the BOM is not part of the first record
        for k in suspect:
            if not bytes(data[starts[k] : ends[k]]).strip():
                keep[k] = False
    finally:
        del data
    line_numbers = np.flatnonzero(keep).astype(np.int64) + 1
    all_kept = bool(keep.all())
    return _Source(
        entry,
        starts[keep],
        ends[keep],
        None if all_kept else line_numbers,
        None,
    )


def _index_json_list(entry: DatasetEntry) -> _Source:
    """Parse a JSON list once and keep its elements as compact JSON bytes."""
    path = entry.annotation
    try:
        with open(path, encoding="utf-8-sig") as handle:
            elements = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"not valid JSON ({exc.msg} at column {exc.colno}); the whole list is unusable",
            file=path,
            line=exc.lineno,
            kind="invalid_json",
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text: {exc}", file=path, kind="invalid_json") from None
    except RecursionError:  # the checker (formats.read_records) names the element
        raise DataError("an element is nested too deeply to parse; the whole list is unusable", file=path,
                        kind="invalid_json") from None
    except ValueError:  # an integer literal past Python's digit limit (4300 by default)
        raise DataError("a number too large to read (an integer literal past Python's digit limit); the whole "
                        "list is unusable", file=path, kind="invalid_json") from None
    if not isinstance(elements, list):
        raise DataError(
            f"a .json annotation file must hold a list of samples, got a {type(elements).__name__}",
            file=path,
            kind="invalid_json",
        )
    try:
        pieces = [_element_bytes(e) for e in elements]
    except RecursionError:
        raise DataError("an element is nested too deeply to store; the whole list is unusable", file=path,
                        kind="invalid_json") from None
    del elements
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    return _Source(entry, starts, ends, None, b"".join(pieces))


def _element_bytes(element: Any) -> bytes:
    """One JSON-list element as compact UTF-8 JSON; a lone surrogate stays escaped, so that reading the record
    names it (``invalid_unicode``) instead of the whole file failing here."""
    try:
        return json.dumps(element, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(element, separators=(",", ":")).encode("ascii")


def _index_source(entry: DatasetEntry, seed: int) -> _Source:
    source = _index_json_list(entry) if _is_json_list(entry.annotation) else _index_jsonl(entry)
    samples_per_epoch(entry, source.num_records)  # MetaError for an empty file or an absurd repeat_time
    source.indices = expand_indices(source.num_records, entry.repeat_time, (seed, entry.name))
    return source


# --------------------------------------------------------------------------------------------
# Length sidecar


def lengths_sidecar_path(annotation: str | os.PathLike) -> str:
    """``<annotation>.lengths.npy``: where :func:`write_lengths_sidecar` puts the token lengths."""
    return os.fspath(annotation) + ".lengths.npy"


def write_lengths_sidecar(annotation: str | os.PathLike, lengths: Sequence[int]) -> str:
    """Write the token length of every record of an annotation file, for length-grouped sampling.

    Format: a 1-D int64 ``.npy`` array with one entry per record in file order (blank lines of a
    JSONL file are not records; for a JSON list, one per element), before any ``repeat_time``
    expansion. A value ``<= 0`` means "unknown" (e.g. a bad line): the dataset estimates that one.
    A sidecar whose size does not match the file's record count is ignored with a warning (stale).
    Written atomically (temporary file + rename). Returns the path.
    """
    array = np.asarray(lengths, dtype=np.int64).reshape(-1)
    path = lengths_sidecar_path(annotation)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)
    return path


def read_lengths_sidecar(annotation: str | os.PathLike, num_records: int) -> np.ndarray | None:
    """The sidecar's lengths when it exists and fits ``num_records``, else None."""
    path = lengths_sidecar_path(annotation)
    if not os.path.isfile(path):
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable length sidecar %s: %s", path, exc)
        return None
    if array.ndim != 1 or array.shape[0] != num_records or not np.issubdtype(array.dtype, np.integer):
        logger.warning(
            "ignoring length sidecar %s: %s entries for %d records (stale? rerun tools/check_data.py)",
            path, array.shape, num_records,
        )
        return None
    return array.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Record helpers


def _parse_json(raw: bytes) -> Any:
    """One record's JSON; every failure is a :class:`DataError` (:func:`formats.parse_json_line`: syntax, UTF-8,
    nesting depth, huge integers, lone surrogates), so a hostile line never raises anything else."""
    return formats.parse_json_line(raw)


def sample_type(record: dict) -> str:
    """``text``, ``image``, ``multi_image`` or ``video`` of an official record (the official dispatch)."""
    image = record.get("image")
    if image:
        if isinstance(image, list) and len(image) > 1:
            return "multi_image"
        return "image"
    if record.get("video"):
        return "video"
    return "text"


def _image_list(record: dict) -> list[str]:
    image = record["image"]
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError(
            f"'image' must be a path or a list of paths, got {image!r}", kind="invalid_record"
        )
    return images


def _copy_turns(conversations: Any) -> list[dict[str, str]]:
    """A copy of the turns, safe to edit (placeholders are inserted); :func:`formats.to_official` validated them."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("empty conversation: no turns to train on", kind="empty_conversation")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise DataError(f"turn {k} must be an object with string 'from' and 'value', got {turn!r:.80}",
                            kind="bad_turn")
        turns.append({"from": turn["from"], "value": turn["value"]})
    if not any(t["from"].lower() in _USER_ROLES for t in turns):
        raise DataError("conversation has no human turn", kind="bad_roles")
    return turns


def _first_user_turn(turns: list[dict[str, str]]) -> dict[str, str]:
    return next(t for t in turns if t["from"].lower() in _USER_ROLES)


def _count(turns: list[dict[str, str]], placeholder: str) -> int:
    return sum(t["value"].count(placeholder) for t in turns)


def _tile_range(min_patch: int, budget: int) -> tuple[int, int]:
    """(min_num, max_num) for tiling. A budget below ``min_dynamic_patch`` leaves the official code
    no candidate grid, and its fallback is the 1 x 1 grid: one tile."""
    return (min_patch, budget) if min_patch <= budget else (1, 1)


# Datasets repeat a few image sizes many times: plan each once while estimating lengths.
_cached_plan = functools.lru_cache(maxsize=1 << 16)(plan_tiles)


def _join(root: str, path: str, confine: bool = False) -> str:
    """``root`` + a media path as the official code joins them; with ``confine`` (``--confine_paths``), a path
    that resolves outside ``root`` is a bad sample (:class:`DataError` kind ``path_outside_root``)."""
    if root.startswith(("s3://", "http://", "https://")):
        return root + path  # the official string concatenation for object stores
    joined = os.path.join(root, path) if root else path
    if confine:
        outside = resolve_outside_root(root, path)
        if outside is not None:
            raise DataError(f"{path!r} resolves to {outside}, outside the dataset root {root} (--confine_paths)",
                            kind="path_outside_root")
    return joined


def resolve_outside_root(root: str, path: str) -> str | None:
    """Where the media ``path`` really is when that is outside the dataset ``root``, else None.

    Absolute paths and ``../`` escapes are resolved, symlinks followed (``os.path.realpath``), so a link inside
    ``root`` that points elsewhere counts as outside. No root (``""``: paths are taken from the working
    directory, as in the official code) and remote roots or paths have no outside. The checker warns with this,
    and ``--confine_paths`` refuses with it (:func:`_join`), so both draw the line in the same place.
    """
    if not root or "://" in root or "://" in path:
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, path))
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        return None
    return real


_logged_unexpected: set[str] = set()  # exception types whose traceback this process has logged


def _as_record_error(exc: Exception, what: str, file: str, line: int) -> Exception:
    """The exception to raise for one record's failure: a located :class:`DataError` (named by
    :func:`~internvl_chat.data.errors.record_error`), or ``exc`` itself when it must stop the run.

    An ``unexpected`` one may be a bug in this code rather than in the data: its traceback is logged once per
    exception type and process, so a bug that makes every sample bad is visible before the bad-fraction
    limit stops the run.
    """
    err = record_error(exc, what)
    if err is None:
        return exc
    err.located(file, line)
    if err.kind == "unexpected" and type(exc).__name__ not in _logged_unexpected:
        _logged_unexpected.add(type(exc).__name__)
        logger.error("%s:%d: %s while %s: skipped as a bad sample, but this may be a bug; traceback (logged "
                     "once per exception type):", file, line, type(exc).__name__, what, exc_info=exc)
    return err


# --------------------------------------------------------------------------------------------
# The dataset


class SupervisedDataset(torch.utils.data.Dataset):
    """The datasets of a meta file, concatenated; ``dataset[i]`` is one model-ready item (module docstring)."""

    def __init__(self, entries: Sequence[DatasetEntry], tokenizer: Any, config: DataConfig) -> None:
        if not entries:
            raise ValueError("SupervisedDataset needs at least one dataset entry")
        self.tokenizer = tokenizer
        self.config = config
        self.entries = list(entries)
        self.template = get_template(config.template)
        self.sources = [_index_source(entry, config.seed) for entry in self.entries]
        sizes = np.array([len(s.indices) for s in self.sources], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # Shared memory: set_epoch reaches dataloader workers that are already running.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._scan: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._end_token_id = self._single_token_id(IMG_END_TOKEN)

    # ---------------------------------------------------------------- size, epoch, location

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the randomness of epoch ``epoch`` (frame counts, frames, JPEG qualities)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch.fill_(epoch)

    def _locate(self, index: int) -> tuple[_Source, int]:
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index = int(index) % n
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        source = self.sources[k]
        return source, int(source.indices[index - self._offsets[k]])

    def locate(self, index: int) -> tuple[str, int]:
        """(annotation file, 1-based line) of ``dataset[index]``'s record."""
        source, record = self._locate(index)
        return source.path, source.line_of(record)

    def record(self, index: int) -> dict:
        """The official-form record behind ``index`` (raises :class:`DataError` with file and line)."""
        source, record = self._locate(index)
        return self._read_record(source, record)

    # ---------------------------------------------------------------- items

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        first, _ = self._locate(index)  # validates the index
        index = int(index) % n
        skipped: list[str] = []
        limit = min(self.config.max_consecutive_bad, n)
        for attempt in range(limit):
            current = (index + attempt) % n
            try:
                item = self.build_item(current)
            except DataError as err:
                if self.config.bad_data == "fail":
                    raise
                skipped.append(err.report())
                continue
            item["skipped"] = skipped
            return item
        shown = "\n  ".join(skipped[:5])
        raise TooMuchBadDataError(
            f"{len(skipped)} bad samples in a row from index {index} ({first.path}); the data needs "
            f"fixing (run tools/check_data.py). First ones:\n  {shown}"
        )

    def build_item(self, index: int) -> dict[str, Any]:
        """``dataset[index]`` without the bad-data policy: a :class:`DataError` names file and line."""
        source, record_index = self._locate(index)
        line = source.line_of(record_index)
        try:
            record = self._read_record(source, record_index)
            item = self._make_item(record, source.entry, self._rngs(int(index) % len(self)))
            if item["num_supervised"] <= 0:  # tokenize_conversation refuses these; never train on all -100
                raise DataError("no supervised token in the sample", kind="invalid_conversation")
        except Exception as exc:  # noqa: BLE001 - every error of one record is that record's (module docstring)
            err = _as_record_error(exc, "building the sample", source.path, line)
            if err is exc:
                raise
            raise err from exc
        item["sample_id"] = f"{source.path}:{line}"
        return item

    def _rngs(self, index: int) -> tuple[np.random.Generator, random.Random]:
        """Per-sample generators from (seed, epoch, index): one for video, one for JPEG qualities."""
        seq = np.random.SeedSequence([self.config.seed, self.epoch, index])
        video_seq, jpeg_seq = seq.spawn(2)
        return np.random.default_rng(video_seq), random.Random(int(jpeg_seq.generate_state(1, np.uint64)[0]))

    def _read_record(self, source: _Source, record_index: int) -> dict:
        line = source.line_of(record_index)
        try:
            raw = _parse_json(source.raw(record_index))
            record = formats.to_official(
                raw, source.entry.format, file=source.path, line=line, image_size_fn=self._size_fn(source.entry)
            )
        except Exception as exc:  # noqa: BLE001 - see build_item
            err = _as_record_error(exc, "reading the record", source.path, line)
            if err is exc:
                raise
            raise err from exc
        if not isinstance(record, dict):
            raise DataError(f"record normalised to a {type(record).__name__}", source.path, line, "invalid_record")
        return record

    def _size_fn(self, entry: DatasetEntry):
        """``path -> (width, height)`` from the image header, for ms-swift boxes given in pixels."""

        def size(rel: str) -> tuple[int, int]:
            # The checks of _load_image (regular file, pixel limit), so a FIFO cannot hang the start-up scan.
            cfg = self.config
            path = _join(entry.root, rel, cfg.confine_paths)
            try:
                return image_size(path, exif_transpose=cfg.exif_transpose, max_image_pixels=cfg.max_image_pixels,
                                  allow_truncated=cfg.allow_truncated_images)
            except ImageLoadError as exc:
                raise DataError(str(exc), kind=exc.kind) from exc

        return size

    def _single_token_id(self, token: str) -> int | None:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def _max_patches(self, entry: DatasetEntry) -> int:
        return entry.max_dynamic_patch or self.config.max_dynamic_patch

    def _load_image(self, root: str, rel: str) -> Any:
        cfg = self.config
        path = _join(root, rel, cfg.confine_paths)
        try:  # load_image names the problem: missing_file, not_a_file, image_too_large, truncated_image, ...
            return load_image(
                path,
                exif_transpose=cfg.exif_transpose,
                rescale_high_bit_depth=cfg.rescale_high_bit_depth,
                max_image_pixels=cfg.max_image_pixels,
                allow_truncated=cfg.allow_truncated_images,
            )
        except ImageLoadError as exc:
            raise DataError(str(exc), kind=exc.kind) from exc

    def _tiles(self, image: Any, max_num: int, rng: random.Random | None, dynamic: bool | None = None) -> torch.Tensor:
        cfg = self.config
        min_num, max_num = _tile_range(cfg.min_dynamic_patch, max_num)
        return image_to_tiles(
            image,
            dynamic=cfg.dynamic_image_size if dynamic is None else dynamic,
            min_num=min_num,
            max_num=max_num,
            image_size=cfg.image_size,
            use_thumbnail=cfg.use_thumbnail,
            pad2square=cfg.pad2square,
            normalize_type=cfg.normalize_type,
            augment_rng=rng,
        )

    def _make_item(
        self, record: dict, entry: DatasetEntry, rngs: tuple[np.random.Generator, random.Random]
    ) -> dict[str, Any]:
        cfg = self.config
        turns = _copy_turns(record.get("conversations"))
        kind = sample_type(record)
        video_rng, jpeg_rng = rngs
        augment = jpeg_rng if entry.data_augment else None
        n_images = _count(turns, IMAGE_PLACEHOLDER)
        n_videos = _count(turns, VIDEO_PLACEHOLDER)

        if kind in ("image", "multi_image"):
            paths = _image_list(record)
            if n_videos:
                raise DataError(f"{VIDEO_PLACEHOLDER} placeholder in an image sample", kind="placeholder_count")
            if len(paths) == 1 and n_images == 0:
                first = _first_user_turn(turns)
                first["value"] = IMAGE_PLACEHOLDER + "\n" + first["value"]
            elif n_images != len(paths):
                raise DataError(
                    f"{n_images} {IMAGE_PLACEHOLDER} placeholder(s) for {len(paths)} image(s); "
                    f"put one {IMAGE_PLACEHOLDER} where each image goes",
                    kind="placeholder_count",
                )
            budget = self._max_patches(entry)
            if len(paths) > 1:
                budget = max(1, budget // len(paths))
            tiles = [self._tiles(self._load_image(entry.root, p), budget, augment) for p in paths]
            num_tokens = [cfg.num_image_token * int(t.shape[0]) for t in tiles]
            pixel_values = torch.cat(tiles)
            flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
        elif kind == "video":
            if n_images:
                raise DataError(
                    f"{IMAGE_PLACEHOLDER} placeholder in a video sample (frames get theirs from {VIDEO_PLACEHOLDER})",
                    kind="placeholder_count",
                )
            if n_videos > 1:
                raise DataError(f"{n_videos} {VIDEO_PLACEHOLDER} placeholders; a sample holds one video",
                                kind="placeholder_count")
            path = record["video"]
            if not isinstance(path, str):
                raise DataError(f"'video' must be a path, got {path!r}", kind="invalid_record")
            frames = self._read_video(_join(entry.root, path, self.config.confine_paths), record.get("clip"),
                                      video_rng)
            target = next((t for t in turns if VIDEO_PLACEHOLDER in t["value"]), None) or _first_user_turn(turns)
            target["value"] = video.expand_video_placeholder(target["value"], len(frames))
            tiles = [self._tiles(frame, 1, augment, dynamic=False) for frame in frames]
            num_tokens = [cfg.num_image_token] * len(tiles)
            pixel_values = torch.cat(tiles)
            flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
        else:
            if n_images or n_videos:
                raise DataError(
                    f"text-only sample (no 'image'/'video' field) holds {n_images + n_videos} "
                    f"{IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholder(s): did it lose its image?",
                    kind="placeholder_count",
                )
            num_tokens = None
            pixel_values = torch.full((1, cfg.image_size, cfg.image_size, 3), 255, dtype=torch.uint8)
            flags = torch.zeros(1, dtype=torch.long)

        try:
            tokens = tokenize_conversation(
                turns, self.template, self.tokenizer, num_tokens, max_length=cfg.max_seq_length,
                text_only=num_tokens is None,
            )
        except SampleTooLongError as exc:
            raise DataError(str(exc), kind="too_long") from exc
        except TokenizerError as exc:
            raise DataError(str(exc), kind="tokenizer_error") from exc
        except ValueError as exc:
            message = str(exc)
            kind_ = "placeholder_count" if IMAGE_PLACEHOLDER in message else "invalid_conversation"
            raise DataError(message, kind=kind_) from exc
        input_ids = torch.tensor(tokens["input_ids"], dtype=torch.long)
        labels = torch.tensor(tokens["labels"], dtype=torch.long)
        if num_tokens is not None and self._end_token_id is not None:
            blocks = int((input_ids == self._end_token_id).sum())
            if blocks != len(num_tokens):
                raise DataError(
                    f"{blocks} image block(s) in the tokens for {len(num_tokens)} image(s)/frame(s)",
                    kind="placeholder_count",
                )
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "image_flags": flags,
            "num_supervised": int((labels != IGNORE_INDEX).sum()),
        }

    def _read_video(self, path: str, clip: Any, rng: np.random.Generator) -> list:
        cfg = self.config
        num_frames = video.choose_num_frames(cfg.min_num_frame, cfg.max_num_frame, rng)
        try:
            frames, _ = video.read_frames(
                path, num_frames=num_frames, sample=cfg.video_sample, clip=clip, rng=rng,
                backend=cfg.video_backend, limits=cfg.media_limits,
            )
        except DataError:
            raise
        except (OSError, RuntimeError, EOFError) as exc:  # decoder failures the video module did not name
            raise DataError(f"cannot read video {path}: {type(exc).__name__}: {exc}", kind="corrupt_video") from exc
        if not frames:
            raise DataError(f"video {path} gave no frames", kind="empty_video")
        return frames

    # ---------------------------------------------------------------- lengths and statistics

    def _scan_records(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per source: (length per record, sample type code per record); parsed once, on demand."""
        if self._scan is None:
            self._scan = [self._scan_source(source) for source in self.sources]
        return self._scan

    def _scan_source(self, source: _Source) -> tuple[np.ndarray, np.ndarray]:
        n = source.num_records
        lengths = read_lengths_sidecar(source.path, n)
        need_parse = np.ones(n, bool) if lengths is None else lengths <= 0
        if lengths is None:
            lengths = np.zeros(n, np.int64)
        types = np.full(n, -1, np.int8)  # -1: not parsed
        if not need_parse.any():
            return lengths, types
        for k, raw in source.iter_raw():
            if not need_parse[k]:
                continue
            types[k], record = self._scan_record(source, k, raw)
            lengths[k] = 1 if record is None else self._record_length(record, source.entry)
        return lengths, types

    def _scan_record(self, source: _Source, k: int, raw: bytes) -> tuple[int, dict | None]:
        """(sample type code, record) of one raw record, or (invalid, None) for any record error.

        Nothing a record holds may escape the start-up scan (a line nested 100,000 deep used to stop a run here
        with a RecursionError naming no line): the scan only estimates, and building the sample reports the
        error by name, file and line.
        """
        try:
            record = formats.to_official(_parse_json(raw), source.entry.format, file=source.path,
                                         line=source.line_of(k), image_size_fn=self._size_fn(source.entry))
            return SAMPLE_TYPES.index(sample_type(record)), record
        except Exception as exc:  # noqa: BLE001
            if is_run_error(exc):
                raise
            return len(SAMPLE_TYPES), None

    def _record_length(self, record: dict, entry: DatasetEntry) -> int:
        """The record's ``length`` field when it is a plausible token count, else the estimate; 1 when even
        the estimate fails on odd values (the sample's own build then names the problem)."""
        given = record.get("length")
        if isinstance(given, int) and not isinstance(given, bool) and 0 < given < 2**31:
            return given
        try:
            return self._estimate_length(record, sample_type(record), entry)
        except Exception as exc:  # noqa: BLE001 - e.g. a width of 10**4000 overflows a float
            if is_run_error(exc):
                raise
            return 1

    def _estimate_length(self, record: dict, kind: str, entry: DatasetEntry) -> int:
        """Text characters / 3 plus the image tokens of the planned tiles (no tokenizer, no pixels)."""
        cfg = self.config
        chars = sum(len(t.get("value", "")) for t in record.get("conversations") or () if isinstance(t, dict)
                    and isinstance(t.get("value"), str))
        tokens = math.ceil(chars / 3)
        if kind in ("image", "multi_image"):
            images = record["image"] if isinstance(record["image"], list) else [record["image"]]
            budget = self._max_patches(entry)
            if len(images) > 1:
                budget = max(1, budget // len(images))
            widths = record.get("width_list") or [record.get("width")] * len(images)
            heights = record.get("height_list") or [record.get("height")] * len(images)
            for w, h in zip(widths, heights):
                tokens += 2 + cfg.num_image_token * self._planned_tiles(w, h, budget)
        elif kind == "video":
            tokens += cfg.max_num_frame * (cfg.num_image_token + 2 + 6)  # "Frame-i: " prefixes
        return max(1, tokens)

    def _planned_tiles(self, width: Any, height: Any, budget: int) -> int:
        cfg = self.config
        if not cfg.dynamic_image_size:
            return 1
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
            return _cached_plan(width, height, *_tile_range(cfg.min_dynamic_patch, budget), cfg.image_size,
                                cfg.use_thumbnail)[2]
        low, high = _tile_range(cfg.min_dynamic_patch, budget)
        return high + (1 if cfg.use_thumbnail and high > 1 else 0)

    @property
    def lengths(self) -> list[int]:
        """Token length per index (for length-grouped sampling); see the module docstring."""
        scans = self._scan_records()
        return np.concatenate(
            [scan[0][source.indices] for scan, source in zip(scans, self.sources)] or [np.zeros(0, np.int64)]
        ).tolist()

    @property
    def length(self) -> list[int]:
        """Alias of :attr:`lengths` (the official datasets' attribute name)."""
        return self.lengths

    def sample_types(self) -> dict[str, int]:
        """How many indices are of each sample type (``invalid`` for records that cannot be read).

        Parses every record once (cached); records whose length came from the sidecar are parsed too.
        """
        counts: Counter[str] = Counter()
        names = (*SAMPLE_TYPES, _INVALID)
        for k, source in enumerate(self.sources):
            lengths, types = self._scan_records()[k]
            if (types < 0).any():
                sidecar_only = types < 0
                for j, raw in source.iter_raw():
                    if sidecar_only[j]:
                        types[j] = self._scan_record(source, j, raw)[0]
            values, numbers = np.unique(types[source.indices], return_counts=True)
            for value, number in zip(values.tolist(), numbers.tolist()):
                counts[names[value]] += number
        return {name: counts.get(name, 0) for name in names}


def build_dataset(meta_path: str | os.PathLike, tokenizer: Any, config: DataConfig) -> SupervisedDataset:
    """Load the meta file and build the concatenated dataset; raises if it holds no sample at all."""
    dataset = SupervisedDataset(load_meta(meta_path), tokenizer, config)
    if len(dataset) == 0:
        raise ValueError(f"meta file {meta_path} yields no samples (empty annotation files or tiny repeat_time)")
    for source in dataset.sources:
        logger.info(
            "dataset %r: %d records in %s, %d samples per epoch (repeat_time %s)",
            source.entry.name, source.num_records, source.path, len(source.indices), source.entry.repeat_time,
        )
    return dataset
