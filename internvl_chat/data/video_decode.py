"""Video decoding: open a video file (PyAV or decord), a GIF or a folder of frame images, check its bounds, and
decode the frames :mod:`~internvl_chat.data.video` chose.

Kept apart from the index rules and prompt text of :mod:`~internvl_chat.data.video`, which call in through
:func:`decode_frames` with a ``choose(source)`` callback (so a file that holds fewer frames than it declares is
re-chosen with the true count), :func:`check_backend` and :func:`need_fps`.

Sources: anything PyAV opens (mp4, mkv, webm, avi, mov, ...), a ``.gif``, or a folder of frame images. PyAV is the
default backend: it decodes the stream once, in order, and keeps only the wanted frames (seeking per frame is slow
on long-GOP h264); when the first wanted frame is far into the file it jumps to the keyframe before it using an
exact packet-timestamp index. decord is used only when ``backend="decord"`` is asked for (on our test clips it
returns pixel-identical frames). GIFs and frame folders are always read with PIL.

Bounds (:class:`~internvl_chat.data.media.MediaLimits`) are checked when a source is opened, before a frame is
decoded: the declared (or counted) frame count, the duration it gives with the frame rate, and the frame size from
the stream header (PyAV; with decord too when PyAV is installed) or a GIF's canvas; each decoded frame's size is
checked again before it is converted (a stream may change resolution). A container that declares no frame count is
counted by demuxing, which stops past ``max_video_frames``. GIF frame counts and durations are read from the file's
block structure, without decoding (PIL would decode every frame to tell). Paths are refused from ``stat`` when they
are not regular files or folders (a FIFO would block the data loader); PyAV and decord open a video by its path
after that check, and a file swapped for a FIFO in between is the one case this does not cover.

Errors are :class:`~internvl_chat.data.errors.DataError` with a ``kind`` (``missing_file``, ``not_a_file``,
``corrupt_video``, ``empty_video``, ``video_too_long``, ``image_too_large``, ``truncated_image``); a missing
optional package raises ``ImportError``.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from PIL import Image

from internvl_chat.data.errors import DataError
from internvl_chat.data.media import MediaLimits, check_media_path, check_pixels, open_regular_file
from internvl_chat.data.transforms import ImageLoadError, load_image, open_image

__all__ = [
    "BACKENDS",
    "FRAME_EXTENSIONS",
    "VideoInfo",
    "check_backend",
    "decode_frames",
    "need_fps",
    "probe_video",
]

BACKENDS = ("pyav", "decord")

# Image files accepted in a frame folder (lower-case suffixes).
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Browsers show a GIF frame with no (or zero) duration for 100 ms; we assume the same.
_GIF_DEFAULT_FRAME_MS = 100

# With PyAV, seek instead of decoding from the start when the first wanted frame is at least this
# far in (building the seek index costs one demux pass, cheap next to decoding this many frames).
_SEEK_MIN_FRAMES = 300


# --------------------------------------------------------------------------------------------
# Sources: a video file (PyAV or decord), a GIF, a folder of frames


@dataclass(frozen=True)
class VideoInfo:
    """What a source holds: ``kind`` is ``"video"``, ``"gif"`` or ``"folder"``; ``fps`` may be
    None for a video file whose container declares no rate (then ``clip``/``fpsX`` cannot work).
    For a folder ``fps`` is the ``folder_fps`` assumed."""

    path: str
    kind: str
    num_frames: int
    fps: float | None


class _ShortVideo(Exception):
    """The decoder ran out before the frame count the metadata promised."""

    def __init__(self, decoded: int) -> None:
        super().__init__(decoded)
        self.decoded = decoded


def _corrupt(path: str, exc: BaseException) -> DataError:
    return DataError(
        f"cannot decode video {path!r}: {type(exc).__name__}: {exc}", kind="corrupt_video"
    )


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise ImportError(
            "reading video needs PyAV: pip install av (or pip install 'internvl-chat[video]')"
        ) from exc
    return av


def _import_decord():
    try:
        import decord
    except ImportError as exc:
        raise ImportError(
            "backend='decord' needs the decord package (pip install decord, or eva-decord on "
            "platforms without decord wheels); the default backend 'pyav' needs only PyAV"
        ) from exc
    return decord


class _PyAVSource:
    """One open PyAV container; :meth:`frames` makes one decoding pass."""

    kind = "video"

    def __init__(self, path: str, limits: MediaLimits) -> None:
        self._av = _import_av()
        self.path = path
        self.limits = limits
        self._pts: list[int] | None = None  # presentation timestamps in frame order, once built
        self._open()
        try:
            context = self.stream.codec_context
            self.frame_size = (context.width, context.height) if context.width and context.height else None
            declared = self.stream.frames or 0
            # mkv/webm and some other containers declare no frame count: count the packets.
            self.num_frames = declared if declared > 0 else self._demux_count()
            self.fps = self._frame_rate()
        except Exception as exc:
            self.close()
            if isinstance(exc, DataError):
                raise
            raise _corrupt(path, exc) from exc

    def _open(self) -> None:
        try:
            self.container = self._av.open(self.path)
        except Exception as exc:  # av.error.InvalidDataError and friends, OSError
            raise _corrupt(self.path, exc) from exc
        if not self.container.streams.video:
            self.container.close()
            raise DataError(f"{self.path!r} has no video stream", kind="corrupt_video")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"

    def _reopen(self) -> None:
        self.container.close()
        self._open()

    def close(self) -> None:
        self.container.close()

    def _frame_rate(self) -> float | None:
        stream = self.stream
        for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
            if rate is not None and rate > 0:
                return float(rate)
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif self.container.duration is not None:
            seconds = self.container.duration / 1_000_000  # in av.time_base (microseconds)
        if seconds and seconds > 0 and self.num_frames > 0:
            return self.num_frames / seconds
        return None

    def _demux_pts(self) -> list[int | None]:
        """Timestamps of every video packet, read by a separate demux pass (no decoding); stops with
        ``video_too_long`` past ``max_video_frames`` packets."""
        limit = self.limits.max_video_frames
        pts: list[int | None] = []
        with self._av.open(self.path) as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.size > 0:
                    pts.append(packet.pts)
                    if limit and len(pts) > limit:
                        raise _too_many_frames(self.path, f"more than {limit:,}", limit)
        return pts

    def _demux_count(self) -> int:
        pts = self._demux_pts()
        self._pts = sorted(pts) if None not in pts and len(set(pts)) == len(pts) else []
        return len(pts)

    def _pts_index(self) -> dict[int, int] | None:
        """``{pts: frame index}`` when every packet has a distinct timestamp, else None."""
        if self._pts is None:
            self._demux_count()
        if not self._pts or len(self._pts) != self.num_frames:
            return None
        return {t: i for i, t in enumerate(self._pts)}

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        wanted = set(indices)
        found: dict[int, Image.Image] = {}
        try:
            position = self._pts_index() if min(wanted) >= _SEEK_MIN_FRAMES else None
            decoded = None
            if position is not None:
                decoded = self._collect_after_seek(position, wanted, found)
            if decoded is None:
                found.clear()
                decoded = self._collect_in_order(wanted, found)
        except DataError:
            raise
        except Exception as exc:
            raise _corrupt(self.path, exc) from exc
        if len(found) < len(wanted):
            raise _ShortVideo(decoded)
        return [found[i] for i in indices]

    def _to_image(self, frame) -> Image.Image:
        """RGB image of a decoded frame, after checking its size (the stream may change resolution)."""
        check_pixels(frame.width, frame.height, self.limits.max_image_pixels, f"a frame of video {self.path!r}")
        return frame.to_image()

    def _collect_in_order(self, wanted: set[int], found: dict) -> int:
        """Decode from the start, keep the wanted frames; returns the frames decoded."""
        last, decoded = max(wanted), 0
        for index, frame in enumerate(self.container.decode(self.stream)):
            decoded = index + 1
            if index in wanted:
                found[index] = self._to_image(frame)
            if index >= last:
                break
        return decoded

    def _collect_after_seek(self, position: dict[int, int], wanted: set[int], found: dict):
        """Jump to the keyframe before the first wanted frame and decode from there, naming
        frames by their timestamps. Returns None (after reopening the file) when the timestamps
        do not line up with the index or the seek landed too late: decode in order instead."""
        first, last, decoded = min(wanted), max(wanted), 0
        self.container.seek(self._pts[first], stream=self.stream, backward=True, any_frame=False)
        for frame in self.container.decode(self.stream):
            index = position.get(frame.pts)
            if index is None or (decoded == 0 and index > first):
                self._reopen()
                return None
            decoded = index + 1
            if index in wanted:
                found[index] = self._to_image(frame)
            if index >= last:
                break
        return decoded


class _DecordSource:
    """decord's ``VideoReader`` (one thread, as the official reader)."""

    kind = "video"

    def __init__(self, path: str, limits: MediaLimits) -> None:
        decord = _import_decord()
        self.path = path
        self.frame_size = _frame_size_from_pyav(path)  # decord has no header API: checked before it decodes
        try:
            self.reader = decord.VideoReader(path, num_threads=1)
            self.num_frames = len(self.reader)
            rate = float(self.reader.get_avg_fps())
        except Exception as exc:  # decord.DECORDError, RuntimeError
            raise _corrupt(path, exc) from exc
        self.fps = rate if math.isfinite(rate) and rate > 0 else None

    def close(self) -> None:
        self.reader = None

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        try:
            batch = self.reader.get_batch(list(indices)).asnumpy()
        except Exception as exc:
            raise _corrupt(self.path, exc) from exc
        return [Image.fromarray(batch[i]) for i in range(batch.shape[0])]


