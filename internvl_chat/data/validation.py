"""The gate every record passes: an official record is checked once, here, and becomes a :class:`Sample`.

:func:`~internvl_chat.data.formats.to_official` converts any supported format and calls
:func:`validate_official`; later stages (the dataset's item building, the templates) trust what passed.
The role table (:data:`ROLE_ALIASES`) is shared with the templates.

The kinds of :class:`DataError` a record can get on its way through the reader, the conversion and the gate:

==================== ==================================================================================
``invalid_json``     a line (or JSON-list element) that does not parse, is not UTF-8, nests too deeply or holds
                     an integer past Python's 4300-digit limit (:mod:`~internvl_chat.data.records`)
``invalid_unicode``  a string with a lone surrogate escape (``"\\ud800"``): valid JSON, but not text any
                     tokenizer can encode
``invalid_record``   the record is not a JSON object
``unknown_format``   no ``conversations``/``messages``/``query``/``response``; unknown format name
``bad_turn``         a turn that is not ``{"from": str, "value": str}`` (or the ms-swift equivalent)
``bad_roles``        unknown role; a system turn not first or twice; no assistant turn at all; no human turn
                     (:func:`sample_of`)
``empty_conversation`` no turns, or no assistant turn with any text
``bad_media``        ``image``/``video`` of the wrong type, more than one video, images and a video together,
                     a bad ``clip``
``placeholder_count`` ``<image>``/``<video>`` placeholders that do not match the media (see below), or in a
                     system/assistant turn
``reserved_token``   literal ``<img>``, ``</img>`` or ``<IMG_CONTEXT>`` in the text (they would become image
                     tokens)
``bad_objects``      ms-swift ``objects`` that cannot be used (schema, missing image size, too few objects
                     for the ``<ref-object>``/``<bbox>`` placeholders)
``bad_box``          ``<box>``/``<quad>`` text that does not parse as ``[[4 ints], ...]`` / ``[[8 ints], ...]``,
                     non-integer coordinates, unbalanced ``<ref>``/``<box>``/``<quad>`` tags
``box_out_of_range`` a coordinate outside 0..1000, or x2 < x1 / y2 < y1
``unsupported``      an ms-swift feature the official format cannot express (per-message ``"loss": false``)
==================== ==================================================================================

Placeholder rule: no images → no ``<image>``; one image → zero (the dataset prepends ``"<image>\\n"``) or one
``<image>``; several images → exactly one ``<image>`` per image (the official code does not insert them). A
one-element ``image`` list counts as one image. At most one ``<video>``, only with a video, and no ``<image>``
in a video sample. Placeholders may sit in any human turn (the official dataset only looks at the first turn
before prepending, so the dataset layer must count them over all turns, as we do here).

Consecutive turns of the same role (two human or two gpt turns in a row) are legal, as in the official code;
:func:`repeated_roles` names them, and ``tools/check_data.py`` lists them as warnings. So are a conversation
that opens with a ``gpt`` turn and one that ends on a ``human`` turn (:func:`turn_order_warnings`).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from internvl_chat.constants import (
    BOX_END_TOKEN,
    BOX_START_TOKEN,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    QUAD_END_TOKEN,
    QUAD_START_TOKEN,
    REF_END_TOKEN,
    REF_START_TOKEN,
    VIDEO_PLACEHOLDER,
)
from internvl_chat.data.errors import DataError

__all__ = [
    "ASSISTANT_ROLES",
    "OFFICIAL_ROLES",
    "ROLE_ALIASES",
    "SAMPLE_TYPES",
    "USER_ROLES",
    "BoxProblem",
    "Sample",
    "check_boxes",
    "near_miss_keys",
    "official_role",
    "repeated_roles",
    "sample_of",
    "sample_type",
    "turn_order_warnings",
    "validate_official",
]

# --------------------------------------------------------------------------------------------------------------
# Roles: the one table of role names (official ones, and the aliases other formats and the templates accept)
# --------------------------------------------------------------------------------------------------------------

HUMAN, GPT, SYSTEM = "human", "gpt", "system"
OFFICIAL_ROLES = (HUMAN, GPT, SYSTEM)
# Accepted (case-insensitively) outside the canonical official records.
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT, "system": SYSTEM}
USER_ROLES = tuple(name for name, role in ROLE_ALIASES.items() if role == HUMAN)
ASSISTANT_ROLES = tuple(name for name, role in ROLE_ALIASES.items() if role == GPT)

_RESERVED_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)


def official_role(role: Any) -> str | None:
    """The official role of a role name or alias (any case), else None."""
    return ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unknown_role(index: int, role: Any) -> DataError:
    return DataError(f"turn {index} has unknown role {role!r}; expected human/user, gpt/assistant or system",
                     kind="bad_roles")


def too_many_videos(n: int) -> DataError:
    return DataError(f"{n} videos in one sample; the official format takes one video per sample", kind="bad_media")


# --------------------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------------------


def validate_official(record: Any) -> None:
    """Raise :class:`DataError` (with a ``kind``) if ``record`` is not a usable official record."""
    if not isinstance(record, Mapping):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}", kind="invalid_record")
    convs = record.get("conversations")
    if convs is None:
        raise DataError(f"record has no 'conversations'; keys: {sorted(record)[:10]}", kind="unknown_format")
    if not isinstance(convs, list):
        raise DataError(f"'conversations' must be a list of turns, got {type(convs).__name__}", kind="bad_turn")
    if not convs:
        raise DataError("empty conversation", kind="empty_conversation")
    image_placeholders, video_placeholders = _check_turns(convs)
    images, has_video = _check_media(record)
    try:
        _check_placeholders(len(images), has_video, image_placeholders, video_placeholders)
    except DataError as err:
        misspelled = near_miss_keys(record)
        if misspelled and not images and not has_video:
            raise DataError(f"{err.reason} ({misspelled[0][1]})", kind=err.kind) from None
        raise


def _check_turns(convs: list) -> tuple[int, int]:
    """Roles, text and markup of every turn; the numbers of ``<image>`` and ``<video>`` placeholders."""
    has_assistant = has_answer = False
    image_placeholders = video_placeholders = 0
    for index, turn in enumerate(convs):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DataError(f"turn {index} must be an object with 'from' and 'value', got {turn!r:.80}",
                            kind="bad_turn")
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise DataError(f"turn {index} ({role!r}): 'value' must be a string, got {value!r:.80}", kind="bad_turn")
        if role not in OFFICIAL_ROLES:
            raise unknown_role(index, role)
        if role == SYSTEM and index != 0:
            raise DataError(f"turn {index} is a system turn; only the first turn may be one", kind="bad_roles")
        if role == GPT:
            has_assistant = True
            has_answer = has_answer or bool(value.strip())
        n_image, n_video = value.count(IMAGE_PLACEHOLDER), value.count(VIDEO_PLACEHOLDER)
        if (n_image or n_video) and role != HUMAN:
            raise DataError(f"turn {index} ({role}) holds a {IMAGE_PLACEHOLDER if n_image else VIDEO_PLACEHOLDER} "
                            "placeholder; images and videos belong in human turns", kind="placeholder_count")
        image_placeholders += n_image
        video_placeholders += n_video
        _check_text(index, value)
    if not has_assistant:
        raise DataError("conversation has no assistant ('gpt') turn: nothing to train on", kind="bad_roles")
    if not has_answer:
        raise DataError("every assistant turn is empty: nothing to train on", kind="empty_conversation")
    return image_placeholders, video_placeholders


def _check_text(index: int, value: str) -> None:
    """No reserved image tokens as text; grounding boxes that parse and lie in 0..1000."""
    for token in _RESERVED_TOKENS:
        if token in value:
            raise DataError(f"turn {index} contains the reserved token {token!r} as text (it would be read as "
                            "image tokens); mark images with <image>", kind="reserved_token")
    problems = check_boxes(value)
    if problems:
        kind = "box_out_of_range" if all(p.kind == "box_out_of_range" for p in problems) else "bad_box"
        raise DataError(f"turn {index}: " + "; ".join(p.message for p in problems[:3]), kind=kind)


def _check_media(record: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The record's image paths and whether it has a video (one or the other), its ``clip`` checked."""
    images = _official_images(record.get("image"))
    video = record.get("video")
    if video not in (None, "") and not (isinstance(video, str) and video.strip()):
        if isinstance(video, list) and len(video) > 1:
            raise too_many_videos(len(video))
        raise DataError(f"'video' must be one path string, got {video!r:.80}", kind="bad_media")
    has_video = video not in (None, "")
    if images and has_video:
        raise DataError("a sample holds either images or a video, not both", kind="bad_media")
    if "clip" in record and record["clip"] is not None:
        clip = record["clip"]
        if not (isinstance(clip, (list, tuple)) and len(clip) == 2 and all(is_number(t) for t in clip)
                and 0 <= clip[0] < clip[1]):
            raise DataError(f"'clip' must be [start_s, end_s] with 0 <= start < end, got {clip!r:.80}",
                            kind="bad_media")
    return images, has_video


