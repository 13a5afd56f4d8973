"""Score a JSONL file of predictions with one metric: ``python -m eval.score --metric NAME --pred FILE``.

The command-line contract (scripts outside the project rely on it):

* FILE holds one JSON object per line: ``"prediction"`` (str) and either ``"answers"`` (list of str) or ``"answer"``
  (str; for ``iou_acc`` a pixel box ``[x1, y1, x2, y2]`` with ``"width"`` and ``"height"``), plus ``"options"``
  (``{"A": "...", ...}``) for ``mc_acc``; optional ``"category"`` / ``"image"`` for ``yesno``. Blank lines are
  skipped.
* stdout gets exactly one JSON object, ``{"metric": NAME, "score": <fraction>, "n": <samples>, ...extras}``, and the
  exit status is 0. Per-sample scores go to ``--per-sample OUT.jsonl`` only, never to stdout.
* A malformed line prints ``FILE:LINE: problem`` on stderr and exits 2; so do an unreadable or empty file. An
  unknown metric is an argparse error (exit 2) listing the names. Warnings go to stderr.

``--textbook`` fixes the official scripts' quirks (see each metric's module); the default reproduces them.
``--style pope|mme`` picks the yes/no parsing of ``yesno`` (default pope).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from eval.metrics import METRICS, MetricInputError, compute
from eval.metrics.yesno import STYLES

__all__ = ["main", "read_records"]


class InputFileError(Exception):
    """A problem with the input file, already worded as ``FILE[:LINE]: problem``."""


def read_records(path: str) -> tuple[list[dict], list[int]]:
    """The JSON objects of a JSONL file and the 1-based line number of each."""
    records, lines = [], []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputFileError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
                except ValueError as err:  # e.g. an integer literal past Python's digit limit
                    raise InputFileError(f"{path}:{lineno}: invalid JSON ({err})") from None
                if not isinstance(record, dict):
                    raise InputFileError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
                lines.append(lineno)
    except OSError as err:
        raise InputFileError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise InputFileError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not records:
        raise InputFileError(f"{path}: no records (the file is empty or blank)")
    return records, lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metric", required=True, choices=list(METRICS), help="metric name")
    parser.add_argument("--pred", required=True, metavar="FILE", help="JSONL predictions (see module docstring)")
    parser.add_argument("--textbook", action="store_true", help="fix the official scripts' quirks")
    parser.add_argument("--style", choices=STYLES, help="yesno only: POPE (default) or MME parsing and figures")
    parser.add_argument("--per-sample", metavar="OUT", help="also write each line's score to OUT (JSONL)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.style is not None and args.metric != "yesno":
        parser.error("--style applies to --metric yesno only")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    options = {"style": args.style} if args.style else {}
    try:
        records, lines = read_records(args.pred)
        result = compute(args.metric, records, textbook=args.textbook, **options)
    except InputFileError as err:
        print(err, file=sys.stderr)
        return 2
    except MetricInputError as err:
        print(f"{args.pred}:{lines[err.index]}: {err.message}", file=sys.stderr)
        return 2
    per_sample = result.pop("per_sample")
    if args.per_sample:
        with open(args.per_sample, "w", encoding="utf-8") as out:
            for lineno, score in zip(lines, per_sample):
                out.write(json.dumps({"line": lineno, "score": score}) + "\n")
    # allow_nan=False: the contract promises JSON; a NaN here would be a bug in a metric, so fail loudly.
    print(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
