"""The conversation behind the chat CLI: media attached to turns, streamed answers that Ctrl-C can stop.

Every turn goes through `model.chat` with the official semantics: the history is a list of (question, answer), the
questions keep their `<image>` placeholders, and `pixel_values` holds the tiles of every image and video of the
conversation in placeholder order, so a follow-up question still sees the earlier media. A video becomes
`num_segments` frames of one tile each, prefixed `Frame1: <image>\\n...` as in the official video chat example.

A turn changes the session only when its answer is complete: a media file that cannot be loaded or a stopped
answer leaves the history and media as they were.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..constants import IMAGE_PLACEHOLDER
from ..data.transforms import load_image, normalize_tiles
from ..data.video import load_video_tiles, video_prompt_prefix
from ..inference import chat_template, images_for_model, multi_image_prefix, skips_special_tokens

# Frames per video: the official video chat example (load_video(..., num_segments=8, max_num=1)).
DEFAULT_NUM_SEGMENTS = 8

# `<img>path</img>` / `<video>path</video>` attach a file inline; a bare `<image>` / `<video>` asks for the path.
MEDIA_TAG = re.compile(r"<img>([^<>]*)</img>|<video>([^<>]*)</video>|<image>|<video>")


class MediaError(Exception):
    """A media file that cannot be used (missing, not an image, not a video): reported, the session goes on."""


@dataclass
class Media:
    kind: str  # "image" | "video"
    path: str
    frames: torch.Tensor | None = None  # video: normalised tiles, one per frame
    frame_patches: list[int] | None = None


class _StopFlag(StoppingCriteria):
    """Ends `generate()` after the current token once the user pressed Ctrl-C."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    def __init__(self, model, tokenizer, generation: dict, max_num: int | None,
                 num_segments: int = DEFAULT_NUM_SEGMENTS) -> None:
        self.model, self.tokenizer, self.generation, self.max_num = model, tokenizer, generation, max_num
        self.num_segments = num_segments
        self.history: list[tuple[str, str]] = []
        self.media: list[Media] = []  # used by the history, in placeholder order
        self.pixel_values: torch.Tensor | None = None
        self.num_patches: list[int] = []
        self.pending: list[Media] = []  # attached with /image, /video or --image/--video, sent with the next message

    # --- media -----------------------------------------------------------------------------------------------------
    def check(self, kind: str, path: str) -> Media:
        """Load a file once now, so a bad path is reported when it is given rather than at the next answer."""
        path = path.strip().strip("'\"")
        if not path:
            raise MediaError(f"no {kind} path given")
        if not Path(path).exists():
            raise MediaError(f"{path}: no such file")
        try:
            if kind == "image":
                load_image(path)
                return Media("image", path)
            cfg = self.model.config
            tiles, patches = load_video_tiles(path, num_segments=self.num_segments, image_size=cfg.image_size,
                                              max_num=1, use_thumbnail=cfg.use_thumbnail)
            frames = normalize_tiles(tiles, getattr(cfg, "normalize_type", "imagenet"))
            return Media("video", path, frames.to(self.model.device, self.model.dtype), patches)
        except MediaError:
            raise
        except Exception as e:  # unreadable image/video: one line, the session goes on
            message = " ".join(str(e).split())
            raise MediaError(message if path in message else f"cannot read {kind} {path}: {message}") from e

    def attach(self, kind: str, path: str) -> Media:
        media = self.check(kind, path)
        self.pending.append(media)
        return media

    def _pixels(self, items: list[Media]) -> tuple[list[torch.Tensor], list[int]]:
        """Tiles of a turn's media in order; the turn's images share the tile budget as in training."""
        images = [m.path for m in items if m.kind == "image"]
        image_pixels, image_patches = images_for_model(self.model, images, self.max_num)
        image_tiles = list(torch.split(image_pixels, image_patches)) if image_pixels is not None else []
        tiles, patches = [], []
        for m in items:
            if m.kind == "image":
                tile = image_tiles.pop(0).to(self.model.device, self.model.dtype)
                tiles.append(tile)
                patches.append(len(tile))
            else:
                tiles.append(m.frames)
                patches += m.frame_patches
        return tiles, patches

    def compose(self, text: str, ask_path=input) -> tuple[str, list[Media]]:
        """The question text with placeholders, and the media of this turn in placeholder order."""
        images = [m for m in self.pending if m.kind == "image"]
        videos = [m for m in self.pending if m.kind == "video"]
        items: list[Media] = images + videos  # the order of the prefix's placeholders
        prefix = multi_image_prefix(len(images)) or (IMAGE_PLACEHOLDER + "\n" if images else "")
        prefix += "".join(video_prompt_prefix(len(m.frame_patches)) for m in videos)
        parts, last = [], 0
        for match in MEDIA_TAG.finditer(text):
            parts.append(text[last:match.start()])
            last = match.end()
            image_path, video_path = match.group(1), match.group(2)
            if image_path is not None or video_path is not None:
                kind, path = ("image", image_path) if image_path is not None else ("video", video_path)
            else:
                kind = "image" if match.group(0) == IMAGE_PLACEHOLDER else "video"
                path = ask_path(f"{kind} path for {match.group(0)}: ")
            media = self.check(kind, path)
            items.append(media)
            parts.append(IMAGE_PLACEHOLDER if kind == "image" else video_prompt_prefix(len(media.frame_patches)))
        parts.append(text[last:])
        return prefix + "".join(parts), items

    # --- turns -----------------------------------------------------------------------------------------------------
    def ask(self, text: str, out=sys.stdout, ask_path=input, header: str = "") -> str | None:
        """Answer one message, streaming to `out` after `header`. Returns None when Ctrl-C stopped the answer (the
        turn is not kept).

        Raises MediaError (nothing changed) when a file of the message cannot be used."""
        question, items = self.compose(text, ask_path)
        tiles, patches = self._pixels(items)
        pixel_values = torch.cat(([self.pixel_values] if self.pixel_values is not None else []) + tiles) \
            if tiles or self.pixel_values is not None else None
        num_patches = self.num_patches + patches
        template = chat_template(self.model)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=skips_special_tokens(self.model, template), timeout=600)
        stop_flag = _StopFlag()
        result: dict = {}

        def run():
            try:
                result["answer"], result["history"] = self.model.chat(
                    self.tokenizer, pixel_values, question,
                    dict(self.generation, streamer=streamer, stopping_criteria=StoppingCriteriaList([stop_flag])),
                    history=self.history or None, return_history=True, num_patches_list=num_patches or None,
                )
            except BaseException as e:  # reported by the main thread
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            out.write(header)
            out.flush()
            raw, shown = "", ""
            for piece in streamer:  # shown: the answer so far, as model.chat() will return it (header removed)
                raw += piece
                visible = template.reply_text(raw, partial=True)
                if visible.startswith(shown):
                    out.write(visible[len(shown):])
                    out.flush()
                    shown = visible
        except KeyboardInterrupt:
            stop_flag.event.set()
        while thread.is_alive():  # a second Ctrl-C while the answer winds down is ignored
            try:
                thread.join()
            except KeyboardInterrupt:
                stop_flag.event.set()
        out.write("\n")
        if "error" in result:
            raise result["error"]
        if stop_flag.event.is_set():
            return None
        self.history = result["history"]
        self.media += items
        self.pending = []
        self.pixel_values, self.num_patches = pixel_values, num_patches
        return result["answer"]

    def reset(self) -> str:
        """Forget history and media; returns what was cleared, in words."""
        turns, media = len(self.history), self.media + self.pending
        self.history, self.media, self.pending = [], [], []
        self.pixel_values, self.num_patches = None, []
        n_images = sum(m.kind == "image" for m in media)
        n_videos = len(media) - n_images
        return (f"cleared {turns} turn(s) of history, {n_images} image(s) and {n_videos} video(s)"
                + (": " + ", ".join(m.path for m in media) if media else ""))
