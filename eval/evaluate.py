"""Evaluate a checkpoint on a benchmark or on your own held-out JSONL: the per-process program behind evaluate.sh.

    sh eval/evaluate.sh MODEL DATASET [--dynamic] [--max-num N] [--out-dir DIR] [--limit N] ...
    python -m eval.evaluate MODEL DATASET ...            # one process, same thing

Every process loads the same samples, takes its contiguous shard (the official ``InferenceSampler`` split),
answers greedily with ``model.chat`` (eval/generate.py), and rank 0 gathers the answers in sample order, scores them
with eval.metrics and writes ``predictions.jsonl`` and ``metrics.json`` into the output folder, then prints a table.
Because every sample is answered alone (batch 1, greedy), N processes give the same answers as one.

Everything that can be wrong with the inputs (model folder, dataset name, benchmark files, media files, an existing
output folder) is checked before the model loads; ``--check-only`` stops there (evaluate.sh runs it once before
starting several processes, so an error is printed once).

An output folder that already holds ``predictions.jsonl`` or ``metrics.json`` is refused (``--overwrite`` replaces
them): a finished run is never overwritten silently.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field

from internvl_chat.data.errors import DataError

from . import benchmarks
from .samples import EvalSample, known_metrics, load_eval_jsonl

OUTPUT_FILES = ("predictions.jsonl", "metrics.json")
CUSTOM_MAX_NEW_TOKENS = 100  # own data: the official limit for open answers (DocVQA, ChartQA, RefCOCO, MMBench)
DEFAULT_MAX_NUM = 6          # the official --max-num default
# Figures the table shows first, when a metric reports them (the numbers the official scripts print last).
HEADLINE = ("overall_f1", "mme_score", "perception", "cognition", "mean_iou", "f1", "acc_plus")


class UsageError(Exception):
    """A problem with the command line or the inputs; printed as one line, exit status 2."""


@dataclass
class Task:
    """One dataset to run: its samples and how to ask them."""

    name: str
    samples: list[EvalSample]
    max_new_tokens: int
    max_num: int
    prompt_suffix: str = ""
    custom: bool = False
    info: dict = field(default_factory=dict)
    metric_options: dict = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder in the official layout (relative or absolute)")
    p.add_argument("dataset", help="a benchmark key (vqa-textvqa-val, refcoco, pope, mme, mmbench-dev-en, ...) or "
                                   "the path of your eval JSONL (training conversation format)")
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic tiling up to --max-num tiles (official: always on for InternVL 1.5+); "
                        "without it each image is one tile")
    p.add_argument("--max-num", type=int, default=None,
                   help="max tiles per image (default: the official recommendation of the benchmark, else 6)")
    p.add_argument("--out-dir", default=None, help="output folder (default: results/<model>/<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace the result files of a previous run")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only (quick checks)")
    p.add_argument("--metric", default=None,
                   help="own JSONL: metric of the lines without a 'metric' key (default: from the reference)")
    p.add_argument("--root", default=None, help="own JSONL: folder its media paths are relative to "
                                                "(default: the JSONL's folder)")
    p.add_argument("--data-root", default=None,
                   help="benchmarks: the folder holding <benchmark>/ files (default: ./data, else <repo>/data)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"override the official per-benchmark limit (own JSONL default: {CUSTOM_MAX_NEW_TOKENS})")
    p.add_argument("--num-segments", type=int, default=8, help="frames per video (own JSONL)")
    p.add_argument("--textbook", action="store_true", help="score with the metrics' textbook variants "
                                                           "(not comparable with published numbers)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="auto: bfloat16 on GPU (official), float32 on CPU")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a tokenizer only defined by its code")
    p.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                   help="accept pickle weight files (pytorch_model.bin, *.pt); by default only safetensors load")
    p.add_argument("--thinking", action="store_true",
                   help="InternVL3/3.5 thinking mode: the thinking system message (see the chat CLI); the reasoning "
                        "before </think> is kept as `reasoning` and the rest scored. Give room: --max-new-tokens")
    p.add_argument("--check-only", action="store_true", help="check the inputs and exit (no model is loaded)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# inputs


def resolve_tasks(args) -> tuple[str, list[Task]]:
    """(dataset label, tasks) for the dataset argument; UsageError for anything missing or unknown."""
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {args.limit}")
    if args.max_num is not None and args.max_num < 1:
        raise UsageError(f"--max-num must be a positive integer, got {args.max_num}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.metric is not None and args.metric not in known_metrics():
        raise UsageError(f"unknown --metric {args.metric!r}; known: {', '.join(known_metrics())}")
    dataset = args.dataset
    if os.path.isfile(dataset) or dataset.endswith((".jsonl", ".json")):
        if not os.path.isfile(dataset):
            raise UsageError(f"eval file not found: {dataset}")
        try:
            samples = load_eval_jsonl(dataset, root=args.root, metric=args.metric)
        except DataError as err:
            raise UsageError(str(err)) from None
        if args.limit is not None:
            samples = samples[:args.limit]
        name = os.path.splitext(os.path.basename(dataset))[0]
        return name, [Task(name, samples, args.max_new_tokens or CUSTOM_MAX_NEW_TOKENS,
                           args.max_num or DEFAULT_MAX_NUM, custom=True)]
    try:
        benches = benchmarks.resolve(dataset)
    except benchmarks.BenchmarkError as err:
        raise UsageError(str(err)) from None
    data_root = os.path.abspath(args.data_root or benchmarks.default_data_root())
    missing = [path for b in benches for path in benchmarks.missing_files(b, data_root)]
    if missing:  # all of them at once: a group (refcoco) may lack several files
        raise UsageError(f"{dataset}: missing {', '.join(missing)}. Put there {benches[0].how} (official layout; "
                         f"eval/README.md lists the files of every benchmark), or point --data-root at the folder "
                         f"that holds them.")
    tasks = []
    for bench in benches:
        try:
            samples = benchmarks.load_benchmark(bench, data_root, args.limit)
        except (benchmarks.BenchmarkError, OSError) as err:
            raise UsageError(str(err)) from None
        tasks.append(Task(bench.name, samples, args.max_new_tokens or bench.max_new_tokens,
                          args.max_num or bench.max_num, bench.prompt_suffix, info={"data_root": data_root},
                          metric_options=dict(bench.metric_options)))
    return dataset, tasks


def check_model(path: str) -> str:
    if not os.path.isdir(path):
        raise UsageError(f"model folder not found: {path} (a local checkpoint folder in the official layout; "
                         "nothing is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{path} has no config.json: not a checkpoint folder")
    return os.path.abspath(path)


def output_dir(args, model: str, label: str) -> str:
    if args.out_dir:
        return os.path.abspath(args.out_dir)
    safe = "".join(c if c.isalnum() or c in "+-_." else "_" for c in label)
    return os.path.abspath(os.path.join("results", os.path.basename(model.rstrip("/")), safe))


def check_output(out_dir: str, overwrite: bool) -> None:
    existing = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
    if existing and not overwrite:
        raise UsageError(f"{out_dir} already holds {', '.join(existing)} from an earlier run: pass --out-dir "
                         "with a new folder, or --overwrite to replace them")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} exists and is not a folder")


# ---------------------------------------------------------------------------------------------------------------
# scoring and reporting (rank 0)


def sample_kind(sample: EvalSample) -> str:
    if sample.video is not None:
        return "video"
    if len(sample.images) > 1:
        return "multi-image"
    return "image" if sample.images else "text"


def _figures(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_sample"}


def score_task(task: Task, predictions: list[str], textbook: bool,
               thinking: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """(prediction lines, result rows, breakdown rows) of one task. With ``thinking`` the answer after the
    reasoning is scored and the reasoning kept in its line."""
    from internvl_chat.data.templates import split_thinking

    from .metrics import MetricInputError, compute

    reasoning: list[str | None] = [None] * len(predictions)
    if thinking:
        reasoning, predictions = (list(part) for part in zip(*map(split_thinking, predictions))) \
            if predictions else ([], [])
    by_metric: dict[str, list[int]] = {}
    for i, sample in enumerate(task.samples):
        by_metric.setdefault(sample.metric, []).append(i)
    records = [s.to_metric_record(p) for s, p in zip(task.samples, predictions)]
    scores: list[float | None] = [None] * len(records)
    rows = []

    def run(metric: str, indices: list[int]) -> dict:
        try:
            return compute(metric, [records[i] for i in indices], textbook=textbook, **task.metric_options)
        except MetricInputError as err:
            sample = task.samples[indices[err.index]]
            raise UsageError(f"{sample.source}: metric {metric}: {err.message}") from None

    for metric, indices in by_metric.items():
        result = run(metric, indices)
        for i, value in zip(indices, result["per_sample"]):
            scores[i] = value
        rows.append({"dataset": task.name, **_figures(result)})

    breakdown = []
    if task.custom:
        groups: dict[tuple[str, str], list[int]] = {}
        kinds = {sample_kind(s) for s in task.samples}
        for i, sample in enumerate(task.samples):
            if "category" in sample.record_extras:
                groups.setdefault((f"category={sample.record_extras['category']}", sample.metric), []).append(i)
            if len(kinds) > 1:
                groups.setdefault((f"kind={sample_kind(sample)}", sample.metric), []).append(i)
        for (group, metric), indices in sorted(groups.items()):
            breakdown.append({"dataset": task.name, "group": group, **_figures(run(metric, indices))})

    lines = []
    for sample, prediction, record, value, thought in zip(task.samples, predictions, records, scores, reasoning):
        line = {"dataset": task.name, "id": sample.id, "question": sample.question, "prediction": prediction}
        if thinking:
            line["reasoning"] = thought
        if "answers" in record:
            line["references"] = record["answers"]
        else:
            line["reference"] = record["answer"]
        if "category" in sample.record_extras:
            line["category"] = sample.record_extras["category"]
        line.update(metric=sample.metric, score=value)
        lines.append(line)
    return lines, rows, breakdown


def group_means(label: str, rows: list[dict]) -> list[dict]:
    """One mean row for a group key whose splits share a metric (the official ChartQA number is the mean of its
    two splits)."""
    if len(rows) < 2 or len({r["metric"] for r in rows}) != 1:
        return []
    return [{"dataset": label, "metric": rows[0]["metric"], "score": sum(r["score"] for r in rows) / len(rows),
             "n": sum(r["n"] for r in rows), "mean_of": [r["dataset"] for r in rows]}]


def format_table(rows: list[dict], breakdown: list[dict]) -> str:
    def extras(row: dict) -> str:
        skip = {"dataset", "metric", "score", "n", "group", "mean_of"}
        figures = {k: v for k, v in row.items()
                   if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = [k for k in HEADLINE if k in figures] + [k for k in figures if k not in HEADLINE]
        return " ".join(f"{k}={figures[k]:.4g}" for k in keys[:4])

    lines = [(r["dataset"], r["metric"], f"{100 * r['score']:.2f}", str(r["n"]), extras(r)) for r in rows]
    lines += [("  " + b["group"], b["metric"], f"{100 * b['score']:.2f}", str(b["n"]), extras(b)) for b in breakdown]
    header = ("dataset", "metric", "score", "n", "")
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(4)]
    out = []
    for line in [header, *lines]:
        out.append(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]:>{widths[2]}}  "
                   f"{line[3]:>{widths[3]}}  {line[4]}".rstrip())
    out.insert(1, "-" * max(len(line) for line in out))
    return "\n".join(out)


def write_results(out_dir: str, lines: list[dict], summary: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, write in (("predictions.jsonl", lambda fh: fh.writelines(json.dumps(line, ensure_ascii=False) + "\n"
                                                                      for line in lines)),
                        ("metrics.json", lambda fh: fh.write(json.dumps(summary, indent=2, ensure_ascii=False)
                                                             + "\n"))):
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, os.path.join(out_dir, name))


# ---------------------------------------------------------------------------------------------------------------
# the run


def main(argv=None) -> int:
    from internvl_chat.console import install

    install()  # third-party warnings: internvl_chat/console.py
    args = build_parser().parse_args(argv)
    try:  # nothing here imports torch: a mistake is reported in a second
        model_path = check_model(args.model)
        label, tasks = resolve_tasks(args)
        out_dir = output_dir(args, model_path, label)
        check_output(out_dir, args.overwrite)
    except UsageError as err:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake; one says it
            print(f"eval/evaluate.py: error: {err}", file=sys.stderr)
        return 2
    if args.check_only:
        return 0
    from internvl_chat.distributed import dist_info

    return run(args, dist_info(), model_path, label, tasks, out_dir)


def run(args, info, model_path: str, label: str, tasks: list[Task], out_dir: str) -> int:
    import torch
    import torch.distributed as dist

    from internvl_chat.model import InternVLChatModel, load_tokenizer

    from .generate import predict, shard

    cuda = torch.cuda.is_available()
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{info.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    dtype = dtypes.get(args.dtype) or (torch.bfloat16 if cuda else torch.float32)

    main_rank = info.is_main
    say = (lambda *a: print(*a, flush=True)) if main_rank else (lambda *a: None)
    say(f"==> {model_path} on {label}: {sum(len(t.samples) for t in tasks)} samples, {info.world_size} "
        f"process(es), {device.type}, {str(dtype).replace('torch.', '')}")
    tokenizer = load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
    model = InternVLChatModel.from_pretrained(model_path, torch_dtype=dtype, allow_pickle=args.allow_pickle)
    model = model.to(device).eval()
    if args.thinking:
        from internvl_chat.data.templates import thinking_system_message
        from internvl_chat.inference import chat_template

        model.system_message = thinking_system_message(chat_template(model))
    if not args.dynamic and getattr(model.config, "dynamic_image_size", False):
        say("note: the model was trained with dynamic tiling; the official eval docs say to pass --dynamic "
            "(without it every image is one tile)")

    all_lines, rows, breakdown, settings = [], [], [], {}
    start = time.monotonic()
    for task in tasks:
        say(f"--> {task.name}: {len(task.samples)} samples, max_new_tokens={task.max_new_tokens}, "
            f"{'dynamic, max_num=' + str(task.max_num) if args.dynamic else 'one tile per image'}")
        local = shard(task.samples, info.rank, info.world_size)
        answers = predict(model, tokenizer, local, max_num=task.max_num, dynamic=args.dynamic,
                          max_new_tokens=task.max_new_tokens, prompt_suffix=task.prompt_suffix,
                          progress=main_rank, num_segments=args.num_segments)
        if info.world_size > 1:
            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, answers)
            answers = [a for part in gathered for a in part]  # rank order = sample order (contiguous shards)
        settings[task.name] = {"max_new_tokens": task.max_new_tokens, "max_num": task.max_num,
                               "prompt_suffix": task.prompt_suffix, "metric_options": task.metric_options,
                               **task.info}
        if main_rank:
            try:
                lines, task_rows, task_breakdown = score_task(task, answers, args.textbook, args.thinking)
            except UsageError as err:
                print(f"eval/evaluate.py: error: {err}", file=sys.stderr)
                return 2
            all_lines += lines
            rows += task_rows
            breakdown += task_breakdown

    if main_rank:
        rows += group_means(label, rows)
        summary = {
            "model": model_path, "dataset": label, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "n": len(all_lines), "results": rows, "breakdown": breakdown,
            "settings": {"dynamic": args.dynamic, "textbook": args.textbook, "thinking": args.thinking,
                         "world_size": info.world_size,
                         "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                         "limit": args.limit, "tasks": settings},
            "seconds": round(time.monotonic() - start, 1),
        }
        write_results(out_dir, all_lines, summary)
        print(format_table(rows, breakdown))
        print(f"==> {os.path.join(out_dir, 'predictions.jsonl')} and metrics.json ({summary['seconds']}s)", flush=True)
    if info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
