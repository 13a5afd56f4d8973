"""Video for training and chat: choose frame indices, decode those frames, build the prompt prefix.

Two index rules exist in the official code and both live here:

* Training (``get_frame_indices`` of the official dataset): :func:`sample_frame_indices` with
  ``sample="rand"`` (default), ``"middle"`` or ``"fpsX"``, and an optional ``clip`` in seconds.
  The frame count of a sample comes from :func:`choose_num_frames` (uniform in
  ``[min_num_frame, max_num_frame]``).
* Chat / evaluation (the README's ``get_index``): :func:`chat_frame_indices`, used by
  :func:`load_video_tiles`.

Decoding (opening a video file, GIF or frame folder, bounds, backends) lives in
:mod:`~internvl_chat.data.video_decode`; :func:`read_frames` and :func:`load_video_tiles` choose the
indices here and let it decode them.

Every problem with the data raises :class:`~internvl_chat.data.errors.DataError` with a ``kind``:
the decoder's (``missing_file``, ``not_a_file``, ``corrupt_video``, ``empty_video``,
``video_too_long``, ``image_too_large``, ``truncated_image``) and, from here, ``bad_clip``
(malformed clip or bound), ``clip_out_of_range``, ``placeholder_count``. Bad arguments from the
calling code (an unknown ``sample`` rule, ``num_frames < 1``) raise ``ValueError``/``TypeError``
instead, and a missing optional package raises ``ImportError``: those are not problems of one sample.

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
* Frame count, duration and frame size are bounded (:mod:`~internvl_chat.data.video_decode`); the
  official reader had no bound, and its only existence check (``os.path.exists``) let a FIFO hang
  the data loader forever.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch
from PIL import Image

from internvl_chat.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl_chat.data.errors import DataError
from internvl_chat.data.media import MediaLimits
from internvl_chat.data.transforms import image_to_tiles
from internvl_chat.data.video_decode import check_backend, decode_frames, need_fps

__all__ = [
    "CLIP_END_TOLERANCE_S",
    "choose_num_frames",
    "sample_frame_indices",
    "clip_window",
    "chat_frame_indices",
    "read_frames",
    "load_video_tiles",
    "video_prompt_prefix",
    "expand_video_placeholder",
]

# How far (seconds) a clip's end may lie past the end of the video before it counts as wrong.
CLIP_END_TOLERANCE_S = 1.0

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
# Public readers


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
    check_backend(backend)
    rate = _parse_fps_rule(sample)
    if num_frames is not None or rate is None:
        num_frames = _positive_int("num_frames", num_frames)
    folder_fps = _check_fps(folder_fps, "folder_fps")

    def choose(source) -> list[int]:
        fps = source.fps
        if clip is not None or rate is not None:
            fps = need_fps(source, "a clip" if clip is not None else f"sample={sample!r}")
        if source.kind == "folder":
            first, length = (0, source.num_frames) if clip is None else clip_window(
                source.num_frames, fps, clip
            )
            if num_frames is None or length <= num_frames:
                return list(range(first, first + length))
        return sample_frame_indices(
            num_frames, source.num_frames, sample=sample, fps=fps, clip=clip, rng=rng
        )

    return decode_frames(path, backend, folder_fps, choose, limits)


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
    check_backend(backend)
    num_segments = _positive_int("num_segments", num_segments)
    folder_fps = _check_fps(folder_fps, "folder_fps")

    def choose(source) -> list[int]:
        return chat_frame_indices(
            source.num_frames, need_fps(source, "chat frame selection"), num_segments, bound
        )

    frames, _ = decode_frames(path, backend, folder_fps, choose, limits)
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