def _check_placeholders(n: int, has_video: bool, image_placeholders: int, video_placeholders: int) -> None:
    """The placeholder rule of the module docstring."""
    if n == 0 and image_placeholders:
        raise DataError(f"{image_placeholders} <image> placeholders but the sample has no image",
                        kind="placeholder_count")
    if n == 1 and image_placeholders > 1:
        raise DataError(f"{image_placeholders} <image> placeholders for 1 image", kind="placeholder_count")
    if n > 1 and image_placeholders != n:
        raise DataError(f"{image_placeholders} <image> placeholders for {n} images; multi-image samples need "
                        "exactly one <image> per image, in order", kind="placeholder_count")
    if video_placeholders > 1:
        raise DataError(f"{video_placeholders} <video> placeholders; one video per sample", kind="placeholder_count")
    if video_placeholders and not has_video:
        raise DataError("a <video> placeholder but the sample has no video", kind="placeholder_count")


@dataclass(frozen=True)
class BoxProblem:
    """One problem found by :func:`check_boxes`; ``kind`` is ``"bad_box"`` or ``"box_out_of_range"``."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


_BOX_SPAN = re.compile(r"<box>(.*?)</box>", re.S)
_QUAD_SPAN = re.compile(r"<quad>(.*?)</quad>", re.S)


def check_boxes(text: str) -> list[BoxProblem]:
    """Problems with the grounding markup in one turn's text (empty list: fine).

    ``<box>`` must hold ``[[x1, y1, x2, y2], ...]`` and ``<quad>`` ``[[8 numbers], ...]``, integers in
    0..1000 with x1 <= x2 and y1 <= y2 for boxes; ``<ref>``/``<box>``/``<quad>`` tags must be balanced.
    """
    problems: list[BoxProblem] = []
    for start, end in ((REF_START_TOKEN, REF_END_TOKEN), (BOX_START_TOKEN, BOX_END_TOKEN),
                       (QUAD_START_TOKEN, QUAD_END_TOKEN)):
        if text.count(start) != text.count(end):
            problems.append(BoxProblem("bad_box", f"unbalanced {start}...{end}: {text.count(start)} "
                                                  f"opening vs {text.count(end)} closing tags"))
    for pattern, tag, size in ((_BOX_SPAN, "box", 4), (_QUAD_SPAN, "quad", 8)):
        for match in pattern.finditer(text):
            problems += _span_problems(match.group(1), tag, size)
    return problems


def _span_problems(body: str, tag: str, size: int) -> list[BoxProblem]:
    shown = f"<{tag}>{body.strip()[:80]}</{tag}>"
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if not (isinstance(value, list) and value and all(isinstance(item, list) and len(item) == size
                                                      and all(is_number(c) for c in item) for item in value)):
        example = "[[x1, y1, x2, y2], ...]" if size == 4 else "[[x1, y1, x2, y2, x3, y3, x4, y4], ...]"
        return [BoxProblem("bad_box", f"{shown} does not parse as {example}")]
    problems = []
    for item in value:
        if not all(isinstance(c, int) for c in item):
            problems.append(BoxProblem("bad_box", f"{shown}: coordinates must be integers in 0..1000 "
                                                  f"(normalised as round(x / W * 1000)), got {item}"))
            continue
        problems += [BoxProblem("box_out_of_range", f"{shown}: {p}") for p in coordinate_problems(item, size)]
    return problems


def coordinate_problems(coords: Sequence[int], size: int) -> list[str]:
    if any(c < 0 or c > 1000 for c in coords):
        return [f"coordinates {list(coords)} outside 0..1000"]
    if size == 4 and (coords[2] < coords[0] or coords[3] < coords[1]):
        return [f"box {list(coords)} has x2 < x1 or y2 < y1"]
    return []


def repeated_roles(conversations: Any) -> list[str]:
    """One message per pair of consecutive turns of the same role (two questions or two answers in a row).

    Not an error: the templates render them, and the official code trains on them. But a question left without
    its answer, or two answers to one question, is almost always a merge or conversion slip, so the checker lists
    them as warnings. Turn numbers are 0-based, as in :func:`validate_official`'s messages.
    """
    if not isinstance(conversations, list):
        return []
    roles = [turn.get("from") if isinstance(turn, Mapping) else None for turn in conversations]
    what = {HUMAN: "two human turns in a row (the first question gets no answer)",
            GPT: "two gpt turns in a row (two answers to one question)"}
    return [f"turns {k - 1} and {k} are both {role!r}: {what[role]}"
            for k, role in enumerate(roles) if k and role in what and roles[k - 1] == role]


def turn_order_warnings(conversations: Any) -> list[tuple[str, str]]:
    """``(kind, message)`` for a conversation that opens with an answer or ends on a question.

    Not errors (training builds such samples), but suspicious: ``assistant_first`` -- the first turn after an
    optional system turn is ``gpt``, so that answer is trained with no question before it;
    ``trailing_human_turn`` -- the last turn is ``human``, a question that is never answered (nothing of it is
    trained). Turn numbers are 0-based, as in :func:`validate_official`'s messages.
    """
    if not isinstance(conversations, list):
        return []
    roles = [turn.get("from") if isinstance(turn, Mapping) else None for turn in conversations]
    dialogue = [(k, role) for k, role in enumerate(roles) if role != SYSTEM]
    if not dialogue:
        return []
    found = []
    first, first_role = dialogue[0]
    if first_role == GPT:
        found.append(("assistant_first", f"turn {first} (the first after any system turn) is 'gpt': that answer is "
                                         "trained with no question before it"))
    last, last_role = dialogue[-1]
    if last_role == HUMAN:
        found.append(("trailing_human_turn", f"turn {last}, the last one, is 'human': a question with no answer "
                                             "(never trained; drop it or add the answer)"))
    return found


# Keys an official (or LLaVA) record may carry; a key near ``image``/``video``/``conversations`` and not one of
# these is likely a typo that silently drops the media.
_RECORD_KEYS = frozenset({"conversations", "image", "video", "clip", "width", "height", "width_list", "height_list",
                          "length", "id", "system", "images", "videos", "objects"})
_MEDIA_KEYS = {"image": ("image", "img"), "video": ("video", "vid"), "conversations": ("conversation",)}


def near_miss_keys(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, message)`` for each unknown key that looks like ``image``, ``video`` or ``conversations``
    (``imgae``, ``image_path``, ``video_file``) while the record lacks that key: the official code ignores it,
    so its media is never read. (``image_id`` beside an ``image`` is not a typo and is not named.)"""
    found = []
    missing = [name for name in _MEDIA_KEYS if name not in record]
    for key in record:
        if not isinstance(key, str) or key in _RECORD_KEYS:
            continue
        lowered = key.lower()
        close = [name for name in missing if lowered.startswith(_MEDIA_KEYS[name])]
        close = close or difflib.get_close_matches(lowered, missing, n=1, cutoff=0.75)
        if close:
            found.append((key, f"unknown key {key!r}: did you mean {close[0]!r}? (the key is ignored, so "
                               f"its value is never read)"))
    return found


