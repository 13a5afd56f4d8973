"""The machine a benchmark ran on, as one or two lines of markdown (every BENCHMARKS.md section names it)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: str = "cpu") -> str:
    """CPU model, cores visible / torch threads, RAM, torch version; GPUs, CUDA, bf16, flash-attn on `cuda`."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = _ram_gib()
    text = (f"Machine: {_cpu_model()}, {cores} cores visible of {os.cpu_count()}, {torch.get_num_threads()} torch "
            f"threads, {f'{ram:.0f} GiB RAM' if ram else 'RAM unknown'}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {_version('transformers')}.")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return text + "  \nGPU: none (CUDA not available)."
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(k) for k in range(count)})
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        flash = _version("flash-attn") if importlib.util.find_spec("flash_attn") else None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        text += (f"  \nGPU: {count} x {', '.join(names)} ({memory:.0f} GiB each"
                 f"{f', CUDA_VISIBLE_DEVICES={visible}' if visible is not None else ''}), CUDA {torch.version.cuda}, "
                 f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, "
                 f"flash-attn {flash or 'not installed'}.")
    return text
