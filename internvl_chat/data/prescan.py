"""Fast structural pass over every annotation line before training (issue 13 item 2).

``finetune.early_checks`` calls :func:`prescan_for_training` after reading the meta file and before any process
group or model load, so data that training would mostly skip stops the run in seconds, not after many steps.

Each record goes through the steps of the training dataset's own build path
(:meth:`~internvl_chat.data.dataset.SupervisedDataset.build_item`) that need no decoding and no tokenizer, with the
same functions: :func:`~internvl_chat.data.records.parse_json_line`, the format conversion and validation gate
(:func:`~internvl_chat.data.formats.to_official`, then :func:`~internvl_chat.data.validation.sample_of`), and for
every image and video the path join (:func:`~internvl_chat.data.paths.join_media_path`, ``--confine_paths``
honoured) and the ``stat`` the loaders do first (:func:`~internvl_chat.data.media.check_media_path`: exists, is a
regular file; a video may be a frame folder). A record found bad here is skipped by training with the same kind
and reason. What only decoding or the tokenizer finds (corrupt or truncated images, unreadable videos,
over-long samples) passes here and is still counted by training's
:class:`~internvl_chat.data.errors.BadDataTracker`; ``tools/check_data.py`` checks all of it.

The bad fraction is the checker's (:mod:`~internvl_chat.data.check`): distinct bad records over the distinct
records one epoch visits (a fractional ``repeat_time``: the seeded subset that
:func:`~internvl_chat.data.meta.expand_indices` draws for training); repeats do not weigh. Above
``--max_bad_fraction`` (under ``--bad_data fail``: any bad record visited) :class:`PrescanError` carries the
summary to print; below it, the caller gets one line to log. One process: the pass costs about what parsing and
validating the JSON costs (tens of thousands of records per second), a ``stat`` per distinct media path.
"""

from __future__ import annotations

import time
import types
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from internvl_chat.data import formats
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import header_size_fn
from internvl_chat.data.errors import DataError, record_error
from internvl_chat.data.media import check_media_path
from internvl_chat.data.meta import DatasetEntry, expand_indices, samples_per_epoch
from internvl_chat.data.paths import join_media_path
from internvl_chat.data.records import Annotation, parse_json_line
from internvl_chat.data.report import Problem
from internvl_chat.data.validation import sample_of

__all__ = ["PrescanError", "prescan_for_training"]

MAX_SHOWN = 10  # bad lines quoted in the message; tools/check_data.py lists every one
DEFAULT_MAX_BAD_FRACTION = 0.01  # DataTrainingArguments.max_bad_fraction's default, for callers without the flag


class PrescanError(Exception):
    """Training cannot start on this data (too much of it is bad, or a data flag is wrong): the message is what to
    print (exit code 2)."""


