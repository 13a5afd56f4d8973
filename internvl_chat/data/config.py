"""The data settings of a run, validated once, and the two numbers every data stage derives from them.

:class:`DataConfig` is what the official ``DataTrainingArguments`` mean for the dataset; training, the checker,
the inspector and the benchmark all build it with :meth:`DataConfig.from_args`, so the same flags give the same
config everywhere. :func:`num_image_tokens` (context tokens per tile) and :func:`image_tile_range` (tiles per
image of a sample) are the one copy of those rules, shared with the model config and chat inference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from internvl_chat.data.errors import check_policy
from internvl_chat.data.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_VIDEO_FRAMES,
    DEFAULT_MAX_VIDEO_SECONDS,
    MediaLimits,
)
from internvl_chat.data.templates import get_template
from internvl_chat.data.video_decode import BACKENDS as VIDEO_BACKENDS

__all__ = ["DataConfig", "image_tile_range", "num_image_tokens"]

# InternViT's patch size and the official pixel-shuffle ratio: 448-px tiles give 256 tokens.
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5

# DataConfig field -> the official training flag it comes from, where the names differ.
_FLAG_NAMES = {"template": ("conv_style", "template"), "image_size": ("force_image_size", "image_size")}


def num_image_tokens(image_size: int, patch_size: int = PATCH_SIZE, downsample_ratio: float = DOWNSAMPLE_RATIO) -> int:
    """Context tokens per tile: the official ``int((image_size // patch) ** 2 * downsample_ratio ** 2)``."""
    return int((int(image_size) // int(patch_size)) ** 2 * downsample_ratio**2)


def image_tile_range(max_dynamic_patch: int, num_images: int = 1, min_dynamic_patch: int = 1) -> tuple[int, int]:
    """``(min_num, max_num)`` tiles for each image of a sample holding ``num_images`` images.

    A multi-image sample shares the budget: ``max(1, max_dynamic_patch // num_images)`` per image (the official
    rule). A budget below ``min_dynamic_patch`` leaves the official tiling no candidate grid, and its fallback is
    the 1 x 1 grid: one tile.
    """
    budget = max(1, max_dynamic_patch // num_images) if num_images > 1 else max_dynamic_patch
    return (min_dynamic_patch, budget) if min_dynamic_patch <= budget else (1, 1)


@dataclass
class DataConfig:
    """What the official ``DataTrainingArguments`` mean for the dataset (defaults are the official ones).

    ``normalize_type`` is only used here for the ``pad2square`` fill colour; the model normalises.
    Ours: ``video_sample`` (``rand``/``middle``/``fpsX``), ``video_backend`` (``pyav``/``decord``),
    ``seed`` (of all per-sample randomness), ``bad_data`` (``skip``/``fail``), ``max_consecutive_bad``,
    and the two image-conversion switches of :func:`~internvl_chat.data.transforms.load_image` (``False``
    restores the official pixels for EXIF-rotated and 16-bit images). Decoding bounds (ours: the official code
    has none, and loads truncated images; see :mod:`~internvl_chat.data.media`; 0 = no limit):
    ``max_image_pixels`` (images and video frames, from the header, before decoding),
    ``max_video_frames``, ``max_video_seconds``; ``allow_truncated_images`` loads cut-off image files
    with a grey fill (the official behaviour) instead of skipping them.
    ``confine_paths`` (``--confine_paths``): an image or video path that
    resolves outside the dataset root (absolute, ``../``, a symlink out) is a bad sample, kind
    ``path_outside_root`` (default off, as the official code: the checker only warns).
    The bad fraction a run tolerates is the training loop's (``--max_bad_fraction``), not the dataset's.
    ``fast_image_decode`` (ours, off by default: tiles identical to the official code): the same grids and tile
    counts, from JPEGs decoded at a reduced DCT scale and resized with ``reducing_gap`` (see
    :func:`~internvl_chat.data.tiling.fast_dynamic_preprocess`); only dynamically tiled images use it.
    """

    template: str = "internlm2-chat"
    num_image_token: int = 256
    image_size: int = 448
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    pad2square: bool = False
    normalize_type: str = "imagenet"
    max_seq_length: int | None = 8192
    min_num_frame: int = 8
    max_num_frame: int = 32
    video_sample: str = "rand"
    video_backend: str = "pyav"
    seed: int = 42
    bad_data: str = "skip"
    max_consecutive_bad: int = 50
    exif_transpose: bool = True
    rescale_high_bit_depth: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_truncated_images: bool = False
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    confine_paths: bool = False
    fast_image_decode: bool = False

    def __post_init__(self) -> None:
        get_template(self.template)
        check_policy(self.bad_data)
        for name in ("num_image_token", "image_size", "min_dynamic_patch", "max_dynamic_patch",
                     "min_num_frame", "max_num_frame", "max_consecutive_bad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ValueError(
                f"min_dynamic_patch ({self.min_dynamic_patch}) > max_dynamic_patch ({self.max_dynamic_patch})"
            )
        if self.min_num_frame > self.max_num_frame:
            raise ValueError(f"min_num_frame ({self.min_num_frame}) > max_num_frame ({self.max_num_frame})")
        if self.max_seq_length is not None and (
            isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) or self.max_seq_length < 1
        ):
            raise ValueError(f"DataConfig.max_seq_length must be a positive int or None, got {self.max_seq_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"DataConfig.seed must be a non-negative int, got {self.seed!r}")
        if not _valid_sample_rule(self.video_sample):
            raise ValueError(
                f"DataConfig.video_sample must be 'rand', 'middle' or 'fpsX' (X > 0), got {self.video_sample!r}"
            )
        if not isinstance(self.fast_image_decode, bool):
            raise ValueError(f"DataConfig.fast_image_decode must be a bool, got {self.fast_image_decode!r}")
        if self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"DataConfig.video_backend must be one of {VIDEO_BACKENDS}, got {self.video_backend!r}")
        try:
            self.media_limits  # noqa: B018 - validates the four media bounds
        except ValueError as exc:
            raise ValueError(f"DataConfig.{exc}") from None

    @property
    def media_limits(self) -> MediaLimits:
        """The decoding bounds of :mod:`~internvl_chat.data.media` (pixels, video frames and seconds,
        truncated images) as one object for the image and video loaders."""
        return MediaLimits(self.max_image_pixels, self.max_video_frames, self.max_video_seconds,
                           self.allow_truncated_images)

    @classmethod
    def from_args(cls, args: Any = None, *, base: Mapping[str, Any] | None = None, **overrides: Any) -> DataConfig:
        """The config that training-style arguments describe: the one way flags become a ``DataConfig``.

        ``args`` is any object with official ``DataTrainingArguments`` names (``conv_style`` or ``template``,
        ``force_image_size`` or ``image_size``, the other fields by their own names); attributes it lacks or
        holds as ``None`` are unset. Each field is, first found: ``overrides`` (e.g. ``seed=``), ``args``,
        ``base`` (e.g. a checkpoint's data settings), the default. ``num_image_token``, unless given in
        ``overrides`` or ``args``, is :func:`num_image_tokens` of the image size, ``base``'s ``patch_size``
        (else 14) and the ``down_sample_ratio`` of ``args`` (else ``base``'s, else 0.5).
        """
        base = {k: v for k, v in (base or {}).items() if v is not None}
        given: dict[str, Any] = {}
        for f in fields(cls):
            for name in _FLAG_NAMES.get(f.name, (f.name,)):
                if getattr(args, name, None) is not None:
                    given[f.name] = getattr(args, name)
                    break
        given.update(overrides)
        values = {f.name: base[f.name] for f in fields(cls) if f.name in base}
        values.update(given)
        if "num_image_token" not in given:
            ratio = getattr(args, "down_sample_ratio", None)
            ratio = base.get("down_sample_ratio", DOWNSAMPLE_RATIO) if ratio is None else ratio
            values["num_image_token"] = num_image_tokens(values.get("image_size", cls.image_size),
                                                         base.get("patch_size", PATCH_SIZE), ratio)
        return cls(**values)


def _valid_sample_rule(rule: Any) -> bool:
    """Frame sampling rules of :func:`~internvl_chat.data.video.read_frames`: rand, middle, fpsX."""
    if rule in ("rand", "middle"):
        return True
    if not isinstance(rule, str) or not rule.startswith("fps"):
        return False
    try:
        rate = float(rule[3:])
    except ValueError:
        return False
    return math.isfinite(rate) and rate > 0
