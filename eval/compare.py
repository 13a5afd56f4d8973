"""Two evaluation runs side by side: `python -m eval.compare BEFORE_DIR AFTER_DIR`.

Reads the `metrics.json` that `eval/evaluate.sh` wrote into each folder and prints one row per dataset and metric
(and per category / sample kind of your own data): the score of each run, the change, and for `iou_acc` the mean IoU
too. The usual pair is the base checkpoint and the fine-tuned one on the same held-out set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_metrics(path: str | Path) -> dict:
    """metrics.json of a run folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a folder written by eval/evaluate.sh (--out-dir)")
    return json.loads(path.read_text())


def _rows(metrics: dict) -> dict[tuple[str, str], dict]:
    """(row label, metric) -> figures, for the results and the per-category/kind breakdown."""
    rows = {}
    for row in metrics.get("results", []):
        rows[(row["dataset"], row["metric"])] = row
    for row in metrics.get("breakdown", []):
        rows[("  " + row["group"], row["metric"])] = row
    return rows


def compare(before: dict, after: dict) -> list[dict]:
    """Rows present in both runs, in the after-run's order: label, metric, n, before, after, delta (+ mean IoU)."""
    old, new = _rows(before), _rows(after)
    out = []
    for key, row in new.items():
        if key not in old:
            continue
        entry = {"label": key[0], "metric": key[1], "n": row["n"], "before": old[key]["score"],
                 "after": row["score"], "delta": row["score"] - old[key]["score"]}
        if "mean_iou" in row:
            entry["mean_iou_before"], entry["mean_iou_after"] = old[key].get("mean_iou", 0.0), row["mean_iou"]
        out.append(entry)
    return out


def format_comparison(rows: list[dict], names: tuple[str, str] = ("before", "after"),
                      extra: dict[str, dict[str, str]] | None = None) -> str:
    """A plain-text table; `extra` adds columns: {column name: {(row label stripped, metric): text}}."""
    extra = extra or {}
    header = ["", "metric", "n", names[0], names[1], "change", "mean IoU", *extra]
    lines = [header]
    for r in rows:
        iou = (f"{r['mean_iou_before']:.3f} -> {r['mean_iou_after']:.3f}" if "mean_iou_after" in r else "")
        key = (r["label"].strip(), r["metric"])
        lines.append([r["label"], r["metric"], str(r["n"]), f"{100 * r['before']:.1f}", f"{100 * r['after']:.1f}",
                      f"{100 * r['delta']:+.1f}", iou, *(col.get(key, "") for col in extra.values())])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            .rstrip() for line in lines]
    text.insert(1, "-" * max(len(t) for t in text))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="folder (or metrics.json) of the first run")
    parser.add_argument("after", help="folder (or metrics.json) of the second run")
    parser.add_argument("--names", nargs=2, default=("before", "after"), metavar=("FIRST", "SECOND"))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = compare(load_metrics(args.before), load_metrics(args.after))
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        print(f"eval.compare: error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("eval.compare: error: the two runs share no dataset and metric", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_comparison(rows, tuple(args.names)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
