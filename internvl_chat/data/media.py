"""Opening media files safely: what a path is, how big an image is, before anything is decoded.

Three guards, shared by the image loader (:func:`~internvl_chat.data.transforms.load_image`), the
video decoders (:mod:`~internvl_chat.data.video_decode`), the dataset, the checker and chat:

* **Only regular files are read.** :func:`check_media_path` ``stat``\\ s the path first and names
  what it is when it is not a file: a directory, a FIFO (named pipe: ``open`` blocks until a writer
  appears, i.e. forever), a character device (``/dev/zero`` never ends), a block device, a socket, a
  symlink loop, or a dangling symlink. :func:`open_regular_file` then opens with ``O_NONBLOCK`` and
  checks the open descriptor again, so a path swapped for a FIFO after the ``stat`` cannot block
  either. Video files are opened by the decoder library itself, by path, after the same ``stat``.
* **Pixels are counted from the header.** :func:`sniff_image_size` reads the width and height of a
  PNG, GIF, JPEG, BMP or WebP file from its first bytes (a JPEG: its segment headers, skipped with
  seeks) without PIL, and :func:`check_pixels` refuses more than ``max_image_pixels`` with the size
  and the limit in the message. Other formats are checked on PIL's lazily opened image, which has
  parsed only its header too. Nothing is allocated for the pixels of a refused image.
* **Videos are bounded** by frame count, duration and frame size (:class:`MediaLimits`).

Defaults, and why:

* ``max_image_pixels`` = 178,956,970 = PIL's own ``DecompressionBombError`` threshold
  (``2 * Image.MAX_IMAGE_PIXELS``, 2 x 89,478,485): nothing PIL accepts out of the box is refused,
  and the largest accepted image costs about 0.5 GB as RGB. 0 means no limit.
* ``max_video_frames`` = 1,000,000 (9.3 hours at 30 fps) and ``max_video_seconds`` = 36,000
  (10 hours): far above any clip a model trains on, far below the absurd values a broken or hostile
  header declares (2^31 frames, or a frame rate of 1e-9 fps, which would make the frame-index
  arithmetic allocate gigabytes). 0 means no limit.

Deviation from the official code: it removes PIL's pixel limit for the whole process
(``Image.MAX_IMAGE_PIXELS = None``) and so decodes any decompression bomb (a 48 kB PNG of 20000 x
20000 pixels takes 2.2 GB). Here the limit is ours, explicit and configurable.

Every problem raises :class:`~internvl_chat.data.errors.DataError` with a ``kind``:
``missing_file`` (absent, or a dangling symlink), ``not_a_file`` (directory, FIFO, device, socket,
symlink loop), ``unreadable_file`` (permission and other OS errors), ``image_too_large`` and
``video_too_long``.

The opt-in fast image path asks a lazily opened JPEG to decode smaller (:func:`draft_to_cover`), once the size
it will be resized to is known from the header.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from numbers import Integral, Real
from typing import IO

from internvl_chat.data.errors import DataError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_VIDEO_FRAMES",
    "DEFAULT_MAX_VIDEO_SECONDS",
    "MediaLimits",
    "check_media_path",
    "open_regular_file",
    "sniff_image_size",
    "check_pixels",
    "draft_to_cover",
]

# PIL's DecompressionBombError threshold with its default settings: 2 * Image.MAX_IMAGE_PIXELS, where
# MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3) = 89,478,485. Written out, not read from PIL,
# so that code which lifts PIL's global limit (as the official dataset does) does not lift ours.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
DEFAULT_MAX_VIDEO_FRAMES = 1_000_000
DEFAULT_MAX_VIDEO_SECONDS = 36_000.0

# EXIF Orientation values that rotate by 90 degrees: the upright image's sides are the stored ones swapped.
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)

# A JPEG's size sits in its SOF segment, after APPn/COM/DQT/DHT segments; stop looking after this many
# (each is skipped with a seek, so even this many costs nothing).
_JPEG_MAX_SEGMENTS = 1024


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on what one sample may make the loader decode; 0 disables a bound.

    ``max_image_pixels`` applies to images (every frame that is decoded) and to video frames;
    ``max_video_frames`` / ``max_video_seconds`` to the frame count and duration a video, GIF or
    frame folder declares (or is counted to hold), checked before any frame is decoded.
    ``allow_truncated_images`` loads truncated image files with their missing part grey (the
    official behaviour) instead of refusing them.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    allow_truncated_images: bool = False

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_video_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = no limit), got {value!r}")
        seconds = self.max_video_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, Real) or not seconds >= 0:
            raise ValueError(f"max_video_seconds must be a number >= 0 (0 = no limit), got {seconds!r}")
        if not isinstance(self.allow_truncated_images, bool):
            raise ValueError(f"allow_truncated_images must be a bool, got {self.allow_truncated_images!r}")


# --------------------------------------------------------------------------------------------
# What a path is

_NOT_A_FILE = (
    (stat.S_ISDIR, "a directory", ""),
    (stat.S_ISFIFO, "a FIFO (named pipe)", ": reading it could wait for a writer forever"),
    (stat.S_ISCHR, "a character device", ": reading it could block or never end"),
    (stat.S_ISBLK, "a block device", ""),
    (stat.S_ISSOCK, "a socket", ""),
)


def _not_a_file(mode: int, path: str, what: str) -> DataError | None:
    """The error naming a non-regular file type, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    name, why = next(((name, why) for test, name, why in _NOT_A_FILE if test(mode)), ("a special file", ""))
    return DataError(f"{what} path {path} is {name}, not a regular file{why}", kind="not_a_file")


