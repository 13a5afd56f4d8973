"""Checkpoints that survive faults: verified resume, all-or-nothing publication, rotation that keeps a good one,
and a one-line error when the disk is full.

How InternVLTrainer saves `checkpoint-N` (train/trainer.py `_save_checkpoint`):
1. Free space is checked first (`shutil.disk_usage`) against the size of the newest good checkpoint, or for the
   first save against the bytes of the model and optimizer state: a save that cannot fit stops the run before a
   byte is written.
2. transformers' Trainer writes every file into the staging folder `checkpoint-N.saving/checkpoint-N` (the
   installed Trainer writes straight into the final folder, with no temporary folder of its own; its output
   directory is pointed at the staging folder for the duration of the save).
3. Every file is fsync'ed, then the completion marker `internvl_chat_complete.json` is written (atomically, last):
   each file's size and an integrity record (below).
4. The staging folder is renamed to `checkpoint-N`; a rename within one file system is atomic, so a folder named
   `checkpoint-N` is either absent or complete.
5. Rotation (`save_total_limit`) counts only checkpoints that verify; it deletes older ones beyond the limit and
   broken leftovers older than the newest good one, never the newest good one, and first renames a folder to
   `checkpoint-N.deleting` so a half-deleted folder is never taken for a checkpoint.

A SIGKILL at any moment leaves at worst a `*.saving` / `*.deleting` leftover (ignored, then removed by the next
rotation) or, in the microseconds between the two renames when a step is saved a second time, no `checkpoint-N` at
all; the previous good checkpoint is always still there. A full disk (ENOSPC anywhere in the save, including
torch's "inline_container.cc ... unexpected pos" and an ENOSPC reported by fsync) removes the partial checkpoint
and raises `CheckpointSaveError` with one line: the folder, the space needed, the space free.

At the next start (finetune.py) the newest checkpoint that verifies is resumed; every one skipped is logged on one
line with its path and the reason. `verify_checkpoint`: the marker is there and readable, every file it lists is
there with the recorded size, small files hash to the recorded sha256, the first and last MiB of big ones too,
every safetensors header parses and declares exactly the bytes the file holds, every torch archive has its zip
directory, and no pickle weight file the run did not write sits in the folder (model/weight_files.py).

Why no full hash of the big files: sha256 runs at ~0.5-1 GB/s on one core, so hashing 15 GB of weights and 30 GB
of optimizer state would add a minute to every save and another to every start. The faults that really happen are
truncation (kill, full disk: caught by sizes, safetensors offsets and zip directories) and zero-filled or missing
blocks after a crash (caught by the head/tail hashes, and prevented by fsync before the marker); silent bit rot in
the middle of a large file is left to the file system. Files up to 32 MiB (configs, tokenizer, trainer state, RNG
and scheduler state) are hashed whole.

Limits: the output folder's file system must be able to rename a folder (every local and network POSIX file
system can; object-store mounts may do it slowly). In a multi-process save a failure on one rank (e.g. a full disk
under DeepSpeed, where every rank writes its shards) stops the other ranks only at the collective's timeout; the
free-space check before the save is agreed by all ranks, so the common case stops them together.

A marker written before this format (`{"global_step", "time"}` only) still counts, with the checks that need no
record: safetensors headers and torch zip directories. A folder given explicitly with --resume_from_checkpoint
that has no marker (e.g. from another tool) gets the same structural checks and a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time

from ..model.weight_files import pickle_weight_files, safetensors_problem, torch_zip_problem

logger = logging.getLogger(__name__)

MARKER = "internvl_chat_complete.json"
MARKER_FORMAT = 2
SMALL_FILE = 32 * 2**20  # hashed whole
EDGE = 2**20  # bigger files: the first and last MiB are hashed
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LEFTOVER_RE = re.compile(r"^checkpoint-(\d+)\.(saving|replaced|deleting)$")
TORCH_ARCHIVE_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be saved (full disk); the message is one line naming the folder and the sizes."""


# --- listing ------------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` folder, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def list_leftovers(output_dir: str) -> list[str]:
    """Folders of interrupted saves and deletions (`checkpoint-N.saving`, `.replaced`, `.deleting`)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, n) for n in os.listdir(output_dir) if LEFTOVER_RE.match(n))


# --- the marker ---------------------------------------------------------------------------------------------------
def _sha256(path: str, edges: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if not edges:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(f.read(EDGE))
            f.seek(-EDGE, os.SEEK_END)
            digest.update(f.read(EDGE))
    return digest.hexdigest()


def file_record(path: str) -> dict:
    size = os.path.getsize(path)
    if size <= SMALL_FILE:
        return {"size": size, "sha256": _sha256(path, edges=False)}
    return {"size": size, "edges_sha256": _sha256(path, edges=True)}


def _files(folder: str) -> list[str]:
    """Relative paths ('/'-separated) of every file under `folder` but the marker, sorted."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel not in (MARKER, MARKER + ".tmp"):
                out.append(rel)
    return sorted(out)


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # some file systems cannot open a directory for fsync; the files themselves were synced
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # "fsync not supported here" is not a fault
            raise
    finally:
        os.close(fd)