def _gif_block(fp) -> bytes | None:
    """One GIF data sub-block; None at the zero-length terminator (or the end of the file)."""
    size = fp.read(1)
    if not size or size[0] == 0:
        return None
    return fp.read(size[0])


def _skip_gif_blocks(fp) -> None:
    """Seek past the remaining sub-blocks of an extension or of a frame's compressed data."""
    while True:
        size = fp.read(1)
        if not size or size[0] == 0:
            return
        fp.seek(size[0], os.SEEK_CUR)


def _scan_gif(fp, max_frames: int) -> tuple[list[int], tuple[int, int]]:
    """Per-frame durations (ms) and the canvas size, from the GIF's block structure alone.

    PIL can tell both only by seeking through the frames, which decodes every one of them (a GIF of
    many large frames then costs minutes before a single frame is chosen); this walk reads a few bytes
    per block and seeks over the compressed data. It follows PIL's reading: a frame's duration comes
    from the graphic control extension before it (missing or 0: :data:`_GIF_DEFAULT_FRAME_MS`), and a
    frame reaching past the logical screen enlarges the canvas. Stops after ``max_frames + 1`` frames
    (0: no limit), enough to refuse the file.
    """
    head = fp.read(13)
    if len(head) < 13 or head[:6] not in (b"GIF87a", b"GIF89a"):
        raise ValueError("not a GIF file")
    width, height, flags = struct.unpack("<HHB", head[6:11])
    if flags & 0x80:  # global colour table
        fp.seek(3 << ((flags & 7) + 1), os.SEEK_CUR)
    durations: list[int] = []
    pending: int | None = None
    while not (max_frames and len(durations) > max_frames):
        byte = fp.read(1)
        if not byte or byte == b";":
            break
        if byte == b"!":
            label = fp.read(1)
            block = _gif_block(fp)
            if label == b"\xf9" and block is not None and len(block) >= 3:
                pending = struct.unpack("<H", block[1:3])[0] * 10
            if block is not None:
                _skip_gif_blocks(fp)
        elif byte == b",":
            descriptor = fp.read(9)
            if len(descriptor) < 9:
                break
            left, top, w, h, frame_flags = struct.unpack("<HHHHB", descriptor)
            width, height = max(width, left + w), max(height, top + h)
            if frame_flags & 0x80:  # local colour table
                fp.seek(3 << ((frame_flags & 7) + 1), os.SEEK_CUR)
            fp.read(1)  # LZW minimum code size
            _skip_gif_blocks(fp)
            durations.append(pending or _GIF_DEFAULT_FRAME_MS)
            pending = None
        # any other byte is skipped, as PIL does
    return durations, (width, height)


