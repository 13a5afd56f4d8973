#!/usr/bin/env python
"""Fold the LoRA adapters of a fine-tuned checkpoint into its weights: python tools/merge_lora.py IN OUT

IN is a checkpoint saved while LoRA-wrapped (config.json has use_llm_lora / use_backbone_lora > 0). OUT gets plain
official key names, use_*_lora = 0, the tokenizer, and IN's *.py files, so it loads anywhere an official checkpoint
does. OUT must not exist yet (nothing is overwritten).
"""

import argparse
import glob
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from internvl_chat.model import InternVLChatModel, load_tokenizer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_path")
    parser.add_argument("output_path")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    args = parser.parse_args(argv)
    if os.path.exists(args.output_path) and os.listdir(args.output_path):
        parser.error(f"{args.output_path} exists and is not empty; choose a new directory")
    model = InternVLChatModel.from_pretrained(args.input_path, torch_dtype=getattr(torch, args.dtype))
    if not (model.config.use_llm_lora or model.config.use_backbone_lora):
        print(f"note: {args.input_path} has no LoRA adapters; writing an unchanged copy")
    model.merge_lora()
    model.save_pretrained(args.output_path)
    load_tokenizer(args.input_path).save_pretrained(args.output_path)
    for src in glob.glob(os.path.join(args.input_path, "*.py")):
        shutil.copy2(src, args.output_path)
    print(f"merged checkpoint written to {args.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
