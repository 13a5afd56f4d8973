"""Every supported annotation format, normalised to the official InternVL record, and validated.

The dataset only ever handles one record shape, the official JSONL line (spec section 3.2)::

    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
     "image": str | [str, ...], "video": str, "clip": [start_s, end_s], "width"/"height", "length", "id"}

so every other format is converted here, once, by :func:`to_official`, and every record (official ones
included) is checked here, before a GPU is rented, for the mistakes the official pipeline hides (an image
without its ``<image>``, a box outside 0..1000, a conversation with nothing to train on).

Formats (names as returned by :func:`detect_format`, accepted by :func:`to_official` and a meta entry's
``"format"``):

``internvl``
    The official record. Passed through unchanged (the same dict) when it is already canonical.
``llava``
    LLaVA JSON (``.json`` lists, ``tools/json2jsonl.py`` input) and ShareGPT-like ``conversations``. Its
    records *are* official records except for: ``user``/``assistant`` (any case) for ``human``/``gpt``; a
    top-level ``system`` string (becomes a leading ``system`` turn); ms-swift's plural ``images``/``videos``
    lists (the official code ignores them and would silently train text-only). LLaVA puts ``<image>`` at the
    start (``"<image>\\nQ"``) or the end (``"Q\\n<image>"``) of the first human turn; the official code replaces
    the placeholder where it stands, so both are kept as written. A LLaVA record without any of those traits is
    byte-for-byte official and is reported as ``internvl``.
``messages`` (alias ``sharegpt``)
    ms-swift's standard format: ``messages: [{"role": "system"|"user"|"assistant", "content": str | blocks}]``
    plus ``images``/``videos``/``objects``; also ``conversations`` lists with ``role``/``content``. OpenAI-style
    content blocks (``text``, ``image``/``image_url``, ``video``/``video_url``) become text with placeholders.
``swift``
    ms-swift's ``query``/``response``/``history``/``system``/``images``/``videos``/``objects`` records. A meta
    entry naming ``swift`` also accepts ``messages`` records (both are ms-swift's).

ms-swift conversion (``swift`` and ``messages``):

- ``history`` ``[[q, a], ...]`` becomes human/gpt turns before ``query``/``response``; ``system`` a leading
  system turn; roles ``user``→``human``, ``assistant``→``gpt``.
- Images: every ``<image>`` takes the next path of ``images``; every inline ``<img>path</img>`` (or image
  content block) puts its path at that position. The resulting ``image`` list is in placeholder order; one
  image is stored as a string. ms-swift allows several images without any ``<image>`` (it adds the missing
  tags in front of the first query); we do the same, writing ``"<image>\\n"`` per image at the start of the
  first human turn, which is how the official code places a lone image. A partial set of placeholders is an
  error (ambiguous). Note: ms-swift's InternVL templates write ``</img>\\n`` after each image; the official
  format has no such newline, so ``"<image>Describe"`` tokenizes without it here, as the official code would.
- ``videos``: at most one (official: one video per sample); the ``<video>`` placeholder is optional.
- Grounding ``objects`` (both ms-swift schemas: the list of ``{"caption", "bbox", "bbox_type", "image"}``
  objects, possibly JSON-encoded, of the InternVL best-practice page, and the newer ``{"ref": [...],
  "bbox": [...], "bbox_type": ..., "image_id": [...]}``): the i-th ``<ref-object>`` becomes
  ``<ref>ref_i</ref>`` and the j-th ``<bbox>`` becomes ``<box>[[x1, y1, x2, y2]]</box>`` (a list of boxes gives
  several), in integer 0..1000 coordinates with the official normalisation ``round(x / W * 1000)``
  (``bbox_type`` ``real``: pixels, needs the image size; ``norm_1000``/``norm1000``: kept, rounded;
  ``norm_1``/``norm1``: ``round(x * 1000)``). ms-swift truncates with ``int()`` instead of rounding, so a box
  may differ by one unit from what ms-swift trains on; we follow the official data. The image size comes from
  ``width_list``/``height_list``, else ``width``/``height`` of a single-image record, else
  ``image_size_fn(path)`` (the dataset passes one that reads the image header; ``path`` as written in the
  record, relative to the dataset root).

Validation (:func:`validate_official`, applied to every result) raises :class:`DataError` with one of these
``kind`` values:

==================== ==================================================================================
``invalid_json``     a line (or JSON-list element) that does not parse (:func:`read_records`), is not UTF-8,
                     nests deeper than :data:`MAX_JSON_DEPTH` or holds an integer past Python's 4300-digit
                     limit (:func:`parse_json_line`)
``invalid_unicode``  a string with a lone surrogate escape (``"\\ud800"``): valid JSON, but not text any
                     tokenizer can encode
``invalid_record``   the record is not a JSON object
``unknown_format``   no ``conversations``/``messages``/``query``/``response``; unknown format name
``bad_turn``         a turn that is not ``{"from": str, "value": str}`` (or the ms-swift equivalent)
``bad_roles``        unknown role; a system turn not first or twice; no assistant turn at all
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
:func:`repeated_roles` names them, and ``tools/check_data.py`` lists them as warnings.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    "FORMATS",
    "BoxProblem",
    "canonical_format",
    "check_boxes",
    "count_records",
    "detect_file_format",
    "detect_format",
    "parse_json_line",
    "read_records",
    "repeated_roles",
    "to_official",
    "validate_official",
]

FORMATS = ("internvl", "llava", "messages", "swift")
_FORMAT_ALIASES = {
    "official": "internvl",
    "internvl_chat": "internvl",
    "sharegpt": "messages",
    "ms-swift": "swift",
    "ms_swift": "swift",
}

HUMAN, GPT, SYSTEM = "human", "gpt", "system"
_OFFICIAL_ROLES = (HUMAN, GPT, SYSTEM)
# Accepted (case-insensitively) outside the canonical official records.
_ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT, "system": SYSTEM}

# Keys of the official record copied over from converted records when present.
_PASSTHROUGH_KEYS = ("id", "width", "height", "width_list", "height_list", "clip", "length")

# ms-swift grounding placeholders (plain text in its datasets).
REF_OBJECT_PLACEHOLDER = "<ref-object>"
BBOX_PLACEHOLDER = "<bbox>"

_IMAGE_OR_INLINE = re.compile(r"<img>(.*?)</img>|<image>", re.S)
_GROUNDING_PLACEHOLDER = re.compile(r"<ref-object>|<bbox>")
_RESERVED_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)

_BBOX_TYPES = {"real": "real", "norm_1000": "norm1000", "norm1000": "norm1000", "norm_1": "norm1", "norm1": "norm1"}

ImageSizeFn = Callable[[str], "tuple[int, int]"]


# --------------------------------------------------------------------------------------------------------------
# Format names and detection
# --------------------------------------------------------------------------------------------------------------


def canonical_format(name: str | None) -> str | None:
    """The canonical format name for ``name`` (aliases resolved); ``None``/``"auto"`` give ``None`` (detect)."""
    if name is None or name == "auto":
        return None
    key = name.lower() if isinstance(name, str) else name
    key = _FORMAT_ALIASES.get(key, key)
    if key not in FORMATS:
        raise DataError(
            f"unknown annotation format {name!r}; known: auto, {', '.join(FORMATS)} "
            f"(aliases: {', '.join(sorted(_FORMAT_ALIASES))})",
            kind="unknown_format",
        )
    return key


def detect_format(record: Any) -> str:
    """Which format one record is in: ``"internvl"``, ``"llava"``, ``"messages"`` or ``"swift"``.

    ``conversations`` with ``from``/``value`` is official (``internvl``) when its roles are exactly
    ``human``/``gpt``/``system`` and it carries none of LLaVA/ShareGPT's extras, else ``llava``; ``conversations``
    with ``role``/``content`` and ``messages`` are ``messages``; ``query``/``response`` is ``swift``.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}", kind="invalid_record")
    convs = record.get("conversations")
    if convs is not None:
        if isinstance(convs, list) and convs and isinstance(convs[0], Mapping):
            first = convs[0]
            if "from" not in first and "role" in first:
                return "messages"
        return "internvl" if _is_canonical_official(record) else "llava"
    if "messages" in record or "conversation" in record:
        return "messages"
    if "query" in record or "response" in record:
        return "swift"
    raise DataError(
        "record has none of the keys of a known format: 'conversations' (official/LLaVA), "
        f"'messages' or 'query'/'response' (ms-swift); keys: {sorted(record)[:10]}",
        kind="unknown_format",
    )


