#!/usr/bin/env python
"""Write BENCHMARKS.md: every benchmark section of bench/, measured in one run, under a header that says when,
at which commit, on which machine and how to reproduce it.

    python bench/run.py                        # all sections on the CPU -> BENCHMARKS.md
    python bench/run.py --quick --out /tmp/b.md
    python bench/run.py --only padding,training # -> BENCHMARKS-padding-training.md
    python bench/run.py --device cuda          # the GPU part of BENCHMARKS.md (bench/gpu.sh runs this)

Sections (``--only`` names): data (bench/data_throughput.py), padding (bench/padding.py), training
(bench/train_step.py), generation (bench/generation.py), changes (bench/changes.py). Each module exposes
``section(quick: bool = False, device: str = "cpu") -> str``, the markdown of its section starting with a ``## ``
heading, and stays runnable alone.

Headlines: a section contributes a line to the file's "Headlines" list by putting
``<!-- headline: one sentence -->`` anywhere in its markdown (an HTML comment, so it stays invisible where it
is). Any number per section; they are listed in section order.

CPU and GPU in one file: a CPU run rewrites everything but the GPU part; ``--device cuda`` replaces (or appends)
only the GPU part, between ``<!-- gpu:begin -->`` and ``<!-- gpu:end -->``, with its own date, commit and
machine, and the sections' headings one level down. So the GPU figures, measured elsewhere, survive a CPU
re-run, and the table of contents always covers both.

The padding section is computed from token lengths, so a GPU run leaves it out unless ``--only`` names it.

A section that raises is written as failed, with the error and its traceback; the run goes on with the others
and exits 1. Progress (section start and end, seconds) goes to stderr. Between sections the runner collects
garbage, empties the CUDA cache, resets its peak-memory counter and restores torch's thread count, so each section
measures from the same state.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.machine import describe  # noqa: E402

SECTIONS = {  # --only name: (module, title used when the section fails)
    "data": ("bench.data_throughput", "Data path"),
    "padding": ("bench.padding", "Padding efficiency"),
    "training": ("bench.train_step", "Training"),
    "generation": ("bench.generation", "Generation"),
    "changes": ("bench.changes", "Profile-driven changes"),
}
# Sections whose figures do not depend on the device (computed from lengths): a GPU run leaves them out unless named.
DEVICE_INDEPENDENT = {"padding"}
FAILED = "**Section failed:**"  # tests look for it; a section's own text never contains it
GPU_BEGIN, GPU_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
TOC_BEGIN, TOC_END = "<!-- toc:begin -->", "<!-- toc:end -->"
_HEADLINE = re.compile(r"<!--\s*headline:\s*(.*?)\s*-->", re.S)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def commit() -> str:
    """`git rev-parse --short HEAD`, with `-dirty` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("-dirty" if dirty else "")


