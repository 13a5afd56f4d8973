#!/usr/bin/env python
"""Draw the loss curve of a fine-tuning run (training loss and any eval losses) to a PNG.

    python tools/plot_loss.py work_dirs/demo/run            # writes work_dirs/demo/run/loss_curve.png
    python tools/plot_loss.py RUN_DIR --out curve.png
"""

import argparse
import sys

from internvl_chat.train.loss_curve import plot_loss_curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="output folder of a run (holds trainer_state.json)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/loss_curve.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_loss_curve(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_loss.py: error: {err}", file=sys.stderr)
        return 2
    print(f"loss curve written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