def check_media_path(path: str | os.PathLike, *, what: str = "image", allow_dir: bool = False) -> os.stat_result:
    """``os.stat`` of a media path, or a :class:`DataError` naming what is wrong with it.

    Follows symlinks (a link to a regular file is fine). ``allow_dir`` accepts a directory (a video
    given as a folder of frames). Never opens the path, so it cannot block on a FIFO.
    """
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = _readlink(path)
            raise DataError(f"{what} file not found: {path} is a dangling symlink (to {target}, which does not "
                            "exist)", kind="missing_file") from None
        raise DataError(f"{what} file not found: {path}", kind="missing_file") from None
    except OSError as exc:
        raise _stat_error(path, what, exc) from None
    if allow_dir and stat.S_ISDIR(info.st_mode):
        return info
    error = _not_a_file(info.st_mode, path, what)
    if error is not None:
        raise error
    return info


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _stat_error(path: str, what: str, exc: OSError) -> DataError:
    if exc.errno == errno.ELOOP:
        return DataError(f"{what} path {path} is a symlink loop (too many levels of symbolic links)",
                         kind="not_a_file")
    if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):
        return DataError(f"{what} file not found: {path} ({exc.strerror})", kind="missing_file")
    return DataError(f"cannot read {what} file {path}: {exc.strerror or exc}", kind="unreadable_file")


def open_regular_file(path: str | os.PathLike, *, what: str = "image") -> IO[bytes]:
    """Open a media file for reading, only if it is a regular file (see the module docstring).

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the type is
    then checked on the open descriptor, which no rename can change.
    """
    path = os.fspath(path)
    check_media_path(path, what=what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}", kind="missing_file") from None
    except OSError as exc:
        raise _stat_error(path, what, exc) from None
    try:
        error = _not_a_file(os.fstat(fd).st_mode, path, what)
        if error is not None:  # replaced between the stat and the open
            raise error
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # no effect on a regular file; restores ordinary semantics
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------------------------
# Image size from the header


def check_pixels(width: int, height: int, limit: int, what: str) -> None:
    """Raise ``image_too_large`` when ``width * height`` exceeds ``limit`` (0: no limit)."""
    if limit and width * height > limit:
        raise DataError(
            f"{what} is {width} x {height} = {width * height:,} pixels, over the limit of {limit:,} "
            "(max_image_pixels; raise it, or 0 for no limit, if the image is genuine)",
            kind="image_too_large",
        )


def sniff_image_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """``(width, height)`` from the header of a PNG, GIF, JPEG, BMP or WebP file; None for other
    formats or a header too short to tell (then PIL's header parse is checked instead).

    Reads a few bytes from the current position and seeks back there. A GIF's size is its logical
    screen: frames reaching beyond it enlarge the canvas, which the caller checks on PIL's image.
    """
    start = fp.tell()
    try:
        head = fp.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
            return struct.unpack("<HH", head[6:10])
        if head.startswith(b"BM") and len(head) >= 26:
            return _bmp_size(head)
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp_size(head)
        if head.startswith(b"\xff\xd8"):
            fp.seek(start + 2)
            return _jpeg_size(fp)
        return None
    finally:
        fp.seek(start)


def _bmp_size(head: bytes) -> tuple[int, int] | None:
    header_size = struct.unpack("<I", head[14:18])[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", head[18:22])
    if header_size >= 16:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)  # a negative height means top-down rows
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:  # extended: 24-bit canvas size minus one
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":  # lossy keyframe
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _jpeg_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """Walk the segment headers to the first SOFn; each segment body is skipped with a seek."""
    for _ in range(_JPEG_MAX_SEGMENTS):
        byte = fp.read(1)
        if byte != b"\xff":
            return None
        marker = fp.read(1)
        while marker == b"\xff":  # fill bytes
            marker = fp.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0xD8 or 0xD0 <= code <= 0xD7 or code == 0x01:  # no length field
            continue
        if code in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length_bytes = fp.read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            body = fp.read(5)
            if len(body) < 5:
                return None
            height, width = struct.unpack(">HH", body[1:5])
            return width, height
        if length < 2:
            return None
        fp.seek(length - 2, os.SEEK_CUR)
    return None


# --------------------------------------------------------------------------------------------
# Reduced decoding (the opt-in fast image path)


def draft_to_cover(image, size: tuple[int, int], *, exif_transpose: bool = True) -> tuple[int, int]:
    """Make a lazily opened JPEG decode at the smallest DCT scale (1/8, 1/4, 1/2, else 1) that still covers
    ``size``; returns the size it will decode to. Other formats are left alone (their size is returned).

    ``size`` is ``(width, height)`` of the upright image: with ``exif_transpose`` and an EXIF rotation by 90
    degrees the request is swapped into the stored orientation. libjpeg scales inside the inverse DCT: a 1/2-scale
    decode still entropy-decodes every coefficient but writes a quarter of the pixels, and the resize after it
    reads a quarter as many.
    """
    if getattr(image, "format", None) != "JPEG":  # MPO (multi-picture JPEG) seeks frames: not drafted
        return image.size
    width, height = size
    if exif_transpose:
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # malformed EXIF: to_rgb ignores it too
            orientation = 1
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
    image.draft("RGB", (max(1, width), max(1, height)))  # "RGB" never changes the mode, only the scale
    return image.size
