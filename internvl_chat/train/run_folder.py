"""The run-folder contract: what starting a run in an output folder that already holds one does.

Every checkpoint stores the run's resolved settings (:data:`SETTINGS_FILE`: the flags that decide what is trained,
the data's and the base model's fingerprints, the global batch); a finished run stores them at the top of the
folder, marked complete. Starting a run, before any process group or model load:

* nothing of a run there (a missing or empty folder, or only a launcher log) -> a new run;
* a finished run with the same settings -> "complete", exit 0, no file touched; with other settings -> refused;
* checkpoints with the same settings -> resume from the newest that verifies (one line, with the step);
* checkpoints with settings that change what is trained -> refused, with the differences and the three ways out:
  ``--overwrite_output_dir`` (start over: the old run is moved aside, never deleted), ``--resume_from_checkpoint
  PATH`` (resume on purpose), another output folder.

``--resume_from_checkpoint PATH`` and ``--overwrite_output_dir`` are decisions, so they skip the comparison. A
checkpoint written without the settings file (an older version, the official code) is resumed, with a warning that
its settings could not be compared.

The official script's behaviour differs: it resumes from the last checkpoint whatever the settings, and its own
launchers pass ``--overwrite_output_dir True``, which turns resuming off and writes over the old run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import checkpoint

logger = logging.getLogger(__name__)

SETTINGS_FILE = "run_settings.json"
SETTINGS_FORMAT = 1
LOCK_FILE = ".internvl_chat.lock"  # held (flock) by rank 0 while a run trains in the folder
# Files a finished run writes at the top of its folder: a folder holding one of these holds a (finished) run.
FINAL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "trainer_state.json",
               "all_results.json", "train_results.json", SETTINGS_FILE)

# The flags that decide what is trained, by what they are about (official names; ours included).
TRAINED_BY: dict[str, tuple[str, ...]] = {
    "model": ("mlp_path", "vision_select_layer", "drop_path_rate", "ps_version", "down_sample_ratio",
              "force_image_size", "router_aux_loss_coef", "output_router_logits"),
    "trainability": ("freeze_llm", "freeze_backbone", "freeze_mlp", "unfreeze_vit_layers", "use_backbone_lora",
                     "use_llm_lora", "unfreeze_lm_head", "use_qlora", "lora_alpha", "lora_dropout",
                     "llm_lora_target_modules", "backbone_lora_target_modules"),
    "template": ("conv_style",),
    "data": ("max_seq_length", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch",
             "min_num_frame", "max_num_frame", "pad2square", "normalize_type", "use_packed_ds",
             "num_images_expected", "max_packed_tokens", "loss_reduction", "loss_reduction_all_gather",
             "group_by_length", "seed", "data_seed", "fast_image_decode"),
    "schedule": ("learning_rate", "vision_lr", "mlp_lr", "llm_lr", "lr_scheduler_type", "lr_scheduler_kwargs",
                 "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps", "weight_decay", "optim",
                 "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"),
    "precision": ("bf16", "fp16"),
}


class RunFolderError(Exception):
    """Starting here would continue or overwrite a run it should not: the message lists why and the ways out."""


# --- the settings ---------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A JSON-comparable form of a flag value (enums by value, the rest as JSON has it)."""
    value = getattr(value, "value", value)
    return json.loads(json.dumps(value, default=str))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_fingerprint(path: str) -> dict:
    """The base checkpoint by content: its config.json and the names and sizes of its weight files."""
    folder = os.path.abspath(path)
    try:
        with open(os.path.join(folder, "config.json"), "rb") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        config = None
    weights = []
    try:
        for name in sorted(os.listdir(folder)):
            if name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                weights.append((name, os.path.getsize(os.path.join(folder, name))))
    except OSError:
        pass
    ident = _digest(json.dumps([config, weights], sort_keys=True).encode())
    size = sum(s for _, s in weights)
    return {"show": f"{folder} ({len(weights)} weight file(s), {checkpoint.format_bytes(size)}; id {ident})",
            "id": ident}


def model_settings(values: Mapping[str, Any]) -> dict:
    """The base model by content: the chat checkpoint, or the ViT and LLM folders a new model is built from."""
    if values.get("model_name_or_path"):
        return {"checkpoint": model_fingerprint(values["model_name_or_path"])}
    return {"checkpoint": {"show": "none (built from --vision_path and --llm_path)", "id": None},
            "vision": model_fingerprint(values["vision_path"]), "llm": model_fingerprint(values["llm_path"])}


def data_fingerprint(meta_path: str, entries: Sequence, annotations: Sequence) -> dict[str, dict]:
    """The meta file by content, and each dataset's annotation file by size, record count and checksum (of the whole
    file up to checkpoint.SMALL_FILE, taken while training indexed it with `hash_files`, else read here; of its edges
    above)."""
    with open(meta_path, "rb") as handle:
        meta = _digest(json.dumps(json.load(handle), sort_keys=True).encode())
    out = {"meta": {"show": f"{os.path.abspath(meta_path)} (id {meta})", "id": meta}}
    for entry, annotation in zip(entries, annotations):
        path = os.path.abspath(entry.annotation)
        size = os.path.getsize(path)
        if size <= checkpoint.SMALL_FILE and annotation.sha256 is not None:
            record = {"size": size, "sha256": annotation.sha256}  # checkpoint.file_record's, without a second read
        else:
            record = checkpoint.file_record(path)
        ident = _digest(json.dumps([size, annotation.num_records, record], sort_keys=True).encode())
        out[f"dataset {entry.name!r}"] = {
            "show": f"{path}: {annotation.num_records} records, {checkpoint.format_bytes(size)} (id {ident})",
            "id": ident}
    return out


