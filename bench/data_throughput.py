#!/usr/bin/env python
"""Samples per second of the training dataset, next to the official per-sample path, on one CPU process.

    python bench/data_throughput.py            # ~2-3 minutes on 2 cores
    python bench/data_throughput.py --quick    # ~25 s smoke run
    python bench/data_throughput.py --json     # machine-readable
    python bench/data_throughput.py --markdown # the BENCHMARKS.md section (python bench/run.py --only data)

What is measured. A mix is generated once (large JPEG photos ~3000x2000, document pages 1700x2200
as PNG, A4 document scans at 300 dpi (2480x3508) as JPEG, three-image samples, short h264 videos made
with PyAV, text-only chats), then read sample by sample in this process, with no dataloader workers, by

* **ours** (exact): ``SupervisedDataset[i]`` as training uses it (uint8 tiles; normalisation runs
  later, on the device, inside the model),
* **fast**: the same with ``--fast_image_decode`` (JPEGs decoded at a reduced DCT scale that still
  covers the tile grid, ``reducing_gap`` resizes, the thumbnail from the canvas; same grid and tokens),
* **official**: a plain re-implementation, written here, of what the official
  ``LazySupervisedDataset.__getitem__`` does per sample: ``json.loads`` of the line,
  ``PIL.Image.open(...).convert("RGB")``, ``dynamic_preprocess``, per tile ``Resize`` + ``ToTensor`` +
  ``Normalize`` in float32 (numpy, the same arithmetic as torchvision), the template prompt with
  the image tokens in it tokenized whole, and the ``preprocess_mpt`` label mask (each round
  tokenized again to find its length). Videos: every frame decoded in order with PyAV, the
  official ``middle`` frame indices kept (decord is what the official code uses; it is not a
  dependency here).

The exact and official paths must give identical tensors on every benchmarked sample: ``input_ids``,
``labels``, ``image_flags``, and pixel values equal after normalising ours with
:func:`~internvl_chat.data.transforms.normalize_tiles`; the fast path the same ``input_ids``, ``labels``,
``image_flags`` and tile count as the exact one, its pixels reported as PSNR against the exact tiles per
sample kind. The exit code is 1 otherwise (or when a fast tile falls under 40 dB).

Stage shares are measured by wrapping the stage functions for the run only (the library is not
instrumented): decode (``load_image``, ``video.read_frames``, and the header read ``image_size`` the fast
path plans its grid from), tile (``image_to_tiles``), normalise
(none in ours: the model does it on the device; a separate row shows what CPU normalisation would
cost), tokenise (``tokenize_conversation``), other (JSON, format checks, tensors). Each sample is
read ``--repeats`` times by each path, back to back with the order rotating, and each path keeps
its fastest time per sample (noise from other processes on a shared machine only ever adds time).
Settings: Hermes-2 with a Qwen2-style tokenizer, 448-px tiles, ``max_dynamic_patch`` 12 + thumbnail,
8 frames per video.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from internvl_chat.data import dataset as dataset_module
from internvl_chat.data import video as video_module
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import build_dataset
from internvl_chat.data.transforms import normalize_tiles
from internvl_chat.model.tokenizer import load_tokenizer
from internvl_chat.train.arguments import DataTrainingArguments

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer_qwen2"
STAGES = ("decode", "tile", "normalise", "tokenise", "other")
KINDS = ("photo", "scan", "page", "multi", "video", "text")
PATHS = ("ours", "fast", "official")
PSNR_FLOOR = 40.0  # issue 15: the fast tiles' PSNR against the exact ones
FAST_TARGET = 2.5  # issue 15: fast path samples/s over the official path's, on JPEG photos and scans

# The mix: how many samples of each kind.
FULL_MIX = {"photo": 8, "scan": 6, "page": 6, "multi": 4, "video": 3, "text": 10}
QUICK_MIX = {"photo": 2, "scan": 1, "page": 1, "multi": 1, "video": 1, "text": 3}

# Facts of the official Hermes-2 template and training constants (image tokens, tile size, normalisation).
HERMES_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                 "是一个有用无害的人工智能助手。")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = (f"{IM_START}user\n", f"{IM_START}assistant\n")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE, NUM_IMAGE_TOKEN, MAX_PATCH, FRAMES = 448, 256, 12, 8
IGNORE = -100

WORDS = ("the model reads every tile of the page and answers with a short precise sentence about what it sees "
         "including colours shapes numbers tables charts and the small print at the bottom").split()


# --------------------------------------------------------------------------------------------
# The generated mix


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth colour fields plus sensor-like noise: JPEG sizes and decode cost like a real photo."""
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (height // 100, width // 100, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def _page(rng: random.Random, size: tuple[int, int] = (1700, 2200)) -> Image.Image:
    """A white page with lines of 'words' (dark boxes), a heading and a table grid."""
    page = Image.new("RGB", size, (252, 252, 250))
    draw = ImageDraw.Draw(page)
    draw.rectangle((150, 120, 1100, 180), fill=(20, 20, 20))
    y = 260
    while y < size[1] - 200:
        x = 150
        while x < size[0] - 250:
            w = rng.randint(20, 110)
            draw.rectangle((x, y, x + w, y + 18), fill=(rng.randint(0, 60),) * 3)
            x += w + rng.randint(10, 18)
        y += rng.choice((34, 34, 34, 60))
        if rng.random() < 0.03:
            for k in range(6):
                draw.line((150, y + 40 * k, size[0] - 150, y + 40 * k), fill=(90, 90, 90), width=2)
            y += 260
    return page


def _scan(rng: random.Random, size: tuple[int, int] = (2480, 3508)) -> Image.Image:
    """An A4 page at 300 dpi as a scanner delivers it: the page's content, optical blur (about 1 px), noise."""
    page = _page(rng, size).filter(ImageFilter.GaussianBlur(1.0))
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-4, 5, (size[1], size[0], 1), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(page, np.int16) + noise, 0, 255).astype(np.uint8))


