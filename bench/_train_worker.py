"""One training-benchmark variant, run in its own process so that its peak memory is its own.

bench/train_step.py starts these through a multiprocessing forkserver that has imported torch, transformers and
the model code once (so a variant costs a fork, not an interpreter start) and has run no computation (so forked
children do not inherit a busy OpenMP pool).
"""

from __future__ import annotations

import contextlib
import time
import traceback

import torch
from transformers import InternVLForConditionalGeneration

from _vlm import PeakMemory, attn_implementation, item_tokens, model_dtype, sync, to_device
from internvl_chat.model import InternVLChatModel
from internvl_chat.model.tokenizer import load_tokenizer
from internvl_chat.tiny_model import synthetic_batch

LORA_RANK = 16  # the official *_lora.sh launchers: --use_llm_lora 16, ViT and LLM frozen, projector trained


def _batch(spec: dict, tokenizer) -> dict:
    """The variant's batch: normalised float tiles, which the native model takes too; text ids from the whole
    learnt vocabulary of the tiny Qwen2 tokenizer (the batches the published figures were measured on)."""
    return synthetic_batch(tokenizer, [tuple(s) for s in spec["layout"]], packed=bool(spec.get("packed")),
                           seed=spec.get("seed", 0), image_size=spec["shape"].image_size, float_pixels=True,
                           text_ids=(10, tokenizer.vocab_size))


def _load(spec: dict):
    device, dtype = spec["device"], model_dtype(spec["device"])
    attn = attn_implementation(device)
    if spec["impl"] == "native":
        model = InternVLForConditionalGeneration.from_pretrained(spec["hf_dir"], dtype=dtype, attn_implementation=attn)
        return model.to(device)
    kwargs = {}
    if spec["mode"] == "qlora":
        from transformers import BitsAndBytesConfig

        # the settings of finetune.qlora_load_kwargs: NF4 LLM linears, ViT / projector / LM head in full precision
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["vision_model", "mlp1", "lm_head", "output"])
        kwargs["device_map"] = {"": device}
    model = InternVLChatModel.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation=attn, **kwargs)
    if spec["mode"] == "qlora":
        from internvl_chat.finetune import patch_bnb_for_cpu_training

        patch_bnb_for_cpu_training(model)
        return model  # placed by device_map (bitsandbytes models refuse .to())
    return model.to(device)


def _set_trainable(model, mode: str) -> None:
    """full: everything; frozen_vit: all but the ViT; lora / qlora: the official LoRA recipe (ViT and LLM
    frozen, LoRA rank 16 on the LLM's linears, projector trained)."""
    if mode == "full":
        return
    model.vision_model.requires_grad_(False)
    if mode in ("lora", "qlora"):
        model.language_model.requires_grad_(False)
        model.wrap_llm_lora(LORA_RANK)
        model.mlp1.requires_grad_(True)


def run_variant(spec: dict) -> dict:
    """Build the model and batch of `spec`, run a warm-up step, then `spec["steps"]` timed steps (forward,
    backward, AdamW step, zero_grad), the first under a peak-memory probe: a steady-state step, with the AdamW
    states in place. Returns times, first-step loss, memory and counts, or the error."""
    try:
        return _run(spec)
    except Exception:  # reported in the section rather than aborting the whole benchmark
        return {"name": spec["name"], "error": traceback.format_exc(limit=4)}


def _run(spec: dict) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process only: no "Loading weights" bars in the benchmark's output
    torch.manual_seed(0)
    device = spec["device"]
    tokenizer = load_tokenizer(spec["model_dir"])
    batch = _batch(spec, tokenizer)
    real_tokens = sum(item_tokens(spec["shape"], s) for s in spec["layout"])
    model = _load(spec)
    native = spec["impl"] == "native"
    if native:
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    else:
        model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        _set_trainable(model, spec["mode"])
        if spec.get("gc"):
            model.set_vision_gradient_checkpointing(True)
            model.set_llm_gradient_checkpointing(True)
        if spec["loss"] == "full":
            batch["return_logits"] = True
    model.train()
    batch = to_device(batch, device, model_dtype(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)  # the Trainer's default optimizer (adamw_torch_fused)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    sync(device)
    baseline = PeakMemory.current(device)  # model, batch and an empty optimizer
    loss = step()  # warm-up: creates the AdamW states and the gradients' storage
    times = []
    mem = PeakMemory(device)
    for k in range(spec["steps"]):
        with mem if k == 0 else contextlib.nullcontext():
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
    return {"name": spec["name"], "times": times, "loss": loss, "mem_growth": mem.total - baseline,
            "mem_total": mem.total, "tokens": real_tokens, "slots": int(batch["input_ids"].numel()),
            "trainable": sum(p.numel() for p in params)}


def prepare_models(out: str, shape, export_native: bool = True) -> dict:
    """Write the benchmark checkpoint to `out`/official and, with `export_native`, its native export (hf_convert)
    to `out`/native. Runs in a worker so that the parent process computes nothing before forking."""
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from _vlm import write_model
    from internvl_chat.hf_convert import convert_to_hf

    hf_logging.disable_progress_bar()  # this worker process only
    official = write_model(Path(out) / "official", shape)
    result = {"model_dir": str(official)}
    if export_native:
        result["hf_dir"] = str(convert_to_hf(official, Path(out) / "native"))
    return result


def measure_matmul(device: str) -> float:
    from _vlm import matmul_flops

    return matmul_flops(device)
