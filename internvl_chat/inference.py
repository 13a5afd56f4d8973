"""Turning images into model inputs for chat: the official README's `load_image`, on our pixel pipeline.

Images load with the training loader's checks (`data/transforms.py` `load_image`): a path that is not a regular
file, a truncated file or one with more than `max_image_pixels` pixels (from its header, before decoding; default
PIL's own bomb limit, 0 = none) raises an error naming the file, where the official README code removes PIL's
limit and decodes whatever it is given. An image over the limit raises `ImageTooLargeError`, a `ValueError`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .constants import IMAGE_PLACEHOLDER
from .data.media import DEFAULT_MAX_IMAGE_PIXELS
from .data.transforms import image_to_tiles, load_image, normalize_tiles


def load_image_tiles(
    image: str | Path | Image.Image,
    *,
    image_size: int = 448,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    dynamic: bool = True,
    normalize_type: str = "imagenet",
    dtype: torch.dtype = torch.float32,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_truncated: bool = False,
) -> torch.Tensor:
    """One image -> normalised tiles [N, 3, S, S] (dynamic tiling, thumbnail last), ready for `model.chat`.

    A path is loaded with `load_image`'s checks (module docstring); too many pixels raise `ImageTooLargeError`
    (a `ValueError` naming the file and the limit), any other unreadable file `ImageLoadError` (an `OSError`).
    """
    if not isinstance(image, Image.Image):
        image = load_image(image, max_image_pixels=max_image_pixels, allow_truncated=allow_truncated)
    tiles = image_to_tiles(
        image, dynamic=dynamic, min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail
    )
    return normalize_tiles(tiles, normalize_type, dtype=dtype)


def images_for_model(
    model, images: list, max_num: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor | None, list[int]]:
    """Tiles for several images with the model's own tiling settings; returns (pixel_values, num_patches_list)."""
    if not images:
        return None, []
    cfg = model.config
    per_image = max_num or cfg.max_dynamic_patch
    if len(images) > 1:  # the official multi-image budget
        per_image = max(1, per_image // len(images))
    tiles = [
        load_image_tiles(
            img, image_size=cfg.image_size, max_num=per_image, min_num=cfg.min_dynamic_patch,
            use_thumbnail=cfg.use_thumbnail, dynamic=cfg.dynamic_image_size,
            normalize_type=getattr(cfg, "normalize_type", "imagenet"), max_image_pixels=max_image_pixels,
        )
        for img in images
    ]
    return torch.cat(tiles), [len(t) for t in tiles]


def multi_image_prefix(n_images: int) -> str:
    """`Image-1: <image>\\nImage-2: <image>\\n...` — the convention of the official docs and evaluation."""
    if n_images <= 1:
        return ""
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images))