def _video(path: Path, rng: np.random.Generator, seconds: float = 3.0, fps: int = 10,
           size: tuple[int, int] = (640, 360)) -> None:
    import av

    width, height = size
    base = np.asarray(_photo(rng, (width * 2, height)), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(int(seconds * fps)):
            shift = int(k * width / (seconds * fps))  # a slow pan
            frame = np.ascontiguousarray(base[:, shift : shift + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_mix(folder: Path, mix: dict[str, int], seed: int = 0) -> tuple[Path, list[str]]:
    """Write the files, ``mix.jsonl`` and ``meta.json``; returns the meta path and the kind of each line."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    has_av = _has_av()
    records: list[tuple[str, dict]] = []
    for k in range(mix["photo"]):
        name = f"photo_{k}.jpg"
        size = (3000, 2000) if k % 2 == 0 else (2000, 3000)
        if not (folder / name).exists():
            _photo(rng, size).save(folder / name, quality=90)
        question = "<image>\nDescribe the photo." if k % 2 else "What is in this picture?"  # auto-prepended
        records.append(("photo", {"image": name, "width": size[0], "height": size[1], "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": _words(prng, 40)}]}))
    for k in range(mix.get("scan", 0)):
        name = f"scan_{k}.jpg"
        if not (folder / name).exists():
            _scan(prng).save(folder / name, quality=85)
        records.append(("scan", {"image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat does the letter ask for?"},
            {"from": "gpt", "value": _words(prng, 50)}]}))
    for k in range(mix["page"]):
        name = f"page_{k}.png"
        if not (folder / name).exists():
            _page(prng).save(folder / name, compress_level=3)
        records.append(("page", {"image": name, "conversations": [
            {"from": "human", "value": "<image>\nRead the heading."}, {"from": "gpt", "value": _words(prng, 12)},
            {"from": "human", "value": "Summarise the first paragraph."}, {"from": "gpt", "value": _words(prng, 60)}]}))
    for k in range(mix["multi"]):
        names = []
        for j in range(3):
            name = f"multi_{k}_{j}.jpg"
            if not (folder / name).exists():
                _photo(rng, (1280, 960) if j != 1 else (960, 1280)).save(folder / name, quality=88)
            names.append(name)
        records.append(("multi", {"image": names, "conversations": [
            {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nCompare them."},
            {"from": "gpt", "value": _words(prng, 50)}]}))
    for k in range(mix["video"] if has_av else 0):
        name = f"clip_{k}.mp4"
        if not (folder / name).exists():
            _video(folder / name, rng)
        records.append(("video", {"video": name, "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in the clip?"},
            {"from": "gpt", "value": _words(prng, 30)}]}))
    for k in range(mix["text"]):
        records.append(("text", {"conversations": [
            {"from": "human", "value": _words(prng, 20) + " Explain."}, {"from": "gpt", "value": _words(prng, 80)},
            {"from": "human", "value": "And briefly?"}, {"from": "gpt", "value": _words(prng, 15)}]}))
    order = list(range(len(records)))
    prng.shuffle(order)
    kinds = [records[i][0] for i in order]
    with open(folder / "mix.jsonl", "w", encoding="utf-8") as handle:
        for i in order:
            handle.write(json.dumps(records[i][1], ensure_ascii=False) + "\n")
    meta = {"bench_mix": {"root": str(folder.resolve()), "annotation": str((folder / "mix.jsonl").resolve()),
                          "data_augment": False, "repeat_time": 1}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder / "meta.json", kinds


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Stage timing


class Timer:
    """Seconds per stage; :meth:`wrap` times a function's calls as one stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return timed

    @contextlib.contextmanager
    def stage(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


@contextlib.contextmanager
def instrumented(timer: Timer):
    """Time our dataset's stages by wrapping the functions it calls (for this run only)."""
    patches = [(dataset_module, "load_image", "decode"), (dataset_module, "image_to_tiles", "tile"),
               (dataset_module, "tokenize_conversation", "tokenise"), (video_module, "read_frames", "decode"),
               (dataset_module, "image_size", "decode")]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, stage in patches:
            setattr(module, name, timer.wrap(stage, getattr(module, name)))
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


# --------------------------------------------------------------------------------------------
# The official per-sample path, re-implemented from its documented behaviour


def official_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Spec 4.1: every (cols, rows) with min_num <= cols*rows <= max_num, from a set, sorted by area."""
    grids = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])


def official_dynamic_preprocess(image: Image.Image, min_num: int, max_num: int, size: int,
                                thumbnail: bool) -> list[Image.Image]:
    """Official tiling: closest aspect ratio (ties: later grid iff area > half its canvas), resize, crop, thumbnail."""
    width, height = image.size
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in official_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    canvas = image.resize((cols * size, rows * size))
    tiles = [canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows)
             for c in range(cols)]
    if thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


_MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
_STD = np.array(IMAGENET_STD, np.float32)[:, None, None]


def to_tensor_normalize(tile: Image.Image) -> np.ndarray:
    """torchvision ToTensor (uint8 -> float32 / 255, CHW) then Normalize ((x - mean) / std), float32."""
    x = np.asarray(tile).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (x - _MEAN) / _STD


class OfficialPath:
    """What the official dataset does for one index (non-packed, ``data_augment`` off, Hermes-2)."""

    def __init__(self, annotation: str, root: str, tokenizer, timer: Timer) -> None:
        with open(annotation, encoding="utf-8") as handle:
            self.lines = handle.readlines()
        self.root, self.tokenizer, self.timer = root, tokenizer, timer

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        item = json.loads(self.lines[index])
        turns = [dict(t) for t in item["conversations"]]
        if item.get("image"):
            if isinstance(item["image"], list):
                images = [self._open(p) for p in item["image"]]
                budget = max(1, MAX_PATCH // len(images))
            else:
                if "<image>" not in turns[0]["value"]:
                    turns[0]["value"] = "<image>\n" + turns[0]["value"]
                images, budget = [self._open(item["image"])], MAX_PATCH
            with self.timer.stage("tile"):
                tiles_per_image = [official_dynamic_preprocess(im, 1, budget, IMAGE_SIZE, True) for im in images]
            tiles = self._transform([t for group in tiles_per_image for t in group])
            counts = [NUM_IMAGE_TOKEN * len(group) for group in tiles_per_image]
            flags = [1] * len(tiles)
        elif item.get("video"):
            frames = self._frames(os.path.join(self.root, item["video"]))
            prefix = "\n".join(f"Frame-{i + 1}: <image>" for i in range(len(frames))) + "\n"
            if "<video>" not in turns[0]["value"]:
                turns[0]["value"] = "<video>\n" + turns[0]["value"]
            turns[0]["value"] = turns[0]["value"].replace("<video>\n", prefix)
            tiles = self._transform(frames)
            counts, flags = [NUM_IMAGE_TOKEN] * len(frames), [1] * len(frames)
        else:
            white = Image.new("RGB", (224, 224), (255, 255, 255))
            with self.timer.stage("tile"):
                dummy = official_dynamic_preprocess(white, 1, 1, IMAGE_SIZE, True)
            tiles, counts, flags = self._transform(dummy), [], [0]
        with self.timer.stage("tokenise"):
            input_ids, labels = self._preprocess_mpt(turns, counts)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": tiles, "image_flags": flags}

    def _open(self, rel: str) -> Image.Image:
        with self.timer.stage("decode"):
            return Image.open(os.path.join(self.root, rel)).convert("RGB")

    def _frames(self, path: str) -> list[Image.Image]:
        """Decode in order and keep the official ``middle`` frames, like decord's get_batch."""
        import av

        with self.timer.stage("decode"):
            with av.open(path) as container:
                stream = container.streams.video[0]
                vlen = stream.frames
                acc = min(FRAMES, vlen)
                edges = np.linspace(0, vlen, acc + 1).astype(int)
                wanted = [(int(edges[k]) + int(edges[k + 1]) - 1) // 2 for k in range(acc)]
                wanted += [wanted[-1]] * (FRAMES - len(wanted))
                found = {}
                for k, frame in enumerate(container.decode(stream)):
                    if k in wanted:
                        found[k] = Image.fromarray(frame.to_ndarray(format="rgb24"))
                    if k >= max(wanted):
                        break
            return [found[k] for k in wanted]

    def _transform(self, tiles: list[Image.Image]) -> np.ndarray:
        with self.timer.stage("tile"):  # the transform's Resize((448, 448), BICUBIC): a copy for tiles
            tiles = [t.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC) for t in tiles]
        with self.timer.stage("normalise"):
            return np.stack([to_tensor_normalize(t) for t in tiles])

    def _preprocess_mpt(self, turns: list[dict], image_token_counts: list[int]) -> tuple[list[int], list[int]]:
        """Spec 6.2 + 6.4 ``preprocess_mpt``: render, replace each <image> in order, tokenize whole; then mask
        per round (round 0 = system + user + assistant, later rounds user + assistant), a round's length being
        its own token count + 1 for the <|im_end|> the split removed."""
        prompt = f"{IM_START}system\n{HERMES_SYSTEM}{IM_END}"
        for turn in turns:
            prompt += (ROLES[0] if turn["from"] == "human" else ROLES[1]) + turn["value"] + IM_END
        for count in image_token_counts:
            prompt = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * count + "</img>", 1)
        tok = self.tokenizer
        input_ids = tok(prompt).input_ids
        labels = list(input_ids)
        pieces = prompt.split(IM_END)
        rounds = [IM_END.join(pieces[:3])] + [IM_END.join(pieces[k : k + 2]) for k in range(3, len(pieces), 2)]
        position = 0
        for text in rounds:
            if not text:
                break
            round_len = len(tok(text).input_ids) + 1
            head, sep, _ = text.partition(ROLES[1])
            if not sep or text.count(ROLES[1]) != 1:
                break
            instruction_len = len(tok(head + ROLES[1]).input_ids)
            labels[position : position + instruction_len] = [IGNORE] * instruction_len
            position += round_len
        labels[position:] = [IGNORE] * (len(labels) - position)
        if position != len(input_ids):  # the official "tokenization mismatch": every label dropped
            labels = [IGNORE] * len(labels)
        return input_ids, labels


# --------------------------------------------------------------------------------------------
# Running and comparing


def same_tensors(ours: dict, theirs: dict) -> str | None:
    """None when the two items are identical (pixels after normalising ours), else what differs."""
    if ours["input_ids"].tolist() != theirs["input_ids"]:
        return "input_ids differ"
    if ours["labels"].tolist() != theirs["labels"]:
        return "labels differ"
    if ours["image_flags"].tolist() != theirs["image_flags"]:
        return "image_flags differ"
    pixels = normalize_tiles(ours["pixel_values"]).numpy()
    if pixels.shape != theirs["pixel_values"].shape:
        return f"pixel shapes differ: {pixels.shape} vs {theirs['pixel_values'].shape}"
    if not np.array_equal(pixels, theirs["pixel_values"]):
        return f"pixel values differ (max abs diff {np.abs(pixels - theirs['pixel_values']).max():g})"
    return None


def same_item_but_pixels(exact: dict, fast: dict) -> str | None:
    """None when the fast item has the exact item's tokens, labels, flags and tile shape, else what differs."""
    for key in ("input_ids", "labels", "image_flags"):
        if not torch.equal(exact[key], fast[key]):
            return f"{key} differ"
    if exact["pixel_values"].shape != fast["pixel_values"].shape:
        return f"tile shapes differ: {tuple(fast['pixel_values'].shape)} vs {tuple(exact['pixel_values'].shape)}"
    return None


def squared_errors(exact: torch.Tensor, fast: torch.Tensor) -> tuple[float, float, int]:
    """(sum of squared level differences, worst tile's mean squared difference, values) of two uint8 tile stacks."""
    diff = (exact.to(torch.int32) - fast.to(torch.int32)).pow_(2).to(torch.float64)
    per_tile = diff.flatten(1).mean(1)
    return float(diff.sum()), float(per_tile.max()), diff.numel()


def psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def timed_call(get, index: int, timer: Timer) -> tuple[float, dict[str, float]]:
    """Seconds for ``get(index)`` and the seconds of each stage inside it."""
    timer.seconds.clear()
    start = time.perf_counter()
    get(index)
    return time.perf_counter() - start, dict(timer.seconds)


def time_normalise(items: list[torch.Tensor], device: str, repeats: int) -> tuple[float, str]:
    """Seconds to normalise every item's tiles on ``device`` (tiles already there; fastest of ``repeats`` per item,
    as the paths are timed), and the method used there."""
    target = torch.device(device)
    moved = [t.to(target) for t in items]
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    for pixels in moved[:2]:  # warm-up (kernels, allocator)
        normalize_tiles(pixels)
    total = 0.0
    for pixels in moved:
        times = []
        for _ in range(max(1, repeats)):
            sync()
            start = time.perf_counter()
            normalize_tiles(pixels)
            sync()
            times.append(time.perf_counter() - start)
        total += min(times)
    method = "float32 arithmetic" if target.type == "cpu" else "a per-channel lookup table"
    return total, method


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    mix = QUICK_MIX if args.quick else FULL_MIX
    repeats = args.repeats or (1 if args.quick else 3)
    with contextlib.ExitStack() as stack:
        folder = Path(args.data_dir) if args.data_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        t0 = time.perf_counter()
        meta, kinds = make_mix(folder, mix, args.seed)
        generate_s = time.perf_counter() - t0
        tokenizer_path = args.tokenizer or _default_tokenizer(stack)
        tokenizer = load_tokenizer(tokenizer_path)
        # the config training builds from these flags (the official middle frames: no random draw to compare)
        flags = DataTrainingArguments(conv_style="Hermes-2", force_image_size=IMAGE_SIZE, dynamic_image_size=True,
                                      use_thumbnail=True, max_dynamic_patch=MAX_PATCH, min_num_frame=FRAMES,
                                      max_num_frame=FRAMES, max_seq_length=8192, bad_data="fail")
        config = DataConfig.from_args(flags, video_sample="middle")
        assert config.num_image_token == NUM_IMAGE_TOKEN and not config.fast_image_decode
        ours = build_dataset(meta, tokenizer, config)
        fast = build_dataset(meta, tokenizer, DataConfig.from_args(flags, video_sample="middle",
                                                                   fast_image_decode=True))
        entry = ours.entries[0]
        official_timer = Timer()
        official = OfficialPath(entry.annotation, entry.root, tokenizer, official_timer)
        n = len(ours)

        # Identical tensors on every sample (untimed), which also warms caches for every path; the fast path's
        # pixels are compared with the exact ones.
        mismatches = []
        errors: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # kind -> [sum sq, worst mse, values]
        for i in range(n):
            exact_item, fast_item = ours[i], fast[i]
            problem = same_tensors(exact_item, official[i])
            if problem:
                mismatches.append({"index": i, "kind": kinds[i], "path": "ours", "problem": problem})
            problem = same_item_but_pixels(exact_item, fast_item)
            if problem:
                mismatches.append({"index": i, "kind": kinds[i], "path": "fast", "problem": problem})
            elif int(exact_item["image_flags"].sum()):
                total, worst, count = squared_errors(exact_item["pixel_values"], fast_item["pixel_values"])
                acc = errors[kinds[i]]
                acc[0], acc[1], acc[2] = acc[0] + total, max(acc[1], worst), acc[2] + count

        # Per sample, the paths run back to back (the order rotating) and each keeps its fastest of the repeats:
        # load from other processes on a shared machine inflates single runs, not the minimum.
        ours_timer = Timer()
        getters = {"ours": lambda i: timed_call(ours.__getitem__, i, ours_timer),
                   "fast": lambda i: timed_call(fast.__getitem__, i, ours_timer),
                   "official": lambda i: timed_call(official.__getitem__, i, official_timer)}
        best: dict[str, list[tuple[float, dict[str, float]] | None]] = {name: [None] * n for name in PATHS}
        with instrumented(ours_timer):
            for r in range(repeats):
                for i in range(n):
                    shift = (r + i) % len(PATHS)
                    for name in PATHS[shift:] + PATHS[:shift]:
                        measured = getters[name](i)
                        if best[name][i] is None or measured[0] < best[name][i][0]:
                            best[name][i] = measured

        # What normalising ours on the CPU would add (training does it on the device instead), and on the device.
        items = [ours[i]["pixel_values"] for i in range(n)]
        cpu_normalise, cpu_method = time_normalise(items, "cpu", repeats)
        device = getattr(args, "device", "cpu") or "cpu"
        device_normalise = None
        if device != "cpu" and (not device.startswith("cuda") or torch.cuda.is_available()):
            device_normalise = time_normalise(items, device, repeats)
        tiles = sum(int(p.shape[0]) for p in items)

    result = {"samples": n, "mix": {k: kinds.count(k) for k in KINDS}, "tiles": tiles, "repeats": repeats,
              "generate_seconds": round(generate_s, 2), "tokenizer": str(tokenizer_path),
              "identical": n - len({m["index"] for m in mismatches if m["path"] == "ours"}),
              "mismatches": mismatches, "paths": {}}
    for name in PATHS:
        per_sample = [t for t, _ in best[name]]
        total = sum(per_sample)
        stages = {stage: sum(st.get(stage, 0.0) for _, st in best[name]) for stage in STAGES}
        stages["other"] = max(0.0, total - sum(stages.values()))
        per_kind = {}
        for kind in KINDS:
            times = [t for t, k in zip(per_sample, kinds) if k == kind]
            if times:
                per_kind[kind] = {"samples": len(times), "samples_per_s": len(times) / sum(times)}
        result["paths"][name] = {"seconds": total, "samples_per_s": n / total, "stages": stages,
                                 "per_kind": per_kind}
    official_s = result["paths"]["official"]["seconds"]
    result["ratio"] = official_s / result["paths"]["ours"]["seconds"]
    result["fast_ratio"] = official_s / result["paths"]["fast"]["seconds"]
    result["ours_cpu_normalise_seconds"] = cpu_normalise
    result["cpu_normalise_method"] = cpu_method
    result["ratio_with_cpu_normalise"] = official_s / (result["paths"]["ours"]["seconds"] + cpu_normalise)
    if device_normalise is not None:
        result["device_normalise"] = {"device": device, "seconds": device_normalise[0], "method": device_normalise[1]}
    result["psnr"] = {kind: {"psnr_db": psnr(errors[kind][0] / errors[kind][2]), "worst_tile_db": psnr(errors[kind][1])}
                      for kind in KINDS if errors.get(kind, (0, 0, 0))[2]}
    all_values = sum(acc[2] for acc in errors.values())
    result["psnr_all_db"] = psnr(sum(acc[0] for acc in errors.values()) / all_values) if all_values else math.inf
    result["psnr_ok"] = all(v["worst_tile_db"] >= PSNR_FLOOR for v in result["psnr"].values())
    return result


def _default_tokenizer(stack: contextlib.ExitStack) -> str:
    if FIXTURE_TOKENIZER.is_dir():
        return str(FIXTURE_TOKENIZER)
    from internvl_chat.tiny_tokenizer import build_tiny_tokenizer

    folder = stack.enter_context(tempfile.TemporaryDirectory())
    build_tiny_tokenizer("qwen2", folder)
    return folder


COLUMNS = (("official", "official path"), ("ours", "ours, exact"), ("fast", "ours, fast"))


def _ms(seconds: float, samples: int) -> str:
    return f"{seconds / samples * 1000:.1f} ms"


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 1e-9 and numerator > 1e-9 else "-"


def table_rows(result: dict) -> list[list[str]]:
    """Rows of [what, official, exact, fast, exact vs official, fast vs official]: samples/s (higher is better),
    per-stage time per sample (the ratios are official time / ours), samples/s per kind."""
    paths, n = result["paths"], result["samples"]
    rows = [["samples/s, whole mix", *(f"{paths[p]['samples_per_s']:.2f}" for p, _ in COLUMNS),
             f"{result['ratio']:.2f}x", f"{result['fast_ratio']:.2f}x"]]
    for stage in STAGES:
        times = [paths[p]["stages"][stage] for p, _ in COLUMNS]
        cells = [f"{_ms(t, n)} ({t / paths[p]['seconds']:.0%})" if t > 1e-4 else "0 (on the device)"
                 for t, (p, _) in zip(times, COLUMNS)]
        rows.append([f"{stage}, per sample", *cells, _ratio(times[0], times[1]), _ratio(times[0], times[2])])
    for kind in KINDS:
        if kind in paths["ours"]["per_kind"]:
            rates = [paths[p]["per_kind"][kind]["samples_per_s"] for p, _ in COLUMNS]
            label = f"{kind} ({result['mix'][kind]}), samples/s"
            rows.append([label, *(f"{r:.2f}" for r in rates), _ratio(rates[1], rates[0]), _ratio(rates[2], rates[0])])
    return rows


def _db(value: float) -> str:
    return "identical" if math.isinf(value) else f"{value:.1f} dB"


def targets(result: dict) -> list[str]:
    """The issue's targets, each with what was measured and whether it is met."""
    kinds = result["paths"]["official"]["per_kind"]
    lines = []
    for kind in ("photo", "scan"):
        if kind in kinds:
            ratio = result["paths"]["fast"]["per_kind"][kind]["samples_per_s"] / kinds[kind]["samples_per_s"]
            verdict = "met" if ratio >= FAST_TARGET else "NOT met"
            lines.append(f"fast path >= {FAST_TARGET}x the official samples/s on JPEG {kind}s: {ratio:.2f}x, {verdict}")
    worst = min((v["worst_tile_db"] for v in result["psnr"].values()), default=math.inf)
    lines.append(f"fast tiles >= {PSNR_FLOOR:.0f} dB PSNR against the exact ones: worst tile {_db(worst)}, "
                 f"{'met' if result['psnr_ok'] else 'NOT met'}")
    return lines


def normalisation_note(result: dict) -> str:
    n = result["samples"]
    text = (f"Normalisation (`ToTensor` + `Normalize`): the official path runs it on the CPU, per tile, in float32 "
            f"(its `normalise` row). Ours ships uint8 tiles and training normalises them on the model's device "
            f"(`TileNormalizer`: on a CPU by the official float32 arithmetic, on other devices through a per-channel "
            f"lookup table; both bit-identical to the official values). Counted on this CPU "
            f"({result['cpu_normalise_method']}) it would add {_ms(result['ours_cpu_normalise_seconds'], n)} per "
            f"sample: exact path + CPU normalisation = {result['ratio_with_cpu_normalise']:.2f}x the official path.")
    if "device_normalise" in result:
        dev = result["device_normalise"]
        text += (f" On `{dev['device']}` ({dev['method']}): {_ms(dev['seconds'], n)} per sample, tiles already "
                 "there.")
    return text


def format_result(result: dict) -> str:
    mix = ", ".join(f"{result['mix'][k]} {k}" for k in KINDS if result["mix"][k])
    header = ["", *(name for _, name in COLUMNS), "exact/official", "fast/official"]
    widths = [26, 18, 18, 18, 15, 15]
    lines = [
        f"data throughput, one process, no workers: {result['samples']} samples ({mix}), {result['tiles']} tiles; "
        f"fastest of {result['repeats']} run(s) per sample",
        f"  photos ~3000x2000 JPEG, scans 2480x3508 JPEG, pages 1700x2200 PNG, 3-image samples, {FRAMES}-frame h264 "
        f"clips, text chats; Hermes-2, max_dynamic_patch {MAX_PATCH} + thumbnail",
        "",
        "  " + "".join(h.rjust(w) if k else h.ljust(w) for k, (h, w) in enumerate(zip(header, widths))),
    ]
    for row in table_rows(result):
        lines.append("  " + "".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths))))
    lines += ["", "  fast vs exact tiles, PSNR (whole kind / worst tile):"]
    for kind, value in result["psnr"].items():
        lines.append(f"    {kind:<8}{_db(value['psnr_db']):>14}{_db(value['worst_tile_db']):>14}")
    lines += ["", "  " + normalisation_note(result),
              f"  identical tensors, exact vs official (input_ids, labels, image_flags, pixels after normalising "
              f"ours): {result['identical']}/{result['samples']} samples"]
    for mismatch in result["mismatches"]:
        lines.append(f"    MISMATCH sample {mismatch['index']} ({mismatch['kind']}, {mismatch['path']}): "
                     f"{mismatch['problem']}")
    lines += [f"  target: {line}" for line in targets(result)]
    return "\n".join(lines)


