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
:func:`~internvl_chat.data.records.write_lengths_sidecar` defines, next to the annotation file.
The annotation and meta files are never modified. The lengths belong to the settings of the check
(template, tiles, ``max_seq_length``, frames): re-run the check when those change.

Warnings (listed, never a reason to fail): consecutive turns of the same role (``same_role_turns``), a ``gpt``
turn first (``assistant_first``) or a ``human`` turn last (``trailing_human_turn``), a key that looks like a
misspelled ``image``/``video``/``conversations`` (``misspelled_key``), image and
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from internvl_chat.constants import IGNORE_INDEX, IMG_END_TOKEN, INTERNVL_SPECIAL_TOKENS
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import SupervisedDataset
from internvl_chat.data.errors import DataError, record_error
from internvl_chat.data.meta import DatasetEntry, load_meta, samples_per_epoch
from internvl_chat.data.paths import resolve_outside_root
from internvl_chat.data.records import write_lengths_sidecar
from internvl_chat.data.report import Collector, Problem, RecordResult, Report
from internvl_chat.data.validation import near_miss_keys, repeated_roles, sample_type, turn_order_warnings

__all__ = ["StandInTokenizer", "check_dataset"]

_CHUNK = 16  # records per task sent to a worker process


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

    def check(self, entry: int, record: int) -> RecordResult:
        dataset = self.datasets[entry]
        name = self.entries[entry].name
        file, line = dataset.locate(record)
        result = RecordResult(entry, record, line)
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
        """What training accepts but is likely a mistake: consecutive turns of one role, a conversation that opens
        with an answer or ends on a question, a misspelled media key, and media paths that resolve outside the
        dataset root (not with ``confine_paths``: then training refuses them, a problem)."""
        meta = self.entries[entry]
        convs = record.get("conversations")
        found = [Problem("same_role_turns", file, line, message, meta.name) for message in repeated_roles(convs)]
        found += [Problem(kind, file, line, message, meta.name) for kind, message in turn_order_warnings(convs)]
        found += [Problem("misspelled_key", file, line, message, meta.name) for _, message in near_miss_keys(record)]
        if self.config.confine_paths:
            return found
        for key, path in _media_paths(record):
            outside = resolve_outside_root(meta.root, path)
            if outside is not None:
                found.append(Problem("path_outside_root", file, line,
                                     f"{key} {path!r} resolves to {outside}, outside the dataset root {meta.root} "
                                     "(training reads it; --confine_paths would skip the sample)", meta.name))
        return found

    def _over_length(self, result: RecordResult, ids: list[int], labels: list[int], limit: int, name: str,
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


def _run_tasks(tasks: list[tuple]) -> list[RecordResult]:
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
    meta_path, entries = _load_entries(meta)

    collector = Collector(entries, keep_per_kind)
    local = _ItemChecker(entries, tokenizer, config, allow_truncation)
    _check_entries(local, collector)
    tasks = _item_tasks(local, collector)
    total = collector.expected_total(local)
    if workers == 1:
        _check_here(local, tasks, collector, progress, total)
    else:
        _check_in_workers(workers, (entries, tokenizer, config, allow_truncation), tasks, collector, progress, total)
    if progress is not None:
        progress(collector.done, total)

    report = collector.report(meta_path, _settings(config, tokenizer, tokenizer_name), tokenizer is not None,
                              config.seed)
    if write_lengths:
        _write_sidecars(report, collector, entries)
    report.seconds = time.perf_counter() - started
    return report


def _load_entries(meta: str | os.PathLike | Sequence[DatasetEntry]) -> tuple[str | None, list[DatasetEntry]]:
    """(absolute meta path or None, entries) of a meta file path or of already loaded entries."""
    if isinstance(meta, (str, os.PathLike)):
        meta_path = os.path.abspath(os.fspath(meta))
        return meta_path, load_meta(meta_path, log_warnings=False)  # warnings: listed in the report instead
    return None, list(meta)


def _check_here(checker: _ItemChecker, tasks: Iterable[tuple], collector: Collector,
                progress: Callable[[int, int], None] | None, total: int) -> None:
    for task in tasks:
        collector.add(checker.check(*task))
        if progress is not None and collector.done % 256 == 0:
            progress(collector.done, total)


def _check_in_workers(workers: int, initargs: tuple, tasks: Iterable[tuple], collector: Collector,
                      progress: Callable[[int, int], None] | None, total: int) -> None:
    context = multiprocessing.get_context("spawn")  # no forked tokenizer threads or torch state
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=initargs,
    ) as pool:
        # Keep a bounded number of chunks in flight so huge files do not queue up in memory.
        pending: list[concurrent.futures.Future] = []
        for chunk in _chunked(tasks, _CHUNK):
            pending.append(pool.submit(_run_tasks, chunk))
            if len(pending) >= 4 * workers:
                for result in pending.pop(0).result():
                    collector.add(result)
                if progress is not None:
                    progress(collector.done, total)
        for future in pending:
            for result in future.result():
                collector.add(result)


def _write_sidecars(report: Report, collector: Collector, entries: Sequence[DatasetEntry]) -> None:
    """The token-length sidecar of every usable file; one that cannot be written is a warning."""
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


def _check_entries(checker: _ItemChecker, collector: Collector) -> None:
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


def _item_tasks(checker: _ItemChecker, collector: Collector) -> Iterable[tuple]:
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
