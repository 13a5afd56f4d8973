#!/usr/bin/env python
"""Fold the LoRA adapters of a fine-tuned checkpoint into its weights: python tools/merge_lora.py IN OUT

IN is a checkpoint saved while LoRA-wrapped (config.json has use_llm_lora / use_backbone_lora > 0); for a QLoRA run
(4-bit base weights) the full-precision base it was trained from is reloaded (--base, default: the path recorded in
IN's config.json) and the trained tensors are applied on top. OUT gets plain official key names, use_*_lora = 0, the
tokenizer with the training chat_template and eos ids (internvl_chat/serving.py), and IN's *.py files, so it loads
and serves anywhere an official checkpoint does (the *.py files are copied, never imported). OUT must not exist yet
(nothing is overwritten). Weights are read from safetensors only: a folder holding pickle weight files is refused
unless --allow_pickle.
"""

import argparse
import json
import os
from pathlib import Path

import torch

from internvl_chat.model import InternVLChatModel, load_tokenizer
from internvl_chat.model.weight_files import CorruptWeightsError, UnsafeWeightsError, check_weights_dir
from internvl_chat.serving import save_servable


# top-level fields a fine-tuning run writes (finetune.py); copied from a QLoRA run onto its full-precision base
RUN_FIELDS = ("template", "select_layer", "dynamic_image_size", "use_thumbnail", "ps_version", "min_dynamic_patch",
              "max_dynamic_patch", "force_image_size", "normalize_type", "system_message")


def load_qlora_checkpoint(path: str, config: dict, base: str | None, dtype: torch.dtype,
                          allow_pickle: bool = False) -> InternVLChatModel:
    """A QLoRA checkpoint holds 4-bit base weights: rebuild from the full-precision base, then load what trained."""
    from safetensors import safe_open

    base = base or config.get("qlora_base_model")
    if not base or not os.path.isdir(base):
        raise SystemExit(
            f"{path} is a QLoRA checkpoint (4-bit base weights); pass --base with the full-precision checkpoint it "
            f"was trained from (recorded: {config.get('qlora_base_model')!r})"
        )
    model = InternVLChatModel.from_pretrained(base, torch_dtype=dtype, allow_pickle=allow_pickle)
    check_weights_dir(path, allow_pickle)  # the trained tensors are read below: safetensors only, whole
    if config.get("use_backbone_lora"):
        model.wrap_backbone_lora(config["use_backbone_lora"], config.get("backbone_lora_alpha"))
    if config.get("use_llm_lora"):
        model.wrap_llm_lora(config["use_llm_lora"], config.get("llm_lora_alpha"),
                            target_modules=config.get("llm_lora_target_modules"))
    own = model.state_dict()
    trained = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for key in h.keys():
                outside_llm = key.startswith(("vision_model.", "mlp1.", "language_model.lm_head",
                                              "language_model.output"))
                if ("lora_" in key or outside_llm) and key in own and h.get_slice(key).get_shape() == list(
                        own[key].shape):
                    trained[key] = h.get_tensor(key).to(dtype)
    model.load_state_dict(trained, strict=False)
    for field in RUN_FIELDS:
        if field in config:
            setattr(model.config, field, config[field])
    print(f"QLoRA: rebuilt from {base}, loaded {len(trained)} trained tensors from {path}")
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_path")
    parser.add_argument("output_path")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--base", default=None, help="full-precision base checkpoint (QLoRA runs only)")
    parser.add_argument("--allow_pickle", "--allow-pickle", action="store_true",
                        help="accept pickle weight files (pytorch_model.bin, *.pt); by default only safetensors are "
                             "loaded and a folder holding pickle weights is refused")
    args = parser.parse_args(argv)
    if os.path.exists(args.output_path) and os.listdir(args.output_path):
        parser.error(f"{args.output_path} exists and is not empty; choose a new directory")
    dtype = getattr(torch, args.dtype)
    config = json.loads(Path(args.input_path, "config.json").read_text())
    try:
        if "quantization_config" in config:
            model = load_qlora_checkpoint(args.input_path, config, args.base, dtype, args.allow_pickle)
        else:
            model = InternVLChatModel.from_pretrained(args.input_path, torch_dtype=dtype,
                                                      allow_pickle=args.allow_pickle)
    except (UnsafeWeightsError, CorruptWeightsError) as e:
        parser.error(str(e))
    if not (model.config.use_llm_lora or model.config.use_backbone_lora):
        print(f"note: {args.input_path} has no LoRA adapters; writing an unchanged copy")
    model.merge_lora()
    save_servable(model, load_tokenizer(args.input_path), args.output_path, code_from=(args.input_path,))
    print(f"merged checkpoint written to {args.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
