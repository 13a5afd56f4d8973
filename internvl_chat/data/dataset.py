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

Annotation files are read by :mod:`~internvl_chat.data.records` (a byte-offset index per file, so
workers read one record at a time; its line numbers are the checker's and the inspector's).

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

Validation happens once, in :mod:`~internvl_chat.data.validation` (roles, placeholders, boxes,
reserved tokens, ...); item building trusts it. Stricter than the official code, on purpose (each is a
silent mistrain or a crash there): the number of ``<image>`` placeholders must equal the number of images
(official: extra placeholders stayed in the text as plain words), ``<image>``/``<video>`` in a text-only sample is an
error (it almost always lost its ``image`` field), and over-long samples that would lose image tokens
or every supervised token are errors (``too_long``). A missing placeholder is inserted in the first
*human* turn (official: ``conversations[0]``, whatever its role, which broke samples with a system
turn).

Lengths for length-grouped sampling (:attr:`SupervisedDataset.lengths`), per annotation file, first
found wins: a sidecar ``<annotation>.lengths.npy`` (:func:`~internvl_chat.data.records.write_lengths_sidecar`),
the record's ``length`` field, a cheap estimate (text characters / 3 + image tokens of the planned tiles, from
``width``/``height`` when present, else the maximum tiles). Computed on first use only. The same scan gives
the tiles per sample (:attr:`SupervisedDataset.tiles`, exact from ``width``/``height``, else unknown) that packing
plans its tile budget with.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from internvl_chat.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_END_TOKEN, VIDEO_PLACEHOLDER
from internvl_chat.data import formats, video
from internvl_chat.data.config import DataConfig, image_tile_range
from internvl_chat.data.errors import DataError, TooMuchBadDataError, is_run_error, record_error
from internvl_chat.data.meta import DatasetEntry, expand_indices, load_meta, samples_per_epoch
from internvl_chat.data.paths import join_media_path
from internvl_chat.data.records import Annotation, index_annotation, parse_json_line, read_lengths_sidecar
from internvl_chat.data.templates import SampleTooLongError, TokenizerError, get_template, tokenize_conversation
from internvl_chat.data.tiling import canvas_size, plan_tiles
from internvl_chat.data.transforms import ImageLoadError, image_size, image_to_tiles, load_image
from internvl_chat.data.validation import SAMPLE_TYPES, Sample, sample_of, sample_type

__all__ = [
    "UNKNOWN_TILES",
    "SupervisedDataset",
    "build_dataset",
]

logger = logging.getLogger(__name__)

UNKNOWN_TILES = -1  # SupervisedDataset.tiles of a sample whose tile count only decoding tells
_INVALID = "invalid"



# --------------------------------------------------------------------------------------------
# Annotation files: indexing and raw access


@dataclass
class _Source:
    """One annotation file of the meta: its index (:class:`~internvl_chat.data.records.Annotation`) and which
    records an epoch visits."""

    entry: DatasetEntry
    annotation: Annotation
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # record per local index

    @property
    def path(self) -> str:
        return self.entry.annotation

    @property
    def num_records(self) -> int:
        return self.annotation.num_records

    def line_of(self, record: int) -> int:
        return self.annotation.line_of(record)

    def raw(self, record: int) -> bytes:
        return self.annotation.raw(record)

    def iter_raw(self) -> Iterator[tuple[int, bytes]]:
        return self.annotation.iter_raw()


def _index_source(entry: DatasetEntry, seed: int, annotation: Annotation | None = None) -> _Source:
    source = _Source(entry, annotation if annotation is not None else index_annotation(entry.annotation))
    samples_per_epoch(entry, source.num_records)  # MetaError for an empty file or an absurd repeat_time
    source.indices = expand_indices(source.num_records, entry.repeat_time, (seed, entry.name))
    return source


# --------------------------------------------------------------------------------------------
# Record helpers


def header_size_fn(entry: DatasetEntry, config: DataConfig):
    """``path -> (width, height)`` from the image header, for ms-swift boxes given in pixels."""

    def size(rel: str) -> tuple[int, int]:
        # The checks of _load_image (regular file, pixel limit), so a FIFO cannot hang the start-up scan.
        path = join_media_path(entry.root, rel, config.confine_paths)
        try:
            return image_size(path, exif_transpose=config.exif_transpose, max_image_pixels=config.max_image_pixels,
                              allow_truncated=config.allow_truncated_images)
        except ImageLoadError as exc:
            raise DataError(str(exc), kind=exc.kind) from exc

    return size


