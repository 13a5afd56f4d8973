"""Every supported annotation format, normalised to the official InternVL record.

The dataset only ever handles one record shape, the official JSONL line::

    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
     "image": str | [str, ...], "video": str, "clip": [start_s, end_s], "width"/"height", "length", "id"}

so every other format is converted here, once, by :func:`to_official`, and every record (official ones
included) then passes the gate of :mod:`~internvl_chat.data.validation`, which catches the mistakes the official
pipeline hides (an image without its ``<image>``, a box outside 0..1000, a conversation with nothing to train on).

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

Every result passes :func:`~internvl_chat.data.validation.validate_official` (the error kinds and the placeholder
rule are listed there); conversion problems are :class:`DataError` of kind ``unknown_format``, ``bad_turn``,
``bad_roles``, ``bad_media``, ``placeholder_count``, ``bad_objects`` or ``unsupported`` (an ms-swift feature the
official format cannot express, such as a per-message ``"loss": false``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from internvl_chat.constants import (
    IMAGE_PLACEHOLDER,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    VIDEO_PLACEHOLDER,
)
from internvl_chat.data.errors import DataError
from internvl_chat.data.grounding import ImageSizeFn, replace_grounding
from internvl_chat.data.validation import (
    GPT,
    HUMAN,
    OFFICIAL_ROLES,
    SYSTEM,
    official_role,
    too_many_videos,
    unknown_role,
    validate_official,
)

__all__ = [
    "FORMATS",
    "canonical_format",
    "detect_file_format",
    "detect_format",
    "to_official",
]

FORMATS = ("internvl", "llava", "messages", "swift")
_FORMAT_ALIASES = {
    "official": "internvl",
    "internvl_chat": "internvl",
    "sharegpt": "messages",
    "ms-swift": "swift",
    "ms_swift": "swift",
}

# Keys of the official record copied over from converted records when present.
_PASSTHROUGH_KEYS = ("id", "width", "height", "width_list", "height_list", "clip", "length")

_IMAGE_OR_INLINE = re.compile(r"<img>(.*?)</img>|<image>", re.S)



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
    with ``role``/``content`` and ``messages`` are ``messages``; ``query``/``response`` is ``swift``. A record
    with none of them is ``unknown_format``, naming the nearest format key; so is a ``conversation`` (ms-swift's
    old ``human``/``assistant`` pairs) that holds turns, a typo of ``conversations``.
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
    if "messages" in record:
        return "messages"
    if "conversation" in record:
        if _turn_list(record["conversation"]):  # turns, not old ms-swift {"human", "assistant"} pairs: a typo
            raise DataError("record has 'conversation' holding turns: did you mean 'conversations'? (the singular "
                            "key is ms-swift's old [{\"human\": q, \"assistant\": a}] form)", kind="unknown_format")
        return "messages"
    if "query" in record or "response" in record:
        return "swift"
    raise DataError(
        "record has none of the keys of a known format: 'conversations' (official/LLaVA), "
        f"'messages' or 'query'/'response' (ms-swift); keys: {sorted(record)[:10]}{_did_you_mean(record)}",
        kind="unknown_format",
    )


_FORMAT_KEYS = ("conversations", "messages", "query", "response")


def _did_you_mean(record: Mapping[str, Any]) -> str:
    """``"; did you mean 'conversations' (not 'conversatons')?"`` for the key nearest a format key, else ``""``."""
    for key in record:
        if isinstance(key, str):
            close = difflib.get_close_matches(key.lower(), _FORMAT_KEYS, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]!r} (not {key!r})?"
    return ""


def _turn_list(value: Any) -> bool:
    """Whether ``value`` is a list of official or ms-swift turns (``from``/``role`` objects)."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)
            and ("from" in value[0] or "role" in value[0]) and not {"human", "assistant"} <= set(value[0]))


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
        if isinstance(turn, Mapping) and turn.get("from") not in OFFICIAL_ROLES and official_role(turn.get("from")):
            return False
    return True


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
            role = official_role(turn["from"])
            if role is None:
                raise unknown_role(index, turn["from"])
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
            raise too_many_videos(len(videos))
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
        raise too_many_videos(len(videos))

    images = _place_images(turns, images)
    replace_grounding(turns, record.get("objects"), images, record, image_size_fn)

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
                hint = "; did you mean 'conversations'?" if _turn_list(messages) else ""
                raise DataError(f"conversation[{index}] must be {{'human': ..., 'assistant': ...}}{hint}",
                                kind="bad_turn")
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
        role = official_role(message["role"])
        if role is None:
            raise unknown_role(index, message["role"])
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