def write_marker(folder: str, step: int) -> dict:
    """fsync every file of `folder`, then write the marker listing them (atomically, and synced itself)."""
    rels = _files(folder)
    for root, _, names in os.walk(folder):
        for name in names:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)
    files = {rel: file_record(os.path.join(folder, rel)) for rel in rels}
    marker = {"format": MARKER_FORMAT, "global_step": step, "time": time.time(),
              "bytes": sum(r["size"] for r in files.values()), "files": files}
    tmp = os.path.join(folder, MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MARKER))
    _fsync(folder, directory=True)
    return marker


def read_marker(folder: str) -> dict | None:
    """The marker's content; None when absent. A marker that cannot be parsed raises ValueError."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"the completion marker cannot be read ({e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files", {}), dict):
        raise ValueError("the completion marker is malformed")
    return marker


# --- verification -------------------------------------------------------------------------------------------------
def verify_checkpoint(path: str, deep: bool = True, allow_pickle: bool = False) -> list[str]:
    """Problems that forbid resuming from the checkpoint folder `path` (empty: it verifies).

    deep=False skips the hashes (rotation, after every save); resume selection verifies deep.
    """
    if not os.path.isdir(path):
        return ["not a folder"]
    try:
        marker = read_marker(path)
    except ValueError as e:
        return [str(e)]
    if marker is None:
        return ["no completion marker (the save did not finish)"]
    if "files" not in marker:  # written before markers listed files
        return structural_problems(path, allow_pickle)
    problems = []
    for rel, record in sorted(marker["files"].items()):
        problem = _file_problem(os.path.join(path, rel), record, deep)
        if problem:
            problems.append(f"{rel} {problem}")
    if not allow_pickle:
        listed = set(marker["files"])
        for name in pickle_weight_files(path):
            if name not in listed:
                problems.append(f"{name} is a pickle weight file this run did not write (--allow_pickle to accept)")
    return problems


def _file_problem(full: str, record: dict, deep: bool) -> str | None:
    if not os.path.isfile(full):
        return "is missing"
    size = os.path.getsize(full)
    if size != record.get("size"):
        return f"is {size} bytes, the marker recorded {record.get('size')} (truncated or overwritten)"
    if full.endswith(".safetensors"):
        problem = safetensors_problem(full)
        if problem:
            return problem
    if not deep:
        return None
    if full.endswith(TORCH_ARCHIVE_SUFFIXES):
        problem = torch_zip_problem(full)
        if problem:
            return problem
    if "sha256" in record and _sha256(full, edges=False) != record["sha256"]:
        return "content differs from what was saved (sha256)"
    if "edges_sha256" in record and _sha256(full, edges=True) != record["edges_sha256"]:
        return "content differs from what was saved (sha256 of its first and last MiB)"
    return None


def structural_problems(path: str, allow_pickle: bool = False) -> list[str]:
    """Checks that need no marker: safetensors headers vs file sizes, shards named by an index, torch zip
    directories, no pickle weight files."""
    problems = []
    for rel in _files(path):
        full = os.path.join(path, rel)
        problem = None
        if rel.endswith(".safetensors"):
            problem = safetensors_problem(full)
        elif rel.endswith(TORCH_ARCHIVE_SUFFIXES):
            problem = torch_zip_problem(full)
        elif rel.endswith(".safetensors.index.json"):
            problem = _index_problem(full)
        if problem:
            problems.append(f"{rel} {problem}")
    if not allow_pickle:
        problems += [f"{name} is a pickle weight file (--allow_pickle to accept)" for name in pickle_weight_files(path)]
    return problems


def _index_problem(index_path: str) -> str | None:
    from ..model.weight_files import CorruptWeightsError, index_shards

    try:
        folder = os.path.dirname(index_path)
        missing = [s for s in index_shards(index_path) if not os.path.isfile(os.path.join(folder, s))]
    except CorruptWeightsError:
        return "is not a readable safetensors index"
    return f"names missing shard(s) {', '.join(missing)}" if missing else None


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


# --- resume -------------------------------------------------------------------------------------------------------
def select_resume_checkpoint(output_dir: str, allow_pickle: bool = False) -> str | None:
    """The newest checkpoint under `output_dir` that verifies; every newer one skipped is logged with the reason."""
    for leftover in list_leftovers(output_dir):
        logger.warning("ignoring %s: an interrupted save or deletion (removed when training starts)", leftover)
    for _, path in reversed(list_checkpoints(output_dir)):
        problems = verify_checkpoint(path, allow_pickle=allow_pickle)
        if not problems:
            return path
        logger.warning("skipping checkpoint %s: %s", path, _summary(problems))
    return None


def check_resume_path(path: str, allow_pickle: bool = False) -> str:
    """An explicit --resume_from_checkpoint, verified: a broken one is an error naming it and its problems."""
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {path}: no such folder")
    if os.path.exists(os.path.join(path, MARKER)):
        problems = verify_checkpoint(path, allow_pickle=allow_pickle)
    else:
        logger.warning("%s has no completion marker: only its weight files' structure can be checked", path)
        problems = structural_problems(path, allow_pickle)
    if problems:
        raise ValueError(f"--resume_from_checkpoint {path} cannot be resumed from: {'; '.join(problems)}")
    logger.info("resuming from %s", path)
    return path


# --- publication, deletion, rotation ------------------------------------------------------------------------------
def staging_root(output_dir: str, step: int) -> str:
    """The Trainer writes `<this>/checkpoint-N` during the save."""
    return os.path.join(output_dir, f"checkpoint-{step}.saving")


def publish(staged: str, final: str) -> None:
    """Move a complete staged checkpoint into place, replacing a previous save of the same step."""
    replaced = None
    if os.path.exists(final):
        replaced = final + ".replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staged, final)
    _fsync(os.path.dirname(final) or ".", directory=True)
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)


def remove_tree(path: str) -> None:
    """Delete a checkpoint folder so that an interruption cannot leave something that looks like a checkpoint."""
    name = os.path.basename(path.rstrip(os.sep))
    if CHECKPOINT_RE.match(name):
        doomed = path.rstrip(os.sep) + ".deleting"
        shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.rename(path, doomed)
            path = doomed
        except OSError:
            pass  # delete in place; verification still rejects what is left
    shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(output_dir: str, limit: int | None, protect: tuple[str | None, ...] = ()) -> list[str]:
    """Apply save_total_limit to the checkpoints that verify; returns the deleted paths.

    Only verified checkpoints count and the newest `limit` of them (and `protect`, e.g. the best one) are kept, so
    the only good checkpoint is never deleted. Broken ones older than the newest good one are leftovers of
    interrupted saves and go; broken ones newer than it are kept (they are replaced when the run gets there again),
    as are all checkpoints when nothing verifies. Leftover `.saving/.replaced/.deleting` folders go.
    """
    checkpoints = list_checkpoints(output_dir)
    good = [(step, path) for step, path in checkpoints if not verify_checkpoint(path, deep=False, allow_pickle=True)]
    newest_good = good[-1][0] if good else None
    keep = {os.path.abspath(p) for p in protect if p}
    if limit and limit > 0:
        keep |= {os.path.abspath(path) for _, path in good[-limit:]}
    else:
        keep |= {os.path.abspath(path) for _, path in good}
    doomed = []
    good_paths = {path for _, path in good}
    for step, path in checkpoints:
        if os.path.abspath(path) in keep:
            continue
        if path in good_paths or (newest_good is not None and step < newest_good):
            doomed.append(path)
    doomed += list_leftovers(output_dir)
    for path in doomed:
        logger.info("deleting %s (%s)", path, "save_total_limit" if path in good_paths else "incomplete leftover")
        remove_tree(path)
    return doomed


# --- disk space ---------------------------------------------------------------------------------------------------
def free_bytes(path: str) -> int:
    """Free space for an unprivileged writer on the file system holding `path`."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def checkpoint_bytes(path: str) -> int:
    """Total size of a checkpoint folder (from its marker when it has one)."""
    try:
        marker = read_marker(path)
    except ValueError:
        marker = None
    if marker and "bytes" in marker:
        return int(marker["bytes"])
    return sum(os.path.getsize(os.path.join(path, rel)) for rel in _files(path))