def detect_file_format(first_records: Iterable[Any]) -> str:
    """One format for a file from its first records (non-objects and :class:`DataError` items are skipped).

    Returns the common format; official records mixed with LLaVA ones give ``"llava"`` (its conversion
    handles both); other mixes, or no usable record, give ``"auto"``: detect per record.
    """
    found: set[str] = set()
    for record in first_records:
        if isinstance(record, tuple) and len(record) == 2:  # (line, record) pairs from read_records
            record = record[1]
        if not isinstance(record, Mapping):
            continue
        try:
            found.add(detect_format(record))
        except DataError:
            continue
    if found <= {"internvl"} and found:
        return "internvl"
    if found <= {"internvl", "llava"} and found:
        return "llava"
    if len(found) == 1:
        return found.pop()
    return "auto"


def _is_canonical_official(record: Mapping[str, Any]) -> bool:
    if "system" in record or "images" in record or "videos" in record:
        return False
    convs = record.get("conversations")
    if not isinstance(convs, list):
        return True  # let validation name the problem
    for turn in convs:
        if isinstance(turn, Mapping) and turn.get("from") not in _OFFICIAL_ROLES and _alias(turn.get("from")):
            return False
    return True


def _alias(role: Any) -> str | None:
    return _ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def to_official(
    record: Any,
    fmt: str | None = None,
    *,
    file: str | None = None,
    line: int | None = None,
    image_size_fn: ImageSizeFn | None = None,
) -> dict:
    """Convert one record to a validated official record (see the module docstring).

    ``fmt`` is a format name or alias (``None``/``"auto"``: :func:`detect_format`). A canonical official
    record is returned as is (not copied); converted records are new dicts and the input is not modified.
    ``image_size_fn(path) -> (width, height)`` is only called for ms-swift ``bbox_type: "real"`` boxes without
    ``width``/``height`` in the record. Raises :class:`DataError` (``file``/``line`` filled from the arguments).
    """
    try:
        fmt = canonical_format(fmt) or detect_format(record)
        if not isinstance(record, Mapping):
            raise DataError(f"a record must be a JSON object, got {type(record).__name__}", kind="invalid_record")
        if fmt in ("internvl", "llava"):
            out = _from_conversations(record, fmt)
        else:
            out = _from_swift(record, image_size_fn)
        validate_official(out)
        return out
    except DataError as err:
        raise err.located(file, line)