# Datasets repeat a few image sizes many times: plan each once while estimating lengths.
_cached_plan = functools.lru_cache(maxsize=1 << 16)(plan_tiles)


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

    def __init__(self, entries: Sequence[DatasetEntry], tokenizer: Any, config: DataConfig,
                 annotations: Sequence[Annotation] | None = None) -> None:
        """``annotations``: the entries' files indexed already (training's early checks read each once)."""
        if not entries:
            raise ValueError("SupervisedDataset needs at least one dataset entry")
        self.tokenizer = tokenizer
        self.config = config
        self.entries = list(entries)
        self.template = get_template(config.template)
        indexed = list(annotations) if annotations is not None else [None] * len(self.entries)
        self.sources = [_index_source(entry, config.seed, ann) for entry, ann in zip(self.entries, indexed)]
        sizes = np.array([len(s.indices) for s in self.sources], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # Shared memory: set_epoch reaches dataloader workers that are already running.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._scan: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
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
            raw = parse_json_line(source.raw(record_index))
            record = formats.to_official(
                raw, source.entry.format, file=source.path, line=line, image_size_fn=self._size_fn(source.entry)
            )
        except Exception as exc:  # noqa: BLE001 - see build_item
            err = _as_record_error(exc, "reading the record", source.path, line)
            if err is exc:
                raise
            raise err from exc
        return record

    def _size_fn(self, entry: DatasetEntry):
        return header_size_fn(entry, self.config)

    def _single_token_id(self, token: str) -> int | None:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def _max_patches(self, entry: DatasetEntry) -> int:
        return entry.max_dynamic_patch or self.config.max_dynamic_patch

    def _load_image(self, root: str, rel: str, draft: tuple[int, int] | None = None) -> Any:
        cfg = self.config
        path = join_media_path(root, rel, cfg.confine_paths)
        try:  # load_image names the problem: missing_file, not_a_file, image_too_large, truncated_image, ...
            return load_image(
                path,
                exif_transpose=cfg.exif_transpose,
                rescale_high_bit_depth=cfg.rescale_high_bit_depth,
                max_image_pixels=cfg.max_image_pixels,
                allow_truncated=cfg.allow_truncated_images,
                draft=draft,
            )
        except ImageLoadError as exc:
            raise DataError(str(exc), kind=exc.kind) from exc

    def _tile_range(self, entry: DatasetEntry, num_images: int) -> tuple[int, int]:
        """(min_num, max_num) tiles per image of a sample with ``num_images`` images from ``entry``."""
        return image_tile_range(self._max_patches(entry), num_images, self.config.min_dynamic_patch)

    def _tiles(self, image: Any, tile_range: tuple[int, int], rng: random.Random | None,
               dynamic: bool | None = None) -> torch.Tensor:
        cfg = self.config
        min_num, max_num = tile_range
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
        """One item from an official record that passed the gate (:mod:`~internvl_chat.data.validation`, which
        :func:`~internvl_chat.data.formats.to_official` applies): pixels by sample type, then tokens."""
        sample = sample_of(record)
        video_rng, jpeg_rng = rngs
        augment = jpeg_rng if entry.data_augment else None
        if sample.kind == "video":
            pixel_values, num_tokens = self._video_pixels(sample, entry, video_rng, augment)
        elif sample.kind == "text":
            pixel_values, num_tokens = self._text_pixels(), None
        else:
            pixel_values, num_tokens = self._image_pixels(sample, entry, augment)
        input_ids, labels = self._tokenize(sample.turns, num_tokens)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "image_flags": torch.full((pixel_values.shape[0],), int(num_tokens is not None), dtype=torch.long),
            "num_supervised": int((labels != IGNORE_INDEX).sum()),
        }

    def _image_pixels(self, sample: Sample, entry: DatasetEntry,
                      augment: random.Random | None) -> tuple[torch.Tensor, list[int]]:
        """Every image's tiles and context tokens; a lone image without ``<image>`` gets ``"<image>\\n"`` in front
        of the first human turn (official: of ``conversations[0]``, whatever its role)."""
        if len(sample.images) == 1 and not any(IMAGE_PLACEHOLDER in turn["value"] for turn in sample.turns):
            first = sample.first_human_turn()
            first["value"] = IMAGE_PLACEHOLDER + "\n" + first["value"]
        tile_range = self._tile_range(entry, len(sample.images))
        tiles = [self._image_tiles(entry, p, tile_range, augment) for p in sample.images]
        return torch.cat(tiles), [self.config.num_image_token * int(t.shape[0]) for t in tiles]

    def _image_tiles(self, entry: DatasetEntry, rel: str, tile_range: tuple[int, int],
                     augment: random.Random | None) -> torch.Tensor:
        """One image's tiles. With ``fast_image_decode`` the grid is planned from the header's size, as the exact
        path plans it from the decoded one, and a JPEG is decoded only as large as that grid's canvas."""
        cfg = self.config
        if not (cfg.fast_image_decode and cfg.dynamic_image_size):
            return self._tiles(self._load_image(entry.root, rel), tile_range, augment)
        size = header_size_fn(entry, cfg)(rel)
        image = self._load_image(entry.root, rel, draft=canvas_size(*size, *tile_range, cfg.image_size,
                                                                    cfg.use_thumbnail))
        # a reduced decode is smaller than the header says; any other difference: the decoded image is the truth
        source = size if image.size[0] <= size[0] and image.size[1] <= size[1] else image.size
        min_num, max_num = tile_range
        return image_to_tiles(image, dynamic=True, min_num=min_num, max_num=max_num, image_size=cfg.image_size,
                              use_thumbnail=cfg.use_thumbnail, pad2square=cfg.pad2square,
                              normalize_type=cfg.normalize_type, augment_rng=augment, fast=True, source_size=source)

    def _video_pixels(self, sample: Sample, entry: DatasetEntry, rng: np.random.Generator,
                      augment: random.Random | None) -> tuple[torch.Tensor, list[int]]:
        """One ``image_size`` tile per frame; ``<video>`` (else the first human turn) gets the frame lines."""
        path = join_media_path(entry.root, sample.video, self.config.confine_paths)
        frames = self._read_video(path, sample.clip, rng)
        target = next((t for t in sample.turns if VIDEO_PLACEHOLDER in t["value"]), None) or sample.first_human_turn()
        target["value"] = video.expand_video_placeholder(target["value"], len(frames))
        tiles = [self._tiles(frame, (1, 1), augment, dynamic=False) for frame in frames]
        return torch.cat(tiles), [self.config.num_image_token] * len(tiles)

    def _text_pixels(self) -> torch.Tensor:
        """The official white dummy tile of a text-only sample (its ``image_flags`` is 0)."""
        size = self.config.image_size
        return torch.full((1, size, size, 3), 255, dtype=torch.uint8)

    def _tokenize(self, turns: list[dict[str, str]], num_tokens: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``labels`` of the turns, template failures named as data errors."""
        try:
            tokens = tokenize_conversation(
                turns, self.template, self.tokenizer, num_tokens, max_length=self.config.max_seq_length,
                text_only=num_tokens is None,
            )
        except SampleTooLongError as exc:
            raise DataError(str(exc), kind="too_long") from exc
        except TokenizerError as exc:
            raise DataError(str(exc), kind="tokenizer_error") from exc
        except ValueError as exc:
            message = str(exc)
            kind = "placeholder_count" if IMAGE_PLACEHOLDER in message else "invalid_conversation"
            raise DataError(message, kind=kind) from exc
        input_ids = torch.tensor(tokens["input_ids"], dtype=torch.long)
        if num_tokens is not None and self._end_token_id is not None:  # a tokenizer that merged an image tag
            blocks = int((input_ids == self._end_token_id).sum())
            if blocks != len(num_tokens):
                raise DataError(
                    f"{blocks} image block(s) in the tokens for {len(num_tokens)} image(s)/frame(s)",
                    kind="placeholder_count",
                )
        return input_ids, torch.tensor(tokens["labels"], dtype=torch.long)

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

    def _scan_records(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per source: (length, sample type code, tiles) per record; parsed once, on demand."""
        if self._scan is None:
            self._scan = [self._scan_source(source) for source in self.sources]
        return self._scan

    def _scan_source(self, source: _Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = source.num_records
        lengths = read_lengths_sidecar(source.path, n)
        need_parse = np.ones(n, bool) if lengths is None else lengths <= 0
        if lengths is None:
            lengths = np.zeros(n, np.int64)
        types = np.full(n, -1, np.int8)  # -1: not parsed
        tiles = np.full(n, UNKNOWN_TILES, np.int64)  # records the sidecar spares from parsing stay unknown
        if not need_parse.any():
            return lengths, types, tiles
        for k, raw in source.iter_raw():
            if not need_parse[k]:
                continue
            types[k], record = self._scan_record(source, k, raw)
            if record is not None:
                lengths[k] = self._record_length(record, source.entry)
                tiles[k] = self._record_tiles(record, source.entry)
            else:
                lengths[k] = 1
        return lengths, types, tiles

    def _scan_record(self, source: _Source, k: int, raw: bytes) -> tuple[int, dict | None]:
        """(sample type code, record) of one raw record, or (invalid, None) for any record error.

        Nothing a record holds may escape the start-up scan (a line nested 100,000 deep used to stop a run here
        with a RecursionError naming no line): the scan only estimates, and building the sample reports the
        error by name, file and line.
        """
        try:
            record = formats.to_official(parse_json_line(raw), source.entry.format, file=source.path,
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
            tile_range = self._tile_range(entry, len(images))
            widths = record.get("width_list") or [record.get("width")] * len(images)
            heights = record.get("height_list") or [record.get("height")] * len(images)
            for w, h in zip(widths, heights):
                tokens += 2 + cfg.num_image_token * self._planned_tiles(w, h, tile_range)
        elif kind == "video":
            tokens += cfg.max_num_frame * (cfg.num_image_token + 2 + 6)  # "Frame-i: " prefixes
        return max(1, tokens)

    def _record_tiles(self, record: dict, entry: DatasetEntry) -> int:
        """Tiles the record's sample will hold (a text sample's dummy tile included), planned from its
        ``width``/``height`` as the sample build tiles them; :data:`UNKNOWN_TILES` when that depends on what
        only decoding tells (images without a size, the frames of a video) or the record is odd."""
        kind = sample_type(record)
        if kind == "text":
            return 1
        if kind == "video":
            return UNKNOWN_TILES
        try:
            images = record["image"] if isinstance(record["image"], list) else [record["image"]]
            if not self.config.dynamic_image_size:
                return len(images)
            tile_range = self._tile_range(entry, len(images))
            widths = record.get("width_list") or [record.get("width")] * len(images)
            heights = record.get("height_list") or [record.get("height")] * len(images)
            sizes = [*widths, *heights]
            if len(widths) != len(images) or len(heights) != len(images) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes
            ):
                return UNKNOWN_TILES
            return sum(self._planned_tiles(w, h, tile_range) for w, h in zip(widths, heights))
        except Exception as exc:  # noqa: BLE001 - odd values: the sample's own build names the problem
            if is_run_error(exc):
                raise
            return UNKNOWN_TILES

    def _planned_tiles(self, width: Any, height: Any, tile_range: tuple[int, int]) -> int:
        cfg = self.config
        if not cfg.dynamic_image_size:
            return 1
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
            return _cached_plan(width, height, *tile_range, cfg.image_size, cfg.use_thumbnail)[2]
        high = tile_range[1]  # no size: the most tiles the range allows
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

    @property
    def tiles(self) -> list[int]:
        """Tiles per index, from the same scan as :attr:`lengths` (for the tile budget of packing): exact where
        the record gives the image sizes, :data:`UNKNOWN_TILES` (-1) for videos, images without a size and
        records whose length came from a sidecar (left unparsed)."""
        scans = self._scan_records()
        return np.concatenate(
            [scan[2][source.indices] for scan, source in zip(scans, self.sources)] or [np.zeros(0, np.int64)]
        ).tolist()

    def sample_types(self) -> dict[str, int]:
        """How many indices are of each sample type (``invalid`` for records that cannot be read).

        Parses every record once (cached); records whose length came from the sidecar are parsed too.
        """
        counts: Counter[str] = Counter()
        names = (*SAMPLE_TYPES, _INVALID)
        for k, source in enumerate(self.sources):
            types = self._scan_records()[k][1]
            if (types < 0).any():
                sidecar_only = types < 0
                for j, raw in source.iter_raw():
                    if sidecar_only[j]:
                        types[j] = self._scan_record(source, j, raw)[0]
            values, numbers = np.unique(types[source.indices], return_counts=True)
            for value, number in zip(values.tolist(), numbers.tolist()):
                counts[names[value]] += number
        return {name: counts.get(name, 0) for name in names}


def build_dataset(meta_path: str | os.PathLike, tokenizer: Any, config: DataConfig,
                  read: tuple[Sequence[DatasetEntry], Sequence[Annotation]] | None = None) -> SupervisedDataset:
    """Load the meta file and build the concatenated dataset; raises if it holds no sample at all.

    ``read``: the meta file's entries and indexed annotation files when the caller has read them already (they
    are not read again; the entries' warnings are logged here)."""
    if read is None:
        dataset = SupervisedDataset(load_meta(meta_path), tokenizer, config)
    else:
        for warning in (w for entry in read[0] for w in entry.warnings):
            logger.warning("%s", warning)
        dataset = SupervisedDataset(read[0], tokenizer, config, annotations=read[1])
    if len(dataset) == 0:
        raise ValueError(f"meta file {meta_path} yields no samples (empty annotation files or tiny repeat_time)")
    for source in dataset.sources:
        logger.info(
            "dataset %r: %d records in %s, %d samples per epoch (repeat_time %s)",
            source.entry.name, source.num_records, source.path, len(source.indices), source.entry.repeat_time,
        )
    return dataset
