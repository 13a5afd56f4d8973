"""Weight files on disk: which ones may be loaded, and whether a file is whole, without loading it.

Shared by model loading (model/modeling.py `from_pretrained`) and checkpoint verification (train/checkpoint.py).

- **No pickle.** `pytorch_model.bin`, `*.pt`, `*.pth` (...) are Python pickles: loading one can run any code its
  author chose. Weights load from safetensors only; a folder holding a pickle weight file, beside the safetensors or
  instead of them, is refused with a message naming the files, unless the caller passes `allow_pickle` (the
  `--allow_pickle` flags). A folder that also has safetensors is refused too: a stray pickle there means the folder
  is not what it claims to be, and someone else's tool would load it. The files the HF Trainer writes into every
  checkpoint (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, `training_args.bin`, ...) are not weights and are
  not refused: the Trainer loads them at resume with `torch.load(weights_only=True)` (transformers >= 4.50), which
  only rebuilds tensors and plain containers, and the resume verification lists them in the completion marker, so
  only files our own run wrote are ever read (train/checkpoint.py).
- **Whole files.** A truncated or half-written `.safetensors` makes the safetensors library fail with
  "incomplete metadata" or "invalid header" and no file name. `safetensors_problem` reads only the header (8-byte
  length + JSON) and checks that every tensor's byte range matches its dtype and shape and that the data section
  the header declares is exactly what the file holds, so the user gets the path and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile

# bytes per element; sub-byte and exotic dtypes are left out and get no per-tensor size check
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# written by transformers' Trainer into every checkpoint (and training_args.bin beside the final model); not weights
TRAINER_STATE_FILES = re.compile(r"^(optimizer|scheduler|scaler)\.pt$|^rng_state(_\d+)?\.pth$|^training_args\.bin$")


class UnsafeWeightsError(ValueError):
    """A folder holds pickle weight files and the caller did not allow pickle."""


class CorruptWeightsError(ValueError):
    """A weight file is truncated or malformed; the message names the file."""


def pickle_weight_files(directory: str) -> list[str]:
    """Names of the pickle files in `directory` (top level) that are, or could be taken for, model weights."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name.endswith(PICKLE_SUFFIXES) and not TRAINER_STATE_FILES.match(name)
                  and os.path.isfile(os.path.join(directory, name)))


def safetensors_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")) if os.path.isdir(directory) else []


def safetensors_problem(path: str) -> str | None:
    """Why the safetensors file at `path` cannot be whole (reading only its header), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header (truncated)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > SAFETENSORS_MAX_HEADER or 8 + header_len > size:
                return f"header length {header_len} does not fit in its {size} bytes (truncated or not safetensors)"
            raw = f.read(header_len)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "header is not valid JSON (corrupt or not safetensors)"
    if not isinstance(header, dict):
        return "header is not a JSON object (corrupt or not safetensors)"
    data_len = size - 8 - header_len
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_entry_problem(info)
        if problem:
            return f"tensor {name!r}: {problem}"
        begin, end = info["data_offsets"]
        itemsize = SAFETENSORS_DTYPE_BYTES.get(info["dtype"])
        if itemsize is not None and end - begin != math.prod(info["shape"]) * itemsize:
            return f"tensor {name!r}: {end - begin} bytes for shape {info['shape']} of {info['dtype']}"
        ranges.append((begin, end))
    ranges.sort()
    expected = 0
    for begin, end in ranges:  # the format's rule: tensors tile the data section, no gaps, no overlaps
        if begin != expected:
            return f"tensor byte ranges leave a gap or overlap at offset {expected}"
        expected = end
    if expected != data_len:
        how = "truncated" if data_len < expected else "trailing bytes"
        return f"header declares {expected} data bytes, the file holds {data_len} ({how})"
    return None


def _tensor_entry_problem(info) -> str | None:
    if not isinstance(info, dict):
        return "entry is not an object"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(info.get("dtype"), str):
        return "no dtype"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"invalid data_offsets {offsets!r}"
    return None


def torch_zip_problem(path: str) -> str | None:
    """A torch.save file (a zip archive since torch 1.6) whose central directory cannot be read is truncated or
    corrupt. Reads the archive's directory at the end of the file, never unpickles anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except zipfile.BadZipFile:
        return "not a complete torch archive (truncated or corrupt)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def check_weights_dir(directory: str, allow_pickle: bool = False) -> bool:
    """Refuse pickle weights and broken safetensors before transformers reads them. Returns whether the weights
    are safetensors (False only for an allowed pickle-only folder)."""
    pickles = pickle_weight_files(directory)
    if pickles and not allow_pickle:
        raise UnsafeWeightsError(
            f"{directory} holds pickle weight file(s) {', '.join(pickles)}; loading a pickle can run arbitrary code, "
            "so only .safetensors weights are loaded. Remove or convert them, or pass --allow_pickle "
            "(allow_pickle=True) if you trust where this folder came from"
        )
    names = safetensors_files(directory)
    for name in names:
        problem = safetensors_problem(os.path.join(directory, name))
        if problem:
            raise CorruptWeightsError(f"{os.path.join(directory, name)}: {problem}")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        missing = sorted(set(index_shards(index)) - set(names))
        if missing:
            raise CorruptWeightsError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
    return bool(names) or not pickles


def index_shards(index_path: str) -> list[str]:
    """Shard file names named by a `*.safetensors.index.json` (malformed index: CorruptWeightsError)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptWeightsError(f"{index_path}: not a readable safetensors index ({e})") from None