def _from_conversations(record: Mapping[str, Any], fmt: str) -> dict:
    """Official and LLaVA/ShareGPT ``conversations`` records (``from``/``value``)."""
    convs = record.get("conversations")
    if convs is None:
        raise DataError(
            f"record has no 'conversations' (format {fmt!r}); keys: {sorted(record)[:10]}", kind="unknown_format"
        )
    if _is_canonical_official(record):
        return record  # validated by the caller, returned unchanged
    if not isinstance(convs, list):
        raise DataError(f"'conversations' must be a list of turns, got {type(convs).__name__}", kind="bad_turn")
    out = {key: value for key, value in record.items() if key not in ("system", "images", "videos")}
    turns = []
    for index, turn in enumerate(convs):
        if isinstance(turn, Mapping) and "from" in turn:
            role = _alias(turn["from"])
            if role is None:
                raise _unknown_role(index, turn["from"])
            turn = {**turn, "from": role}
        turns.append(turn)
    system = record.get("system")
    if system not in (None, ""):  # an empty system string would replace the template's default system message
        if not isinstance(system, str):
            raise DataError(f"'system' must be a string, got {type(system).__name__}", kind="bad_turn")
        if turns and isinstance(turns[0], Mapping) and turns[0].get("from") == SYSTEM:
            raise DataError("both a top-level 'system' and a leading system turn", kind="bad_roles")
        turns.insert(0, {"from": SYSTEM, "value": system})
    out["conversations"] = turns
    if "images" in record:
        if record.get("image") not in (None, "", []):
            raise DataError("both 'image' and 'images' are set; use one", kind="bad_media")
        images = _path_list(record["images"], "images")
        out.pop("image", None)
        if images:
            out["image"] = images[0] if len(images) == 1 else images
    if "videos" in record:
        if record.get("video") not in (None, ""):
            raise DataError("both 'video' and 'videos' are set; use one", kind="bad_media")
        videos = _path_list(record["videos"], "videos")
        out.pop("video", None)
        if len(videos) > 1:
            raise _too_many_videos(len(videos))
        if videos:
            out["video"] = videos[0]
    return out


def _from_swift(record: Mapping[str, Any], image_size_fn: ImageSizeFn | None) -> dict:
    """ms-swift ``query``/``response``/``history`` and ``messages`` records."""
    convs = record.get("conversations")
    if isinstance(convs, list) and convs and isinstance(convs[0], Mapping) and "from" in convs[0]:
        raise DataError("record is in the official/LLaVA 'conversations' format (from/value), not ms-swift's; "
                        "name format 'internvl' or 'llava' (or 'auto')", kind="unknown_format")
    if "query" in record or "response" in record:
        turns = _swift_query_turns(record)
        inline_videos: list[str] = []
    elif "messages" in record or "conversations" in record or "conversation" in record:
        turns, inline_videos = _swift_message_turns(record)
    else:
        raise DataError(
            f"record has neither 'query'/'response' nor 'messages' (ms-swift formats); keys: {sorted(record)[:10]}",
            kind="unknown_format",
        )

    images = _path_list(record.get("images"), "images")
    videos = _path_list(record.get("videos"), "videos") + inline_videos
    if len(videos) > 1:
        raise _too_many_videos(len(videos))

    images = _place_images(turns, images)
    objects = record.get("objects")
    if objects not in (None, "", [], {}) or any(_GROUNDING_PLACEHOLDER.search(value) for _, value in turns):
        _replace_grounding(turns, _parse_objects(objects), images, record, image_size_fn)

    out: dict[str, Any] = {"conversations": [{"from": role, "value": value} for role, value in turns]}
    if images:
        out["image"] = images[0] if len(images) == 1 else images
    if videos:
        out["video"] = videos[0]
    for key in _PASSTHROUGH_KEYS:
        if key in record:
            out[key] = record[key]
    return out