def _official_images(image: Any) -> list[str]:
    if image in (None, "", []):
        return []
    if isinstance(image, str):
        if not image.strip():
            raise DataError("'image' is a blank string", kind="bad_media")
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) and p.strip() for p in image):
        return image
    raise DataError(f"'image' must be a path string or a list of path strings, got {image!r:.80}", kind="bad_media")


# --------------------------------------------------------------------------------------------------------------
# What passed the gate
# --------------------------------------------------------------------------------------------------------------

SAMPLE_TYPES = ("text", "image", "multi_image", "video")


def sample_type(record: dict) -> str:
    """``text``, ``image``, ``multi_image`` or ``video`` of an official record (the official dispatch)."""
    image = record.get("image")
    if image:
        if isinstance(image, list) and len(image) > 1:
            return "multi_image"
        return "image"
    if record.get("video"):
        return "video"
    return "text"


@dataclass
class Sample:
    """A record that passed :func:`validate_official`: its type, its turns (copies, safe to edit) and media."""

    kind: str
    turns: list[dict[str, str]]
    images: list[str]
    video: str | None
    clip: Any

    def first_human_turn(self) -> dict[str, str]:
        return next(turn for turn in self.turns if turn["from"] == HUMAN)


def sample_of(record: Mapping[str, Any]) -> Sample:
    """The :class:`Sample` of a record that passed :func:`validate_official` (trusted: not checked again).

    The gate's last rule lives here: a sample needs a human turn (its image placeholder goes there). A record
    without one still converts and has a type, so the checker and the length scan count it by its type.
    """
    if not any(turn["from"] == HUMAN for turn in record["conversations"]):
        raise DataError("conversation has no human turn", kind="bad_roles")
    image = record.get("image")
    images = [] if not image else [image] if isinstance(image, str) else list(image)
    return Sample(
        kind=sample_type(record),
        turns=[{"from": turn["from"], "value": turn["value"]} for turn in record["conversations"]],
        images=images,
        video=record.get("video") or None,
        clip=record.get("clip"),
    )