def zero_stage(deepspeed: Any) -> Any:
    """The ZeRO stage of a DeepSpeed config (path or dict), None without DeepSpeed: checkpoints of different stages
    do not resume into each other."""
    if not deepspeed:
        return None
    config = deepspeed
    if isinstance(deepspeed, str):
        try:
            with open(deepspeed, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return deepspeed
    stage = (config.get("zero_optimization") or {}).get("stage", 0) if isinstance(config, dict) else None
    return f"ZeRO-{stage}"


def resolve_settings(values: Mapping[str, Any], world_size: int, entries: Sequence, annotations: Sequence) -> dict:
    """The run's settings that decide what is trained, as stored in :data:`SETTINGS_FILE`."""
    settings: dict[str, Any] = {"model": model_settings(values)}
    for group, names in TRAINED_BY.items():
        settings.setdefault(group, {}).update({name: _plain(values.get(name)) for name in names})
    settings["data"].update(data_fingerprint(values["meta_path"], entries, annotations))
    per_device = int(values.get("per_device_train_batch_size") or 8)
    accumulation = int(values.get("gradient_accumulation_steps") or 1)
    settings["batch"] = {"global batch": {
        "show": f"{per_device * accumulation * world_size} ({per_device} per device x {accumulation} accumulation x "
                f"{world_size} processes)", "id": per_device * accumulation * world_size}}
    settings["precision"]["deepspeed"] = zero_stage(values.get("deepspeed"))
    return settings


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`group: name: old -> new` for every setting that differs (fingerprints compared by id, shown in full)."""
    out = []
    for group in new:
        before, after = old.get(group) or {}, new[group]
        for name in after:
            if name not in before:  # a setting an older version did not record
                continue
            a, b = before[name], after[name]
            ida = a.get("id") if isinstance(a, dict) and "id" in a else a
            idb = b.get("id") if isinstance(b, dict) and "id" in b else b
            if ida != idb:
                show = (lambda v: v["show"] if isinstance(v, dict) and "show" in v else json.dumps(v))
                out.append(f"{group}: {name}: {show(a)} -> {show(b)}")
    return out


def write_settings(folder: str, settings: Mapping[str, Any], **state: Any) -> None:
    """Write :data:`SETTINGS_FILE` into `folder` (atomically: a reader never sees half a file)."""
    path = os.path.join(folder, SETTINGS_FILE)
    body = {"format": SETTINGS_FORMAT, **state, "settings": settings}
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(body, handle, indent=2)
    os.replace(path + ".tmp", path)


def read_settings(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, SETTINGS_FILE), encoding="utf-8") as handle:
            body = json.load(handle)
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("settings"), dict) else None


# --- the decision ---------------------------------------------------------------------------------------------------
@dataclass
class Decision:
    """What to do with the output folder. ``action``: new | resume | start_over | complete."""

    action: str
    message: str = ""
    resume: str | None = None  # the checkpoint to resume from
    exit_code: int = 0  # of a complete run: 1 when it finished but failed its bad-data check
    notes: list[str] = field(default_factory=list)


def run_contents(output_dir: str) -> list[str]:
    """The names in `output_dir` that belong to a run (checkpoints, final files); empty: no run there."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    found = [n for n in names if checkpoint.CHECKPOINT_RE.match(n) and os.path.isdir(os.path.join(output_dir, n))]
    found += [n for n in names if n in FINAL_FILES]
    return found


def _legacy_complete(output_dir: str) -> int | None:
    """The final step of a finished run that recorded no settings (official code, older versions): its top-level
    trainer_state.json reached its max_steps, next to the final weights."""
    try:
        with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return None
    has_weights = any(os.path.exists(os.path.join(output_dir, n))
                      for n in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"))
    step, total = state.get("global_step"), state.get("max_steps")
    if has_weights and isinstance(step, int) and isinstance(total, int) and 0 < total <= step:
        return step
    return None


def ways_out(output_dir: str, resume_from: str | None) -> str:
    lines = ["Choose one:",
             f"  --overwrite_output_dir True    start over; the old run is moved to {aside_name(output_dir)}-<time>, "
             "not deleted"]
    if resume_from:
        lines.append(f"  --resume_from_checkpoint {resume_from}    resume from it on purpose, with the new settings")
    lines.append("  another output folder (OUTPUT_DIR=... or --output_dir ...)    keep both runs")
    return "\n".join(lines)


def aside_name(output_dir: str) -> str:
    return os.path.normpath(output_dir) + ".previous"


def decide(output_dir: str, settings: Mapping[str, Any], *, overwrite: bool, resume_from_checkpoint: Any,
           auto_resume: bool, allow_pickle: bool = False) -> Decision:
    """What starting a run with `settings` in `output_dir` does (read-only: nothing is moved or written here).

    Raises :class:`RunFolderError` when the folder holds a run this one must not silently continue or overwrite."""
    explicit = str(resume_from_checkpoint).strip() if resume_from_checkpoint not in (None, False) else ""
    if explicit.lower() in ("false", "none"):
        explicit = ""
    contents = run_contents(output_dir)
    if explicit and explicit.lower() != "true":  # a checkpoint named on purpose: no comparison
        return Decision("resume", resume=checkpoint.check_resume_path(explicit, allow_pickle))
    if not contents:
        if explicit:  # "True": resume from the newest, which must exist
            raise RunFolderError(f"--resume_from_checkpoint True: {output_dir} holds no checkpoint")
        return Decision("new")
    if overwrite:
        return Decision("start_over", message=f"--overwrite_output_dir: {output_dir} holds a run "
                                              f"({', '.join(contents[:4])}{', ...' if len(contents) > 4 else ''})")

    final = read_settings(output_dir)
    if final is not None and final.get("complete"):
        diff = differences(final["settings"], settings)
        if diff:
            raise RunFolderError(_changed(output_dir, f"a finished run (step {final.get('global_step')})", diff,
                                          None))
        failed = final.get("failed")
        text = f"{output_dir} holds this run, complete at step {final.get('global_step')}: nothing to do"
        if failed:
            return Decision("complete", message=f"{text}; it failed: {failed}", exit_code=1)
        return Decision("complete", message=text + " (--overwrite_output_dir True to train it again)")
    legacy_step = _legacy_complete(output_dir) if final is None else None

    resume = checkpoint.select_resume_checkpoint(output_dir, allow_pickle)
    if resume is None:
        if legacy_step is not None:
            return Decision("complete", message=f"{output_dir} holds a finished run (step {legacy_step}, settings not "
                                                "recorded): nothing to do (--overwrite_output_dir True to start over)")
        broken = [os.path.basename(p) for _, p in checkpoint.list_checkpoints(output_dir)]
        what = f"checkpoints that do not verify ({', '.join(broken)})" if broken else \
            f"the files of another run ({', '.join(contents)})"
        raise RunFolderError(f"{output_dir} holds {what}; training here would write over them.\n"
                             + ways_out(output_dir, None))
    step = int(checkpoint.CHECKPOINT_RE.match(os.path.basename(resume)).group(1))
    if not auto_resume and not explicit:
        raise RunFolderError(f"{output_dir} holds a run (newest checkpoint {resume}) and --auto_resume is False, so "
                             "it would not be resumed but written over.\n" + ways_out(output_dir, resume))
    recorded = read_settings(resume)
    if recorded is None:
        return Decision("resume", resume=resume, message=f"resuming from {resume} (step {step}); it recorded no "
                                                         "settings, so this run's could not be compared with them")
    diff = differences(recorded["settings"], settings)
    if diff:
        raise RunFolderError(_changed(output_dir, f"a run with checkpoints (newest {os.path.basename(resume)})",
                                      diff, resume))
    return Decision("resume", resume=resume, message=f"resuming from {resume} (step {step}): same settings")


def _changed(output_dir: str, what: str, diff: list[str], resume: str | None) -> str:
    why = "continuing it would mix the two" if resume else "training here would write over it"
    return (f"{output_dir} holds {what} with other settings; {why}:\n"
            + "\n".join(f"  {line}" for line in diff) + "\n" + ways_out(output_dir, resume))


def move_aside(output_dir: str) -> str:
    """Rename the old run's folder to `<output_dir>.previous-<time>` (a fresh name, never over anything)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{aside_name(output_dir)}-{stamp}", 1
    while os.path.exists(target):
        target, n = f"{aside_name(output_dir)}-{stamp}-{n}", n + 1
    os.rename(output_dir, target)
    return target


# --- one run at a time ----------------------------------------------------------------------------------------------
def _holder(fd: int) -> str:
    """What the lock holder wrote into the lock file ("pid 123 on host, since ...")."""
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"


def lock_holder(output_dir: str) -> str | None:
    """Who holds `output_dir` (a run still going: "pid 123 on host, since ..."), or None. Reads, never writes."""
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    except OSError:  # a file system without locks: nothing to say
        return None
    finally:
        os.close(fd)  # releases the probe's shared lock
    return None


class RunLock:
    """Rank 0's hold on the output folder while it trains, so a second launch into it stops at once."""

    def __init__(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self.fd)
            os.close(self.fd)
            raise RunFolderError(in_use_message(output_dir, holder)) from None
        except OSError:  # no locks on this file system: run without
            pass
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)

    def release(self) -> None:
        os.close(self.fd)


def in_use_message(output_dir: str, holder: str) -> str:
    return (f"{output_dir} is in use by a run that is still going ({holder}); wait for it to end, stop it, or "
            "choose another output folder (OUTPUT_DIR=... or --output_dir ...)")