class _GifSource:
    """A GIF read with PIL; every frame composited and converted to RGB (alpha dropped).

    Frame count, durations and canvas size come from :func:`_scan_gif` (nothing decoded), so the
    bounds are checked before PIL decodes a frame; PIL then decodes up to the last wanted frame.
    """

    kind = "gif"

    def __init__(self, path: str, limits: MediaLimits) -> None:
        self.path = path
        self.limits = limits
        try:
            with open_regular_file(path, what="video") as fp:
                durations, self.frame_size = _scan_gif(fp, limits.max_video_frames)
        except DataError:
            raise
        except Exception as exc:  # struct.error, ValueError, OSError
            raise _corrupt(path, exc) from exc
        self.num_frames = len(durations)
        self.fps = 1000.0 * self.num_frames / sum(durations) if durations else None
        self._stack = ExitStack()
        if not durations:
            return  # no frame: reported as an empty video, PIL need not open it
        try:
            self.image = self._stack.enter_context(open_image(
                path, max_image_pixels=limits.max_image_pixels, allow_truncated=limits.allow_truncated_images
            ))
        except ImageLoadError as exc:
            raise _video_error(path, exc) from exc

    def close(self) -> None:
        self._stack.close()

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        found = {}
        try:
            for i in sorted(set(indices)):  # PIL decodes GIF frames in order: seek forward only
                self.image.seek(i)
                check_pixels(*self.image.size, self.limits.max_image_pixels, f"a frame of GIF {self.path!r}")
                found[i] = self.image.convert("RGB")
        except DataError:
            raise
        except Exception as exc:
            raise _corrupt(self.path, exc) from exc
        return [found[i] for i in indices]


