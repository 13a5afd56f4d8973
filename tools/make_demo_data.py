#!/usr/bin/env python
"""Write a small synthetic dataset (images + JSONL + meta JSON) in the official format.

    python tools/make_demo_data.py work_dirs/demo_data --num-images 24
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from internvl_chat.demo_data import make_demo_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    meta = make_demo_dataset(args.out_dir, num_images=args.num_images, seed=args.seed)
    print(f"demo dataset written; meta JSON: {meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
