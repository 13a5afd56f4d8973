"""Video for training and chat: choose frame indices, decode those frames, build the prompt prefix.

Two index rules exist in the official code and both live here:

* Training (``get_frame_indices`` of the official dataset): :func:`sample_frame_indices` with
  ``sample="rand"`` (default), ``"middle"`` or ``"fpsX"``, and an optional ``clip`` in seconds.
  The frame count of a sample comes from :func:`choose_num_frames` (uniform in
  ``[min_num_frame, max_num_frame]``).
* Chat / evaluation (the README's ``get_index``): :func:`chat_frame_indices`, used by
  :func:`load_video_tiles`.

Decoding (:func:`read_frames`) takes a video file (anything PyAV opens: mp4, mkv, webm, avi, mov,
...), a ``.gif``, or a folder of frame images. PyAV is the default backend: it decodes the stream
once, in order, and keeps only the wanted frames (seeking per frame is slow on long-GOP h264); when
the first wanted frame is far into the file it jumps to the keyframe before it using an exact
packet-timestamp index. decord is used only when ``backend="decord"`` is asked for (on our
test clips it returns pixel-identical frames). GIFs and frame folders are always read with PIL.

Every problem with the data raises :class:`~internvl_chat.data.errors.DataError` with a ``kind``:
``missing_file``, ``not_a_file`` (a FIFO, device, socket or symlink loop: refused from ``stat``,
never opened, so nothing blocks), ``corrupt_video``, ``empty_video`` (no frames), ``video_too_long``
(over ``max_video_frames`` or ``max_video_seconds``), ``image_too_large`` (a frame over
``max_image_pixels``), ``truncated_image`` (a cut-off image in a frame folder), ``bad_clip``
(malformed clip or bound), ``clip_out_of_range``, ``placeholder_count``. Bad arguments from the
calling code (an unknown ``sample`` rule, ``num_frames < 1``) raise ``ValueError``/``TypeError``
instead, and a missing optional package raises ``ImportError``: those are not problems of one sample.

Bounds (:class:`~internvl_chat.data.media.MediaLimits`, defaults and reasons in
:mod:`~internvl_chat.data.media`) are checked when a source is opened, before a frame is decoded:
the declared (or counted) frame count, the duration it gives with the frame rate, and the frame size
from the stream header (PyAV; with decord too when PyAV is installed) or a GIF's canvas; each decoded
frame's size is checked again before it is converted (a stream may change resolution). A container
that declares no frame count is counted by demuxing, which stops past ``max_video_frames``. GIF frame
counts and durations are read from the file's block structure, without decoding (PIL would decode
every frame to tell). PyAV and decord open a video by its path after the ``stat`` check; a file
swapped for a FIFO in between is the one case this does not cover.

Differences from the official code, each on purpose:

* Randomness comes from the ``rng`` passed in (``random.Random`` or ``numpy.random.Generator``),
  never from the process-global state, so a sample can be replayed. With a ``random.Random`` the
  per-interval draw is the official ``choice(range(lo, hi))``.
* A clip end up to :data:`CLIP_END_TOLERANCE_S` past the end of the video is clamped to it
  (annotations round times up); further out, or a clip starting after the video, is an error (the
  official code asked the decoder for frames that do not exist and resampled another item).
* GIFs: frames repeated by padding are returned repeated (the official GIF reader kept each
  selected frame once, so a short GIF yielded fewer frames than asked); ``fpsX`` and ``clip`` use
  the GIF's own frame durations (the official code assumed 1 frame per second and ignored clips).
* Frame folders: sorted by the number at the end of the file name (official: ``*_<n>.jpg``);
  any common image extension is accepted; only the selected frames are loaded. A folder has no
  frame rate of its own: ``folder_fps`` (default 1.0, the official assumption) converts clip
  seconds and ``fpsX`` into frames (the official code ignored clips on folders).
* The ``<video>`` placeholder without a following newline is still expanded
  (:func:`expand_video_placeholder`); the official code left it in the text.
* Frame count, duration and frame size are bounded (above); the official reader had no bound, and
  its only existence check (``os.path.exists``) let a FIFO hang the data loader forever.
"""

from __future__ import annotations

import math
import os
import random
import re
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from PIL import Image

from internvl_chat.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl_chat.data.errors import DataError
from internvl_chat.data.media import MediaLimits, check_media_path, check_pixels, open_regular_file
from internvl_chat.data.transforms import ImageLoadError, image_to_tiles, load_image, open_image

