#!/usr/bin/env python
"""Training-step throughput, peak memory and MFU of InternVL fine-tuning variants, measured side by side.

    python bench/train_step.py                  # ~6 minutes on 2 CPU cores
    python bench/train_step.py --quick          # < 1 minute, tiny model (CI smoke run)
    python bench/train_step.py --device cuda    # bf16 weights, flash-attention 2 when installed, SDPA otherwise
    python bench/run.py --only training         # the same, as a section of BENCHMARKS.md

Model: a random-weight InternVL in the official layout, small but real (ViT 6 x 256, Qwen2 LLM 8 x 512, the real
151,674-token vocabulary, 448-px tiles -> 256 image tokens per tile). Batches are built as the dataset builds items
(prompt and image tokens unsupervised, the answer supervised) and collated by the project's own collators. A step
is forward, backward, fused AdamW step (the Trainer's default) and zero_grad.

Compared, each variant in a fresh process (so its peak memory is its own), in rounds that alternate the order:
the chunked loss (default) vs full logits (`return_logits=True`) at ~1.3k and ~4k tokens; full fine-tune vs frozen
ViT vs LoRA vs QLoRA; packed vs padded on the same samples; gradient checkpointing on/off; and ours vs the
transformers-native `InternVLForConditionalGeneration` on the same weights (exported with internvl_chat/hf_convert)
and batch, each computing its own loss. Each variant keeps its fastest step (noise on a shared machine only adds).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the helpers live next to this file, whether run as a script or imported
    sys.path.insert(0, str(_HERE))

import _vlm  # noqa: E402

SECTION = "training"
matmul_flops = _vlm.matmul_flops  # matmul_flops(device) -> FLOP/s: the MFU ceiling, for bench/run.py too
logger = logging.getLogger("bench.train_step")

# (tiles, prompt tokens, answer tokens) per sample; answers are the only supervised tokens
LAYOUTS = {
    False: {  # full: 2 samples x 2 tiles, 1,284 tokens, 212 supervised; ~4k: 2 x 2,048, 700 supervised
        "base": [(2, 22, 106), (2, 22, 106)],
        "long": [(2, 1184, 350), (2, 1184, 350)],
        "mix": [(2, 22, 106), (1, 30, 60), (0, 60, 90), (1, 20, 80)],  # photo, small image, text-only, image
    },
    True: {  # quick: 64-token tiles (_vlm.QUICK_SHAPE)
        "base": [(1, 20, 30), (1, 20, 30)],
        "long": [(1, 300, 80), (1, 300, 80)],
        "mix": [(1, 20, 30), (1, 10, 20), (0, 40, 20)],
    },
}

# name -> label, settings (defaults: ours, full fine-tune, chunked loss, base batch, padded, no checkpointing)
VARIANTS = {
    "chunked": ("ours, chunked loss (default)", {}),
    "full_logits": ("ours, full logits (`return_logits=True`)", {"loss": "full"}),
    "native": ("native `InternVLForConditionalGeneration`", {"impl": "native", "loss": "full"}),
    "frozen_vit": ("frozen ViT", {"mode": "frozen_vit"}),
    "lora": ("LoRA r16 (ViT + LLM frozen)", {"mode": "lora"}),
    "qlora": ("QLoRA r16 (NF4 LLM)", {"mode": "qlora"}),
    "gc": ("gradient checkpointing (ViT + LLM)", {"gc": True}),
    "padded": ("padded batch (DataCollator)", {"batch": "mix"}),
    "packed": ("one packed row (PackedCollator)", {"batch": "mix", "packed": True}),
    "chunked_4k": ("ours, chunked loss, ~4k tokens", {"batch": "long"}),
    "full_logits_4k": ("ours, full logits, ~4k tokens", {"batch": "long", "loss": "full"}),
}


# variants run in every round (the others once, in full mode): the chunked-loss and native comparisons
REPEATED = ("chunked", "full_logits", "native")

# glibc keeps freed small and mid-size blocks in its heap, so a process's RSS stays at its high-water mark and the
# peak RSS of a step would say more about fragmentation than about live memory. With allocations from 128 KiB up
# served by mmap (this threshold, set in the environment the worker processes start with), freed tensors leave
# the RSS at once.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _spec(name: str, quick: bool, device: str, dirs: dict) -> dict:
    settings = dict(impl="ours", mode="full", loss="chunked", batch="base", packed=False, gc=False)
    settings.update(VARIANTS[name][1])
    shape = _vlm.QUICK_SHAPE if quick else _vlm.FULL_SHAPE
    return dict(settings, name=name, device=device, shape=shape, layout=LAYOUTS[quick][settings["batch"]],
                steps=1, **dirs)


def _flops(spec: dict, shape: _vlm.Shape) -> float:
    layout = spec["layout"]
    segments = [_vlm.item_tokens(shape, s) for s in layout]
    supervised = sum(s[2] for s in layout)
    head = supervised if (spec["loss"] == "chunked" and spec["impl"] == "ours") else sum(segments)
    vit = "full" if spec["mode"] == "full" else "frozen"
    llm = "lora" if spec["mode"] in ("lora", "qlora") else "full"
    return _vlm.step_flops(shape, segments, head, sum(max(t, 1) for t, _, _ in layout),
                           sum(t * shape.tile_tokens for t, _, _ in layout), vit=vit, llm=llm)


def measure(quick: bool = False, device: str = "cpu", only: list[str] | None = None, rounds: int | None = None) -> dict:
    """Run every variant (or `only` these) and return the raw results with the FLOP counts and the ceiling."""
    shape = _vlm.QUICK_SHAPE if quick else _vlm.FULL_SHAPE
    names = only or list(VARIANTS)
    rounds = rounds or (1 if quick else 2)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["_train_worker"])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp, \
            ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        import _train_worker as worker  # noqa: PLC0415  (heavy: imported only when measuring)

        saved = {k: os.environ.get(k) for k in _MALLOC_ENV}
        os.environ.update(_MALLOC_ENV)  # read once, when the first submit starts the forkserver
        try:
            dirs = pool.submit(worker.prepare_models, tmp, shape, "native" in names).result()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
        ceiling = pool.submit(worker.measure_matmul, device).result()
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                spec = _spec(name, quick, device, dirs)
                if r and name not in REPEATED and not quick:
                    continue  # later rounds only for the headline ratios: the section must fit in ~6 minutes
                start = time.perf_counter()
                got = pool.submit(worker.run_variant, spec).result()
                logger.info("training: %s round %d in %.1f s%s", name, r + 1, time.perf_counter() - start,
                            " (failed)" if "error" in got else "")
                prev = results.get(name)
                if prev is None or "error" in prev:
                    got["flops"] = _flops(spec, shape)
                    got["spec"] = spec
                    results[name] = got
                elif "error" not in got:
                    prev["times"] += got["times"]
                    prev["mem_growth"] = min(prev["mem_growth"], got["mem_growth"])
                    prev["mem_total"] = min(prev["mem_total"], got["mem_total"])
    for res in results.values():
        if "times" in res:
            res["best"] = min(res["times"])
            res["tokens_per_s"] = res["tokens"] / res["best"]
            res["mfu"] = res["flops"] / res["best"] / ceiling
    return {"quick": quick, "device": device, "shape": shape.describe(), "shape_obj": shape, "ceiling": ceiling,
            "rounds": rounds, "results": results}


# ----------------------------------------------------------------------------------------------------- report


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _row(res: dict, label: str, ref: dict | None = None) -> str:
    if "error" in res:
        last = res["error"].strip().splitlines()[-1][:100]
        return f"| {label} | failed: `{last}` | | | | | |"
    ratio = f"{res['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and "best" in ref else ""
    mem = f"{res['mem_growth'] / ref['mem_growth']:.2f}x" if ref and "best" in ref and ref["mem_growth"] else ""
    return (f"| {label} | {res['tokens_per_s']:,.0f} | {ratio} | {_mib(res['mem_growth'])} | {mem} | "
            f"{_mib(res['mem_total'])} | {100 * res['mfu']:.1f} % |")


_HEADER = ("| variant | tokens/s | speed vs ref | peak growth MiB | memory vs ref | peak total MiB | MFU |\n"
           "|---|---:|---:|---:|---:|---:|---:|")


def _table(results: dict, rows: list[tuple[str, str | None]]) -> str:
    lines = [_HEADER]
    for name, ref in rows:
        if name in results:
            label = VARIANTS[name][0] + (" (ref)" if ref is None else "")
            lines.append(_row(results[name], label, results.get(ref) if ref else None))
    return "\n".join(lines)


def _loss_summary(res: dict, quick: bool) -> list[str]:
    """The chunked loss against full logits in words (and the headlines of the section)."""
    lines, heads = [], []
    for chunked, full in (("chunked", "full_logits"), ("chunked_4k", "full_logits_4k")):
        a, b = res.get(chunked, {}), res.get(full, {})
        if "best" not in a or "best" not in b:
            continue
        speed = a["tokens_per_s"] / b["tokens_per_s"]
        growth = 1 - a["mem_growth"] / b["mem_growth"]
        total = 1 - a["mem_total"] / b["mem_total"]
        lines.append(f"- {a['tokens']:,} tokens: the chunked loss runs the step {speed:.2f}x as fast as full logits; "
                     f"peak memory {100 * total:.0f} % lower in total, {100 * growth:.0f} % lower above the loaded "
                     f"model.")
        heads.append(f"chunked loss at {a['tokens']:,} tokens: {speed:.2f}x step speed, {100 * growth:.0f} % less "
                     f"peak memory above the model ({100 * total:.0f} % less in total) than full logits")
    if "best" in res.get("chunked", {}) and "best" in res.get("native", {}):
        ratio = res["chunked"]["tokens_per_s"] / res["native"]["tokens_per_s"]
        heads.append(f"training step {ratio:.2f}x the tokens/s of the transformers-native InternVL class on the same "
                     f"weights and batch")
    if not quick:
        lines += [f"<!-- headline: {h} -->" for h in heads]
    return lines + [""] if lines else []


def format_section(m: dict) -> str:
    res, quick, device = m["results"], m["quick"], m["device"]
    flag = " --quick" if quick else ""
    dev = f" --device {device}" if device != "cpu" else ""
    layouts = LAYOUTS[quick]

    def describe(batch: str) -> str:
        layout = layouts[batch]
        tokens = sum(_vlm.item_tokens(m["shape_obj"], s) for s in layout)
        return (f"{len(layout)} samples, {sum(max(t, 1) for t, _, _ in layout)} tiles, {tokens:,} tokens of which "
                f"{sum(s[2] for s in layout):,} supervised")

    out = [f"## Training step{' (quick mode: tiny model, figures not meaningful)' if quick else ''}", ""]
    out.append(
        "Tokens/s, peak memory and MFU of one training step (forward, backward, fused AdamW step: the Trainer's "
        "default) for the variants of an "
        f"InternVL fine-tune, side by side in one run. Model: random weights in the official layout, {m['shape']}. "
        f"Batches are built like dataset items (image tokens and prompts unsupervised) and collated by the "
        f"project's collators: base {describe('base')}; long {describe('long')}; mixed lengths "
        f"{describe('mix')} (padded vs packed). Each variant runs in a fresh process: a warm-up step, then a "
        f"measured one; {m['rounds']} round(s) alternating the order"
        f"{'' if quick or m['rounds'] == 1 else ' (later rounds: ' + ', '.join(REPEATED) + ')'}, tokens/s (real "
        f"tokens, padding excluded) from the fastest measured step.")
    out.append("")
    out.append(
        "Peak memory, of a steady-state step (after the warm-up, AdamW states in place): "
        + ("`torch.cuda.max_memory_allocated` during the measured step (total) and its excess over the memory "
           "allocated once the model and batch were loaded (growth: gradients, AdamW states, activations, logits)."
           if device.startswith("cuda") else
           "the process's peak RSS during the measured step (VmHWM, reset through /proc/self/clear_refs; total) and "
           "its excess over the RSS once the model and batch were loaded (growth: gradients, AdamW states, "
           "activations, logits), with glibc serving allocations from 128 KiB up by mmap "
           "(`MALLOC_MMAP_THRESHOLD_=131072` in the worker processes) so that freed tensors leave the RSS.")
        + f" MFU: model FLOPs per step / step time / the measured matmul ceiling of "
        f"{m['ceiling'] / 1e9:,.0f} GFLOP/s ({'bf16 8192^2' if device.startswith('cuda') else 'float32 2048^2'} "
        "matmul, best of 5). FLOPs are counted analytically: 6 x params x tokens for trained linear layers (4 for "
        "frozen ones a gradient passes through, 2 for a frozen ViT), attention 4 x S^2 x width per layer forward "
        "(x3 with backward); the LM head at every real position for full logits and at the supervised positions "
        "only for the chunked loss; recomputation under checkpointing not counted.")
    out += ["", f"Reproduce: `python bench/run.py --only training{flag}` or "
                f"`python bench/train_step.py{flag}{dev}`.", "", _vlm.machine(device), ""]
    out += ["### Loss: chunked (supervised positions only) vs full logits", "",
            _table(res, [("full_logits", None), ("chunked", "full_logits"),
                         ("full_logits_4k", None), ("chunked_4k", "full_logits_4k")]), ""]
    out += _loss_summary(res, quick)
    out += ["### What trains", "",
            _table(res, [("chunked", None), ("frozen_vit", "chunked"), ("lora", "chunked"), ("qlora", "chunked")])]
    trainable = ", ".join(f"{VARIANTS[n][0]} {res[n]['trainable'] / 1e6:,.1f} M" for n in
                          ("chunked", "frozen_vit", "lora", "qlora") if n in res and "trainable" in res[n])
    out += ["", f"Trainable parameters: {trainable}.", ""]
    out += ["### Packing and gradient checkpointing", "",
            _table(res, [("padded", None), ("packed", "padded"), ("chunked", None), ("gc", "chunked")])]
    if "padded" in res and "slots" in res["padded"] and "packed" in res and "slots" in res["packed"]:
        out += ["", f"Same {len(layouts['mix'])} samples: the padded batch holds {res['padded']['slots']:,} positions,"
                    f" the packed row {res['packed']['slots']:,}, for {res['padded']['tokens']:,} real tokens."]
    out += ["", "### Ours vs transformers-native InternVL (same weights, same batch, full fine-tune)", "",
            _table(res, [("native", None), ("chunked", "native"), ("full_logits", "native")])]
    losses = [(VARIANTS[n][0], res[n]["loss"]) for n in ("chunked", "full_logits", "native")
              if n in res and "loss" in res[n]]
    if losses:
        out += ["", "First-step loss (each model's own): " + ", ".join(f"{k} {v:.6f}" for k, v in losses) + "."]
    return "\n".join(out) + "\n"


def section(quick: bool = False, device: str = "cpu") -> str:
    """The BENCHMARKS.md section `training` (see the module docstring)."""
    return format_section(measure(quick=quick, device=device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and batches, one round (CI smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 2, quick 1)")
    parser.add_argument("--json", action="store_true", help="print the raw measurements as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    m = measure(quick=args.quick, device=args.device, only=args.only, rounds=args.rounds)
    print(json.dumps(m, indent=2, default=str) if args.json else format_section(m))
    return 0 if all("error" not in r for r in m["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