def estimate_save_bytes(output_dir: str, model=None, optimizer=None) -> tuple[int, str]:
    """(bytes, how they were estimated): the newest good checkpoint's size (the next one holds the same files), or
    before the first save the bytes of the model's state dict plus the optimizer's state tensors."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if not verify_checkpoint(path, deep=False, allow_pickle=True):
            return checkpoint_bytes(path), f"the size of {os.path.basename(path)}"
    import torch

    total, seen = 0, set()
    tensors = list(model.state_dict().values()) if model is not None else []
    for state in getattr(optimizer, "state", {}).values() if optimizer is not None else []:
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)] if isinstance(state, dict) else []
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total, "model and optimizer state"


_NO_SPACE = re.compile(r"no space left|os error 28|storagefull|disk quota|quota exceeded", re.I)
# torch.save reports a failed write without the errno ("[enforce fail at inline_container.cc:...] . unexpected pos")
_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|failed writing|write failed", re.I)


def is_disk_full(exc: BaseException, free: int, needed: int) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk is full. torch's bare write failure counts
    when the free space is now below what the save needs."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        message = str(exc)
        if _NO_SPACE.search(message) or (_WRITE_FAILED.search(message) and free < needed):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def disk_full_message(folder: str, needed: int, basis: str, free: int, kept: str | None, before: bool) -> str:
    what = "stopping before writing" if before else "the partial checkpoint was removed"
    keep = f"; {kept} is kept" if kept else ""
    again = f"resumes from {os.path.basename(kept)}" if kept else "starts from the beginning"
    return (f"not enough disk space to save {folder}: it needs about {format_bytes(needed)} ({basis}), "
            f"{format_bytes(free)} free; {what}{keep}. Free some space and run the same command again: it {again}")
