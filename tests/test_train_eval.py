"""Eval during training (--eval_meta_path): what it logs, that it leaves training untouched, ranks, start-up errors.

Tiny model, a few steps each. The held-out set is the demo generator with another seed (the demo's split).
"""

import json
from pathlib import Path

import pytest
import torch

from internvl_chat.data.meta import MetaError
from internvl_chat.demo_data import make_demo_dataset
from internvl_chat.finetune import main
from test_finetune import _torchrun, base_args, read_weights

EVAL = ["--eval_strategy", "steps", "--eval_steps", "1", "--eval_max_new_tokens", "8",
        "--per_device_eval_batch_size", "32"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from internvl_chat.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("train_eval")
    make_tiny_model(root / "qwen2", llm="qwen2", template="internvl2_5", seed=0)
    meta = make_demo_dataset(root / "data", num_images=6, seed=0)
    make_demo_dataset(root / "heldout", num_images=6, seed=1)
    eval_meta = write_meta(root / "eval_meta.json", "demo_heldout", mixed_heldout(root / "heldout"))
    return root, meta, eval_meta


def mixed_heldout(folder: Path) -> Path:
    """The demo lines reordered so that box answers (iou_acc by default) and text answers (vqa_acc) alternate: any
    first N lines hold both metrics, whatever the generator's line order."""
    lines = (folder / "demo.jsonl").read_text().splitlines()
    is_box = ["<box>" in json.loads(line)["conversations"][-1]["value"] for line in lines]
    boxes = [line for line, b in zip(lines, is_box) if b]
    texts = [line for line, b in zip(lines, is_box) if not b]
    assert len(boxes) >= 3 and len(texts) >= 3
    k = min(len(boxes), len(texts))
    mixed = [line for pair in zip(boxes, texts) for line in pair] + boxes[k:] + texts[k:]
    path = folder / "eval.jsonl"
    path.write_text("\n".join(mixed) + "\n")
    return path


def write_meta(path: Path, name: str, annotation: Path, **extra) -> Path:
    entry = {"root": str(annotation.parent), "annotation": str(annotation), "data_augment": False,
             "repeat_time": 1, **extra}
    path.write_text(json.dumps({name: entry}))
    return path


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def eval_entries(out: Path) -> list[dict]:
    return [h for h in history(out) if "eval_demo_heldout_loss" in h]


def load_like_the_run(model_dir, meta, out):
    """Model, tokenizer and DataConfig exactly as finetune.main prepares them for these arguments."""
    from internvl_chat.finetune import data_config, load_model_and_tokenizer, parse_args

    model_args, data_args, training_args = parse_args(base_args(model_dir, meta, out))
    model, tokenizer = load_model_and_tokenizer(model_args, data_args, training_args)
    return model.eval(), tokenizer, data_config(data_args, training_args, model)


def test_eval_logs_loss_and_generation_metrics(workdir, caplog):
    """Every eval step logs the held-out loss and both metrics of the set (its box lines default to iou_acc, the
    rest to vqa_acc) to trainer_state.json and tensorboard; the final step's figures are recomputed here from the
    saved weights; eval batches are not counted as training data."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eval.generate import predict
    from eval.metrics import compute
    from eval.samples import load_eval_jsonl
    from internvl_chat.data.collator import DataCollator
    from internvl_chat.data.dataset import SupervisedDataset
    from internvl_chat.data.meta import load_meta

    root, meta, eval_meta = workdir
    out = root / "logs"
    caplog.set_level(logging.INFO, logger="internvl_chat.finetune")
    main(base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--max_steps", "2",
                   "--eval_meta_path", str(eval_meta), "--eval_max_samples", "6", *EVAL,
                   "--report_to", "tensorboard"))
    entries = eval_entries(out)
    assert [e["step"] for e in entries] == [1, 2]
    last = entries[-1]
    assert {"eval_demo_heldout_vqa_acc", "eval_demo_heldout_iou_acc"} <= set(last)
    assert "bad data: none in 4 records" in caplog.text  # 2 steps x batch 2; the 2 x 14 eval samples not counted
    (events,) = {p.parent for p in out.glob("runs/**/events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload()
    for tag in ("eval/demo_heldout_loss", "eval/demo_heldout_vqa_acc", "eval/demo_heldout_iou_acc"):
        assert [e.step for e in scalars.Scalars(tag)] == [1, 2], tag

    model, tokenizer, config = load_like_the_run(out, meta, root / "unused")
    # the loss: the whole set in one batch of 32 (--per_device_eval_batch_size), the model's token-mean loss
    dataset = SupervisedDataset(load_meta(eval_meta), tokenizer, config)
    assert len(dataset) > 6  # the loss covers the whole set, generation only its first 6 lines
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert last["eval_demo_heldout_loss"] == pytest.approx(loss, rel=1e-4)
    # the metrics: greedy answers to the first 6 lines, scored per metric
    samples = load_eval_jsonl(root / "heldout" / "eval.jsonl", root=root / "heldout")[:6]
    predictions = predict(model, tokenizer, samples, max_num=2, dynamic=True, max_new_tokens=8)
    for metric in ("vqa_acc", "iou_acc"):
        records = [s.to_metric_record(p) for s, p in zip(samples, predictions) if s.metric == metric]
        assert records
        assert last[f"eval_demo_heldout_{metric}"] == pytest.approx(compute(metric, records)["score"])
        assert last[f"eval_demo_heldout_{metric}_n"] == len(records)


# Every training step draws from the torch RNG whatever its samples: LoRA dropout on every LLM token (drop-path in
# the frozen ViT only matters for samples with images); with activation checkpointing, which replays the RNG.
RANDOM_TRAINING = ["--freeze_backbone", "True", "--freeze_llm", "True", "--use_llm_lora", "4", "--lora_dropout",
                   "0.1", "--drop_path_rate", "0.2", "--grad_checkpoint", "True"]


@pytest.fixture(scope="module")
def run_without_eval(workdir):
    """RANDOM_TRAINING: an evaluation that consumed the RNG would change the weights."""
    root, meta, _ = workdir
    out = root / "no_eval"
    main(base_args(root / "qwen2", meta, out, "--max_steps", "3", *RANDOM_TRAINING))
    return read_weights(out)


def assert_identical(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_eval_every_step_leaves_weights_identical(workdir, run_without_eval):
    root, meta, eval_meta = workdir
    out = root / "with_eval"
    # the old flag name, as the official scripts spell it
    main(base_args(root / "qwen2", meta, out, "--max_steps", "3", *RANDOM_TRAINING, "--eval_meta_path",
                   str(eval_meta), "--eval_max_samples", "2", "--evaluation_strategy", "steps", "--eval_steps", "1",
                   "--eval_max_new_tokens", "8"))
    assert [e["step"] for e in eval_entries(out)] == [1, 2, 3]
    assert_identical(run_without_eval, read_weights(out))


@pytest.mark.slow
def test_resume_with_eval_reproduces_run_without_eval(workdir, run_without_eval):
    root, meta, eval_meta = workdir
    out = root / "resumed_with_eval"
    common = [*RANDOM_TRAINING, "--eval_meta_path", str(eval_meta), "--eval_max_samples", "2", *EVAL,
              "--save_strategy", "steps", "--save_steps", "2"]
    main(base_args(root / "qwen2", meta, out, *common, "--max_steps", "2"))
    # longer than the finished run: other settings, so resumed on purpose
    main(base_args(root / "qwen2", meta, out, *common, "--max_steps", "3",
                   "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert [e["step"] for e in eval_entries(out)] == [1, 2, 3]
    assert_identical(run_without_eval, read_weights(out))


def test_isolation_restores_rngs_modes_and_use_cache(workdir):
    """What an evaluation changes (RNG draws, eval mode, use_cache) is undone; a frozen LLM stays in eval mode."""
    import random

    import numpy as np

    from internvl_chat.model import InternVLChatModel
    from internvl_chat.train.evaluation import isolated_from_training

    root, _, _ = workdir
    model = InternVLChatModel.from_pretrained(root / "qwen2").train()
    model.language_model.eval()
    model.language_model.config.use_cache = False
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with isolated_from_training(model):
        model.eval()
        model.language_model.config.use_cache = True
        torch.rand(5), np.random.rand(5), random.random()
        iter(torch.utils.data.DataLoader([1, 2]))  # an iterator draws its base seed from the torch RNG
    after = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(expected[0], after[0]) and np.array_equal(expected[1], after[1]) and expected[2] == after[2]
    assert model.training and model.vision_model.training and model.mlp1.training
    assert not any(m.training for m in model.language_model.modules())
    assert model.language_model.config.use_cache is False


def crafted_set(root: Path, meta: Path, lines: int, correct: list[bool]) -> Path:
    """Held-out lines whose acceptable answers are the model's own greedy answer (correct) or a string it never
    says: the score of the first len(correct) lines is known before the run. Needs learning rate 0 in the run."""
    from eval.generate import predict
    from eval.samples import load_eval_jsonl

    source = root / "heldout" / "eval.jsonl"
    model, tokenizer, _ = load_like_the_run(root / "qwen2", meta, root / "unused")
    samples = load_eval_jsonl(source, root=root / "heldout")[:lines]
    predictions = predict(model, tokenizer, samples, max_num=2, dynamic=True, max_new_tokens=8)
    records = [json.loads(line) for line in source.read_text().splitlines()[:lines]]
    flags = correct + [True] * (lines - len(correct))  # lines past the cap would all count as correct
    for record, prediction, ok in zip(records, predictions, flags):
        record["answers"] = [prediction if ok else "no model says this"]
    path = root / "heldout" / "crafted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return write_meta(root / "crafted_meta.json", "demo_heldout", path, metric="vqa_acc")


@pytest.mark.slow
def test_two_ranks_gather_the_generation_metric(workdir):
    """5 samples over 2 ranks (shards of 3 and 2): the gathered score is the hand-computed 3/5 in both runs. Rank 0's
    shard alone would give 2/3, a padded or uncapped set something else."""
    root, meta, _ = workdir
    crafted = crafted_set(root, meta, lines=7, correct=[True, True, False, True, False])
    args = ["--freeze_backbone", "True", "--max_steps", "1", "--learning_rate", "0", "--eval_meta_path",
            str(crafted), "--eval_max_samples", "5", *EVAL]
    single = root / "gather_1"
    main(base_args(root / "qwen2", meta, single, *args))
    double = root / "gather_2"
    _torchrun(2, base_args(root / "qwen2", meta, double, *args, "--per_device_train_batch_size", "1"))
    for out in (single, double):
        (entry,) = eval_entries(out)
        assert entry["eval_demo_heldout_vqa_acc"] == pytest.approx(3 / 5), out.name
        assert entry["eval_demo_heldout_vqa_acc_n"] == 5


@pytest.mark.slow
def test_zero3_skips_generation_but_keeps_the_loss(workdir):
    pytest.importorskip("deepspeed")
    from test_finetune import REPO

    root, meta, eval_meta = workdir
    out = root / "zero3"
    proc = _torchrun(2, base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--max_steps", "2",
                                  "--per_device_train_batch_size", "1", "--deepspeed",
                                  str(REPO / "zero_stage3_config.json"), "--eval_meta_path", str(eval_meta),
                                  "--eval_max_samples", "2", *EVAL))
    entries = eval_entries(out)
    assert [e["step"] for e in entries] == [1, 2]
    assert not [k for e in entries for k in e if k.endswith("_acc")]
    assert "ZeRO-3: generation metrics of the eval sets are skipped" in proc.stdout + proc.stderr


def test_final_eval_only_when_asked_bf16_loss_only(workdir):
    """--do_eval without an eval strategy: one evaluation after training (bf16 autocast over float32 master
    weights); --eval_max_samples 0 turns generation off."""
    root, meta, eval_meta = workdir
    out = root / "final_eval"
    main(base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--max_steps", "2", "--bf16", "True",
                   "--eval_meta_path", str(eval_meta), "--do_eval", "True", "--eval_max_samples", "0"))
    entries = eval_entries(out)
    assert [e["step"] for e in entries] == [2]
    assert not [k for k in entries[0] if k.endswith("_acc")]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_demo_heldout_loss"] == pytest.approx(entries[0]["eval_demo_heldout_loss"])


def test_generation_under_bf16_autocast(workdir):
    root, meta, eval_meta = workdir
    out = root / "bf16_generation"
    main(base_args(root / "qwen2", meta, out, "--freeze_backbone", "True", "--max_steps", "1", "--bf16", "True",
                   "--eval_meta_path", str(eval_meta), "--eval_max_samples", "2", *EVAL))
    (entry,) = eval_entries(out)
    assert entry["eval_demo_heldout_iou_acc_n"] == entry["eval_demo_heldout_vqa_acc_n"] == 1


def test_bad_metric_name_is_a_startup_error(workdir, tmp_path):
    root, meta, _ = workdir
    bad = write_meta(tmp_path / "bad_metric.json", "demo_heldout", root / "heldout" / "eval.jsonl",
                     metric="vqa_accuracy")
    with pytest.raises(MetaError, match=r"bad_metric\.json.*'demo_heldout'.*unknown metric 'vqa_accuracy'"):
        main(base_args(root / "qwen2", meta, tmp_path / "out", "--max_steps", "1", "--eval_meta_path", str(bad),
                       *EVAL))
    assert not (tmp_path / "out").exists()  # stopped before training


def test_missing_eval_annotation_is_a_startup_error(workdir, tmp_path):
    root, meta, _ = workdir
    missing = write_meta(tmp_path / "missing.json", "demo_heldout", tmp_path / "nowhere.jsonl")
    with pytest.raises(MetaError, match=r"missing\.json.*'demo_heldout'.*nowhere\.jsonl.*not found"):
        main(base_args(root / "qwen2", meta, tmp_path / "out", "--max_steps", "1", "--eval_meta_path",
                       str(missing), *EVAL))
    assert not (tmp_path / "out").exists()


def test_eval_strategy_without_eval_sets_is_an_error(workdir, tmp_path):
    root, meta, _ = workdir
    with pytest.raises(ValueError, match="--eval_meta_path"):
        main(base_args(root / "qwen2", meta, tmp_path / "out", "--max_steps", "1", *EVAL))