def markdown(result: dict, device: str, quick: bool) -> str:
    """The BENCHMARKS.md section of one result."""
    try:
        from bench.machine import describe
    except ImportError:  # run as `python bench/data_throughput.py`: bench/ itself is on the path
        from machine import describe
    mix = ", ".join(f"{result['mix'][k]} {k}" for k in KINDS if result["mix"][k])
    paths = result["paths"]
    photo = [paths[p]["per_kind"].get("photo", {}).get("samples_per_s", 0.0) for p, _ in COLUMNS]
    scan = [paths[p]["per_kind"].get("scan", {}).get("samples_per_s", 0.0) for p, _ in COLUMNS]
    worst = min((v["worst_tile_db"] for v in result["psnr"].values()), default=math.inf)
    out = [
        "## Data path",
        "",
        "<!-- headline: Data path (one CPU core): --fast_image_decode reads JPEG photos at "
        f"{_ratio(photo[2], photo[0])} and document scans at {_ratio(scan[2], scan[0])} the official per-sample "
        "path's samples/s (fast tiles "
        f">= {_db(worst)} PSNR against the exact ones); the exact path gives identical tensors at "
        f"{result['ratio']:.2f}x on the whole mix. -->",
        "Samples per second of the training dataset (`SupervisedDataset[i]`, one process, no workers, one torch "
        "thread) next to a plain re-implementation of the official `LazySupervisedDataset.__getitem__` (decode, "
        "`dynamic_preprocess`, per-tile `ToTensor` + `Normalize` in float32, Hermes-2 prompt and label mask), on a "
        f"generated mix: {mix} ({result['tiles']} tiles; photos ~3000x2000 JPEG, scans 2480x3508 JPEG at 300 dpi "
        f"with optical blur, pages 1700x2200 PNG, three 1280x960 JPEGs per multi-image sample, {FRAMES}-frame h264 "
        "clips, text chats). Columns: the official path; ours exact (tiles bit-identical to the official ones, "
        "checked on every sample); ours with `--fast_image_decode` (same grid, tile count and tokens, checked; "
        "JPEGs decoded at a reduced DCT scale that still covers the grid, `reducing_gap` resizes, thumbnail from the "
        "canvas). Each sample is read by the three paths back to back, the order rotating, "
        f"{result['repeats']} time(s); each path keeps its fastest time per sample. Ratios: ours / official "
        "samples/s (for stage rows, official time / ours).",
        "",
        "Reproduce: `python bench/run.py --only data` or `python bench/data_throughput.py"
        f"{' --quick' if quick else ''}` (`--json` for every figure).",
        "",
        describe(device) + (" The data path runs on the CPU whatever the device; only the normalisation line "
                            "below uses it." if device != "cpu" else ""),
        "",
        "| | official path | ours, exact | ours, fast | exact vs official | fast vs official |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    out += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    out += ["", "Fast tiles against the exact ones (PSNR over the kind's tiles; worst single tile):", "",
            "| kind | PSNR | worst tile |", "|---|---:|---:|"]
    out += [f"| {kind} | {_db(v['psnr_db'])} | {_db(v['worst_tile_db'])} |" for kind, v in result["psnr"].items()]
    out += ["", normalisation_note(result), "",
            f"Exact vs official, identical tensors: {result['identical']}/{result['samples']} samples. "
            "Targets (issue 15):"]
    out += [f"- {line}" for line in targets(result)]
    if result["mismatches"]:
        out += ["", "Mismatches:"] + [f"- sample {m['index']} ({m['kind']}, {m['path']}): {m['problem']}"
                                      for m in result["mismatches"]]
    return "\n".join(out) + "\n"


def section(quick: bool = False, device: str = "cpu") -> str:
    """The `data` section of BENCHMARKS.md (bench/run.py): one run of this benchmark, as markdown."""
    args = argparse.Namespace(quick=quick, repeats=None, data_dir=None, tokenizer=None, seed=0, device=device)
    return markdown(run(args), device, quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small mix and one pass (~25 s)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs per sample and path, fastest kept (default 3; --quick 1)")
    parser.add_argument("--data-dir", help="where to write (and reuse) the generated mix (default: a temp dir)")
    parser.add_argument("--tokenizer", help="a Qwen2-style tokenizer folder (default: the fixture one, else tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="where the normalisation line also times TileNormalizer (the data path is CPU work)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the result as JSON")
    output.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md section")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.markdown:
        print(markdown(result, args.device, args.quick), end="")
    else:
        print(format_result(result))
    return 0 if not result["mismatches"] and result["psnr_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
