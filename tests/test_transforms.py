"""Pixel pipeline: RGB conversion, padding, JPEG augmentation, normalisation, fixture cases."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, PngImagePlugin

from internvl_chat.data.transforms import (
    JPEG_QUALITIES,
    NORMALIZE_TYPES,
    ImageLoadError,
    TileNormalizer,
    image_to_tiles,
    jpeg_recompress,
    load_image,
    mean_std,
    normalize_lut,
    normalize_tiles,
    pad2square,
    random_jpeg_quality,
    to_rgb,
)

DATA = Path(__file__).resolve().parent / "fixtures" / "data"


@cache
def _json(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _cases() -> list[dict]:
    return _json("pixels.json")["cases"]


def _fixture_tiles(case: dict) -> np.ndarray:
    pngs = sorted((DATA / case["tiles_dir"]).glob("*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])


def _official_lut(normalize_type: str) -> np.ndarray:
    return np.array(_json("normalize_lut.json")["lut"][normalize_type], dtype=np.float32)


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("normalize_type", ["imagenet", "clip", "siglip"])
def test_lut_is_bit_exact_and_constants_match(normalize_type):
    fixture = _json("normalize_lut.json")
    assert [list(v) for v in mean_std(normalize_type)] == fixture["mean_std"][normalize_type]
    ours = normalize_lut(normalize_type).numpy()
    assert ours.shape == (3, 256) and ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), _official_lut(normalize_type).view(np.uint32))


@pytest.mark.parametrize("normalize_type", ["imagenet", "clip", "siglip"])
def test_normaliser_on_real_tiles_equals_lut_lookup(normalize_type):
    tiles = _fixture_tiles(_cases()[0])  # [N, H, W, 3] uint8
    lut = _official_lut(normalize_type)
    expected = np.stack([lut[c][tiles[..., c]] for c in range(3)], axis=1)  # [N, 3, H, W]
    got = normalize_tiles(torch.from_numpy(tiles), normalize_type)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))
    # numpy input, NCHW input and a single HWC tile give the same numbers
    assert torch.equal(normalize_tiles(tiles, normalize_type), got)
    nchw = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(normalize_tiles(nchw, normalize_type, channels_last=False), got)
    assert torch.equal(normalize_tiles(tiles[1], normalize_type), got[1:2])


@pytest.mark.parametrize("normalize_type", ["imagenet", "clip", "siglip"])
def test_every_level_of_every_channel_is_the_official_value(normalize_type):
    """The CPU computes the values (float32 arithmetic) instead of indexing the table: all 3 x 256 bit for bit."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3)
    got = normalize_tiles(levels, normalize_type).reshape(3, 256).numpy()
    assert np.array_equal(got.view(np.uint32), _official_lut(normalize_type).view(np.uint32))
    assert torch.equal(normalize_tiles(levels, normalize_type, dtype=torch.bfloat16),
                       torch.from_numpy(got).reshape(1, 3, 16, 16).to(torch.bfloat16))


def test_normaliser_dtype_and_device_follow_the_module():
    tiles = torch.from_numpy(_fixture_tiles(_cases()[0])[:, :64, :64])
    module = TileNormalizer("clip")
    reference = module(tiles)
    assert torch.equal(module(tiles, dtype=torch.bfloat16), reference.to(torch.bfloat16))
    assert torch.equal(module.to(torch.bfloat16)(tiles), reference.to(torch.bfloat16))
    assert "lut" not in module.state_dict()  # a constant, never saved into checkpoints


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_normaliser_on_gpu_is_bit_identical_to_cpu():
    tiles = torch.from_numpy(_fixture_tiles(_cases()[0]))
    cpu = normalize_tiles(tiles, "imagenet")
    module = TileNormalizer("imagenet").cuda()
    assert torch.equal(module(tiles.cuda()).cpu(), cpu)
    assert torch.equal(module(tiles.cuda(), dtype=torch.bfloat16).cpu(), cpu.to(torch.bfloat16))