def _swift_query_turns(record: Mapping[str, Any]) -> list[list[str]]:
    turns: list[list[str]] = []
    system = record.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise DataError(f"'system' must be a string, got {type(system).__name__}", kind="bad_turn")
        turns.append([SYSTEM, system])
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"'history' must be a list of [query, response] pairs, got {history!r:.80}", kind="bad_turn")
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"history[{index}] must be a [query, response] pair of strings, got {pair!r:.80}",
                            kind="bad_turn")
        turns += [[HUMAN, pair[0]], [GPT, pair[1]]]
    query = record.get("query")
    query = "" if query is None else query  # ms-swift allows an empty query (pre-training style)
    response = record.get("response")
    if not isinstance(query, str):
        raise DataError(f"'query' must be a string, got {type(query).__name__}", kind="bad_turn")
    if not isinstance(response, str):
        raise DataError(f"'response' must be a string, got {response!r:.80}", kind="bad_turn")
    turns += [[HUMAN, query], [GPT, response]]
    return turns


def _swift_message_turns(record: Mapping[str, Any]) -> tuple[list[list[str]], list[str]]:
    if "messages" in record:
        key = "messages"
    elif "conversations" in record:
        key = "conversations"
    else:
        key = "conversation"
    messages = record[key]
    if not isinstance(messages, list):
        raise DataError(f"{key!r} must be a list of messages, got {type(messages).__name__}", kind="bad_turn")
    if key == "conversation":  # old ms-swift sharegpt: [{"human": q, "assistant": a}, ...]
        pairs = []
        for index, pair in enumerate(messages):
            if not isinstance(pair, Mapping) or not {"human", "assistant"} <= set(pair):
                raise DataError(f"conversation[{index}] must be {{'human': ..., 'assistant': ...}}", kind="bad_turn")
            pairs += [{"role": "user", "content": pair["human"]}, {"role": "assistant", "content": pair["assistant"]}]
        messages = pairs
    turns: list[list[str]] = []
    videos: list[str] = []
    system = record.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise DataError(f"'system' must be a string, got {type(system).__name__}", kind="bad_turn")
        turns.append([SYSTEM, system])
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(f"{key}[{index}] must be an object with 'role' and 'content', got {message!r:.80}",
                            kind="bad_turn")
        role = _alias(message["role"])
        if role is None:
            raise _unknown_role(index, message["role"])
        if role == SYSTEM and turns and turns[0][0] == SYSTEM and index == 0:
            raise DataError("both a top-level 'system' and a leading system message", kind="bad_roles")
        if role == GPT and message.get("loss", True) in (False, 0):
            raise DataError(
                f"{key}[{index}] has \"loss\": false; the official format supervises every assistant turn",
                kind="unsupported",
            )
        turns.append([role, _content_text(message["content"], f"{key}[{index}]", videos)])
    return turns, videos