__all__ = [
    "BACKENDS",
    "CLIP_END_TOLERANCE_S",
    "MediaLimits",
    "FRAME_EXTENSIONS",
    "VideoInfo",
    "choose_num_frames",
    "sample_frame_indices",
    "clip_window",
    "chat_frame_indices",
    "probe_video",
    "read_frames",
    "load_video_tiles",
    "video_prompt_prefix",
    "expand_video_placeholder",
]

BACKENDS = ("pyav", "decord")

# How far (seconds) a clip's end may lie past the end of the video before it counts as wrong.
CLIP_END_TOLERANCE_S = 1.0

# Image files accepted in a frame folder (lower-case suffixes).
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Browsers show a GIF frame with no (or zero) duration for 100 ms; we assume the same.
_GIF_DEFAULT_FRAME_MS = 100

# With PyAV, seek instead of decoding from the start when the first wanted frame is at least this
# far in (building the seek index costs one demux pass, cheap next to decoding this many frames).
_SEEK_MIN_FRAMES = 300

Rng = random.Random | np.random.Generator


# --------------------------------------------------------------------------------------------
# Index rules


def _check_rng(rng: Rng | None) -> Rng:
    """A fresh OS-seeded generator when none is given: the global RNG is never touched."""
    if rng is None:
        return random.Random()
    if not isinstance(rng, (random.Random, np.random.Generator)):
        raise TypeError(
            f"rng must be a random.Random or numpy.random.Generator, got {type(rng).__name__}"
        )
    return rng


def _randint(rng: Rng, lo: int, hi: int) -> int:
    """Uniform int in ``[lo, hi)`` (``random.choice(range(lo, hi))`` for a ``random.Random``)."""
    if isinstance(rng, random.Random):
        return rng.choice(range(lo, hi))
    return int(rng.integers(lo, hi))


def _random_subset(rng: Rng, n: int, k: int) -> list[int]:
    """``k`` distinct sorted ints from ``range(n)``."""
    if isinstance(rng, random.Random):
        return sorted(rng.sample(range(n), k))
    return sorted(int(i) for i in rng.permutation(n)[:k])


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def choose_num_frames(min_num_frame: int, max_num_frame: int, rng: Rng | None = None) -> int:
    """Frames for one training sample: uniform in ``[min_num_frame, max_num_frame]`` (inclusive).

    The official dataset draws ``np.random.randint(min, max + 1)`` per sample (defaults 8 and 32).
    """
    lo = _positive_int("min_num_frame", min_num_frame)
    hi = _positive_int("max_num_frame", max_num_frame)
    if lo > hi:
        raise ValueError(f"min_num_frame ({lo}) must not exceed max_num_frame ({hi})")
    rng = _check_rng(rng)
    if isinstance(rng, random.Random):
        return rng.randint(lo, hi)
    return int(rng.integers(lo, hi + 1))


def _parse_fps_rule(sample: str) -> float | None:
    """``"fps2"`` -> 2.0, ``"rand"``/``"middle"`` -> None; anything else is a ValueError."""
    if sample in ("rand", "middle"):
        return None
    if isinstance(sample, str) and sample.startswith("fps"):
        try:
            rate = float(sample[3:])
        except ValueError:
            rate = float("nan")
        if math.isfinite(rate) and rate > 0:
            return rate
    raise ValueError(
        f"unknown frame sampling rule {sample!r}; expected 'rand', 'middle' or 'fpsX' "
        "(X > 0 frames per second, e.g. 'fps1' or 'fps0.5')"
    )


def _check_fps(fps: object, why: str) -> float:
    if isinstance(fps, bool) or not isinstance(fps, Real) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"{why} needs the video frame rate (fps > 0), got {fps!r}")
    return float(fps)


def _parse_span(span: object, what: str, negative_start: bool = False) -> tuple[float, float]:
    """Validate a ``[start, end]`` pair in seconds (a clip, or a chat bound, whose start may be
    negative: the README clamps it to the first frame)."""
    if isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2:
        raise DataError(
            f"{what} must be [start_seconds, end_seconds], got {span!r}", kind="bad_clip"
        )
    start, end = span
    for value in (start, end):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise DataError(f"{what} times must be finite numbers, got {span!r}", kind="bad_clip")
    if (start < 0 and not negative_start) or end <= start:
        rule = "start < end" if negative_start else "0 <= start < end"
        raise DataError(f"{what} needs {rule}, got {list(span)!r}", kind="bad_clip")
    return float(start), float(end)


