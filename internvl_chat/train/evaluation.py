"""Evaluation during training (``--eval_meta_path``): held-out loss and generation metrics, invisible to training.

Each evaluation (``--eval_strategy steps --eval_steps N``, ``--eval_on_start``, or once after training with
``--do_eval``) reports, for every set of the eval meta file (same format as ``--meta_path``; an entry may add
``"metric": "vqa_acc"`` etc.):

* ``eval_<set>_loss``: the teacher-forced loss over the whole set (its ``repeat_time`` applies), through the
  Trainer's own evaluation loop, with the training's DataConfig but never augmentation;
* ``eval_<set>_<metric>``: greedy answers (``eval.generate.predict``, ``model.chat`` per sample, as
  ``eval/evaluate.sh`` does) to the first ``--eval_max_samples`` samples of the set, each rank answering its
  contiguous shard (``eval.generate.shard``), gathered in order and scored with ``eval.metrics.compute``; numeric
  extra figures of the metric follow as ``eval_<set>_<metric>_<figure>`` (e.g. ``_n``). A set whose lines name
  several metrics gets one score per metric.

Both land in the Trainer's log (console, tensorboard, ``trainer_state.json``) in one entry per set, and in the
dict ``Trainer.evaluate`` returns (so ``--metric_for_best_model eval_<set>_vqa_acc`` works).

Why an evaluation cannot change the training run (weights, data order, resume): every global RNG training draws
from (python, numpy, torch CPU and CUDA) is saved before and restored after it -- creating any DataLoader iterator
draws a seed from the torch RNG, even with ``num_workers=0``; every module's train/eval flag and every config's
``use_cache`` are put back as they were (a frozen LLM stays in eval mode); eval batches are not counted in the
bad-data tracker nor the tokens/s window (``InternVLTrainer.compute_loss``). Generation runs on the unwrapped model
(no DDP collectives; activation checkpointing is inactive in eval mode) under the run's autocast.

DeepSpeed ZeRO-3: generation metrics are skipped with a warning (the eval loss still runs). Partitioned weights
are gathered in every forward, so all ranks would have to run the same number of forwards
(``generate(synced_gpus=True)`` and equal shards), which per-sample ``model.chat`` cannot promise.

All checks of the eval meta file (missing annotation, unknown ``metric``, unreadable eval lines) run at start-up,
before the model is loaded, so a typo cannot surface hours into a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..data.meta import DatasetEntry, MetaError, load_meta

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# start-up: arguments and the eval meta file


def check_eval_args(data_args, training_args) -> None:
    """Fail early on eval flags that cannot work together."""
    wants_eval = training_args.eval_strategy != "no" or training_args.do_final_eval
    if wants_eval and not data_args.eval_meta_path:
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy} / --do_eval need --eval_meta_path (a meta JSON of "
            f"held-out sets, same format as --meta_path)"
        )
    if data_args.eval_meta_path and not wants_eval:
        logger.warning("--eval_meta_path is set but nothing evaluates: add --eval_strategy steps --eval_steps N "
                       "and/or --do_eval True")
    if data_args.eval_max_samples < 0:
        raise ValueError(f"--eval_max_samples must be >= 0 (0 = eval loss only), got {data_args.eval_max_samples}")
    if data_args.eval_max_new_tokens < 1:
        raise ValueError(f"--eval_max_new_tokens must be >= 1, got {data_args.eval_max_new_tokens}")


@dataclass
class EvalSetSpec:
    """One validated set of the eval meta file: its entry (augmentation off) and its generation samples."""

    entry: DatasetEntry
    samples: list  # eval.samples.EvalSample, the first --eval_max_samples lines


def load_eval_specs(eval_meta_path: str, max_samples: int) -> list[EvalSetSpec]:
    """Read and check the eval meta file and the generation samples of every set (no model needed).

    Raises MetaError naming the file and set for an unknown ``metric``; ``load_meta`` already names a missing
    annotation file, and ``eval.samples.load_eval_jsonl`` a bad line.
    """
    from eval.metrics import METRICS, compute
    from eval.samples import load_eval_jsonl

    specs = []
    for entry in load_meta(eval_meta_path):
        where = f"eval meta file {entry.meta_path}, dataset {entry.name!r}"
        metric = entry.extra.get("metric")
        if metric is not None and metric not in METRICS:
            raise MetaError(f"{where}: unknown metric {metric!r} (known: {', '.join(sorted(METRICS))})")
        if entry.data_augment:
            logger.info("%s: data_augment ignored, evaluation never augments", where)
        samples = []
        if max_samples > 0:
            samples = load_eval_jsonl(entry.annotation, root=entry.root or None, metric=metric)[:max_samples]
            for sample in samples:
                if sample.metric not in METRICS:
                    raise MetaError(f"{where}: {sample.source or sample.id} names unknown metric "
                                    f"{sample.metric!r} (known: {', '.join(sorted(METRICS))})")
            check_scorable(where, samples, compute)
        specs.append(EvalSetSpec(dataclasses.replace(entry, data_augment=False), samples))
    return specs


def check_scorable(where: str, samples: list, compute) -> None:
    """Score an empty answer to every sample now: a record lacking what its metric needs (an iou_acc box without
    the image size, say) must stop the run at start-up, not at its first evaluation."""
    by_metric: dict[str, list] = {}
    for sample in samples:
        by_metric.setdefault(sample.metric, []).append(sample)
    for metric, group in by_metric.items():
        try:
            compute(metric, [sample.to_metric_record("") for sample in group])
        except Exception as exc:  # MetricInputError(index, message) and malformed-record errors alike
            index = getattr(exc, "index", None)
            which = group[index].source if isinstance(index, int) and 0 <= index < len(group) else "a sample"
            raise MetaError(f"{where}: {which} cannot be scored with {metric}: {exc}") from exc


# --------------------------------------------------------------------------------------------------------------
# isolation from the training run


def save_rng_states() -> dict[str, Any]:
    """Every global generator training draws from (dropout, drop-path, samplers, dataloader worker seeds)."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    # only when CUDA is in use: asking for its state would otherwise initialise CUDA in a CPU run
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def isolated_from_training(*models: torch.nn.Module):
    """Run an evaluation that leaves no trace on training: RNG states, module modes and use_cache restored.

    Pass the model and its DDP / DeepSpeed wrapper: the wrapper's own mode flag is restored too.
    """
    rng = save_rng_states()
    modules = list({id(m): m for model in models if model is not None for m in model.modules()}.values())
    modes = [(module, module.training) for module in modules]
    caches = []
    seen = set()
    for module in modules:
        for attr in ("config", "generation_config"):
            cfg = getattr(module, attr, None)
            if cfg is not None and id(cfg) not in seen and hasattr(cfg, "use_cache"):
                seen.add(id(cfg))
                caches.append((cfg, cfg.use_cache))
    try:
        yield
    finally:
        restore_rng_states(rng)
        for module, training in modes:
            module.training = training  # per module, not model.train(): a frozen LLM stays in eval mode
        for cfg, use_cache in caches:
            cfg.use_cache = use_cache