def _content_text(content: Any, where: str, videos: list[str]) -> str:
    """A message's text; OpenAI-style content blocks become text with inline image / video placeholders."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: 'content' must be a string or a list of blocks, got {content!r:.80}",
                        kind="bad_turn")
    parts = []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in ("image", "image_url"):
            parts.append(f"{IMG_START_TOKEN}{_block_path(block, kind, where)}{IMG_END_TOKEN}")
        elif kind in ("video", "video_url"):
            videos.append(_block_path(block, kind, where))
            parts.append(VIDEO_PLACEHOLDER)
        else:
            raise DataError(f"{where}: unsupported content block {block!r:.80}", kind="bad_turn")
    return "".join(parts)


def _block_path(block: Mapping[str, Any], kind: str, where: str) -> str:
    value = block.get(kind)
    if isinstance(value, Mapping):
        value = value.get("url", value.get("path"))
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {kind} block without a path: {block!r:.80}", kind="bad_media")
    return value.strip()


def _path_list(value: Any, key: str) -> list[str]:
    """ms-swift media lists: a list of paths (or ``{"path": ...}``), a single path, or nothing."""
    if value in (None, "", []):
        return []
    items = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(items, list):
        raise DataError(f"{key!r} must be a list of paths, got {type(value).__name__}", kind="bad_media")
    paths = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("path")
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{key!r} must hold non-empty path strings, got {item!r:.80}", kind="bad_media")
        paths.append(item)
    return paths


def _place_images(turns: list[list[str]], given: list[str]) -> list[str]:
    """Rewrite inline ``<img>path</img>`` to ``<image>`` and order all image paths by placeholder."""
    images: list[str] = []
    taken = 0
    missing = 0

    def replace(match: re.Match) -> str:
        nonlocal taken, missing
        if match.group(1) is not None:  # <img>path</img>
            path = match.group(1).strip()
            if not path:
                raise DataError("empty inline image '<img></img>'", kind="bad_media")
            images.append(path)
        elif taken < len(given):
            images.append(given[taken])
            taken += 1
        else:
            missing += 1
        return IMAGE_PLACEHOLDER

    for turn in turns:
        turn[1] = _IMAGE_OR_INLINE.sub(replace, turn[1])
    placeholders = len(images) + missing
    if missing:
        raise DataError(
            f"{placeholders} image placeholders (<image> or <img>path</img>) but {len(given) + len(images) - taken} "
            "images", kind="placeholder_count",
        )
    leftover = given[taken:]
    if leftover and placeholders:
        raise DataError(
            f"{len(given)} images in 'images' but only {taken} <image> placeholders for them "
            f"(and {len(images) - taken} inline); write one <image> per image", kind="placeholder_count",
        )
    if leftover and len(leftover) > 1:
        # ms-swift adds the missing tags in front of the first query; one image per "<image>\n".
        first_human = next((turn for turn in turns if turn[0] == HUMAN), None)
        if first_human is not None:
            first_human[1] = "<image>\n" * len(leftover) + first_human[1]
    return images + leftover


# --------------------------------------------------------------------------------------------------------------
# ms-swift grounding objects
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Box:
    coords: list[list[float]]  # one or more [x1, y1, x2, y2]
    bbox_type: str
    image_index: int


def _parse_objects(objects: Any) -> tuple[list[str], list[_Box]]:
    """Both ms-swift schemas to (refs, boxes); the i-th ``<ref-object>``/``<bbox>`` use refs[i]/boxes[i]."""
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except ValueError as exc:
            raise DataError(f"'objects' is a string but not valid JSON: {exc}", kind="bad_objects") from None
    if objects in (None, "", [], {}):
        return [], []
    if isinstance(objects, Mapping):  # {"ref": [...], "bbox": [...], "bbox_type": ..., "image_id": [...]}
        refs = objects.get("ref") or []
        refs = [refs] if isinstance(refs, str) else refs
        bboxes = objects.get("bbox") or []
        bbox_type = _bbox_type(objects.get("bbox_type"))
        image_ids = objects.get("image_id") or []
        if not isinstance(refs, list) or not isinstance(bboxes, list) or not isinstance(image_ids, list):
            raise DataError("'objects' ref/bbox/image_id must be lists", kind="bad_objects")
        if bboxes and _is_number(bboxes[0]):
            bboxes = [bboxes]  # a single box written flat
        boxes = [
            _Box(_box_coords(bbox, i), bbox_type, _image_index(image_ids[i] if i < len(image_ids) else 0, i))
            for i, bbox in enumerate(bboxes)
        ]
        return [_ref_text(ref, i) for i, ref in enumerate(refs)], boxes
    if isinstance(objects, list):  # [{"caption": ..., "bbox": [...], "bbox_type": ..., "image": 0}, ...]
        refs, boxes = [], []
        for i, obj in enumerate(objects):
            if not isinstance(obj, Mapping) or "bbox" not in obj:
                raise DataError(f"objects[{i}] must be an object with 'bbox', got {obj!r:.80}", kind="bad_objects")
            ref = obj.get("caption", obj.get("ref"))
            if ref is not None:
                refs.append(_ref_text(ref, i))
            image = obj.get("image", obj.get("image_id", 0))
            boxes.append(_Box(_box_coords(obj["bbox"], i), _bbox_type(obj.get("bbox_type")), _image_index(image, i)))
        return refs, boxes
    raise DataError(f"'objects' must be a list or an object, got {type(objects).__name__}", kind="bad_objects")


def _bbox_type(value: Any) -> str:
    if value is None:
        return "real"  # ms-swift's default
    if value not in _BBOX_TYPES:
        raise DataError(f"unknown bbox_type {value!r}; expected real, norm_1000 or norm_1", kind="bad_objects")
    return _BBOX_TYPES[value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _box_coords(bbox: Any, index: int) -> list[list[float]]:
    boxes = [bbox] if isinstance(bbox, list) and bbox and _is_number(bbox[0]) else bbox
    if not isinstance(boxes, list) or not boxes or not all(
        isinstance(box, list) and len(box) == 4 and all(_is_number(c) for c in box) for box in boxes
    ):
        raise DataError(f"object {index}: bbox must be [x1, y1, x2, y2] or a list of them, got {bbox!r:.80}",
                        kind="bad_objects")
    return boxes


def _image_index(value: Any, index: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"object {index}: image index must be a non-negative int, got {value!r}", kind="bad_objects")
    return value


def _ref_text(ref: Any, index: int) -> str:
    if not isinstance(ref, str):
        raise DataError(f"object {index}: ref/caption must be a string, got {ref!r:.80}", kind="bad_objects")
    return ref


def _replace_grounding(
    turns: list[list[str]],
    parsed: tuple[list[str], list[_Box]],
    images: list[str],
    record: Mapping[str, Any],
    image_size_fn: ImageSizeFn | None,
) -> None:
    refs, boxes = parsed
    sizes: dict[int, tuple[float, float]] = {}
    used = {"ref": 0, "box": 0}

    def size_of(image_index: int) -> tuple[float, float]:
        if image_index not in sizes:
            sizes[image_index] = _image_size(image_index, images, record, image_size_fn)
        return sizes[image_index]

    def replace(match: re.Match) -> str:
        if match.group(0) == REF_OBJECT_PLACEHOLDER:
            i = used["ref"]
            if i >= len(refs):
                raise DataError(f"{i + 1} <ref-object> placeholders but {len(refs)} refs in 'objects'",
                                kind="bad_objects")
            used["ref"] += 1
            return f"{REF_START_TOKEN}{refs[i]}{REF_END_TOKEN}"
        i = used["box"]
        if i >= len(boxes):
            raise DataError(f"{i + 1} <bbox> placeholders but {len(boxes)} boxes in 'objects'", kind="bad_objects")
        used["box"] += 1
        box = boxes[i]
        size = size_of(box.image_index) if box.bbox_type == "real" else None
        normalised = [_normalise_box(coords, box.bbox_type, size, i) for coords in box.coords]
        return f"{BOX_START_TOKEN}{normalised}{BOX_END_TOKEN}"

    for turn in turns:
        turn[1] = _GROUNDING_PLACEHOLDER.sub(replace, turn[1])


def _image_size(
    index: int, images: list[str], record: Mapping[str, Any], image_size_fn: ImageSizeFn | None
) -> tuple[float, float]:
    if index >= len(images):
        raise DataError(f"a box refers to image {index} but the record has {len(images)} images", kind="bad_objects")
    widths, heights = record.get("width_list"), record.get("height_list")
    if isinstance(widths, list) and isinstance(heights, list) and index < min(len(widths), len(heights)):
        size = (widths[index], heights[index])
    elif len(images) == 1 and record.get("width") is not None and record.get("height") is not None:
        size = (record["width"], record["height"])
    elif image_size_fn is not None:
        size = tuple(image_size_fn(images[index]))
    else:
        raise DataError(
            f"bbox_type 'real' needs the size of image {images[index]!r}: add width/height to the record, or "
            "convert through the dataset (it reads the image header)", kind="bad_objects",
        )
    if len(size) != 2 or not all(_is_number(v) and v > 0 for v in size):
        raise DataError(f"bad size {size!r} for image {images[index]!r}", kind="bad_objects")
    return size  # type: ignore[return-value]


def _normalise_box(coords: list[float], bbox_type: str, size: tuple[float, float] | None, index: int) -> list[int]:
    """Integer 0..1000 coordinates, the official way: ``round(x / W * 1000)``."""
    if bbox_type == "real":
        width, height = size  # type: ignore[misc]
        out = [round(c / (width if k % 2 == 0 else height) * 1000) for k, c in enumerate(coords)]
    elif bbox_type == "norm1":
        out = [round(c * 1000) for c in coords]
    else:
        out = [round(c) for c in coords]
    problems = _coordinate_problems(out, 4)
    if problems:
        where = f" in a {size[0]}x{size[1]} image" if size else ""
        raise DataError(
            f"box {index} {coords} ({bbox_type}{where}) normalises to {out}: {problems[0]}", kind="box_out_of_range"
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Validation of official records
# --------------------------------------------------------------------------------------------------------------


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
                                                      and all(_is_number(c) for c in item) for item in value)):
        example = "[[x1, y1, x2, y2], ...]" if size == 4 else "[[x1, y1, x2, y2, x3, y3, x4, y4], ...]"
        return [BoxProblem("bad_box", f"{shown} does not parse as {example}")]
    problems = []
    for item in value:
        if not all(isinstance(c, int) for c in item):
            problems.append(BoxProblem("bad_box", f"{shown}: coordinates must be integers in 0..1000 "
                                                  f"(normalised as round(x / W * 1000)), got {item}"))
            continue
        problems += [BoxProblem("box_out_of_range", f"{shown}: {p}") for p in _coordinate_problems(item, size)]
    return problems


def _coordinate_problems(coords: Sequence[int], size: int) -> list[str]:
    if any(c < 0 or c > 1000 for c in coords):
        return [f"coordinates {list(coords)} outside 0..1000"]
    if size == 4 and (coords[2] < coords[0] or coords[3] < coords[1]):
        return [f"box {list(coords)} has x2 < x1 or y2 < y1"]
    return []


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

    has_assistant = has_answer = False
    image_placeholders = video_placeholders = 0
    for index, turn in enumerate(convs):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DataError(f"turn {index} must be an object with 'from' and 'value', got {turn!r:.80}",
                            kind="bad_turn")
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise DataError(f"turn {index} ({role!r}): 'value' must be a string, got {value!r:.80}", kind="bad_turn")
        if role not in _OFFICIAL_ROLES:
            raise _unknown_role(index, role)
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
        for token in _RESERVED_TOKENS:
            if token in value:
                raise DataError(f"turn {index} contains the reserved token {token!r} as text (it would be read as "
                                "image tokens); mark images with <image>", kind="reserved_token")
        problems = check_boxes(value)
        if problems:
            kind = "box_out_of_range" if all(p.kind == "box_out_of_range" for p in problems) else "bad_box"
            raise DataError(f"turn {index}: " + "; ".join(p.message for p in problems[:3]), kind=kind)
    if not has_assistant:
        raise DataError("conversation has no assistant ('gpt') turn: nothing to train on", kind="bad_roles")
    if not has_answer:
        raise DataError("every assistant turn is empty: nothing to train on", kind="empty_conversation")

    images = _official_images(record.get("image"))
    video = record.get("video")
    if video not in (None, "") and not (isinstance(video, str) and video.strip()):
        if isinstance(video, list) and len(video) > 1:
            raise _too_many_videos(len(video))
        raise DataError(f"'video' must be one path string, got {video!r:.80}", kind="bad_media")
    has_video = video not in (None, "")
    if images and has_video:
        raise DataError("a sample holds either images or a video, not both", kind="bad_media")
    if "clip" in record and record["clip"] is not None:
        clip = record["clip"]
        if not (isinstance(clip, (list, tuple)) and len(clip) == 2 and all(_is_number(t) for t in clip)
                and 0 <= clip[0] < clip[1]):
            raise DataError(f"'clip' must be [start_s, end_s] with 0 <= start < end, got {clip!r:.80}",
                            kind="bad_media")

    n = len(images)
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


def _unknown_role(index: int, role: Any) -> DataError:
    return DataError(f"turn {index} has unknown role {role!r}; expected human/user, gpt/assistant or system",
                     kind="bad_roles")


def _too_many_videos(n: int) -> DataError:
    return DataError(f"{n} videos in one sample; the official format takes one video per sample", kind="bad_media")


# --------------------------------------------------------------------------------------------------------------
# Reading annotation files
# --------------------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"
_WS = " \t\r\n"

# Real records nest 3 to 6 levels ({"conversations": [{...}]}, ms-swift objects); 64 leaves room for any metadata
# and stays far below Python's recursion limit (1000), which json.loads, repr() and our own walks share with the
# caller's stack: a line nested 100,000 deep raised RecursionError from the length scan at start-up.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings do not count)."""
    opening = text.count("[") + text.count("{")
    if opening <= MAX_JSON_DEPTH:  # C-speed shortcut for almost every line
        return opening
    import numpy as np  # vectorised: a shallow line of millions of brackets must not cost seconds per read

    chars = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "surrogatepass"), np.uint8)
    if chars.size == 0:
        return 0
    steps = ((chars == ord("[")) | (chars == ord("{"))).astype(np.int32)
    steps -= (chars == ord("]")) | (chars == ord("}"))
    return int(np.cumsum(steps).max())