def run_section(name: str, quick: bool, device: str) -> tuple[str, bool]:
    """(markdown, ok) of one section; an exception becomes a failed section with its traceback."""
    module, title = SECTIONS[name]
    threads = torch.get_num_threads()
    log(f"{name}: start")
    start = time.perf_counter()
    try:
        text = importlib.import_module(module).section(quick=quick, device=device).strip() + "\n"
        if not text.startswith("## "):
            text = f"## {title}\n\n{text}"
        ok = True
    except Exception as err:  # noqa: BLE001 - any failure of a section is reported in the file, not fatal
        text = (f"## {title}\n\n{FAILED} `{type(err).__name__}: {err}`. Rerun it alone: "
                f"`python bench/run.py --only {name}{' --device ' + device if device != 'cpu' else ''}`.\n\n"
                f"<details><summary>traceback</summary>\n\n```\n{traceback.format_exc().rstrip()}\n```\n\n"
                "</details>\n")
        ok = False
    log(f"{name}: {'done' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    _release(device)
    torch.set_num_threads(threads)  # a section may pin itself to one core; the next one gets the machine back
    return f"<!-- section: {name} -->\n{text}", ok


def _release(device: str) -> None:
    """Free what a section left behind, so the next one's peak memory is its own."""
    gc.collect()
    if device == "cuda":
        if not torch.cuda.is_available():  # only the tests write a GPU part without a GPU
            return
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def headlines(markdown: str) -> list[str]:
    return [" ".join(h.split()) for h in _HEADLINE.findall(markdown)]


def demote(markdown: str) -> str:
    """Every heading one level down (outside code fences): the GPU part nests its sections under `## GPU`."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out) + "\n"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def table_of_contents(body: str) -> str:
    """Links to the `##` headings, and to the `###` ones of the GPU part (its sections)."""
    entries, seen, fenced, in_gpu = [], {}, False, False
    for line in body.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        in_gpu = (in_gpu or line == GPU_BEGIN) and line != GPU_END
        match = re.match(r"(##|###) (.+)", line)
        if fenced or not match or (match.group(1) == "###" and not in_gpu):
            continue
        title = match.group(2).strip()
        anchor = slug(title)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        indent = "  " if match.group(1) == "###" else ""
        entries.append(f"{indent}- [{title}](#{anchor}{f'-{count}' if count else ''})")
    return "\n".join([TOC_BEGIN, *entries, TOC_END])


_MACHINE: dict[str, str] = {}  # device -> description, taken before the sections run (some set torch's threads)


def machine(device: str) -> str:
    if device not in _MACHINE:
        _MACHINE[device] = " ".join(describe(device).split())
    return _MACHINE[device]


def _meta(quick: bool, device: str, reproduce: str) -> list[str]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"- Date: {now}", f"- Commit: `{commit()}`", f"- {machine(device)}", f"- Reproduce: {reproduce}"]
    if quick:
        lines.append("- **Quick run** (`--quick`: small sizes, a smoke test; not figures to quote)")
    return lines


def _headline_list(sections: list[str], empty: str = "(no section contributed a headline)") -> list[str]:
    return [f"- {h}" for text in sections for h in headlines(text)] or [f"- {empty}"]


def cpu_document(sections: list[str], quick: bool, only: list[str], gpu_part: str | None,
                 empty: str = "(no section contributed a headline)") -> str:
    command = "`python bench/run.py`" + (f" (this file: `--only {','.join(only)}`)" if only else "")
    head = [
        "# Benchmarks",
        "",
        "Generated by `python bench/run.py` (GPU part: `bash bench/gpu.sh`); do not edit by hand. Every section says "
        "what it measures, how to reproduce it and on which machine. These machines are shared and noisy: compared "
        "variants are measured side by side in one run, alternating, so read the ratios rather than the absolute "
        "times.",
        "",
        *_meta(quick, "cpu", command + "; one section: `python bench/run.py --only NAME` (data, padding, "
               "training, generation, changes)"),
        "",
    ]
    body = ["## Headlines", "", *_headline_list(sections, empty), "", *sections]
    if gpu_part:
        body += [gpu_part]
    body_text = "\n".join(body)
    return "\n".join(head + ["## Contents", "", table_of_contents(body_text), "", body_text]).rstrip() + "\n"


def gpu_part(sections: list[str], quick: bool) -> str:
    lines = [
        GPU_BEGIN,
        "## GPU",
        "",
        "The same benchmarks on CUDA (bf16; flash-attention 2 where installed), measured by `bash bench/gpu.sh` "
        "on another machine than the sections above, at its own commit (padding efficiency depends on no device: "
        "see above):",
        "",
        *_meta(quick, "cuda", "`bash bench/gpu.sh` (or `python bench/run.py --device cuda`)"),
        "",
        "GPU headlines:",
        "",
        *_headline_list(sections),
        "",
        *(demote(text) for text in sections),
        GPU_END,
    ]
    return "\n".join(lines) + "\n"


def _split_gpu(text: str) -> tuple[str, str | None]:
    """(the file without its GPU part, the GPU part or None)."""
    start, end = text.find(GPU_BEGIN), text.find(GPU_END)
    if start < 0 or end < start:
        return text, None
    end += len(GPU_END)
    return text[:start].rstrip() + "\n" + text[end:].lstrip("\n"), text[start:end] + "\n"


def write(out: Path, sections: list[str], quick: bool, device: str, only: list[str]) -> None:
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    rest, old_gpu = _split_gpu(old)
    if device == "cpu":
        out.write_text(cpu_document(sections, quick, only, old_gpu), encoding="utf-8")
        return
    part = gpu_part(sections, quick)
    if TOC_BEGIN not in rest:  # no CPU file there yet (or not one of ours): the GPU part alone, with a header
        out.write_text(cpu_document([], quick, only, part, "(CPU sections not run here: `python bench/run.py`)"),
                       encoding="utf-8")
        return
    text = rest.rstrip() + "\n\n" + part
    toc_start, toc_end = text.index(TOC_BEGIN), text.index(TOC_END) + len(TOC_END)
    body = text[toc_end:]
    out.write_text(text[:toc_start] + table_of_contents(body) + body, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (< ~1 minute per section): a smoke test")
    parser.add_argument("--only", help=f"comma-separated sections, of: {', '.join(SECTIONS)} (written, unless --out "
                                       "says otherwise, to BENCHMARKS-<names>.md: BENCHMARKS.md stays whole)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None,
                        help="the file to write (default: BENCHMARKS.md at the repository root, BENCHMARKS-<names>.md "
                             "with --only; with --device cuda only its GPU part changes)")
    args = parser.parse_args(argv)
    names = [n for n in SECTIONS if args.device == "cpu" or n not in DEVICE_INDEPENDENT]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.out is None:  # a partial run never replaces the whole file
        only = args.only and args.device == "cpu"
        args.out = ROOT / (f"BENCHMARKS-{'-'.join(names)}.md" if only else "BENCHMARKS.md")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    machine(args.device)
    machine("cpu")
    start = time.perf_counter()
    results = [run_section(name, args.quick, args.device) for name in names]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(args.out, [text for text, _ in results], args.quick, args.device, names if args.only else [])
    failed = [name for name, (_, ok) in zip(names, results) if not ok]
    log(f"wrote {args.out} in {time.perf_counter() - start:.1f} s"
        + (f"; FAILED sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