def clip_window(vlen: int, fps: float, clip: Sequence[float]) -> tuple[int, int]:
    """``(first_index, num_frames)`` of the frames a ``[start, end]`` clip (seconds) covers.

    Official rule: ``first = int(start * fps)``, ``count = int((end - start) * fps)``. A clip that
    starts after the video, is shorter than one frame, or ends more than
    :data:`CLIP_END_TOLERANCE_S` after the video raises :class:`DataError`; a smaller overshoot is
    clamped to the video's end.
    """
    vlen = _positive_int("vlen", vlen)
    fps = _check_fps(fps, "a clip")
    start, end = _parse_span(clip, "clip")
    first = int(start * fps)
    count = int((end - start) * fps)
    duration = vlen / fps
    if first >= vlen:
        raise DataError(
            f"clip {list(clip)!r} starts after the video ends ({duration:.3f} s, {vlen} frames)",
            kind="clip_out_of_range",
        )
    if count < 1:
        raise DataError(
            f"clip {list(clip)!r} is shorter than one frame at {fps:g} fps", kind="bad_clip"
        )
    if first + count > vlen:
        if end - duration > CLIP_END_TOLERANCE_S:
            raise DataError(
                f"clip {list(clip)!r} ends {end - duration:.3f} s after the video "
                f"({duration:.3f} s, {vlen} frames)",
                kind="clip_out_of_range",
            )
        count = vlen - first
    return first, count