def parse_json_line(raw: bytes | str) -> Any:
    """One JSON value from a line (bytes: strict UTF-8, a leading BOM dropped), or a :class:`DataError`.

    Every way a line can fail is named: ``invalid_json`` for bad syntax, non-UTF-8 bytes, nesting deeper than
    :data:`MAX_JSON_DEPTH` (checked on the text before parsing, so nothing recurses) and integer literals past
    Python's digit limit (4300 by default); ``invalid_unicode`` for a ``\\ud800``-style escape without its pair
    (a lone surrogate: valid JSON, but no tokenizer can encode it). ``json.loads`` on bytes would guess UTF-16/32
    from NUL bytes and let UTF-8-encoded surrogates through; decoding strictly first rules both out.
    """
    if isinstance(raw, (bytes, bytearray)):
        if raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"invalid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})",
                            kind="invalid_json") from None
    else:
        text = raw
    if json_depth(text) > MAX_JSON_DEPTH:
        raise DataError(f"invalid JSON: arrays/objects nested deeper than {MAX_JSON_DEPTH} levels",
                        kind="invalid_json")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} at column {exc.colno}", kind="invalid_json") from None
    except RecursionError:  # unreachable after the depth check; kept so a deep line can never crash a run
        raise DataError("invalid JSON: nested too deeply to parse", kind="invalid_json") from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"invalid JSON: a number too large to read (an integer literal of more than "
                        f"{sys.get_int_max_str_digits()} digits)", kind="invalid_json") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(value)
    return value


