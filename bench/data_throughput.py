#!/usr/bin/env python
"""Samples per second of the training dataset, next to the official per-sample path, on one CPU process.

    python bench/data_throughput.py            # ~1-2 minutes on 2 cores
    python bench/data_throughput.py --quick    # ~15 s smoke run
    python bench/data_throughput.py --json     # machine-readable

What is measured. A mix is generated once (large JPEG photos ~3000x2000, document pages 1700x2200
as PNG, three-image samples, short h264 videos made with PyAV, text-only chats), then read sample
by sample in this process, with no dataloader workers, by

* **ours**: ``SupervisedDataset[i]`` as training uses it (uint8 tiles; normalisation runs later, on
  the device, inside the model), and
* **official**: a plain re-implementation, written here, of what the official
  ``LazySupervisedDataset.__getitem__`` does per sample: ``json.loads`` of the line,
  ``PIL.Image.open(...).convert("RGB")``, ``dynamic_preprocess``, per tile ``Resize`` + ``ToTensor`` +
  ``Normalize`` in float32 (numpy, the same arithmetic as torchvision), the template prompt with
  the image tokens in it tokenized whole, and the ``preprocess_mpt`` label mask (each round
  tokenized again to find its length). Videos: every frame decoded in order with PyAV, the
  official ``middle`` frame indices kept (decord is what the official code uses; it is not a
  dependency here).

Both paths must give identical tensors on every benchmarked sample: ``input_ids``, ``labels``,
``image_flags``, and pixel values equal after normalising ours with
:func:`~internvl_chat.data.transforms.normalize_tiles`. The exit code is 1 otherwise.

Stage shares are measured by wrapping the stage functions for the run only (the library is not
instrumented): decode (``load_image``, ``video.read_frames``), tile (``image_to_tiles``), normalise
(none in ours: the model does it on the device; a separate row shows what CPU normalisation would
cost), tokenise (``tokenize_conversation``), other (JSON, format checks, tensors). Each sample is
read ``--repeats`` times by each path, back to back with the order alternating, and each path keeps
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
from PIL import Image, ImageDraw

from internvl_chat.data import dataset as dataset_module
from internvl_chat.data import video as video_module
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import build_dataset
from internvl_chat.data.transforms import normalize_tiles
from internvl_chat.model.tokenizer import load_tokenizer
from internvl_chat.train.arguments import DataTrainingArguments

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer_qwen2"
STAGES = ("decode", "tile", "normalise", "tokenise", "other")
KINDS = ("photo", "page", "multi", "video", "text")

# The mix: how many samples of each kind.
FULL_MIX = {"photo": 8, "page": 6, "multi": 4, "video": 3, "text": 10}
QUICK_MIX = {"photo": 2, "page": 1, "multi": 1, "video": 1, "text": 3}

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
               (dataset_module, "tokenize_conversation", "tokenise"), (video_module, "read_frames", "decode")]
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


def timed_call(get, index: int, timer: Timer) -> tuple[float, dict[str, float]]:
    """Seconds for ``get(index)`` and the seconds of each stage inside it."""
    timer.seconds.clear()
    start = time.perf_counter()
    get(index)
    return time.perf_counter() - start, dict(timer.seconds)


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
        assert config.num_image_token == NUM_IMAGE_TOKEN
        ours = build_dataset(meta, tokenizer, config)
        entry = ours.entries[0]
        official_timer = Timer()
        official = OfficialPath(entry.annotation, entry.root, tokenizer, official_timer)
        n = len(ours)

        # Identical tensors on every sample (untimed), which also warms caches for both paths.
        mismatches = []
        for i in range(n):
            problem = same_tensors(ours[i], official[i])
            if problem:
                mismatches.append({"index": i, "kind": kinds[i], "problem": problem})

        # Per sample, the two paths run back to back (alternating which goes first) and each keeps its fastest
        # of the repeats: load from other processes on a shared machine inflates single runs, not the minimum.
        ours_timer = Timer()
        best: dict[str, list[tuple[float, dict[str, float]] | None]] = {"ours": [None] * n, "official": [None] * n}
        with instrumented(ours_timer):
            for r in range(repeats):
                for i in range(n):
                    runs = {"ours": lambda: timed_call(ours.__getitem__, i, ours_timer),
                            "official": lambda: timed_call(official.__getitem__, i, official_timer)}
                    for name in (("ours", "official") if (r + i) % 2 == 0 else ("official", "ours")):
                        measured = runs[name]()
                        if best[name][i] is None or measured[0] < best[name][i][0]:
                            best[name][i] = measured

        # What normalising on the CPU would add to ours (the model does it on the device instead).
        items = [ours[i]["pixel_values"] for i in range(n)]
        t0 = time.perf_counter()
        for pixels in items:
            normalize_tiles(pixels)
        cpu_normalise = time.perf_counter() - t0
        tiles = sum(int(p.shape[0]) for p in items)

    result = {"samples": n, "mix": {k: kinds.count(k) for k in KINDS}, "tiles": tiles, "repeats": repeats,
              "generate_seconds": round(generate_s, 2), "tokenizer": str(tokenizer_path),
              "identical": n - len(mismatches), "mismatches": mismatches, "paths": {}}
    for name in ("ours", "official"):
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
    ours_s, official_s = result["paths"]["ours"]["seconds"], result["paths"]["official"]["seconds"]
    result["ratio"] = official_s / ours_s
    result["ours_cpu_normalise_seconds"] = cpu_normalise
    result["ratio_with_cpu_normalise"] = official_s / (ours_s + cpu_normalise)
    return result


def _default_tokenizer(stack: contextlib.ExitStack) -> str:
    if FIXTURE_TOKENIZER.is_dir():
        return str(FIXTURE_TOKENIZER)
    from internvl_chat.tiny_tokenizer import build_tiny_tokenizer

    folder = stack.enter_context(tempfile.TemporaryDirectory())
    build_tiny_tokenizer("qwen2", folder)
    return folder


def format_result(result: dict) -> str:
    ours, official = result["paths"]["ours"], result["paths"]["official"]
    mix = ", ".join(f"{result['mix'][k]} {k}" for k in KINDS if result["mix"][k])
    lines = [
        f"data throughput, one process, no workers: {result['samples']} samples ({mix}), {result['tiles']} tiles; "
        f"fastest of {result['repeats']} run(s) per sample",
        f"  photos ~3000x2000 JPEG, pages 1700x2200 PNG, 3-image samples, {FRAMES}-frame h264 clips, text chats; "
        f"Hermes-2, max_dynamic_patch {MAX_PATCH} + thumbnail",
        "",
        f"  {'':<22}{'ours':>16}{'official path':>18}{'ratio':>9}",
        f"  {'samples/s':<22}{ours['samples_per_s']:>16.2f}{official['samples_per_s']:>18.2f}"
        f"{result['ratio']:>8.2f}x",
    ]
    for stage in STAGES:
        a, b = ours["stages"][stage], official["stages"][stage]
        share = lambda s, total: f"{s / result['samples'] * 1000:7.1f} ms {s / total:4.0%}"  # noqa: E731
        ratio = f"{b / a:8.2f}x" if a > 1e-4 else f"{'-':>9}"
        note = "  (on the device, in the model)" if stage == "normalise" and a < 1e-4 else ""
        lines.append(f"  {stage + ' per sample':<22}{share(a, ours['seconds']):>16}"
                     f"{share(b, official['seconds']):>18}{ratio}{note}")
    lines.append("")
    for kind in KINDS:
        if kind in ours["per_kind"]:
            a, b = ours["per_kind"][kind]["samples_per_s"], official["per_kind"][kind]["samples_per_s"]
            lines.append(f"  {kind + ' samples/s':<22}{a:>16.2f}{b:>18.2f}{b and a / b:>8.2f}x")
    cpu = result["ours_cpu_normalise_seconds"]
    lines += [
        "",
        f"  ours + normalising on the CPU ({cpu / result['samples'] * 1000:.1f} ms/sample): "
        f"{result['ratio_with_cpu_normalise']:.2f}x the official path",
        f"  identical tensors (input_ids, labels, image_flags, pixels after normalising ours): "
        f"{result['identical']}/{result['samples']} samples",
    ]
    for mismatch in result["mismatches"]:
        lines.append(f"    MISMATCH sample {mismatch['index']} ({mismatch['kind']}): {mismatch['problem']}")
    verdict = "meets" if result["ratio"] >= 2 else "does NOT meet"
    lines.append(f"  target >= 2x the official path: {verdict} it ({result['ratio']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small mix and one pass (~15 s)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs per sample and path, fastest kept (default 3; --quick 1)")
    parser.add_argument("--data-dir", help="where to write (and reuse) the generated mix (default: a temp dir)")
    parser.add_argument("--tokenizer", help="a Qwen2-style tokenizer folder (default: the fixture one, else tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    else:
        print(format_result(result))
    return 0 if not result["mismatches"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