def test_normaliser_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        normalize_tiles(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        normalize_tiles(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="normalize_type"):
        normalize_tiles(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), "imagenet21k")


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["tiles_dir"].split("/")[-1])
def test_pixels_case_end_to_end(case):
    image = load_image(DATA / case["image"])
    assert Image.open(DATA / case["image"]).mode == case["source_mode"]
    kwargs = dict(
        dynamic=case["dynamic_image_size"],
        image_size=case["image_size"],
        use_thumbnail=case["use_thumbnail"],
        pad2square=case["pad2square"],
        normalize_type=case["normalize_type"],
    )
    if case["dynamic_image_size"]:
        kwargs.update(min_num=case["min_num"], max_num=case["max_num"])
    tiles = image_to_tiles(image, **kwargs)
    assert tiles.dtype == torch.uint8 and list(tiles.shape) == [case["num_tiles"], 448, 448, 3]
    assert np.array_equal(tiles.numpy(), _fixture_tiles(case))

    pixels = normalize_tiles(tiles, case["normalize_type"])
    assert list(pixels.shape) == case["shape"]
    for sample in case["samples"]:
        assert pixels[tuple(sample["index"])].item() == sample["value"], sample
    wide = pixels.double()
    assert wide.sum().item() == pytest.approx(case["sum"], rel=1e-12)
    assert (wide**2).sum().item() == pytest.approx(case["sum_sq"], rel=1e-12)
    assert wide.mean(dim=(1, 2, 3)).tolist() == pytest.approx(case["tile_mean"], abs=1e-9)
    assert wide.flatten(1).std(dim=1).tolist() == pytest.approx(case["tile_std"], abs=1e-9)
    assert wide.mean(dim=(0, 2, 3)).tolist() == pytest.approx(case["channel_mean"], abs=1e-9)


def test_image_to_tiles_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="normalize_type"):
        image_to_tiles(Image.new("RGB", (8, 8)), normalize_type="nope")


# ------------------------------------------------------------------------------ modes


def _gradient(mode_size=(40, 24)) -> np.ndarray:
    w, h = mode_size
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([x * 6 % 256, y * 10 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def _official_modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(_gradient())
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray((_gradient()[..., 0] // 2).astype(np.uint8)))
    palette_t = rgb.quantize(16)
    palette_t.info["transparency"] = 3
    return {
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "P": rgb.quantize(16),
        "P+transparency": palette_t,
        "PA": rgba.convert("PA"),
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
        "YCbCr": rgb.convert("YCbCr"),
        "I (8-bit values)": rgb.convert("L").convert("I"),
        "F (0..255 values)": rgb.convert("L").convert("F"),
    }


@pytest.mark.parametrize("name", list(_official_modes()))
def test_modes_without_a_deviation_match_official_convert(name):
    image = _official_modes()[name]
    ours = to_rgb(image)
    assert ours.mode == "RGB" and ours.size == image.size
    assert np.array_equal(np.asarray(ours), np.asarray(image.convert("RGB"))), name


def test_palette_fixture_image_matches_official_convert():
    path = DATA / "images" / "palette_P_800x200.png"
    with Image.open(path) as raw:
        official = np.asarray(raw.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), official)


def test_16_bit_images_are_scaled_not_clipped():
    levels = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 0, 1, 1, 128, 255]
    # The same data read as 32-bit "I" (older Pillow, TIFF) is treated as 16-bit too.
    as_i = Image.fromarray(levels.astype(np.int32))
    assert np.array_equal(np.asarray(to_rgb(as_i)), np.asarray(to_rgb(image)))
    # The official result clips everything above 255 to white; the switch restores it.
    official = np.asarray(to_rgb(image, rescale_high_bit_depth=False))
    assert np.array_equal(official, np.asarray(image.convert("RGB")))
    assert official[0, :, 0].tolist() == [0, 128, 129, 255, 255, 255]


def test_8_bit_data_in_a_16_bit_container_is_kept():
    # a 16-bit PNG holding 0..255 (some converters write those) must not turn black
    levels = np.array([[0, 17, 128, 255]], dtype=np.uint16)
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 17, 128, 255]
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_16_bit_png_file_round_trip(tmp_path):
    levels = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    gray = np.asarray(load_image(tmp_path / "deep.png"))[..., 0]
    assert np.array_equal(gray, np.floor(levels / 257 + 0.5).astype(np.uint8))
    assert np.asarray(load_image(tmp_path / "deep.png", rescale_high_bit_depth=False)).min() == 0


def test_float_and_wide_integer_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]


def _with_orientation(image: Image.Image, orientation: int, fmt: str) -> io.BytesIO:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(
        buffer, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {})
    )
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_unless_disabled(fmt):
    image = Image.fromarray(_gradient((40, 24)))
    rotated = load_image(_with_orientation(image, 6, fmt))  # 6: rotate 90° clockwise to view
    assert rotated.size == (24, 40)
    raw = load_image(_with_orientation(image, 6, fmt), exif_transpose=False)
    assert raw.size == (40, 24)
    expected = raw.transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(rotated), np.asarray(expected))
    # Upright files are untouched, and the tag is gone once applied (no double rotation later).
    assert load_image(_with_orientation(image, 1, fmt)).size == (40, 24)
    assert to_rgb(rotated).size == (24, 40)