def _needs_line_checks(text: str, start: int, end: int) -> bool:
    """Whether :func:`parse_json_line` could refuse ``text[start:end]``, which parsed (deep nesting, lone
    surrogates)."""
    return (text.count("[", start, end) + text.count("{", start, end) > MAX_JSON_DEPTH
            or _SURROGATE_ESCAPE.search(text, start, end) is not None)


def _check_unicode(value: Any, path: str = "") -> None:
    """Raise ``invalid_unicode`` for the first string (key or value) holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"invalid Unicode: lone surrogate {value[exc.start]!r} in {path or 'the record'} "
                            "(a \\uD800-\\uDFFF escape without its pair)", kind="invalid_unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, f"{path}.<key>" if path else "a key")
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, f"{path}[{index}]")


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` or ``(line, DataError)`` for every record of an annotation file, lazily.

    ``.jsonl`` (and any extension other than ``.json``): one object per line; ``line`` is the 1-based physical
    line; blank lines are skipped; a line that does not parse yields a ``DataError`` of kind ``invalid_json``
    and reading goes on. ``.json``: a JSON list (LLaVA); ``line`` is the **1-based index of the element** in the
    list (the physical line where it starts is in error messages). Elements are parsed one at a time from a
    buffered stream, so a large file is never held parsed in memory. A malformed element ends the list (JSON
    has no resynchronisation point): it is reported and nothing after it is read. A ``.json`` file starting
    with ``{`` is read as JSON lines (a common misnaming). Values that are not objects yield ``DataError`` of
    kind ``invalid_record``.
    """
    path = os.fspath(path)
    if path.lower().endswith(".json") and _first_char(path) != "{":
        yield from _read_json_list(path)
    else:
        yield from _read_jsonl(path)


