#!/usr/bin/env python
"""Write a small synthetic dataset (images + JSONL + meta JSON) in the official format, and a held-out split.

    python tools/make_demo_data.py work_dirs/demo_data --num-images 24                 # training data only
    python tools/make_demo_data.py work_dirs/demo_data --num-images 96 --heldout 60    # + heldout.jsonl, eval_meta.json

The held-out split uses the same generator with another seed (--heldout-seed): pictures the training data never
shows, one question per line (colour, shape, count, grounding), each naming its metric. Evaluate it with
`sh eval/evaluate.sh MODEL work_dirs/demo_data/heldout.jsonl`, or during training with
`--eval_meta_path work_dirs/demo_data/eval_meta.json`.
"""

import argparse
from pathlib import Path

from internvl_chat.demo_data import make_demo_dataset, make_heldout_split


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=0, help="held-out questions to write (0: none)")
    parser.add_argument("--heldout-seed", type=int, default=None, help="default: --seed + 1")
    args = parser.parse_args(argv)
    meta = make_demo_dataset(args.out_dir, num_images=args.num_images, seed=args.seed)
    print(f"demo dataset written; meta JSON: {meta}")
    if args.heldout:
        seed = args.seed + 1 if args.heldout_seed is None else args.heldout_seed
        if seed == args.seed:
            parser.error("--heldout-seed must differ from --seed: the held-out pictures would be the training ones")
        eval_meta = make_heldout_split(args.out_dir, num_images=args.heldout, seed=seed)
        print(f"held-out split written: {Path(args.out_dir) / 'heldout.jsonl'}; eval meta JSON: {eval_meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
