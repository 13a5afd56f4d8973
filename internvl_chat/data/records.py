"""Reading annotation files: one reader for JSON lines and JSON lists, by record index or in file order.

A ``.json`` file is a JSON list (LLaVA) unless its first non-blank character is ``{`` (JSON lines misnamed);
any other file is JSON lines (:func:`is_json_list`, the one copy of that rule). A leading UTF-8 BOM is dropped,
blank lines are not records, CRLF line ends are whitespace. A record's ``line`` is its 1-based physical line in
a JSONL file and its 1-based position in a JSON list, everywhere (training, checker, inspector, eval).

* :class:`Annotation` (:func:`index_annotation`): random access for training. A JSONL file is indexed by the
  byte offsets of its non-blank lines (numpy int64, two numbers per line) instead of keeping every line as a
  Python string; a JSON list is parsed once and its elements kept re-serialised in one bytes buffer, so
  dataloader workers do not slowly copy millions of Python objects. A list that does not parse is refused as a
  whole (:class:`DataError`): JSON has no point to resynchronise at.
* :func:`read_records`: every record in file order, ``(line, record | DataError)``, one bad record never stops
  the reading of a JSONL file. JSON lists are parsed one element at a time from a buffered stream, so the
  element that breaks a list is named (the checker reports it when the dataset refuses the file).
* :func:`parse_json_line`: one record's JSON, every way it can fail named (``invalid_json``,
  ``invalid_unicode``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from internvl_chat.data.errors import DataError

__all__ = [
    "MAX_JSON_DEPTH",
    "Annotation",
    "count_records",
    "index_annotation",
    "is_json_list",
    "json_depth",
    "lengths_sidecar_path",
    "parse_json_line",
    "read_lengths_sidecar",
    "read_records",
    "write_lengths_sidecar",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # characters read at a time while streaming a JSON list
_INDEX_CHUNK = 1 << 24  # bytes scanned at a time while indexing JSON lines
# Files up to this size are hashed while training indexes them (`hash_files`), so the run folder's data fingerprint
# (which hashes them whole: train/checkpoint.py SMALL_FILE) does not read them again.
HASHED_WHOLE = 32 * 2**20
_BOM = b"\xef\xbb\xbf"
_WS = " \t\r\n"
_WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")


# --------------------------------------------------------------------------------------------------------------
# One record's JSON
# --------------------------------------------------------------------------------------------------------------

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
    # vectorised: a shallow line of millions of brackets must not cost seconds per read
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


# --------------------------------------------------------------------------------------------------------------
# Which reader
# --------------------------------------------------------------------------------------------------------------


def is_json_list(path: str | os.PathLike) -> bool:
    """Whether an annotation file is a JSON list: a ``.json`` file whose first non-blank character (after a BOM)
    is not ``{``; anything else is JSON lines. An empty ``.json`` file is an empty list."""
    path = os.fspath(path)
    if not path.lower().endswith(".json"):
        return False
    with open(path, "rb") as handle:
        head = handle.read(3)
        if head != _BOM:
            handle.seek(0)
        while chunk := handle.read(1 << 16):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1] != b"{"
    return True


# --------------------------------------------------------------------------------------------------------------
# Random access: the index training reads from
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Annotation:
    """One annotation file, indexed: where each record's bytes are (in the file, or in ``blob``)."""

    path: str
    starts: np.ndarray  # int64 byte offset of each record (in the file, or in ``blob``)
    ends: np.ndarray  # int64 exclusive end of each record
    line_numbers: np.ndarray | None  # 1-based line of each record; None: record k is on line k + 1
    blob: bytes | None  # JSON lists: the elements re-serialised back to back
    sha256: str | None = None  # of the whole file, when indexed with hash_files and at most HASHED_WHOLE bytes

    @property
    def num_records(self) -> int:
        return len(self.starts)

    def line_of(self, record: int) -> int:
        return int(self.line_numbers[record]) if self.line_numbers is not None else record + 1

    def raw(self, record: int) -> bytes:
        start, end = int(self.starts[record]), int(self.ends[record])
        if self.blob is not None:
            return self.blob[start:end]
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    def iter_raw(self) -> Iterator[tuple[int, bytes]]:
        """Every record's bytes in file order, read sequentially in large blocks."""
        if self.blob is not None:
            for k in range(self.num_records):
                yield k, self.blob[int(self.starts[k]) : int(self.ends[k])]
            return
        with open(self.path, "rb") as handle:
            k, n = 0, self.num_records
            while k < n:
                block_start = int(self.starts[k])
                stop = int(np.searchsorted(self.ends, block_start + _INDEX_CHUNK, side="right"))
                stop = max(stop, k + 1)
                handle.seek(block_start)
                block = handle.read(int(self.ends[stop - 1]) - block_start)
                for j in range(k, stop):
                    yield j, block[int(self.starts[j]) - block_start : int(self.ends[j]) - block_start]
                k = stop

    def records(self) -> Iterator[tuple[int, Any]]:
        """``(line, record)`` or ``(line, DataError)`` for every record, in file order."""
        for k, raw in self.iter_raw():
            line = self.line_of(k)
            try:
                value = parse_json_line(raw)
            except DataError as err:
                yield line, err.located(self.path, line)
                continue
            yield line, _record_or_error(value, self.path, line)


def index_annotation(path: str | os.PathLike, *, hash_files: bool = False) -> Annotation:
    """Index an annotation file (either format); a JSON list that does not parse raises :class:`DataError`.

    ``hash_files``: also take the file's SHA-256 on the same read when it is at most HASHED_WHOLE bytes (training
    does, for the run folder's data fingerprint; the checkers and evaluation have no use for it).
    """
    path = os.fspath(path)
    return _index_json_list(path, hash_files) if is_json_list(path) else _index_jsonl(path, hash_files)


def _index_jsonl(path: str, hash_files: bool = False) -> Annotation:
    """Byte offsets of the non-blank lines of a JSONL file (vectorised newline search)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256() if hash_files and size <= HASHED_WHOLE else None
    if size == 0:
        empty = np.zeros(0, np.int64)
        return Annotation(path, empty, empty, None, None, digest.hexdigest() if digest is not None else None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        newlines = []
        for pos in range(0, size, _INDEX_CHUNK):
            chunk = data[pos : pos + _INDEX_CHUNK]
            newlines.append(np.flatnonzero(chunk == 10) + pos)
            if digest is not None:
                digest.update(chunk)
        newline_pos = np.concatenate(newlines).astype(np.int64)
        starts = np.concatenate([[0], newline_pos + 1]).astype(np.int64)
        ends = np.concatenate([newline_pos, [size]]).astype(np.int64)
        if starts[-1] == size:  # the file ends with a newline: no last line
            starts, ends = starts[:-1], ends[:-1]
        keep = ends > starts
        # A line starting with whitespace may be blank (e.g. "\r" or spaces): look at those few only.
        first = np.zeros(len(starts), np.uint8)
        first[keep] = data[starts[keep]]
        suspect = np.flatnonzero(keep & np.isin(first, list(_WHITESPACE)))
        if bytes(data[:3]) == _BOM:
            suspect = np.union1d(suspect, [0])
            starts[0] = 3  # the BOM is not part of the first record
        for k in suspect:
            if not bytes(data[starts[k] : ends[k]]).strip():
                keep[k] = False
    finally:
        del data
    line_numbers = np.flatnonzero(keep).astype(np.int64) + 1
    all_kept = bool(keep.all())
    return Annotation(
        path,
        starts[keep],
        ends[keep],
        None if all_kept else line_numbers,
        None,
        digest.hexdigest() if digest is not None else None,
    )


def _index_json_list(path: str, hash_files: bool = False) -> Annotation:
    """Parse a JSON list once and keep its elements as compact JSON bytes."""
    sha256 = None
    if hash_files and os.path.getsize(path) <= HASHED_WHOLE:  # read once: hashed, then parsed as the text below
        with open(path, "rb") as handle:
            raw = handle.read()
        sha256 = hashlib.sha256(raw).hexdigest()
        text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig")
    else:
        text = open(path, encoding="utf-8-sig")
    try:
        with text:
            elements = json.load(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"not valid JSON ({exc.msg} at column {exc.colno}); the whole list is unusable",
            file=path,
            line=exc.lineno,
            kind="invalid_json",
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text: {exc}", file=path, kind="invalid_json") from None
    except RecursionError:  # read_records names the element
        raise DataError("an element is nested too deeply to parse; the whole list is unusable", file=path,
                        kind="invalid_json") from None
    except ValueError:  # an integer literal past Python's digit limit (4300 by default)
        raise DataError("a number too large to read (an integer literal past Python's digit limit); the whole "
                        "list is unusable", file=path, kind="invalid_json") from None
    if not isinstance(elements, list):
        raise DataError(
            f"a .json annotation file must hold a list of samples, got a {type(elements).__name__}",
            file=path,
            kind="invalid_json",
        )
    try:
        pieces = [_element_bytes(e) for e in elements]
    except RecursionError:
        raise DataError("an element is nested too deeply to store; the whole list is unusable", file=path,
                        kind="invalid_json") from None
    del elements
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    return Annotation(path, starts, ends, None, b"".join(pieces), sha256)


def _element_bytes(element: Any) -> bytes:
    """One JSON-list element as compact UTF-8 JSON; a lone surrogate stays escaped, so that reading the record
    names it (``invalid_unicode``) instead of the whole file failing here."""
    try:
        return json.dumps(element, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(element, separators=(",", ":")).encode("ascii")


# --------------------------------------------------------------------------------------------------------------
# File order: every record, with the element that breaks a JSON list named
# --------------------------------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` or ``(line, DataError)`` for every record of an annotation file, lazily.

    JSON lines: ``line`` is the 1-based physical line; a line that does not parse yields a ``DataError`` of kind
    ``invalid_json`` and reading goes on. JSON list: ``line`` is the **1-based index of the element** in the
    list (the physical line where it starts is in error messages). A malformed element ends the list: it is
    reported and nothing after it is read. Values that are not objects yield ``DataError`` of kind
    ``invalid_record``.
    """
    path = os.fspath(path)
    if is_json_list(path):
        yield from _read_json_list(path)
    else:
        yield from _index_jsonl(path).records()


def count_records(path: str | os.PathLike) -> int:
    """How many entries :func:`read_records` yields (bad lines included), without parsing JSON lines."""
    path = os.fspath(path)
    if is_json_list(path):
        return sum(1 for _ in _read_json_list(path))
    return _index_jsonl(path).num_records


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


# --------------------------------------------------------------------------------------------------------------
# Token-length sidecars: one number per record, in file order
# --------------------------------------------------------------------------------------------------------------


def lengths_sidecar_path(annotation: str | os.PathLike) -> str:
    """``<annotation>.lengths.npy``: where :func:`write_lengths_sidecar` puts the token lengths."""
    return os.fspath(annotation) + ".lengths.npy"


def write_lengths_sidecar(annotation: str | os.PathLike, lengths: Sequence[int]) -> str:
    """Write the token length of every record of an annotation file, for length-grouped sampling.

    Format: a 1-D int64 ``.npy`` array with one entry per record in file order (blank lines of a
    JSONL file are not records; for a JSON list, one per element), before any ``repeat_time``
    expansion. A value ``<= 0`` means "unknown" (e.g. a bad line): the dataset estimates that one.
    A sidecar whose size does not match the file's record count is ignored with a warning (stale).
    Written atomically (temporary file + rename). Returns the path.
    """
    array = np.asarray(lengths, dtype=np.int64).reshape(-1)
    path = lengths_sidecar_path(annotation)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)
    return path


def read_lengths_sidecar(annotation: str | os.PathLike, num_records: int) -> np.ndarray | None:
    """The sidecar's lengths when it exists and fits ``num_records``, else None."""
    path = lengths_sidecar_path(annotation)
    if not os.path.isfile(path):
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable length sidecar %s: %s", path, exc)
        return None
    if array.ndim != 1 or array.shape[0] != num_records or not np.issubdtype(array.dtype, np.integer):
        logger.warning(
            "ignoring length sidecar %s: %s entries for %d records (stale? rerun tools/check_data.py)",
            path, array.shape, num_records,
        )
        return None
    return array.astype(np.int64)