def count_records(path: str | os.PathLike) -> int:
    """How many entries :func:`read_records` yields (bad lines included), without parsing JSON lines."""
    path = os.fspath(path)
    if path.lower().endswith(".json") and _first_char(path) != "{":
        return sum(1 for _ in _read_json_list(path))
    count = 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if raw.strip():
                count += 1
    return count


def _first_char(path: str) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _read_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            try:
                value = parse_json_line(raw)
            except DataError as err:
                yield line_no, err.located(path, line_no)
                continue
            yield line_no, _record_or_error(value, path, line_no)


def _record_or_error(value: Any, path: str, line: int) -> Any:
    if isinstance(value, dict):
        return value
    return DataError(f"a record must be a JSON object, got {type(value).__name__}", file=path, line=line,
                     kind="invalid_record")


def _read_json_list(path: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as fh:
        buf, pos, eof, newlines = "", 0, False, 0  # newlines: "\n" before buf[pos]

        def more(size: int = _CHUNK) -> bool:
            nonlocal buf, pos, eof
            chunk = fh.read(size)
            if not chunk:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0
            return True

        def skip_ws() -> str:
            """Advance over whitespace; the next character, or "" at the end of the file."""
            nonlocal pos, newlines
            while True:
                end = pos
                while end < len(buf) and buf[end] in _WS:
                    end += 1
                newlines += buf.count("\n", pos, end)
                pos = end
                if pos < len(buf):
                    return buf[pos]
                if eof or not more():
                    return ""

        def error(index: int, reason: str) -> tuple[int, DataError]:
            return index, DataError(f"invalid JSON list element {index} (file line {newlines + 1}): {reason}",
                                    file=path, line=index, kind="invalid_json")

        index = 0
        try:
            first = skip_ws()
            if first == "":
                return  # an empty file holds no records, like an empty JSONL file
            if first != "[":
                yield error(1, "a .json annotation file must hold a JSON list of records")
                return
            pos += 1
            while True:
                char = skip_ws()
                if char == "]":
                    return
                if char == "":
                    yield error(index + 1, "the list is not closed with ']'")
                    return
                if index and char == ",":
                    pos += 1
                    char = skip_ws()
                    if char == "]":  # tolerate a trailing comma
                        return
                elif index:
                    yield error(index + 1, f"expected ',' or ']' between elements, found {char!r}")
                    return
                index += 1
                read_size = _CHUNK
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as exc:
                        truncated = exc.pos >= len(buf) - 64 or exc.msg.startswith("Unterminated")
                        if truncated and not eof and more(read_size):
                            read_size *= 2  # keeps re-parsing a large element linear overall
                            continue
                        yield error(index, f"{exc.msg}")
                        return
                    except RecursionError:  # the whole list is unreadable: JSON has no resynchronisation point
                        yield error(index, "nested too deeply to parse")
                        return
                    except ValueError:  # an integer literal past Python's digit limit
                        yield error(index, f"a number too large to read (an integer literal of more than "
                                           f"{sys.get_int_max_str_digits()} digits)")
                        return
                    if end == len(buf) and not eof and more(read_size):
                        continue  # a bare number/literal may go on in the next chunk
                    break
                start_line = newlines + 1
                newlines += buf.count("\n", pos, end)
                record = _record_or_error(value, path, index)
                if not isinstance(record, DataError) and _needs_line_checks(buf, pos, end):
                    try:
                        parse_json_line(buf[pos:end])  # what a JSON line is refused for: deep nesting, surrogates
                    except DataError as err:
                        record = err
                pos = end
                if isinstance(record, DataError):
                    record = DataError(f"{record.reason} (file line {start_line})", file=path, line=index,
                                       kind=record.kind)
                yield index, record
        except UnicodeDecodeError as exc:
            yield error(index + 1, f"not UTF-8 text ({exc.reason})")
