"""Who am I in the job: the one place that reads torchrun, Slurm and plain-python launch variables.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT itself. Under `srun` (one task per GPU, as
the official scripts launch), Slurm's variables are translated into those, so transformers / accelerate / DeepSpeed
initialise the process group as they would under torchrun. A plain `python` run is rank 0 of 1. There is no
official-style `LAUNCHER=slurm` default: the launcher is detected from the environment.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    launcher: str  # "torchrun" | "slurm" | "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[01-04],other" -> "node01"; good enough when scontrol is missing
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def _tasks_on_node(spec: str, node_id: int) -> int:
    """This node's task count from Slurm's compressed per-node list: "8(x2),4" means 8, 8, 4 (0 if unreadable)."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return 0
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else 0


def dist_info(environ: dict | None = None) -> DistInfo:
    """This process's place in the job: torchrun variables first, then a multi-task Slurm step, else rank 0 of 1."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            env.get("INTERNVL_LAUNCHER", "torchrun"), int(env["RANK"]), int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        ntasks = int(env["SLURM_NTASKS"])
        spec = next((env[k] for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
                     if env.get(k)), "")
        local_world = _tasks_on_node(spec, int(env.get("SLURM_NODEID", 0) or 0)) or ntasks
        return DistInfo("slurm", int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)), local_world)
    return DistInfo("none", 0, 1, 0, 1)


def setup_environment(environ: dict | None = None) -> DistInfo:
    """Translate a Slurm task's variables into the torchrun ones (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    env = os.environ if environ is None else environ
    info = dist_info(env)
    if info.launcher == "slurm" and env.get("INTERNVL_LAUNCHER") != "slurm":
        env["INTERNVL_LAUNCHER"] = "slurm"  # remembered after the torchrun variables below exist
        env["RANK"] = str(info.rank)
        env["WORLD_SIZE"] = str(info.world_size)
        env["LOCAL_RANK"] = str(info.local_rank)
        env["LOCAL_WORLD_SIZE"] = str(info.local_world_size)
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", ""))))
        env.setdefault("MASTER_PORT", "29500")
    return info


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
