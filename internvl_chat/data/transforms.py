"""Per-image pixel pipeline: load, convert to RGB, tile, augment, normalise.

The official pipeline turns every tile into float32 inside the dataloader (torchvision
``ToTensor`` + ``Normalize``). Here the CPU side stops at uint8: :func:`image_to_tiles` returns
``uint8 [N, S, S, 3]`` tiles (channels-last, PIL's own layout, 4x smaller to ship from workers),
and :class:`TileNormalizer` turns them into ``[N, 3, S, S]`` on whatever device the model is on.
The normaliser is a 256-entry lookup table per channel holding exactly the float32 values the
official CPU arithmetic gives, so the result is bit-identical on CPU and GPU (redoing the
arithmetic on a GPU need not be: CUDA kernels may divide by a scalar via its reciprocal), and a
bf16 result is the float32 one rounded once.

Behaviour that differs from the official pipeline: EXIF orientation is applied, and 16-bit /
float images are scaled to 8 bits instead of being clipped to white (both switchable per call, see
:func:`to_rgb`); ``pad2square`` is honoured even with ``data_augment`` (see :func:`image_to_tiles`).
Everything else matches the official code bit for bit.

Loading (:func:`load_image`) is stricter than the official dataset, which sets
``Image.MAX_IMAGE_PIXELS = None`` and ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` for the whole
process: a decompression bomb is refused from its header (``max_image_pixels``, default PIL's own
threshold, see :mod:`~internvl_chat.data.media`) instead of being decoded, a truncated file is an
error (``allow_truncated=True`` restores the official grey fill), and a path that is not a regular
file (FIFO, device, directory, symlink loop) is refused before it is opened. PIL's global settings
are left alone unless a caller asks for more than they allow (see :func:`_pil_settings`).
"""

from __future__ import annotations

import io
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import cache
from numbers import Integral
from typing import IO, Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, PngImagePlugin

from internvl_chat.constants import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
)
from internvl_chat.data.errors import DataError
from internvl_chat.data.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_pixels,
    draft_to_cover,
    open_regular_file,
    sniff_image_size,
)
from internvl_chat.data.tiling import dynamic_preprocess, fast_dynamic_preprocess

__all__ = [
    "NORMALIZE_TYPES",
    "JPEG_QUALITIES",
    "ImageLoadError",
    "ImageTooLargeError",
    "mean_std",
    "load_image",
    "open_image",
    "image_size",
    "to_rgb",
    "pad2square",
    "jpeg_recompress",
    "random_jpeg_quality",
    "image_to_tiles",
    "normalize_lut",
    "normalize_tiles",
    "TileNormalizer",
]

NORMALIZE_TYPES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
}

# The official training augmentation re-encodes each tile as JPEG at a quality drawn uniformly
# from 75..100 inclusive (26 choices).
JPEG_QUALITIES = tuple(range(75, 101))

# The official dataset raises PNG's text-chunk limit to 100 MiB (large metadata in scraped PNGs).
_PNG_TEXT_CHUNK_LIMIT = 100 * 1024 * 1024