# --------------------------------------------------------------------------------------------------------------
# the evaluator the trainer calls


@dataclass
class EvalSet:
    name: str
    dataset: Any  # SupervisedDataset of the whole set (loss)
    samples: list  # EvalSample, the generation share
    max_num: int  # tile budget of one image, as in training (entry's max_dynamic_patch, else the run's)


class TrainingEvaluator:
    """Holds the eval sets and computes their generation metrics for the trainer's evaluation loop."""

    def __init__(self, sets: list[EvalSet], collator, *, dynamic: bool, max_new_tokens: int) -> None:
        self.sets = {f"eval_{s.name}": s for s in sets}
        self.collator = collator
        self.dynamic = dynamic
        self.max_new_tokens = max_new_tokens
        self._warned_zero3 = False

    @property
    def datasets(self) -> dict[str, Any]:
        """What the Trainer gets as eval_dataset: one entry per set, so it logs eval_<set>_loss."""
        return {s.name: s.dataset for s in self.sets.values()}

    def generation_metrics(self, trainer, metric_key_prefix: str) -> dict[str, float]:
        """Generate on this rank's shard of the set behind `metric_key_prefix`, gather, score (every rank gets the
        same figures). {} for a prefix that is not one of our sets or a set without generation samples."""
        eval_set = self.sets.get(metric_key_prefix)
        if eval_set is None or not eval_set.samples:
            return {}
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            if not self._warned_zero3 and trainer.is_world_process_zero():
                logger.warning("DeepSpeed ZeRO-3: generation metrics of the eval sets are skipped (every rank would "
                               "have to join every forward of every other rank); the eval loss is still computed")
                self._warned_zero3 = True
            return {}
        from eval.generate import predict, shard
        from eval.metrics import compute

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        mine = shard(eval_set.samples, rank, world)
        model = trainer.accelerator.unwrap_model(trainer.model)
        started = time.perf_counter()
        model.eval()
        with torch.no_grad(), trainer.accelerator.autocast():
            predictions = predict(model, trainer.processing_class, mine, max_num=eval_set.max_num,
                                  dynamic=self.dynamic, max_new_tokens=self.max_new_tokens)
        predictions = gather_in_rank_order(list(predictions))
        if len(predictions) != len(eval_set.samples):
            raise RuntimeError(f"eval set {eval_set.name!r}: {len(predictions)} predictions gathered for "
                               f"{len(eval_set.samples)} samples (shards must cover the set exactly once)")
        metrics = score_predictions(metric_key_prefix, eval_set.samples, predictions, compute)
        if trainer.is_world_process_zero():
            figures = ", ".join(f"{k[len(metric_key_prefix) + 1:]} {v if isinstance(v, int) else f'{v:.4f}'}"
                                for k, v in metrics.items() if not k.endswith("_n"))
            logger.info("eval %s at step %d: %s on %d samples (generation %.1fs)", eval_set.name,
                        trainer.state.global_step, figures, len(predictions), time.perf_counter() - started)
        return metrics


