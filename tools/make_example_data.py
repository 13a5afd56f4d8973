#!/usr/bin/env python
"""Write the small example dataset that ships in shell/data/example/ and its meta file shell/data/example_finetune.json.

    python tools/make_example_data.py                      # rewrite the shipped copy
    python tools/make_example_data.py --out my_dir         # elsewhere: my_dir/meta.json with absolute paths

The samples come from the demo's generator (`internvl_chat.demo_data`: drawn shapes with single-image, grounding,
two-image and text-only samples, multi-turn included); this only fixes their number and seed, and, for the shipped
copy, writes the meta file with paths relative to the repository root, where the launchers run, like the official
`shell/data/*.json` files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from internvl_chat.demo_data import make_demo_dataset

SHIPPED_DIR = REPO / "shell" / "data" / "example"
SHIPPED_META = REPO / "shell" / "data" / "example_finetune.json"
NUM_IMAGES = 6
SEED = 0


def write(out: Path, num_images: int = NUM_IMAGES, seed: int = SEED) -> Path:
    """Write the dataset under `out`; returns its meta file (repo-relative paths for the shipped copy)."""
    out = out.resolve()
    meta_path = make_demo_dataset(out, num_images=num_images, seed=seed)
    if out != SHIPPED_DIR:
        return meta_path
    meta = json.loads(meta_path.read_text())
    for entry in meta.values():
        for key in ("root", "annotation"):
            entry[key] = Path(entry[key]).resolve().relative_to(REPO).as_posix()
    meta_path.unlink()
    SHIPPED_META.write_text(json.dumps(meta, indent=2) + "\n")
    return SHIPPED_META


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="dataset folder (default: the shipped copy)")
    parser.add_argument("--num-images", type=int, default=NUM_IMAGES)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    meta_path = write(args.out, args.num_images, args.seed)
    print(f"example dataset written under {args.out.resolve()}; meta file {meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