def mean_std(normalize_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of ``imagenet`` (InternVL's default), ``clip`` or ``siglip``."""
    try:
        return NORMALIZE_TYPES[normalize_type]
    except KeyError:
        raise ValueError(
            f"unknown normalize_type {normalize_type!r}; expected one of {sorted(NORMALIZE_TYPES)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Loading


class ImageLoadError(OSError):
    """An image file could not be opened or decoded; the message names the file.

    ``kind`` says why, in the words of :class:`~internvl_chat.data.errors.DataError`:
    ``missing_file``, ``not_a_file``, ``unreadable_file``, ``image_too_large``, ``truncated_image``
    or ``corrupt_image``.
    """

    def __init__(self, message: str, kind: str = "corrupt_image") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return (type(self), (str(self), self.kind))


class ImageTooLargeError(ImageLoadError, ValueError):
    """The image has more pixels than allowed (found from its header, before decoding)."""

    def __init__(self, message: str, kind: str = "image_too_large") -> None:
        super().__init__(message, kind)


class _GlobalOverride:
    """Set one PIL module global while at least one loader needs it, reference-counted.

    PIL reads these globals at decode time and has no per-image switch. The value is set when the
    first user enters and restored when the last one leaves, so threads loading in parallel never
    see it flip mid-decode and decoding is not serialised. Other code that opens images from another
    thread at that moment sees the changed value too: that is why only what a caller asked for is
    changed (see :func:`_pil_settings`).
    """

    def __init__(self, module: Any, name: str, value: Callable[[Any], Any]) -> None:
        self.module, self.name, self.value = module, name, value
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Any = None

    def original(self) -> Any:
        """The value outside of any load (what it was before the first current user set it)."""
        with self._lock:
            return self._saved if self._users else getattr(self.module, self.name)

    @contextmanager
    def applied(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = getattr(self.module, self.name)
                setattr(self.module, self.name, self.value(self._saved))
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    setattr(self.module, self.name, self._saved)


# The official dataset raises PNG's text-chunk limit (large metadata in scraped PNGs); never lowers it.
_TEXT_CHUNK = _GlobalOverride(PngImagePlugin, "MAX_TEXT_CHUNK", lambda old: max(old, _PNG_TEXT_CHUNK_LIMIT))
_TRUNCATED = _GlobalOverride(ImageFile, "LOAD_TRUNCATED_IMAGES", lambda old: True)
_NO_PIL_PIXEL_LIMIT = _GlobalOverride(Image, "MAX_IMAGE_PIXELS", lambda old: None)


@contextmanager
def _pil_settings(max_image_pixels: int, allow_truncated: bool) -> Iterator[None]:
    """PIL's globals for one load, changed only as far as the caller asked.

    * The PNG text-chunk limit is raised to the official 100 MiB (bounded; metadata only).
    * ``LOAD_TRUNCATED_IMAGES`` is turned on only for ``allow_truncated`` (the official setting).
    * PIL's own pixel limit is lifted only when ours is higher (``max_image_pixels`` 0, or above
      ``2 * Image.MAX_IMAGE_PIXELS``): our header check then bounds the image instead. With the
      default limit PIL's global stays as it is.
    """
    pil_limit = _NO_PIL_PIXEL_LIMIT.original()
    lift = pil_limit is not None and (max_image_pixels == 0 or max_image_pixels > 2 * pil_limit)
    with ExitStack() as stack:
        stack.enter_context(_TEXT_CHUNK.applied())
        if allow_truncated:
            stack.enter_context(_TRUNCATED.applied())
        if lift:
            stack.enter_context(_NO_PIL_PIXEL_LIMIT.applied())
        yield


def _check_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"max_image_pixels must be an int >= 0 (0 = no limit), got {value!r}")
    return int(value)


@contextmanager
def _open_checked(
    source: str | os.PathLike | IO[bytes], name: str, max_image_pixels: int
) -> Iterator[Image.Image]:
    """PIL's lazily opened image (header parsed, no pixels), after the path and size checks."""
    if isinstance(source, (str, os.PathLike)):
        try:
            fp = open_regular_file(source, what="image")
        except DataError as err:
            raise ImageLoadError(err.reason, err.kind) from None
    else:
        fp = nullcontext(source)
    with fp as stream:
        if stream.seekable():
            size = sniff_image_size(stream)
            if size is not None:
                _check_size(size, max_image_pixels, name)
        try:
            image = Image.open(stream)
        except Image.DecompressionBombError as exc:  # PIL's own limit, in a format we do not sniff
            raise ImageTooLargeError(f"image {name!r} is too large: {exc}") from exc
        except Exception as exc:
            empty = stream.seekable() and stream.seek(0, os.SEEK_END) == 0
            why = "the file is empty (0 bytes)" if empty else f"{type(exc).__name__}: {exc}"
            raise ImageLoadError(f"cannot load image {name!r}: {why}") from exc
        with image:
            _check_size(image.size, max_image_pixels, name)  # formats not sniffed; GIF frame extents
            yield image


def _check_size(size: tuple[int, int], max_image_pixels: int, name: str) -> None:
    try:
        check_pixels(size[0], size[1], max_image_pixels, f"image {name!r}")
    except DataError as err:
        raise ImageTooLargeError(err.reason) from None


def _truncated(exc: BaseException, name: str) -> ImageLoadError | None:
    """PIL's own truncation error (raised while ``LOAD_TRUNCATED_IMAGES`` is off) as ``truncated_image``."""
    if not (isinstance(exc, OSError) and str(exc).startswith("image file is truncated")):
        return None
    return ImageLoadError(
        f"image {name!r} is truncated ({exc}); pass --allow_truncated_images to load such files with the "
        "missing part grey, as the official code does",
        kind="truncated_image",
    )


def _decode(image: Image.Image, name: str) -> None:
    """``image.load()``, naming a cut-off file ``truncated_image``."""
    try:
        image.load()
    except OSError as exc:
        error = _truncated(exc, name)
        if error is None:
            raise
        raise error from exc


def _source_name(source: str | os.PathLike | IO[bytes]) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", "<file object>")


@contextmanager
def open_image(
    source: str | os.PathLike | IO[bytes],
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_truncated: bool = False,
) -> Iterator[Image.Image]:
    """PIL's lazily opened image (header parsed, nothing decoded) after :func:`load_image`'s checks,
    with the PIL settings for decoding it in effect until the block ends (for callers that decode
    several frames themselves). Raises :class:`ImageLoadError` for the checks and the open."""
    max_image_pixels = _check_limit(max_image_pixels)
    name = _source_name(source)
    with _pil_settings(max_image_pixels, allow_truncated), _open_checked(source, name, max_image_pixels) as image:
        yield image


def load_image(
    source: str | os.PathLike | IO[bytes],
    *,
    exif_transpose: bool = True,
    rescale_high_bit_depth: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_truncated: bool = False,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Open and fully decode an image file and return it as RGB (see :func:`to_rgb`).

    ``draft`` (the opt-in fast path): a JPEG is decoded at the smallest DCT scale whose upright size still covers
    this ``(width, height)`` (:func:`~internvl_chat.data.media.draft_to_cover`); without it, at full size.

    Before anything is decoded: a path must be a regular file (a FIFO, device, directory or symlink
    loop is refused, see :mod:`~internvl_chat.data.media`), and the image may have at most
    ``max_image_pixels`` pixels (0: no limit), read from its header, so a decompression bomb costs
    neither time nor memory. Only the first frame of an animated GIF/PNG/WebP is decoded (its canvas
    is what is checked). A truncated file is refused (``truncated_image``) unless
    ``allow_truncated``, which loads it with the missing part grey as the official code does.

    Any failure raises :class:`ImageLoadError` (an ``OSError``) whose message names the file and
    whose ``kind`` names the problem; an image over the limit raises :class:`ImageTooLargeError`,
    which is also a ``ValueError``.
    """
    _check_limit(max_image_pixels)  # a bad argument is a ValueError, not a bad image
    name = _source_name(source)
    try:
        with open_image(source, max_image_pixels=max_image_pixels, allow_truncated=allow_truncated) as image:
            if draft is not None:
                draft_to_cover(image, draft, exif_transpose=exif_transpose)
            _decode(image, name)
            _check_size(image.size, max_image_pixels, name)  # a plugin that decoded more than it declared
            return to_rgb(image, exif_transpose=exif_transpose, rescale_high_bit_depth=rescale_high_bit_depth)
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageLoadError(f"cannot load image {name!r}: {type(exc).__name__}: {exc}") from exc


def image_size(
    source: str | os.PathLike | IO[bytes],
    *,
    exif_transpose: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_truncated: bool = False,
) -> tuple[int, int]:
    """``(width, height)`` of the image :func:`load_image` would return, from the header.

    The same checks as :func:`load_image` (regular file, pixel limit); an EXIF rotation by 90
    degrees swaps the sides when ``exif_transpose``. Reading the EXIF block of a PNG that stores it
    after the pixel data makes PIL decode the image (bounded by the limit checked first).
    """
    _check_limit(max_image_pixels)  # a bad argument is a ValueError, not a bad image
    name = _source_name(source)
    try:
        with open_image(source, max_image_pixels=max_image_pixels, allow_truncated=allow_truncated) as image:
            width, height = image.size
            if not exif_transpose:
                return width, height
            try:
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            except OSError as exc:
                error = _truncated(exc, name)
                if error is None:
                    raise
                raise error from exc
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(f"cannot read image {name!r}: {type(exc).__name__}: {exc}") from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# --------------------------------------------------------------------------------------------
# Mode conversion

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF must not make a decodable image unusable
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _round_div(values: np.ndarray, divisor: int) -> np.ndarray:
    """Round-half-up integer division of non-negative ints, as uint8."""
    values = values.astype(np.int64)
    return ((2 * values + divisor) // (2 * divisor)).astype(np.uint8)


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """8-bit grey version of a 16-bit / 32-bit / float image, or the image itself if 8 bits fit."""
    values = np.asarray(image)
    if values.size == 0:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        if int(values.max()) <= 255:
            return image  # 8-bit data in a 16-bit container: the official clip is exact
        return Image.fromarray(_round_div(values, 257))  # 65535 -> 255
    if image.mode == "I":
        lo, hi = int(values.min()), int(values.max())
        if 0 <= lo and hi <= 255:
            return image  # 8-bit data stored as int32: the official clip is exact
        if 0 <= lo and hi <= 65535:  # 16-bit data (16-bit TIFF, PNG from older Pillow)
            return Image.fromarray(_round_div(values, 257))
        scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.rint(scaled).astype(np.uint8))
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        if values.min() >= 0.0 and values.max() <= 1.0:
            return Image.fromarray(np.rint(values * 255.0).astype(np.uint8))
        return image  # already on a 0..255 scale: PIL's clip is what the official code gives
    return image


def to_rgb(
    image: Image.Image,
    *,
    exif_transpose: bool = True,
    rescale_high_bit_depth: bool = True,
) -> Image.Image:
    """Convert any PIL image to RGB the way the official pipeline does, minus two of its bugs.

    Official behaviour (``image.convert("RGB")``), kept as is:

    * ``L`` and ``1`` are replicated to grey RGB (``1`` gives 0/255); ``P`` goes through its
      palette, and a palette transparency entry is ignored (the stored colour shows);
    * ``LA``, ``PA``, ``RGBA``: the alpha channel is DROPPED, not composited, so transparent pixels
      show whatever colour they store. Changing that would change what official models were trained
      on; composite onto a background yourself if your data needs it;
    * ``CMYK`` uses PIL's plain formula (no ICC colour management); ``YCbCr``/``LAB``/``HSV`` use
      PIL's conversions; an RGB image is returned unchanged (no copy).

    Deviations, each with a switch that restores the official result when ``False``:

    * ``exif_transpose``: apply the EXIF Orientation tag first, so a phone photo is upright as in
      any viewer (the official code ignores it and trains on the sideways pixels).
    * ``rescale_high_bit_depth``: PIL clips 16-bit (``I;16*``, and ``I`` holding values above 255)
      to 0..255, which turns a normal 16-bit PNG almost entirely white. Instead, 16-bit values are
      scaled by 255/65535 (rounded), ``I`` data outside 0..65535 is stretched from its min..max,
      and ``F`` data lying in [0, 1] is scaled by 255 (``F`` data on a 0..255 scale is clipped by
      PIL as before, and ``I`` or 16-bit data whose values all lie in 0..255 is untouched: that is
      8-bit data in a wider container, which the official clip converts exactly).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_rgb expects a PIL image, got {type(image).__name__}")
    if exif_transpose:
        image = _apply_exif_orientation(image)
    if rescale_high_bit_depth and image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        image = _high_bit_depth_to_l(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert a {image.mode!r} image to RGB: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Geometry and augmentation


def _require_rgb(image: Image.Image, what: str) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} expects a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(
            f"{what} expects an RGB image, got mode {image.mode!r}; use to_rgb() first"
        )


def pad2square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Pad an RGB image to a centred square with the mean colour, as the official ``expand2square``.

    The fill is ``int(m * 255)`` per channel (truncated, e.g. ImageNet gives (123, 116, 103)); the
    image sits at offset ``(side - size) // 2`` on the short axis. A square image is returned as is.
    """
    _require_rgb(image, "pad2square")
    if len(mean) != 3:
        raise ValueError(f"pad2square needs 3 mean values (one per RGB channel), got {len(mean)}")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


_pad2square = pad2square  # image_to_tiles has a flag of the same name


def jpeg_recompress(image: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at ``quality`` with PIL's defaults (4:2:0) and decode again (RGB)."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an int in 1..100, got {quality!r}")
    with io.BytesIO() as buffer:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            decoded.load()
            return decoded.convert("RGB")


def random_jpeg_quality(rng: random.Random) -> int:
    """Draw one quality uniformly from :data:`JPEG_QUALITIES` (the official ``data_augment``).

    Pass a seeded ``random.Random`` to make the augmentation reproducible; the official code draws
    from the process-global ``random`` state instead, so its exact draws cannot be replayed.
    """
    return rng.choice(JPEG_QUALITIES)


def image_to_tiles(
    image: Image.Image,
    *,
    dynamic: bool = True,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
    pad2square: bool = False,
    normalize_type: str = "imagenet",
    augment_rng: random.Random | None = None,
    fast: bool = False,
    source_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Turn one image into the uint8 tiles the model sees: ``[N, S, S, 3]``, channels-last.

    ``dynamic`` tiles with :func:`~internvl_chat.data.tiling.dynamic_preprocess` (thumbnail last);
    otherwise the whole image becomes one tile, resized to S x S with BICUBIC (aspect not kept)
    after an optional centred ``pad2square`` in the mean colour of ``normalize_type`` (a no-op for
    the square dynamic tiles). With ``augment_rng`` every tile is JPEG re-compressed at its own
    random quality (the official ``data_augment``). Feed the result to :class:`TileNormalizer`.
    ``fast`` (with ``dynamic``) tiles with :func:`~internvl_chat.data.tiling.fast_dynamic_preprocess` instead,
    planning the grid from ``source_size`` (the original size when ``image`` is a reduced decode; default its own).

    Deviation: the official training transform silently skips ``pad2square`` when ``data_augment``
    is on; here padding is applied whenever it is asked for (after the JPEG round trip, so the
    border keeps the exact mean colour).

    Non-RGB inputs go through :func:`to_rgb` with its defaults; call it (or :func:`load_image`)
    yourself to choose the conversion.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image_to_tiles expects a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = to_rgb(image)
    mean, _ = mean_std(normalize_type)
    if dynamic:
        if fast:
            tiles = fast_dynamic_preprocess(image, source_size or image.size, min_num, max_num, image_size,
                                            use_thumbnail)
        else:
            tiles = dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail)
    else:
        if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        image_size = int(image_size)
        tiles = [image]
    size = (image_size, image_size)
    arrays = []
    for tile in tiles:
        if augment_rng is not None:
            tile = jpeg_recompress(tile, random_jpeg_quality(augment_rng))
        if pad2square:
            tile = _pad2square(tile, mean)
        if tile.size != size:  # PIL would return a copy for an equal size: skip the work
            tile = tile.resize(size, Image.Resampling.BICUBIC)
        arrays.append(np.asarray(tile))
    return torch.from_numpy(np.stack(arrays))


# --------------------------------------------------------------------------------------------
# Normalisation


@cache
def _lut_values(normalize_type: str) -> np.ndarray:
    mean, std = mean_std(normalize_type)
    # The official float32 arithmetic, each step rounded once: ToTensor's v / 255, then
    # Normalize's (x - mean) / std with mean and std as float32 tensors.
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    rows = [(levels - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=True)]
    table = np.stack(rows).astype(np.float32)
    table.flags.writeable = False
    return table


def normalize_lut(normalize_type: str = "imagenet") -> torch.Tensor:
    """float32 ``[3, 256]``: ``[c, v]`` is the official normalised value of level v in channel c."""
    return torch.from_numpy(_lut_values(normalize_type).copy())


class TileNormalizer(torch.nn.Module):
    """uint8 tiles ``[N, H, W, 3]`` (or one ``[H, W, 3]``) -> normalised ``[N, 3, H, W]``.

    Exactly the official ``ToTensor`` + ``Normalize`` values, on any device: on a CPU by the official
    float32 arithmetic itself, elsewhere by indexing a per-channel table (a non-persistent buffer, so
    it follows ``.to(device)`` and never enters a checkpoint). ``dtype`` picks the output type (default: the
    table's, float32); a bf16 output is the float32 value rounded once. Pass ``channels_last=False`` for
    ``[N, 3, H, W]`` input.
    """

    def __init__(self, normalize_type: str = "imagenet") -> None:
        super().__init__()
        self.normalize_type = normalize_type
        self.register_buffer("lut", normalize_lut(normalize_type), persistent=False)

    def extra_repr(self) -> str:
        return f"normalize_type={self.normalize_type!r}"

    def forward(
        self,
        tiles: torch.Tensor | np.ndarray,
        dtype: torch.dtype | None = None,
        channels_last: bool = True,
    ) -> torch.Tensor:
        if isinstance(tiles, np.ndarray):
            tiles = torch.from_numpy(np.ascontiguousarray(tiles))
        if not isinstance(tiles, torch.Tensor):
            raise TypeError(
                f"expected a uint8 tensor or array of tiles, got {type(tiles).__name__}"
            )
        if tiles.dtype != torch.uint8:
            raise TypeError(f"tiles must be uint8 (0..255 levels), got {tiles.dtype}")
        if tiles.dim() == 3:
            tiles = tiles.unsqueeze(0)
        channel_dim = 3 if channels_last else 1
        if tiles.dim() != 4 or tiles.shape[channel_dim] != 3:
            layout = "[N, H, W, 3]" if channels_last else "[N, 3, H, W]"
            raise ValueError(f"tiles must have shape {layout}, got {list(tiles.shape)}")
        if not channels_last:
            tiles = tiles.permute(0, 2, 3, 1)
        if tiles.device.type == "cpu":
            return self._arithmetic(tiles, dtype or self.lut.dtype)
        return self._table(tiles, dtype or self.lut.dtype)

    def _table(self, tiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each level looked up in the per-channel table (the way on GPUs, where a gather is cheap)."""
        lut = self.lut.to(device=tiles.device, dtype=dtype)
        # One flat table of 3*256 entries: the index of level v in channel c is c*256 + v.
        offsets = torch.arange(0, 768, 256, device=tiles.device, dtype=torch.int32)
        index = tiles.to(torch.int32) + offsets
        values = lut.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)
        return values.permute(0, 3, 1, 2).contiguous()

    def _arithmetic(self, tiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The official float32 steps themselves (v / 255, - mean, / std): the table's values bit for bit, and on
        a CPU faster than indexing the table (a gather per value), which stays the way on other devices."""
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in mean_std(self.normalize_type))
        # channels first while still uint8 (a quarter of the bytes to move), then one float32 buffer, in place
        values = tiles.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255).sub_(mean).div_(std)
        return values if dtype == torch.float32 else values.to(dtype)


def normalize_tiles(
    tiles: torch.Tensor | np.ndarray,
    normalize_type: str = "imagenet",
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> torch.Tensor:
    """Functional form of :class:`TileNormalizer` (on the device the tiles are on)."""
    return TileNormalizer(normalize_type)(tiles, dtype=dtype, channels_last=channels_last)