def _video_error(path: str, exc: ImageLoadError) -> DataError:
    """A DataError for an image failure inside a video: a corrupt image is a corrupt video; the
    other kinds (too large, truncated, not a file, missing) keep their names."""
    kind = "corrupt_video" if exc.kind == "corrupt_image" else exc.kind
    return DataError(str(exc), kind=kind)


def _frame_sort_key(names: list[str]) -> Callable[[str], tuple]:
    """Sort by the number at the end of the stem (``frame_12.jpg`` -> 12) when every file has one,
    else naturally by name (digit runs compared as numbers)."""
    trailing = {name: re.search(r"(\d+)$", os.path.splitext(name)[0]) for name in names}
    if all(trailing.values()):
        return lambda name: (int(trailing[name].group(1)), name)

    def natural(name: str) -> tuple:
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                     for part in re.split(r"(\d+)", name) if part)

    return natural


class _FolderSource:
    """A directory of frame images, in frame order; frames are loaded only when asked for."""

    kind = "folder"

    def __init__(self, path: str, fps: float, limits: MediaLimits) -> None:
        self.path = path
        self.limits = limits
        self.frame_size = None  # each frame is checked as it is loaded
        try:
            names = [
                entry.name
                for entry in os.scandir(path)
                if entry.is_file()
                and not entry.name.startswith(".")
                and os.path.splitext(entry.name)[1].lower() in FRAME_EXTENSIONS
            ]
        except OSError as exc:
            raise DataError(
                f"cannot list frame folder {path!r}: {exc}", kind="missing_file"
            ) from exc
        if not names:
            raise DataError(
                f"frame folder {path!r} holds no image files ({', '.join(FRAME_EXTENSIONS)})",
                kind="empty_video",
            )
        self.files = sorted(names, key=_frame_sort_key(names))
        self.num_frames = len(self.files)
        self.fps = fps

    def close(self) -> None:
        pass

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        loaded: dict[int, Image.Image] = {}
        for i in indices:
            if i not in loaded:
                try:
                    loaded[i] = load_image(
                        os.path.join(self.path, self.files[i]),
                        max_image_pixels=self.limits.max_image_pixels,
                        allow_truncated=self.limits.allow_truncated_images,
                    )
                except ImageLoadError as exc:
                    error = _video_error(self.path, exc)
                    raise DataError(f"frame {i} of frame folder {self.path!r}: {exc}", kind=error.kind) from exc
        return [loaded[i] for i in indices]


