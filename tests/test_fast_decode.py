"""The opt-in fast image path (--fast_image_decode): same grid, tile count and tokens as the exact path, pixels
within 40 dB PSNR of it on photo-like JPEGs and document scans, and the default path untouched."""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import build_dataset
from internvl_chat.data.tiling import canvas_size, dynamic_preprocess, plan_tiles
from internvl_chat.data.transforms import image_size, image_to_tiles, load_image
from internvl_chat.model.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PSNR_FLOOR = 40.0
MAX_PATCH = 12


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Gradients + smooth colour fields + a few soft-edged shapes + sensor noise: photo-like statistics."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = np.stack([xs / width * 200, ys / height * 180, (xs + ys) / (width + height) * 220], axis=-1)
    fields = Image.fromarray(rng.integers(0, 256, (height // 150, width // 150, 3), dtype=np.uint8))
    smooth = np.asarray(fields.resize(size, Image.Resampling.BICUBIC), np.float32)
    image = Image.fromarray(np.clip(0.5 * gradient + 0.5 * smooth, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(width // 30, width // 8))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.0))  # lens and demosaicing: no edge is one pixel sharp
    noisy = np.asarray(image, np.int16) + rng.integers(-8, 9, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def scan(size: tuple[int, int] = (2480, 3508), seed: int = 0) -> Image.Image:
    """An A4 page at 300 dpi as a scanner gives it: heading, lines of dark word boxes, a table, optical blur."""
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", size, (246, 245, 240))
    draw = ImageDraw.Draw(page)
    draw.rectangle((220, 180, 1600, 260), fill=(25, 25, 25))
    y = 380
    while y < size[1] - 300:
        x = 220
        while x < size[0] - 350:
            w = int(rng.integers(30, 160))
            draw.rectangle((x, y, x + w, y + 26), fill=(int(rng.integers(0, 60)),) * 3)
            x += w + int(rng.integers(14, 26))
        y += 50 if rng.random() < 0.9 else 90
        if rng.random() < 0.03:
            for k in range(6):
                draw.line((220, y + 56 * k, size[0] - 220, y + 56 * k), fill=(90, 90, 90), width=3)
            y += 360
    page = page.filter(ImageFilter.GaussianBlur(1.0))  # a 300-dpi scanner's optics
    noisy = np.asarray(page, np.int16) + rng.integers(-4, 5, (size[1], size[0], 1), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@functools.cache
def media(folder: str) -> dict[str, str]:
    """The generated files, once per test session (a few seconds)."""
    root = Path(folder)
    wide = photo((3000, 2000), 1)
    files = {"photo_wide.jpg": wide, "photo_tall.jpg": wide.transpose(Image.Transpose.ROTATE_90),
             "scan.jpg": scan(), "small.jpg": photo((640, 480), 3)}
    out = {}
    for name, image in files.items():
        image.save(root / name, quality=90)
        out[name] = str(root / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, upright through EXIF orientation 6 (rotate 90)
    wide.save(root / "rotated.jpg", quality=85, exif=exif)
    out["rotated.jpg"] = str(root / "rotated.jpg")
    scan((1700, 2200), 5).save(root / "page.png", compress_level=1)  # non-JPEG: reducing_gap only
    out["page.png"] = str(root / "page.png")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return media(str(tmp_path_factory.mktemp("fast_decode")))


def exact_tiles(path: str) -> torch.Tensor:
    return image_to_tiles(load_image(path), dynamic=True, max_num=MAX_PATCH, use_thumbnail=True)


def fast_tiles(path: str) -> tuple[torch.Tensor, tuple[int, int]]:
    size = image_size(path)
    image = load_image(path, draft=canvas_size(*size, 1, MAX_PATCH, 448, True))
    tiles = image_to_tiles(image, dynamic=True, max_num=MAX_PATCH, use_thumbnail=True, fast=True, source_size=size)
    return tiles, image.size


@pytest.mark.parametrize("name", ["photo_wide.jpg", "photo_tall.jpg", "scan.jpg", "rotated.jpg", "page.png",
                                  "small.jpg"])
def test_fast_tiles_match_the_exact_grid_within_the_psnr_floor(files, name):
    exact = exact_tiles(files[name])
    fast, decoded = fast_tiles(files[name])
    assert fast.shape == exact.shape  # same grid, same number of tiles (thumbnail included)
    assert fast.dtype == torch.uint8
    worst = min(psnr(f, e) for f, e in zip(fast, exact))
    assert worst >= PSNR_FLOOR, f"{name}: worst tile {worst:.1f} dB"
    upright = image_size(files[name])
    if name.endswith(".jpg") and name != "small.jpg":  # large JPEGs really are decoded at a reduced DCT scale
        stored = decoded if name != "rotated.jpg" else decoded[::-1]
        assert stored[0] * stored[1] * 4 <= upright[0] * upright[1], (name, decoded, upright)
        assert worst < 60, "identical tiles: the fast path was not taken"
    else:
        assert decoded == upright  # nothing to draft: a PNG, or a JPEG smaller than two canvases


def test_draft_never_goes_below_the_canvas(files):
    for name in ("photo_wide.jpg", "photo_tall.jpg", "scan.jpg", "rotated.jpg"):
        width, height = image_size(files[name])
        canvas = canvas_size(width, height, 1, MAX_PATCH, 448, True)
        decoded = load_image(files[name], draft=canvas).size  # upright, after the EXIF rotation
        assert decoded[0] >= canvas[0] and decoded[1] >= canvas[1], (name, decoded, canvas)


def test_tile_counts_equal_the_exact_plan_for_many_shapes():
    """Drafted sizes round up (ceil(w / s)) and so shift the aspect slightly: the grid comes from the original."""
    for width, height in [(3000, 2000), (4032, 3024), (2481, 3507), (5000, 1200), (1201, 4999), (897, 449),
                          (8000, 8001), (3333, 1111)]:
        grid = plan_tiles(width, height, 1, MAX_PATCH, 448, True)
        canvas = canvas_size(width, height, 1, MAX_PATCH, 448, True)
        scale = next(s for s in (8, 4, 2, 1) if min(width // canvas[0], height // canvas[1]) >= s)
        reduced = Image.new("RGB", (-(-width // scale), -(-height // scale)))
        tiles = image_to_tiles(reduced, dynamic=True, max_num=MAX_PATCH, use_thumbnail=True, fast=True,
                               source_size=(width, height))
        assert tiles.shape[0] == grid[2], (width, height)


def test_flag_off_gives_todays_tiles_bit_for_bit(files):
    path = files["photo_wide.jpg"]
    with Image.open(path) as image:  # today's path, as the official code writes it: decode, convert, tile
        today = np.stack([np.asarray(t) for t in dynamic_preprocess(image.convert("RGB"), 1, MAX_PATCH, 448, True)])
    assert DataConfig().fast_image_decode is False
    assert np.array_equal(exact_tiles(path).numpy(), today)


def _dataset(folder: Path, files: dict[str, str], fast: bool):
    records = [
        {"image": files["photo_wide.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A photo."}]},
        {"image": files["scan.jpg"], "conversations": [
            {"from": "human", "value": "Read the page."}, {"from": "gpt", "value": "Some text."}]},
        {"image": [files["photo_tall.jpg"], files["rotated.jpg"]], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "They differ."}]},
    ]
    (folder / "ds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {"ds": {"root": str(folder), "annotation": str(folder / "ds.jsonl"), "data_augment": False,
                   "repeat_time": 1}}
    (folder / "meta.json").write_text(json.dumps(meta))
    flags = types.SimpleNamespace(conv_style="internvl2_5", dynamic_image_size=True, use_thumbnail=True,
                                  max_dynamic_patch=MAX_PATCH, bad_data="fail", fast_image_decode=fast)
    config = DataConfig.from_args(flags)
    assert config.fast_image_decode is fast
    return build_dataset(folder / "meta.json", load_tokenizer(str(FIXTURES / "tokenizer_qwen2")), config)


def test_the_flag_reaches_the_dataset_with_the_same_tokens(files, tmp_path):
    exact, fast = _dataset(tmp_path, files, False), _dataset(tmp_path, files, True)
    for i in range(len(exact)):
        a, b = exact[i], fast[i]
        assert torch.equal(a["input_ids"], b["input_ids"])  # same tile counts, so the same image tokens
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["image_flags"], b["image_flags"])
        assert a["pixel_values"].shape == b["pixel_values"].shape
        assert PSNR_FLOOR <= psnr(a["pixel_values"], b["pixel_values"]) < 60  # close, and not the exact path


def test_the_command_line_flag(tmp_path):
    from internvl_chat.finetune import data_config, parse_args

    model = types.SimpleNamespace(num_image_token=256)
    for argv, expected in (([], False), (["--fast_image_decode"], True), (["--fast_image_decode", "False"], False)):
        _, data_args, training_args = parse_args(["--output_dir", str(tmp_path), *argv])
        assert data_config(data_args, training_args, model).fast_image_decode is expected
