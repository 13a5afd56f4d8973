"""Validate every line of every dataset of a meta file before a GPU is rented.

    python tools/check_data.py --meta_path data/meta.json --model work_dirs/InternVL2_5-1B \\
        --max_dynamic_patch 6 --max_seq_length 8192

Checks JSON, the record format, roles and their order, ``<image>``/``<video>`` placeholders against
the media, grounding boxes, that every image exists and decodes and every video decodes, and (with
``--model`` or ``--tokenizer``/``--template``) tokenizes each sample with the real template and
tokenizer, catching over-length samples. Prints samples per dataset and per type, the tile,
token-length and supervised-token distributions, and every bad line grouped by kind with file:line
and reason. Writes the exact token lengths as ``<annotation>.lengths.npy`` beside each annotation
file (the dataset reads them for length-grouped sampling); annotation and meta files are never
modified.

Media are read as training reads them, with the same bounds: an image over ``--max_image_pixels``
(from its header, never decoded), a truncated image (unless ``--allow_truncated_images``), a video
over ``--max_video_frames`` / ``--max_video_seconds``, and a media path that is not a regular file
(FIFO, device, directory, symlink loop) are each a bad line with its kind; nothing can block.

Without ``--model`` the summary's header says which template and tiling its numbers assume and how to match
the training run.

Also lists warnings that do not fail the check: two turns of the same role in a row, a conversation that
opens with a gpt turn or ends on a human turn, a key that looks like a misspelled image/video key, image/video
paths that resolve outside the dataset root (with ``--confine_paths``, as training with that flag, they
are bad samples instead), unknown meta keys with the nearest known one.

Exit code: 0 when training can start, 1 when it cannot (``--policy fail``: any bad sample;
``--policy skip``: more than ``--max-bad-fraction`` bad per epoch; either: samples that would crash
training), 2 for a bad command line, meta file (the message training would stop with) or tokenizer. The engine is
``internvl_chat.data.check.check_dataset``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from internvl_chat.cli.data_args import SetupError, add_data_arguments, setup_from_args
from internvl_chat.data.check import check_dataset
from internvl_chat.data.meta import MetaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta_path", "--meta-path", dest="meta_path", required=True, help="the meta JSON file")
    add_data_arguments(parser)
    run = parser.add_argument_group("checking")
    run.add_argument("--policy", choices=("fail", "skip"), default="fail",
                     help="fail: any bad sample fails the check (default); skip: only more than "
                          "--max-bad-fraction bad samples per epoch does, as in training")
    run.add_argument("--max-bad-fraction", "--max_bad_fraction", dest="max_bad_fraction", type=float, default=0.01,
                     help="with --policy skip: the bad fraction allowed (default 0.01)")
    run.add_argument("--workers", type=int, default=1, help="processes checking records in parallel (default 1)")
    lengths = run.add_mutually_exclusive_group()
    lengths.add_argument("--write-lengths", dest="write_lengths", action="store_true", default=None,
                         help="write <annotation>.lengths.npy (default when a tokenizer is given)")
    lengths.add_argument("--no-write-lengths", dest="write_lengths", action="store_false",
                         help="do not write length sidecars")
    run.add_argument("--allow-truncation", action="store_true",
                     help="report samples that training truncates (keeping their image blocks) as warnings, "
                          "not errors")
    run.add_argument("--max-examples", type=int, default=10, help="problems shown per kind in the text summary")
    run.add_argument("--json", action="store_true", help="print a machine-readable JSON report instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    from internvl_chat.console import install

    install()  # third-party warnings: internvl_chat/console.py
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        parser.error("--max-bad-fraction must be in [0, 1]")
    try:
        tokenizer, config, tokenizer_name = setup_from_args(args)
        if args.write_lengths and tokenizer is None:
            raise SetupError("--write-lengths needs token lengths: pass --model or --tokenizer/--template")
        report = check_dataset(
            args.meta_path, tokenizer, config, workers=args.workers, write_lengths=args.write_lengths,
            allow_truncation=args.allow_truncation, tokenizer_name=tokenizer_name,
            progress=_progress_printer() if sys.stderr.isatty() and not args.json else None,
        )
    except (SetupError, MetaError) as exc:
        print(f"check_data: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(report.to_dict(args.policy, args.max_bad_fraction, from_model=bool(args.model)), sys.stdout,
                  indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(report.format(args.policy, args.max_bad_fraction, max_examples=args.max_examples,
                            from_model=bool(args.model)))
    return report.exit_code(args.policy, args.max_bad_fraction)


def _progress_printer():
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 1.0 and done != total:
            return
        last[0] = now
        of = f"/{total}" if total else ""
        sys.stderr.write(f"\rchecked {done}{of} records")
        if total and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


if __name__ == "__main__":
    raise SystemExit(main())
