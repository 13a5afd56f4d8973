#!/usr/bin/env python
"""The demo's before/after table: the tiny model on the held-out split before and after fine-tuning.

    python tools/demo_report.py work_dirs/demo/eval_before work_dirs/demo/eval_after [--require-improvement]

Each row is a question kind of the held-out split (colour, shape, count, grounding) with the accuracy before and
after, and the chance level: what a model that learnt the answer format but not the picture would score.
`--require-improvement` exits 1 unless the held-out accuracy after fine-tuning is above both the before figure and
chance, so `make demo` fails loudly when fine-tuning stops helping.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.compare import compare, format_comparison, load_metrics  # noqa: E402
from internvl_chat.demo_data import HELDOUT_KINDS  # noqa: E402


def accuracy_rows(rows: list[dict]) -> tuple[dict | None, float | None]:
    """The overall vqa_acc row and its chance level (per-kind chance weighted by the number of questions)."""
    overall = next((r for r in rows if r["metric"] == "vqa_acc" and not r["label"].startswith(" ")), None)
    kinds = [(r["n"], HELDOUT_KINDS[kind][1]) for r in rows if r["metric"] == "vqa_acc"
             for kind in [r["label"].strip().removeprefix("category=")]
             if kind in HELDOUT_KINDS and HELDOUT_KINDS[kind][1] is not None]
    total = sum(n for n, _ in kinds)
    chance = sum(n * c for n, c in kinds) / total if total else None
    return overall, chance


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--require-improvement", action="store_true")
    args = parser.parse_args(argv)
    rows = compare(load_metrics(args.before), load_metrics(args.after))
    overall, chance = accuracy_rows(rows)
    chance_col = {(f"category={kind}", metric): f"{100 * c:.1f}" for kind, (metric, c) in HELDOUT_KINDS.items()
                  if c is not None}
    if overall is not None and chance is not None:
        chance_col[(overall["label"].strip(), overall["metric"])] = f"{100 * chance:.1f}"
    print(format_comparison(rows, ("before", "after"), {"chance": chance_col}))
    if overall is None or chance is None:
        print("demo_report: no held-out accuracy row (vqa_acc by category) to judge", file=sys.stderr)
        return 1 if args.require_improvement else 0
    verdict = overall["after"] > overall["before"] and overall["after"] > chance
    print(f"\nheld-out accuracy {100 * overall['before']:.1f}% before fine-tuning, {100 * overall['after']:.1f}% after "
          f"(chance {100 * chance:.1f}%): {'fine-tuning helped' if verdict else 'NO improvement over before/chance'}")
    return 0 if verdict or not args.require_improvement else 1


if __name__ == "__main__":
    raise SystemExit(main())