# -------------------------------------------------------------------------- geometry / augmentation


@pytest.mark.parametrize("size,offset", [((10, 4), (0, 3)), ((3, 8), (2, 0)), ((5, 5), (0, 0))])
def test_pad2square_centres_with_truncated_mean_fill(size, offset):
    content = Image.new("RGB", size, (1, 2, 3))
    padded = np.asarray(pad2square(content, NORMALIZE_TYPES["imagenet"][0]))
    side = max(size)
    assert padded.shape == (side, side, 3)
    x, y = offset
    assert (padded[y : y + size[1], x : x + size[0]] == (1, 2, 3)).all()
    mask = np.ones((side, side), bool)
    mask[y : y + size[1], x : x + size[0]] = False
    assert (padded[mask] == (123, 116, 103)).all()  # int(0.485*255), int(0.456*255), int(0.406*255)


def test_pad2square_needs_rgb():
    with pytest.raises(ValueError, match="RGB"):
        pad2square(Image.new("L", (4, 2)), (0.5, 0.5, 0.5))


def test_jpeg_recompress_is_deterministic_and_lossy():
    tile = Image.fromarray(_gradient((64, 64)))
    a, b = jpeg_recompress(tile, 80), jpeg_recompress(tile, 80)
    assert a.mode == "RGB" and a.size == tile.size
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(tile))
    # Matches a plain PIL encode/decode at that quality.
    buffer = io.BytesIO()
    tile.save(buffer, format="JPEG", quality=80)
    assert np.array_equal(np.asarray(a), np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))

    def error(quality):
        return np.abs(
            np.asarray(jpeg_recompress(tile, quality), float) - np.asarray(tile, float)
        ).mean()

    assert error(100) < error(75)
    with pytest.raises(ValueError, match="quality"):
        jpeg_recompress(tile, 0)


def test_seeded_augmentation_is_reproducible_per_tile():
    assert JPEG_QUALITIES == tuple(range(75, 101))
    draws = [random_jpeg_quality(random.Random(s)) for s in range(400)]
    assert set(draws) == set(JPEG_QUALITIES)
    image = Image.fromarray(_gradient((200, 90)))
    kwargs = dict(dynamic=True, min_num=1, max_num=6, image_size=64, use_thumbnail=True)
    first = image_to_tiles(image, augment_rng=random.Random(7), **kwargs)
    again = image_to_tiles(image, augment_rng=random.Random(7), **kwargs)
    plain = image_to_tiles(image, **kwargs)
    assert torch.equal(first, again) and first.shape == plain.shape
    # Each tile got its own quality, drawn in tile order from the rng.
    rng = random.Random(7)
    from internvl_chat.data.tiling import dynamic_preprocess

    for tile, pil in zip(first, dynamic_preprocess(image, 1, 6, 64, True), strict=True):
        assert np.array_equal(
            tile.numpy(), np.asarray(jpeg_recompress(pil, random_jpeg_quality(rng)))
        )


# ------------------------------------------------------------------------------ loading


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="nope.jpg"):
        load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="junk.png") as info:
        load_image(junk)
    assert isinstance(info.value, OSError)


def test_truncated_images_need_the_switch_and_pil_globals_are_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # PIL's default
    data = io.BytesIO()
    Image.fromarray(_gradient((64, 64))).save(data, format="JPEG", quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data.getvalue()[: len(data.getvalue()) * 2 // 3])
    with pytest.raises(ImageLoadError, match="cut.jpg.*truncated") as info:  # a finding by default ...
        load_image(cut)
    assert info.value.kind == "truncated_image"
    assert load_image(cut, allow_truncated=True).size == (64, 64)  # ... the official settings accept it
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 640x360 image is now a "bomb" to PIL
    path = DATA / "images" / "grad_rgb_640x360.png"
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert load_image(path).size == (640, 360)  # our limit (PIL's default threshold) is the higher one
    assert Image.MAX_IMAGE_PIXELS == 100
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_import_has_no_global_pil_side_effects():
    code = (
        "from PIL import Image, ImageFile, PngImagePlugin as P\n"
        "limits = lambda: (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,"
        " P.MAX_TEXT_CHUNK)\n"
        "before = limits()\n"
        "import internvl_chat.data.transforms\n"
        "assert before == limits(), (before, limits())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_concurrent_loads_restore_pil_globals(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_CHUNK", 1234)
    path = DATA / "images" / "palette_P_800x200.png"
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: load_image(path).size, range(16)))
    assert sizes == [(800, 200)] * 16
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and PngImagePlugin.MAX_TEXT_CHUNK == 1234
