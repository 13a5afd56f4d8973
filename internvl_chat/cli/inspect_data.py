"""Show one training sample exactly as the model sees it, with the supervised tokens marked.

    python tools/inspect_data.py --meta_path data/meta.json --index 12 --model work_dirs/InternVL2_5-1B
    python tools/inspect_data.py --meta_path data/meta.json --dataset docs --line 845 \\
        --tokenizer tok/ --template internvl2_5 --no-color

The sample is built by the training dataset itself (same template, tokenizer, tiling and
placeholder rules), then its token sequence is decoded token by token. Image blocks are collapsed to
``<img><IMG_CONTEXT>×N</img>`` and listed with their tile count and grid. Supervised tokens (the
ones the loss sees) are green in a terminal, or wrapped in ``[[...]]`` with ``--no-color`` or when
the output is not a terminal. ``--json`` prints ids, labels, per-token strings and image details
for machines; ``--tokens`` prints one token per row; ``--save-tiles DIR`` writes the uint8 tiles
as PNGs.

``--index`` is the dataset index as training uses it (``repeat_time`` included) across all
datasets of the meta file; with ``--dataset NAME`` it is the 0-based record number in that
dataset's annotation file, and ``--line L`` picks the record on line L (the location
``tools/check_data.py`` reports). Exit code 1 when the sample is bad (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from internvl_chat.cli.data_args import SetupError, add_data_arguments, setup_from_args
from internvl_chat.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_chat.data.config import image_tile_range
from internvl_chat.data.dataset import SupervisedDataset
from internvl_chat.data.errors import DataError
from internvl_chat.data.meta import MetaError, load_meta
from internvl_chat.data.tiling import plan_tiles
from internvl_chat.data.transforms import load_image
from internvl_chat.data.validation import sample_type

GREEN, CYAN, DIM, RESET = "\x1b[32m", "\x1b[36m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta_path", "--meta-path", dest="meta_path", required=True, help="the meta JSON file")
    parser.add_argument("--index", type=int, default=0, help="dataset index (see above; default 0)")
    parser.add_argument("--dataset", help="dataset name in the meta file: --index/--line count in its file")
    parser.add_argument("--line", type=int, help="the record on this line of the annotation file")
    add_data_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--no-color", "--no-colour", dest="no_color", action="store_true",
                     help="mark supervised tokens with [[...]] instead of colour")
    out.add_argument("--tokens", action="store_true", help="one token per row (position, id, label, text)")
    out.add_argument("--save-tiles", metavar="DIR", help="write the sample's tiles as PNG files to DIR")
    return parser


# --------------------------------------------------------------------------------------------
# Building the sample


def select(args: argparse.Namespace, tokenizer: Any, config: Any) -> tuple[SupervisedDataset, int]:
    """The dataset to read from and the index in it, from --index / --dataset / --line."""
    entries = load_meta(args.meta_path)
    if args.dataset is not None:
        chosen = [e for e in entries if e.name == args.dataset]
        if not chosen:
            raise SetupError(f"no dataset {args.dataset!r} in {args.meta_path}; "
                             f"datasets: {', '.join(e.name for e in entries)}")
        entries = [replace(chosen[0], repeat_time=1)]  # index = record number in the file
    elif args.line is not None:
        if len(entries) > 1:
            raise SetupError("--line needs --dataset when the meta file lists several datasets")
        entries = [replace(entries[0], repeat_time=1)]
    dataset = SupervisedDataset(entries, tokenizer, replace(config, bad_data="fail"))
    if args.line is not None:
        for index in range(len(dataset)):
            if dataset.locate(index)[1] == args.line:
                return dataset, index
        raise SetupError(f"no record on line {args.line} of {entries[0].annotation}")
    if not -len(dataset) <= args.index < len(dataset):
        raise SetupError(f"--index {args.index} is out of range: the selection holds {len(dataset)} samples")
    return dataset, args.index % len(dataset)


def single_id(tokenizer: Any, token: str) -> int | None:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def decode(tokenizer: Any, ids: list[int], previous: int | None) -> str:
    """Text of ``ids`` as it reads after token ``previous`` (sentencepiece drops a leading space when a
    piece is decoded alone, so decode with the token before it and cut that part off)."""
    plain = lambda values: tokenizer.decode(values, skip_special_tokens=False,  # noqa: E731
                                            clean_up_tokenization_spaces=False)
    if previous is None:
        return plain(ids)
    head = plain([previous])
    full = plain([previous, *ids])
    return full[len(head):] if full.startswith(head) else plain(ids)


def image_blocks(ids: list[int], start_id: int | None, end_id: int | None) -> list[tuple[int, int]]:
    """``(position of <img>, position of </img>)`` of every image block."""
    blocks, start = [], None
    for position, token in enumerate(ids):
        if token == start_id:
            start = position
        elif token == end_id and start is not None:
            blocks.append((start, position))
            start = None
    return blocks


def describe_images(dataset: SupervisedDataset, index: int, record: dict, kind: str, ids: list[int],
                    blocks: list[tuple[int, int]], context_id: int | None) -> list[dict[str, Any]]:
    """One entry per image block: source file, size, tiles (from the tokens), grid (from the tiling plan)."""
    config = dataset.config
    file = dataset.locate(index)[0]
    entry = next(e for e in dataset.entries if e.annotation == file)
    if kind in ("image", "multi_image"):
        paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
    elif kind == "video":
        paths = [record["video"]] * len(blocks)
    else:
        paths = []
    images = []
    for number, (start, end) in enumerate(blocks):
        context = sum(1 for token in ids[start + 1 : end] if token == context_id)
        info: dict[str, Any] = {
            "index": number,
            "start": start,
            "end": end,
            "context_tokens": context,
            "tiles": context // config.num_image_token,
            "source": paths[number] if number < len(paths) else None,
        }
        if kind == "video":
            info.update(frame=number + 1, grid=[1, 1], thumbnail=False)
        elif number < len(paths):
            # the training loader's checks and bounds (this image just passed them in build_item)
            image = load_image(os.path.join(entry.root, paths[number]) if entry.root else paths[number],
                               exif_transpose=config.exif_transpose,
                               rescale_high_bit_depth=config.rescale_high_bit_depth,
                               max_image_pixels=config.max_image_pixels,
                               allow_truncated=config.allow_truncated_images)
            info["width"], info["height"] = image.size
            if config.dynamic_image_size:
                low, high = image_tile_range(entry.max_dynamic_patch or config.max_dynamic_patch, len(paths),
                                             config.min_dynamic_patch)
                cols, rows, planned = plan_tiles(*image.size, low, high, config.image_size, config.use_thumbnail)
                info.update(grid=[cols, rows], thumbnail=planned > cols * rows)
            else:
                info.update(grid=[1, 1], thumbnail=False)
        images.append(info)
    return images


def inspect(dataset: SupervisedDataset, index: int) -> dict[str, Any]:
    """Everything shown about ``dataset[index]`` (raises :class:`DataError` for a bad sample)."""
    tokenizer = dataset.tokenizer
    file, line = dataset.locate(index)
    record = dataset.record(index)
    item = dataset.build_item(index)
    kind = sample_type(record)
    ids = item["input_ids"].tolist()
    labels = item["labels"].tolist()
    start_id, end_id = single_id(tokenizer, IMG_START_TOKEN), single_id(tokenizer, IMG_END_TOKEN)
    context_id = single_id(tokenizer, IMG_CONTEXT_TOKEN)
    blocks = image_blocks(ids, start_id, end_id)
    tokens = [decode(tokenizer, [token], ids[k - 1] if k else None) for k, token in enumerate(ids)]
    flags = item["image_flags"].tolist()
    name = next(e.name for e in dataset.entries if e.annotation == file)
    return {
        "sample_id": item["sample_id"],
        "file": file,
        "line": line,
        "dataset": name,
        "index": index,
        "type": kind,
        "num_tokens": len(ids),
        "num_supervised": int(item["num_supervised"]),
        "num_tiles": int(sum(flags)),
        "image_flags": flags,
        "pixel_shape": list(item["pixel_values"].shape),
        "input_ids": ids,
        "labels": labels,
        "supervised": [label != IGNORE_INDEX for label in labels],
        "tokens": tokens,
        "pieces": tokenizer.convert_ids_to_tokens(ids),
        "images": describe_images(dataset, index, record, kind, ids, blocks, context_id),
        "record": record,
        "_item": item,
    }


# --------------------------------------------------------------------------------------------
# Rendering


def segments(info: dict[str, Any]) -> list[tuple[str, int, int, Any]]:
    """``(kind, start, stop, image)`` runs: ``"image"`` blocks, then ``"sup"``/``"text"`` token runs."""
    starts = {image["start"]: image for image in info["images"]}
    out, position, n = [], 0, len(info["input_ids"])
    while position < n:
        if position in starts:
            image = starts[position]
            out.append(("image", position, image["end"] + 1, image))
            position = image["end"] + 1
            continue
        supervised = info["supervised"][position]
        stop = position + 1
        while stop < n and stop not in starts and info["supervised"][stop] == supervised:
            stop += 1
        out.append(("sup" if supervised else "text", position, stop, None))
        position = stop
    return out


def collapsed(image: dict[str, Any]) -> str:
    return f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN}×{image['context_tokens']}{IMG_END_TOKEN}"


def image_line(image: dict[str, Any]) -> str:
    number = image["index"] + 1
    if "frame" in image:
        return f"frame {image['frame']}: {image['source']} -> {image['tiles']} tile, {image['context_tokens']} " \
               f"context tokens at {image['start']}..{image['end']}"
    size = f" {image['width']}x{image['height']}" if "width" in image else ""
    grid = ""
    if "grid" in image:
        grid = f", grid {image['grid'][0]}x{image['grid'][1]}" + (" + thumbnail" if image["thumbnail"] else "")
    return (f"image {number}: {image['source']}{size} -> {image['tiles']} tile(s){grid}, "
            f"{image['context_tokens']} context tokens at {image['start']}..{image['end']}")


def render_text(info: dict[str, Any], tokenizer: Any, colour: bool) -> str:
    """Header plus the decoded sequence with image blocks collapsed and supervised runs marked."""
    lines = [
        f"sample {info['sample_id']} (dataset {info['dataset']}, index {info['index']}, type {info['type']})",
        f"tokens {info['num_tokens']}, supervised {info['num_supervised']}, tiles {info['num_tiles']}",
    ]
    lines += [image_line(image) for image in info["images"]]
    legend = f"{GREEN}green{RESET} = supervised" if colour else f"{OPEN}...{CLOSE} = supervised"
    lines.append(f"---- ({legend})")
    lines.append(render_body(info, tokenizer, colour))
    return "\n".join(lines)


def render_body(info: dict[str, Any], tokenizer: Any, colour: bool) -> str:
    """The decoded sequence: image blocks collapsed, supervised runs in green or ``[[...]]``."""
    ids = info["input_ids"]
    parts = []
    for kind, start, stop, image in segments(info):
        if kind == "image":
            text = collapsed(image)
            parts.append(f"{CYAN}{text}{RESET}" if colour else text)
            continue
        text = decode(tokenizer, ids[start:stop], ids[start - 1] if start else None)
        if kind == "sup":
            text = f"{GREEN}{text}{RESET}" if colour else f"{OPEN}{text}{CLOSE}"
        parts.append(text)
    return "".join(parts)


def render_tokens(info: dict[str, Any], colour: bool) -> str:
    """One row per token (an image block is one row)."""
    rows = [f"{'pos':>6}  {'id':>7}  {'label':>7}  text"]
    for kind, start, stop, image in segments(info):
        if kind == "image":
            text = collapsed(image) + f"  ({image_line(image)})"
            rows.append(f"{start:>6}  {'':>7}  {'-100':>7}  " + (f"{CYAN}{text}{RESET}" if colour else text))
            continue
        for k in range(start, stop):
            shown = json.dumps(info["tokens"][k], ensure_ascii=False)
            if kind == "sup":
                shown = f"{GREEN}{shown}{RESET}" if colour else f"{OPEN}{shown}{CLOSE}"
            rows.append(f"{k:>6}  {info['input_ids'][k]:>7}  {info['labels'][k]:>7}  {shown}")
    return "\n".join(rows)


def save_tiles(info: dict[str, Any], folder: str) -> list[str]:
    """Write the real tiles (image_flags 1) as ``tile_NNN.png``; returns the paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    pixels = info["_item"]["pixel_values"].numpy()
    paths = []
    for k, flag in enumerate(info["image_flags"]):
        if flag:
            path = os.path.join(folder, f"tile_{k:03d}.png")
            Image.fromarray(pixels[k]).save(path)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizer, config, _ = setup_from_args(args)
        if tokenizer is None:
            raise SetupError("pass --model, or --tokenizer with --template: the sample is shown as tokens")
        dataset, index = select(args, tokenizer, config)
    except (SetupError, MetaError, DataError) as exc:
        print(f"inspect_data: {exc}", file=sys.stderr)
        return 2
    try:
        info = inspect(dataset, index)
    except DataError as err:
        print(f"inspect_data: bad sample: {err.report()}", file=sys.stderr)
        return 1
    saved = save_tiles(info, args.save_tiles) if args.save_tiles else []
    if args.json:
        public = {k: v for k, v in info.items() if not k.startswith("_")}
        public["text"] = render_body(info, tokenizer, colour=False)
        public["saved_tiles"] = saved
        json.dump(public, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    colour = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(render_tokens(info, colour) if args.tokens else render_text(info, tokenizer, colour))
    if args.save_tiles:
        print(f"{len(saved)} tile(s) written to {args.save_tiles}" if saved else
              "no tiles written: the sample has no image (text-only samples carry one dummy tile)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