def check_backend(backend: str) -> None:
    """A known backend whose package imports (ValueError / ImportError), checked before any file is opened."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {BACKENDS}")
    if backend == "decord":
        _import_decord()  # fail at once, not at the first video file of a mixed dataset
    else:
        _import_av()


def _too_many_frames(path: str, count: str, limit: int) -> DataError:
    return DataError(
        f"video {path!r} holds {count} frames, over max_video_frames={limit:,} (raise it, or 0 for no limit, "
        "if the video is genuine)",
        kind="video_too_long",
    )


def _frame_size_from_pyav(path: str) -> tuple[int, int] | None:
    """Frame size from the stream header via PyAV, when it is installed (decord has no such API)."""
    try:
        import av

        with av.open(path) as container:
            context = container.streams.video[0].codec_context
            return (context.width, context.height) if context.width and context.height else None
    except Exception:  # no PyAV, or a file it cannot read: decord reports that itself
        return None


def _check_bounds(source, limits: MediaLimits) -> None:
    """Frame count, duration and frame size against ``limits``, before any frame is decoded."""
    path = source.path
    if limits.max_video_frames and source.num_frames > limits.max_video_frames:
        raise _too_many_frames(path, f"{source.num_frames:,}", limits.max_video_frames)
    if limits.max_video_seconds and source.fps:
        seconds = source.num_frames / source.fps
        if seconds > limits.max_video_seconds:
            raise DataError(
                f"video {path!r} lasts {seconds:,.1f} s ({source.num_frames:,} frames at {source.fps:g} fps), over "
                f"max_video_seconds={limits.max_video_seconds:g} (raise it, or 0 for no limit, if it is genuine)",
                kind="video_too_long",
            )
    if source.frame_size is not None:
        check_pixels(*source.frame_size, limits.max_image_pixels, f"a frame of video {path!r}")


@contextmanager
def _open_source(path: str | os.PathLike, backend: str, folder_fps: float, limits: MediaLimits) -> Iterator:
    path = os.fspath(path)
    info = check_media_path(path, what="video", allow_dir=True)  # FIFOs, devices, loops: refused unopened
    if stat.S_ISDIR(info.st_mode):
        source = _FolderSource(path, folder_fps, limits)
    elif path.lower().endswith(".gif"):
        source = _GifSource(path, limits)
    elif backend == "decord":
        source = _DecordSource(path, limits)
    else:
        source = _PyAVSource(path, limits)
    try:
        if source.num_frames < 1:
            raise DataError(f"video {path!r} has no frames", kind="empty_video")
        _check_bounds(source, limits)
        yield source
    finally:
        source.close()


def decode_frames(
    path: str | os.PathLike,
    backend: str,
    folder_fps: float,
    choose: Callable[[object], list[int]],
    limits: MediaLimits | None,
) -> tuple[list[Image.Image], list[int]]:
    """Open, pick indices with ``choose(source)``, decode: ``(RGB PIL frames, their indices)``.

    ``choose`` reads the source's ``kind``, ``num_frames``, ``fps`` and ``path``. If the file holds fewer
    frames than its metadata said, it is asked again with the true count (a second, rarer pass)."""
    limits = _check_limits(limits)
    with _open_source(path, backend, folder_fps, limits) as source:
        indices = choose(source)
        try:
            return source.frames(indices), indices
        except _ShortVideo as short:
            decoded = short.decoded
            declared = source.num_frames
    if decoded == 0:
        raise DataError(f"video {os.fspath(path)!r} decodes to no frames", kind="empty_video")
    with _open_source(path, backend, folder_fps, limits) as source:
        source.num_frames = decoded
        indices = choose(source)
        try:
            return source.frames(indices), indices
        except _ShortVideo as short:
            raise DataError(
                f"video {os.fspath(path)!r} declares {declared} frames but decodes "
                f"{decoded} and then {short.decoded}",
                kind="corrupt_video",
            ) from None


def _check_limits(limits: MediaLimits | None) -> MediaLimits:
    if limits is None:
        return MediaLimits()
    if not isinstance(limits, MediaLimits):
        raise TypeError(f"limits must be a MediaLimits, got {type(limits).__name__}")
    return limits


def need_fps(source, why: str) -> float:
    """The source's frame rate, for a clip or an ``fpsX`` rule; a video that declares none is ``corrupt_video``."""
    if source.fps is None:
        raise DataError(
            f"video {source.path!r} declares no frame rate, needed for {why}", kind="corrupt_video"
        )
    return source.fps


def probe_video(
    path: str | os.PathLike, *, backend: str = "pyav", folder_fps: float = 1.0, limits: MediaLimits | None = None
) -> VideoInfo:
    """Frame count and frame rate without decoding pixels (for data checks); ``limits`` are checked."""
    check_backend(backend)
    with _open_source(path, backend, folder_fps, _check_limits(limits)) as source:
        return VideoInfo(os.fspath(path), source.kind, source.num_frames, source.fps)
