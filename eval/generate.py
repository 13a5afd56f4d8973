"""Greedy answers for evaluation samples, one ``model.chat`` call per sample, as the official eval scripts do.

Per sample (official ``internvl_chat/eval/*``): batch size 1, ``num_beams=1``, ``do_sample=False``,
``min_new_tokens=1``, the checkpoint's own template and system message (a sample's own ``system`` turn replaces it
for that call), ``question + prompt_suffix`` as the question. Tiling follows the official eval datasets: with
``dynamic`` the image is tiled by ``dynamic_preprocess`` up to ``max_num`` tiles (thumbnail per the model config),
without it the whole image is ONE tile resized to the model's tile size. Several images share the budget
(``max(1, max_num // n_images)`` each, the convention of the training data and the chat CLI). A video gives
``num_segments`` frames, one tile each, chosen by the README's chat rule (``clip`` as the bound), and its ``<video>``
placeholder becomes the ``Frame-i: <image>`` lines the training data uses, so a model is asked as it was taught.

Nothing here touches torch.distributed: callers shard with :func:`shard` and gather themselves (eval/evaluate.py,
eval during training).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TypeVar

import torch

from internvl_chat.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from internvl_chat.data.video import expand_video_placeholder, load_video_tiles
from internvl_chat.data.transforms import normalize_tiles
from internvl_chat.inference import load_image_tiles

from .samples import EvalSample

__all__ = ["predict", "shard", "pixels_for_sample", "chat_turns", "DEFAULT_NUM_SEGMENTS"]

T = TypeVar("T")

# Frames per video: the README's chat example (load_video(..., num_segments=8, max_num=1)).
DEFAULT_NUM_SEGMENTS = 8


def shard(items: Sequence[T], rank: int, world: int) -> Sequence[T]:
    """This rank's contiguous slice: the official ``InferenceSampler`` split (the first ``len % world`` ranks take
    one extra item), so concatenating the shards in rank order restores the input order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(len(items), world)
    begin = rank * base + min(rank, extra)
    end = begin + base + (1 if rank < extra else 0)
    return items[begin:end]


def pixels_for_sample(model, sample: EvalSample, *, max_num: int | None = None, dynamic: bool = True,
                      num_segments: int = DEFAULT_NUM_SEGMENTS) -> tuple[torch.Tensor | None, list[int]]:
    """(pixel_values in the model's dtype, num_patches_list) of a sample; (None, []) for text-only."""
    cfg = model.config
    normalize_type = getattr(cfg, "normalize_type", "imagenet")
    if sample.video is not None:
        bound = sample.record_extras.get("clip")
        tiles, num_patches = load_video_tiles(sample.video, num_segments=num_segments, bound=bound,
                                              image_size=cfg.image_size, max_num=1, use_thumbnail=cfg.use_thumbnail)
        pixels = normalize_tiles(tiles, normalize_type)
    elif sample.images:
        per_image = max_num or cfg.max_dynamic_patch
        if len(sample.images) > 1:
            per_image = max(1, per_image // len(sample.images))
        tiles = [
            load_image_tiles(path, image_size=cfg.image_size, max_num=per_image, min_num=1,
                             use_thumbnail=cfg.use_thumbnail, dynamic=dynamic, normalize_type=normalize_type)
            for path in sample.images
        ]
        pixels, num_patches = torch.cat(tiles), [len(t) for t in tiles]
    else:
        return None, []
    return pixels.to(model.dtype), num_patches


def chat_turns(sample: EvalSample, num_frames: int, prompt_suffix: str = "") -> tuple[str, list[tuple[str, str]]]:
    """(question, history) for ``model.chat``, with the image/video placeholders placed as in training.

    ``model.chat`` only adds ``<image>\\n`` to a question without history; a single image whose record has no
    placeholder gets it at the start of the first human turn, as the training dataset does, history or not.
    """
    turns = [q for q, _ in sample.history] + [sample.question + prompt_suffix]
    if sample.video is not None:
        index = next((i for i, t in enumerate(turns) if VIDEO_PLACEHOLDER in t), 0)
        turns[index] = expand_video_placeholder(turns[index], num_frames)
    elif len(sample.images) == 1 and not any(IMAGE_PLACEHOLDER in t for t in turns):
        turns[0] = IMAGE_PLACEHOLDER + "\n" + turns[0]
    history = [(q, a) for q, (_, a) in zip(turns[:-1], sample.history)]
    return turns[-1], history


def predict(model, tokenizer, samples: Sequence[EvalSample], *, max_num: int | None = None, dynamic: bool = True,
            max_new_tokens: int = 100, prompt_suffix: str = "", progress: bool = False,
            num_segments: int = DEFAULT_NUM_SEGMENTS) -> list[str]:
    """Greedy answers, in the order of ``samples``. ``max_num``: tile limit per image (None: the model config's
    ``max_dynamic_patch``); ``prompt_suffix`` is appended verbatim (the official suffixes start with a space)."""
    generation = dict(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False)
    default_system = getattr(model, "system_message", None)
    answers: list[str] = []
    start = time.monotonic()
    for i, sample in enumerate(samples):
        try:
            pixels, num_patches = pixels_for_sample(model, sample, max_num=max_num, dynamic=dynamic,
                                                    num_segments=num_segments)
        except Exception as exc:
            raise RuntimeError(f"{sample.source or sample.id}: cannot load the media: {exc}") from exc
        question, history = chat_turns(sample, len(num_patches), prompt_suffix)
        if sample.system is not None:
            model.system_message = sample.system
        try:
            with torch.inference_mode():
                answer = model.chat(tokenizer, pixels, question, dict(generation), history=history or None,
                                    num_patches_list=num_patches or None)
        finally:
            model.system_message = default_system
        answers.append(answer)
        if progress:
            _report(i + 1, len(samples), start)
    return answers


def _report(done: int, total: int, start: float) -> None:
    step = max(1, total // 20)
    if done == total or done % step == 0:
        elapsed = time.monotonic() - start
        print(f"  {done}/{total} samples, {elapsed:.0f}s", file=sys.stderr, flush=True)