def gather_in_rank_order(items: list) -> list:
    """Concatenate every rank's list, rank 0 first (contiguous shards -> the original order)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def score_predictions(prefix: str, samples: list, predictions: list[str], compute) -> dict[str, float]:
    """{prefix_<metric>: score, prefix_<metric>_<figure>: value} for every metric the samples name."""
    by_metric: dict[str, list[dict]] = {}
    for sample, prediction in zip(samples, predictions):
        by_metric.setdefault(sample.metric, []).append(sample.to_metric_record(prediction))
    out: dict[str, float] = {}
    for metric, records in sorted(by_metric.items()):
        result = compute(metric, records)
        out[f"{prefix}_{metric}"] = float(result["score"])
        for key, value in result.items():
            if key in ("metric", "score", "per_sample") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):  # nested breakdowns (per category...) stay out of the log
                out[f"{prefix}_{metric}_{key}"] = value
    return out


def build_evaluator(specs: list[EvalSetSpec], tokenizer, config, data_args) -> TrainingEvaluator:
    """The eval sets' datasets (training's DataConfig) and the unpacked collator their loss batches use."""
    from ..data.collator import DataCollator
    from ..data.dataset import SupervisedDataset

    sets = []
    for spec in specs:
        dataset = SupervisedDataset([spec.entry], tokenizer, config)
        if len(dataset) == 0:
            raise ValueError(f"eval meta file {spec.entry.meta_path}, dataset {spec.entry.name!r}: no samples "
                             f"(empty annotation file or tiny repeat_time)")
        max_num = spec.entry.max_dynamic_patch or config.max_dynamic_patch
        sets.append(EvalSet(spec.entry.name, dataset, spec.samples, max_num))
        logger.info("eval set %r: %d samples for the loss, %d for generation metrics (%s)", spec.entry.name,
                    len(dataset), len(spec.samples),
                    ", ".join(sorted({s.metric for s in spec.samples})) or "generation off")
    # packing is a training throughput device: eval batches are plain padded samples in every mode
    collator = DataCollator(pad_token_id=tokenizer.pad_token_id, loss_reduction=data_args.loss_reduction)
    return TrainingEvaluator(sets, collator, dynamic=config.dynamic_image_size,
                             max_new_tokens=data_args.eval_max_new_tokens)
