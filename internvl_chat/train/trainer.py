"""HF Trainer with what InternVL fine-tuning needs on top.

- the loss is the model's own (token / sample / square reductions through `loss_weight`), scaled for gradient
  accumulation by the Trainer;
- length-grouped sampling from the dataset's cheap `lengths` (no tokenizing the whole set at start-up);
- optional learning rates per component (ViT / MLP / LLM);
- bad samples the dataset skipped are counted and reported (data.errors.BadDataTracker: distinct records, from the
  collator's `sample_ids` and `skipped_samples`), with a hard stop above a bad fraction;
- checkpoints in the official layout (+ the base checkpoint's `*.py`, so `trust_remote_code` loading works, and the
  run's settings, train/run_folder.py, and the training prompt as chat_template plus its end token as eos, serving.py),
  written
  into a staging folder, synced, marked with every file's size and checksum, then renamed into place; rotation keeps
  the newest good one; a full disk is one line naming the folder and the space needed (train/checkpoint.py);
- tokens/s, samples/s and peak memory in every log line;
- evaluation on held-out sets (train/evaluation.py): loss and generation metrics per set, isolated from training
  (RNG states, module modes and use_cache restored; eval batches are not counted as training data).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from ..console import number_step_lines
from ..data.collator import pop_trainer_keys
from ..data.errors import BadDataTracker
from ..serving import write_serving_files
from . import checkpoint
from .plan import component_of

logger = logging.getLogger(__name__)

COMPLETE_MARKER = checkpoint.MARKER  # kept importable under its old name


class _EpochToDataset(TrainerCallback):
    """Tell the dataset the epoch (its per-sample randomness and packing plans are seeded by it).

    accelerate forwards `set_epoch` to the sampler only, so the dataset would otherwise stay at epoch 0.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(math.floor((state.epoch or 0) + 1e-6))


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from `seed + epoch`, so epoch k has the same order in a resumed run as in an
    uninterrupted one (transformers' sampler draws every epoch from one generator seeded once, so a run resumed in
    epoch k replays epoch 0's order). The Trainer calls `set_epoch` at the start of every epoch, resumed ones too."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class InternVLTrainer(Trainer):
    def __init__(self, *args, component_lrs: dict[str, float] | None = None, base_model_dir: str | None = None,
                 bad_data: BadDataTracker | None = None, loss_reduction_all_gather: bool = False,
                 evaluator=None, run_settings: dict | None = None, **kwargs) -> None:
        model = kwargs.get("model")
        # QLoRA: the adapters live inside the language model (official layout), which transformers' "is a purely
        # quantized model being trained?" check cannot see; vouch for them during that check only
        vouch = bool(getattr(model, "is_quantized", False)) and getattr(model.config, "use_llm_lora", 0) > 0
        if vouch:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if vouch:
                del model._hf_peft_config_loaded
        self.component_lrs = {k: v for k, v in (component_lrs or {}).items() if v is not None}
        self.base_model_dir = base_model_dir
        self.bad_data = bad_data or BadDataTracker()
        self.loss_reduction_all_gather = loss_reduction_all_gather
        self.evaluator = evaluator  # train.evaluation.TrainingEvaluator, or None
        self.run_settings = run_settings  # stored in every checkpoint (train/run_folder.py)
        self.last_eval_step: int | None = None
        self._eval_depth = 0
        self._pad_id = getattr(self.processing_class, "pad_token_id", None)
        self._window_tokens = 0
        self._window_samples = 0
        self.add_callback(_EpochToDataset(self))
        number_step_lines(self)  # "step 12/400 {...}" on the console (console.py)
        self._window_start = time.perf_counter()

    # --- loss -----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        about = pop_trainer_keys(inputs)  # the batch contract: data/collator.py
        if not model.training:  # an eval batch: neither training data nor training throughput
            outputs = model(**inputs, return_logits=False)  # a loss only: no full logits (model/loss.py)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        num_samples = int(about.get("num_samples", inputs["input_ids"].shape[0]))  # packed rows hold several
        # sample_ids: "<file>:<line>" per sample, so distinct records are counted
        self.bad_data.update(num_samples, about.get("skipped_samples"), about.get("sample_ids"))
        if not about.get("packed") and inputs.get("attention_mask") is not None:
            self._window_tokens += int(inputs["attention_mask"].sum())
        else:  # packed rows: every token but the padding tail, which carries no label and no image
            self._window_tokens += int((inputs["input_ids"] != self._pad_id).sum()) if self._pad_id is not None \
                else int(inputs["input_ids"].numel())
        self._window_samples += num_samples
        if self.loss_reduction_all_gather:
            inputs["loss_reduction_all_gather"] = True  # the loss denominator is averaged over ranks
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    # --- resume -------------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        if self.args.should_save:  # folders of saves and deletions a kill interrupted only take space
            for leftover in checkpoint.list_leftovers(self.args.output_dir):
                logger.info("removing %s (an interrupted save or deletion)", leftover)
                checkpoint.remove_tree(leftover)
        return super().train(*args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        # resumed from a checkpoint of the last step (killed after its final checkpoint, e.g. while rotating or
        # writing the final model): transformers would still run one more step before checking max_steps, and end
        # with other weights than the uninterrupted run
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # --- sampling -------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return EpochLengthGroupedSampler(batch, list(dataset.lengths), self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # --- evaluation (train/evaluation.py) ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self._eval_depth:  # Trainer.evaluate calls itself once per set of a dict: isolated already
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        from .evaluation import isolated_from_training

        self._eval_depth += 1
        started = time.perf_counter()
        try:
            with isolated_from_training(self.model, self.model_wrapped):
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_depth -= 1
            self._window_start += time.perf_counter() - started  # tokens/s measures training time only
        self.last_eval_step = self.state.global_step
        return metrics

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.evaluator is not None and description == "Evaluation":
            # same log entry as the set's loss (so one line per set on the console and in tensorboard)
            output.metrics.update(self.evaluator.generation_metrics(self, metric_key_prefix))
        return output

    def get_eval_dataloader(self, eval_dataset=None):
        if self.evaluator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.evaluator.collator  # never the packing one
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _get_eval_sampler(self, eval_dataset):
        # transformers length-groups eval batches under group_by_length by reading every sample; the order of a
        # loss average does not matter, so plain order (accelerate shards it over ranks)
        if self.args.world_size <= 1:
            return SequentialSampler(eval_dataset)
        return None

    # --- optimizer: per-component learning rates ---------------------------------------------------------------
    def create_optimizer(self, model=None):
        if not self.component_lrs or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, bool], list] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault((component_of(name), name in decay), []).append(p)
        param_groups = []
        for (comp, use_decay), params in sorted(groups.items()):
            group = {"params": params, "weight_decay": self.args.weight_decay if use_decay else 0.0}
            if comp in self.component_lrs:
                group["lr"] = self.component_lrs[comp]
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # --- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            logs["tokens_per_second"] = round(self._window_tokens / elapsed, 1)
            logs["samples_per_second"] = round(self._window_samples / elapsed, 3)
            if torch.cuda.is_available():
                logs["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            else:
                import resource

                logs["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            if self.bad_data.bad:
                logs["bad_samples"] = self.bad_data.bad
            self._window_tokens = self._window_samples = 0
            self._window_start = time.perf_counter()
        super().log(logs, start_time) if start_time is not None else super().log(logs)

    # --- saving -------------------------------------------------------------------------------------------------
    save_dtype: torch.dtype | None = None  # set for the final save: float32 master weights go out in this dtype

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if state_dict is None and self.save_dtype is not None:
            cast: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
            state_dict = {}
            for name, t in self.accelerator.unwrap_model(self.model).state_dict().items():
                if t.is_floating_point():
                    t = cast.setdefault(t.data_ptr(), t.to(self.save_dtype))
                state_dict[name] = t
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save and self.base_model_dir and os.path.isdir(self.base_model_dir):
            # the base checkpoint's remote code, so AutoModel(..., trust_remote_code=True) loads our output
            for src in glob.glob(os.path.join(self.base_model_dir, "*.py")):
                dst = os.path.join(output_dir, os.path.basename(src))
                if not os.path.exists(dst):
                    shutil.copy2(src, dst)
        if self.args.should_save and self.processing_class is not None:
            # the training prompt as chat_template and its end token as eos, for vLLM / lmdeploy (serving.py)
            config = self.accelerator.unwrap_model(self.model).config
            write_serving_files(output_dir, self.processing_class, getattr(config, "template", None),
                                getattr(config, "system_message", None))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:  # a checkpoint: _save_checkpoint handles faults
            return super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        try:
            super().save_model(output_dir, _internal_call)
        except Exception as exc:
            free = checkpoint.free_bytes(folder)
            needed, basis = checkpoint.estimate_save_bytes(folder, self.model)
            if checkpoint.is_disk_full(exc, free, needed):
                raise checkpoint.CheckpointSaveError(
                    f"not enough disk space to save the final model in {folder}: it needs about "
                    f"{checkpoint.format_bytes(needed)} ({basis}), {checkpoint.format_bytes(free)} free. Free some "
                    "space and run the same command again: it resumes from the last checkpoint") from exc
            raise

    def _get_output_dir(self, trial) -> str:
        # during _save_checkpoint the Trainer writes into the staging folder (train/checkpoint.py)
        return getattr(self, "_staging_dir", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' save into `checkpoint-N.saving/`, then marker and rename (train/checkpoint.py)."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = checkpoint.staging_root(run_dir, self.state.global_step)
        main = self.args.should_save
        if main:
            self._prepare_save(run_dir, final, staging)
        needed, basis = checkpoint.estimate_save_bytes(run_dir, self.model, self.optimizer)
        free = checkpoint.free_bytes(run_dir)
        if _any_rank(free < needed):
            raise checkpoint.CheckpointSaveError(checkpoint.disk_full_message(
                final, needed, basis, free, self._newest_good(run_dir), before=True))
        _barrier()  # every rank writes into a clean staging folder
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate ourselves, counting verified checkpoints only
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            _barrier()  # every rank's shards are on disk
            if main:
                self._publish(os.path.join(staging, name), final, staging)
        except BaseException as exc:
            if main:
                shutil.rmtree(staging, ignore_errors=True)  # a partial checkpoint only takes space
            free = checkpoint.free_bytes(run_dir)
            if isinstance(exc, Exception) and checkpoint.is_disk_full(exc, free, needed):
                raise checkpoint.CheckpointSaveError(checkpoint.disk_full_message(
                    final, needed, basis, free, self._newest_good(run_dir), before=False)) from exc
            raise
        finally:
            self._staging_dir = None
            self.args.save_total_limit = limit
        _barrier()
        if main:
            checkpoint.rotate_checkpoints(run_dir, limit, protect=(final, self.state.best_model_checkpoint))
        _barrier()

    @staticmethod
    def _prepare_save(run_dir: str, final: str, staging: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # what a killed save of this step left
        if os.path.isdir(final) and checkpoint.verify_checkpoint(final, deep=False, allow_pickle=True):
            checkpoint.remove_tree(final)  # a broken save of this step: free its space before writing again

    def _publish(self, staged: str, final: str, staging: str) -> None:
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
            # the Trainer recorded the staged path as the best checkpoint: record where it will live
            self.state.best_model_checkpoint = os.path.join(os.path.dirname(final), os.path.basename(best))
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if self.run_settings is not None:  # before the marker, so the marker covers it
            from .run_folder import write_settings

            write_settings(staged, self.run_settings, global_step=self.state.global_step)
        checkpoint.write_marker(staged, self.state.global_step)
        checkpoint.publish(staged, final)
        shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _newest_good(run_dir: str) -> str | None:
        good = [p for _, p in checkpoint.list_checkpoints(run_dir)
                if not checkpoint.verify_checkpoint(p, deep=False, allow_pickle=True)]
        return good[-1] if good else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on one (so all ranks stop together instead of waiting on a barrier)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
