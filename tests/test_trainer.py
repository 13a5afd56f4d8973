"""InternVLTrainer pieces: per-component learning rates, length grouping, official-layout saves, logging."""

import json
import shutil

import pytest
import torch

from internvl_chat.demo_data import make_demo_dataset
from internvl_chat.finetune import main
from internvl_chat.model import InternVLChatModel
from internvl_chat.tiny_model import make_tiny_model
from internvl_chat.train.arguments import TrainingArguments
from internvl_chat.train.trainer import InternVLTrainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tr")
    model_dir = make_tiny_model(root / "m", llm="qwen2", template="internvl2_5", seed=0)
    # an official checkpoint ships its remote code: our output must carry it along
    (model_dir / "modeling_internvl_chat.py").write_text("# remote code of the base checkpoint\n")
    meta = make_demo_dataset(root / "data", num_images=6, seed=1)
    return root, model_dir, meta


def test_component_learning_rates(tiny, tmp_path):
    _, model_dir, _ = tiny
    model = InternVLChatModel.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, report_to="none")
    trainer = InternVLTrainer(model=model, args=args, component_lrs={"vit": 1e-5, "mlp": 5e-4, "llm": None})
    opt = trainer.create_optimizer()
    by_lr = {}
    for group in opt.param_groups:
        by_lr.setdefault(group["lr"], 0)
        by_lr[group["lr"]] += sum(p.numel() for p in group["params"])
    vit = sum(p.numel() for p in model.vision_model.parameters())
    mlp = sum(p.numel() for p in model.mlp1.parameters())
    llm = sum(p.numel() for p in model.language_model.parameters())
    assert by_lr == {1e-5: vit, 5e-4: mlp, 1e-3: llm}
    # biases and norms never decay
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert no_decay and all(p.ndim == 1 for g in no_decay for p in g["params"])


def test_group_by_length_uses_dataset_lengths(tiny, tmp_path):
    _, model_dir, _ = tiny

    gen = torch.Generator().manual_seed(0)
    lengths_ = torch.randint(10, 5000, (256,), generator=gen).tolist()

    class Lengths(torch.utils.data.Dataset):
        lengths = lengths_

        def __len__(self):
            return len(self.lengths)

        def __getitem__(self, i):
            raise AssertionError("the sampler must not load samples to learn their lengths")

    model = InternVLChatModel.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), group_by_length=True, per_device_train_batch_size=2,
                             report_to="none")
    trainer = InternVLTrainer(model=model, args=args, train_dataset=Lengths())
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(256))
    # batches are length-homogeneous compared with random pairs
    grouped = sum(abs(lengths_[a] - lengths_[b]) for a, b in zip(order[::2], order[1::2])) / 128
    shuffled = torch.randperm(256, generator=gen).tolist()
    random_pairs = sum(abs(lengths_[a] - lengths_[b]) for a, b in zip(shuffled[::2], shuffled[1::2])) / 128
    assert grouped < 0.3 * random_pairs


def test_outputs_are_official_layout_with_remote_code_and_tensorboard(tiny, tmp_path):
    root, model_dir, meta = tiny
    out = tmp_path / "run"
    main(["--model_name_or_path", str(model_dir), "--meta_path", str(meta), "--output_dir", str(out),
          "--conv_style", "internvl2_5", "--dynamic_image_size", "True", "--use_thumbnail", "True",
          "--max_dynamic_patch", "2", "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "1",
          "--save_strategy", "steps", "--save_total_limit", "1", "--logging_steps", "1", "--bf16", "False",
          "--dataloader_num_workers", "0", "--freeze_backbone", "True", "--group_by_length", "True",
          "--evaluation_strategy", "no", "--warmup_ratio", "0.5", "--overwrite_output_dir", "True",
          "--disable_tqdm", "True"])
    for folder in (out, out / "checkpoint-2"):
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer_config.json", "modeling_internvl_chat.py"} <= names
    assert (out / "checkpoint-2" / "internvl_chat_complete.json").exists()
    assert not (out / "checkpoint-1").exists()  # save_total_limit 1
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "tensorboard is the default reporter"
    state = json.loads((out / "trainer_state.json").read_text())
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    assert lrs[0] < lrs[1]  # warmup_ratio 0.5 of 2 steps: the first step warms up
    InternVLChatModel.from_pretrained(out)


def test_flags_without_effect_are_named():
    from internvl_chat.finetune import ignored_flags, parse_args

    model_args, data_args, _ = parse_args(["--output_dir", "/tmp/x", "--max_buffer_size", "5", "--strict_mode", "False",
                                           "--use_liger", "True", "--max_dynamic_patch", "6"])
    assert ignored_flags(model_args, data_args) == ["--use_liger True", "--max_buffer_size 5", "--strict_mode False"]
    model_args, data_args, _ = parse_args(["--output_dir", "/tmp/x"])
    assert ignored_flags(model_args, data_args) == []


def test_the_later_of_evaluation_strategy_and_eval_strategy_wins():
    """The launchers pass the official `--evaluation_strategy no` first; a user's `--eval_strategy steps` after it
    must turn evaluation on (and the other way round)."""
    from internvl_chat.finetune import parse_args

    *_, args = parse_args(["--output_dir", "/tmp/x", "--evaluation_strategy", "no", "--eval_strategy", "steps",
                           "--eval_steps", "5"])
    assert args.eval_strategy == "steps"
    *_, args = parse_args(["--output_dir", "/tmp/x", "--eval_strategy", "steps", "--evaluation_strategy=no"])
    assert args.eval_strategy == "no"