def _uniform_indices(num_frames: int, vlen: int, sample: str, rng: Rng | None) -> list[int]:
    """The official ``rand``/``middle`` rule on ``range(vlen)``, padded to ``num_frames``."""
    count = min(num_frames, vlen)
    bounds = np.linspace(0, vlen, count + 1).astype(int).tolist()
    # Interval k holds frames bounds[k] .. bounds[k+1]-1 (inclusive).
    intervals = [(bounds[k], bounds[k + 1] - 1) for k in range(count)]
    if sample == "middle":
        indices = [(lo + hi) // 2 for lo, hi in intervals]
    else:
        rng = _check_rng(rng)
        # Official draw: choice(range(lo, hi)), which never picks an interval's last frame and is
        # empty for a one-frame interval; then the whole draw becomes a sorted random subset.
        if all(hi > lo for lo, hi in intervals):
            indices = [_randint(rng, lo, hi) for lo, hi in intervals]
        else:
            indices = _random_subset(rng, vlen, count)
    # Fewer frames than asked: repeat the last one.
    return indices + [indices[-1]] * (num_frames - len(indices))


def _fps_indices(rate: float, vlen: int, fps: float, limit: int | None) -> list[int]:
    """Official ``fpsX``: one frame every ``1/X`` s of video, at the middle of each step."""
    duration = float(vlen) / fps
    delta = 1.0 / rate
    stop = duration + delta / 2
    if limit is not None:
        # Only the first ``limit`` are kept: stop the range just after them. np.arange's values do not
        # depend on ``stop`` (start + i * step), so the kept ones are the same as the official full range's.
        stop = min(stop, delta / 2 + (limit + 1) * delta)
    seconds = np.arange(0 + delta / 2, stop, delta)
    indices = [int(i) for i in np.around(seconds * fps).astype(int) if i < vlen]
    if limit is not None:
        indices = indices[:limit]
    return indices


def sample_frame_indices(
    num_frames: int | None,
    vlen: int,
    *,
    sample: str = "rand",
    fps: float | None = None,
    clip: Sequence[float] | None = None,
    rng: Rng | None = None,
) -> list[int]:
    """Frame indices (into the whole video of ``vlen`` frames) for one training sample.

    * ``"rand"``: split the frames into ``min(num_frames, vlen)`` equal intervals
      (``np.linspace(0, vlen, n + 1).astype(int)``) and draw one frame in each from ``rng``;
      if an interval holds a single frame, a sorted random subset is drawn instead (official).
    * ``"middle"``: the middle ``(lo + hi) // 2`` of each interval (deterministic).
    * ``"fpsX"``: X frames per second of video time (needs ``fps``), at
      ``round((k + 1/2) / X * fps)``; ``num_frames`` caps the count by keeping the first ones (the
      official ``max_num_frames`` rule; ``None`` keeps all, as the official training does) and
      there is no padding.

    ``rand``/``middle`` repeat the last index until there are ``num_frames`` when the video (or
    clip) is shorter. ``clip=[start, end]`` seconds (needs ``fps``) samples inside the clip
    (see :func:`clip_window`) and shifts the indices by ``int(start * fps)``.
    """
    rate = _parse_fps_rule(sample)
    if num_frames is not None or rate is None:
        num_frames = _positive_int("num_frames", num_frames)
    if isinstance(vlen, bool) or not isinstance(vlen, Integral) or vlen < 0:
        raise ValueError(f"vlen must be a non-negative int, got {vlen!r}")
    if vlen == 0:
        raise DataError("the video has no frames", kind="empty_video")
    first, length = 0, int(vlen)
    if clip is not None:
        first, length = clip_window(vlen, _check_fps(fps, "a clip"), clip)
    if rate is None:
        indices = _uniform_indices(num_frames, length, sample, rng)
    else:
        indices = _fps_indices(rate, length, _check_fps(fps, f"sample={sample!r}"), num_frames)
        if not indices:  # cannot happen for length >= 1, kept as a guard
            raise DataError("fps sampling selected no frame", kind="empty_video")
    return [first + i for i in indices]


def chat_frame_indices(
    vlen: int,
    fps: float,
    num_segments: int,
    bound: Sequence[float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """The README/eval rule (``get_index``): ``num_segments`` evenly spaced frames, deterministic.

    With ``max_frame = vlen - 1`` and ``bound = (start_s, end_s)`` (default: the whole video):
    ``start = max(first_idx, round(start_s * fps))``, ``end = min(round(end_s * fps), max_frame)``,
    ``seg = (end - start) / num_segments``; frame k is ``int(start + seg / 2 + round(seg * k))``
    (Python's round: halves to even, like numpy's).
    """
    vlen = _positive_int("vlen", vlen)
    fps = _check_fps(fps, "chat_frame_indices")
    num_segments = _positive_int("num_segments", num_segments)
    if isinstance(first_idx, bool) or not isinstance(first_idx, Integral) or first_idx < 0:
        raise ValueError(f"first_idx must be a non-negative int, got {first_idx!r}")
    if bound is None:
        start_s, end_s = -100000.0, 100000.0  # the README's "whole video"
    else:
        start_s, end_s = _parse_span(bound, "bound", negative_start=True)
    max_frame = vlen - 1
    start = max(int(first_idx), round(start_s * fps))
    end = min(round(end_s * fps), max_frame)
    if start > end:
        raise DataError(
            f"bound {list(bound)!r} starts after the video ends ({vlen} frames at {fps:g} fps)",
            kind="clip_out_of_range",
        )
    seg = float(end - start) / num_segments
    return [int(start + seg / 2 + round(seg * k)) for k in range(num_segments)]


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


def _check_backend(backend: str) -> None:
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


def _read(
    path: str | os.PathLike,
    backend: str,
    folder_fps: float,
    choose: Callable[[object], list[int]],
    limits: MediaLimits | None,
) -> tuple[list[Image.Image], list[int]]:
    """Open, pick indices with ``choose(source)``, decode; if the file holds fewer frames than
    its metadata said, pick again with the true count (a second, rarer pass)."""
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


def _need_fps(source, why: str) -> float:
    if source.fps is None:
        raise DataError(
            f"video {source.path!r} declares no frame rate, needed for {why}", kind="corrupt_video"
        )
    return source.fps


# --------------------------------------------------------------------------------------------
# Public readers


def probe_video(
    path: str | os.PathLike, *, backend: str = "pyav", folder_fps: float = 1.0, limits: MediaLimits | None = None
) -> VideoInfo:
    """Frame count and frame rate without decoding pixels (for data checks); ``limits`` are checked."""
    _check_backend(backend)
    with _open_source(path, backend, folder_fps, _check_limits(limits)) as source:
        return VideoInfo(os.fspath(path), source.kind, source.num_frames, source.fps)


def read_frames(
    path: str | os.PathLike,
    *,
    num_frames: int | None,
    sample: str = "rand",
    clip: Sequence[float] | None = None,
    rng: Rng | None = None,
    backend: str = "pyav",
    folder_fps: float = 1.0,
    limits: MediaLimits | None = None,
) -> tuple[list[Image.Image], list[int]]:
    """Decode the frames of one training sample: ``(RGB PIL frames, their frame indices)``.

    ``path`` is a video file, a ``.gif`` or a frame folder. Indices follow
    :func:`sample_frame_indices` (``rand``/``middle`` padded to ``num_frames`` by repeating the
    last frame; ``fpsX`` capped at ``num_frames``, or uncapped with ``None``). A frame folder, as in
    the official reader, is subsampled only when it (or its clip) has more frames than
    ``num_frames``; otherwise all its frames are returned, without padding. ``folder_fps`` is the
    frame rate assumed for a folder. Draw ``num_frames`` per sample with :func:`choose_num_frames`.
    ``limits`` (default :class:`~internvl_chat.data.media.MediaLimits`) bound the frame count,
    duration and frame size before anything is decoded.
    """
    _check_backend(backend)
    rate = _parse_fps_rule(sample)
    if num_frames is not None or rate is None:
        num_frames = _positive_int("num_frames", num_frames)
    folder_fps = _check_fps(folder_fps, "folder_fps")

    def choose(source) -> list[int]:
        fps = source.fps
        if clip is not None or rate is not None:
            fps = _need_fps(source, "a clip" if clip is not None else f"sample={sample!r}")
        if source.kind == "folder":
            first, length = (0, source.num_frames) if clip is None else clip_window(
                source.num_frames, fps, clip
            )
            if num_frames is None or length <= num_frames:
                return list(range(first, first + length))
        return sample_frame_indices(
            num_frames, source.num_frames, sample=sample, fps=fps, clip=clip, rng=rng
        )

    return _read(path, backend, folder_fps, choose, limits)


def load_video_tiles(
    path: str | os.PathLike,
    *,
    num_segments: int = 8,
    bound: Sequence[float] | None = None,
    image_size: int = 448,
    max_num: int = 1,
    use_thumbnail: bool = True,
    backend: str = "pyav",
    folder_fps: float = 1.0,
    limits: MediaLimits | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Frames for chat/eval, as the README's ``load_video``: ``(uint8 tiles [N, S, S, 3],
    num_patches_list)``.

    Frames are picked by :func:`chat_frame_indices` (``bound`` in seconds) and each goes through
    ``dynamic_preprocess(frame, max_num=max_num, use_thumbnail=use_thumbnail)``; with the default
    ``max_num=1`` every frame is one ``image_size`` tile and ``num_patches_list`` is all ones.
    Normalise the tiles with :class:`~internvl_chat.data.transforms.TileNormalizer` and prefix the
    question with :func:`video_prompt_prefix` ``(len(num_patches_list))``.
    """
    _check_backend(backend)
    num_segments = _positive_int("num_segments", num_segments)
    folder_fps = _check_fps(folder_fps, "folder_fps")

    def choose(source) -> list[int]:
        return chat_frame_indices(
            source.num_frames, _need_fps(source, "chat frame selection"), num_segments, bound
        )

    frames, _ = _read(path, backend, folder_fps, choose, limits)
    tiles, num_patches_list = [], []
    for frame in frames:
        frame_tiles = image_to_tiles(
            frame, dynamic=True, min_num=1, max_num=max_num, image_size=image_size,
            use_thumbnail=use_thumbnail,
        )
        tiles.append(frame_tiles)
        num_patches_list.append(int(frame_tiles.shape[0]))
    return torch.cat(tiles), num_patches_list


# --------------------------------------------------------------------------------------------
# Prompt text


def video_prompt_prefix(num_frames: int, training: bool = False) -> str:
    """The per-frame image placeholders that precede the question, one line per frame.

    Chat (README, ``training=False``): ``"Frame1: <image>\\nFrame2: <image>\\n"``; training
    (official dataset, ``training=True``): ``"Frame-1: <image>\\nFrame-2: <image>\\n"``. The two
    differ ONLY by the hyphen, which the official code has in training but not in its README or
    MVBench evaluation; use the hyphen when training and what a model was trained with when
    chatting (released models: either works, the README form is what their authors demo).
    """
    num_frames = _positive_int("num_frames", num_frames)
    label = "Frame-{}" if training else "Frame{}"
    return "".join(f"{label.format(i)}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_frames + 1))


def expand_video_placeholder(text: str, num_frames: int) -> str:
    """The official training edit of the first turn: ``<video>\\n`` becomes the
    ``Frame-i: <image>`` lines (prepended when the text has no ``<video>``).

    More than one ``<video>`` raises :class:`DataError` (one video per sample). A ``<video>`` not
    followed by a newline is replaced too (the official code left it as text, so the sample had
    no image tokens and failed later).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    count = text.count(VIDEO_PLACEHOLDER)
    if count > 1:
        raise DataError(
            f"{count} {VIDEO_PLACEHOLDER} placeholders in one sample; a sample holds one video",
            kind="placeholder_count",
        )
    prefix = video_prompt_prefix(num_frames, training=True)
    if count == 0:
        return prefix + text
    if VIDEO_PLACEHOLDER + "\n" in text:
        return text.replace(VIDEO_PLACEHOLDER + "\n", prefix)
    return text.replace(VIDEO_PLACEHOLDER, prefix)