def prescan_for_training(values: Mapping[str, Any], entries: Sequence[DatasetEntry],
                         annotations: Sequence[Annotation]) -> str:
    """Check every record of every entry structurally (no decoding); raise PrescanError above the bad fraction.

    ``values``: the parsed flags (official names: meta_path, max_bad_fraction, bad_data, conv_style, ...);
    ``entries``: the meta file's DatasetEntry list; ``annotations``: the indexed Annotation of each entry (same
    order). Returns one line for the log: how many records were checked and, when some are bad but within the
    limit, how many training will skip."""
    started = time.perf_counter()
    config = _config(values)
    limit = values.get("max_bad_fraction")
    limit = DEFAULT_MAX_BAD_FRACTION if limit is None else float(limit)
    visited = bad = 0
    kinds: Counter[str] = Counter()
    shown: list[Problem] = []
    for entry, annotation in zip(entries, annotations, strict=True):
        samples_per_epoch(entry, annotation.num_records)  # MetaError (exit 2) as the dataset raises at start-up
        problems = _scan(entry, annotation, config)
        records = np.unique(expand_indices(annotation.num_records, entry.repeat_time, (config.seed, entry.name)))
        visited += len(records)
        in_epoch = np.zeros(annotation.num_records, bool)
        in_epoch[records] = True
        for record, problem in problems:  # in file order
            if in_epoch[record]:
                bad += 1
                kinds[problem.kind] += 1
                if len(shown) < MAX_SHOWN:
                    shown.append(problem)
    seconds = time.perf_counter() - started
    if not bad:
        return f"data pre-scan: {visited} records checked in {seconds:.1f} s, none structurally bad"
    fraction = bad / visited
    percent = f"{fraction:.1%}" if fraction >= 0.001 else f"{100 * fraction:.2g}%"  # 1 of 20,000: not "0.0%"
    by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    hint = f"`python tools/check_data.py --meta_path {values.get('meta_path') or 'META'}`"
    if config.bad_data == "fail" or fraction > limit:
        if config.bad_data == "fail":
            head = (f"{bad} of {visited} records ({percent}) are bad and --bad_data fail stops at the first "
                    "one (--bad_data skip skips them)")
        else:
            head = (f"{bad} of {visited} records ({percent}) are bad, above --max_bad_fraction {limit:g}: "
                    "training would skip them")
        lines = [head, f"  by kind: {by_kind}", *(f"  {problem}" for problem in shown)]
        if bad > len(shown):
            lines.append(f"  ... and {bad - len(shown)} more")
        way_out = "use --bad_data skip" if config.bad_data == "fail" else "raise --max_bad_fraction"
        lines.append(f"  {hint} lists every problem (decoding included); fix the data or {way_out}")
        raise PrescanError("\n".join(lines))
    return (f"data pre-scan: {visited} records checked in {seconds:.1f} s; {bad} ({percent}) are bad, within "
            f"--max_bad_fraction {limit:g}, and training will skip them ({by_kind}); {hint} lists them")


def _config(values: Mapping[str, Any]) -> DataConfig:
    """The run's data settings as training builds them (its seed: ``--data_seed``, else ``--seed``)."""
    seed = values.get("data_seed") or values.get("seed")
    overrides = {} if seed is None else {"seed": seed}
    try:
        return DataConfig.from_args(types.SimpleNamespace(**values), **overrides)
    except (TypeError, ValueError) as exc:  # a wrong data flag (--conv_style nope): one line, exit code 2
        raise PrescanError(f"data settings: {exc}") from exc


def _scan(entry: DatasetEntry, annotation: Annotation, config: DataConfig) -> list[tuple[int, Problem]]:
    """``(record index, problem)`` of every structurally bad record of one annotation file, in file order."""
    media: dict[tuple[str, str], DataError | None] = {}  # a path's verdict, once per pass: datasets reuse images
    size_fn = header_size_fn(entry, config)
    found = []
    for k, raw in annotation.iter_raw():
        line = annotation.line_of(k)
        try:
            record = formats.to_official(parse_json_line(raw), entry.format, file=entry.annotation, line=line,
                                         image_size_fn=size_fn)
            sample = sample_of(record)
            paths = [("image", p) for p in sample.images] + ([("video", sample.video)] if sample.video else [])
            for key in paths:
                if key not in media:
                    media[key] = _media_error(entry.root, key[1], key[0], config.confine_paths)
            err = next((media[key] for key in paths if media[key] is not None), None)
            if err is not None:
                found.append((k, Problem.from_error(err, entry.name, entry.annotation, line)))
        except Exception as exc:  # noqa: BLE001 - every error of one record is that record's, as in the dataset
            err = record_error(exc, "checking the record")
            if err is None:
                raise
            found.append((k, Problem.from_error(err, entry.name, entry.annotation, line)))
    return found


def _media_error(root: str, path: str, what: str, confine: bool) -> DataError | None:
    """What the loaders would refuse before decoding: the path join (``--confine_paths``) and the ``stat``."""
    try:
        check_media_path(join_media_path(root, path, confine), what=what, allow_dir=what == "video")
    except DataError as err:
        return err
    return None

