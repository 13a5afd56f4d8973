#!/usr/bin/env python
"""Convert an official-layout InternVL checkpoint into a transformers-native one (InternVLForConditionalGeneration).

    python tools/convert_to_hf.py work_dirs/my_model work_dirs/my_model-hf

Writes safetensors weights in the native layout, config.json (image token id from the source tokenizer,
downsample_ratio, vision_feature_layer, image size, tie_word_embeddings copied from the LLM; the official config.json
is kept under "internvl_chat_config" so tools/convert_from_hf.py can restore it), the tokenizer, and the processor
files (preprocessor_config.json, processor_config.json) whose settings reproduce our tiling (tile size,
max_dynamic_patch, thumbnail). Qwen2/2.5, Qwen3, Qwen3-MoE, GPT-OSS, Llama and Phi-3 LLMs keep their class;
InternLM2 and InternLM3 become Llama.

Then a self-check: both models in float32 on a probe (text and a 3-tile image), max |diff| of the logits printed;
exit status 1 above --tolerance. Refused, with exit status 2 and the reason: pixel shuffle v1, InternViT qk-norm
eps other than 1e-6, tiles of another size than the ViT's, unmerged LoRA, pad2square, tiling without thumbnail,
other LLM families.

Loading: InternVLForConditionalGeneration.from_pretrained(OUT) and AutoImageProcessor.from_pretrained(OUT) work
with transformers >= 5 alone (the PIL image processor gives the same tiles as ours). AutoProcessor.from_pretrained
(OUT) also builds transformers' InternVL video processor, which needs `torchvision` (the CPU or CUDA build matching
your torch). An InternLM2 tokenizer is copied as it is (its own tokenizer code, trust_remote_code=True).
"""

import argparse
import sys

from internvl_chat.console import install as install_console
from internvl_chat.hf_convert import UnsupportedModelError, convert_to_hf, self_check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="official-layout checkpoint folder (config.json, *.safetensors, tokenizer)")
    parser.add_argument("out", help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out folder")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the float32 self-check (it loads both models in float32 on the CPU)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |logit diff| (float32)")
    parser.add_argument("--device", default="cpu", help="where the self-check runs both models, e.g. cuda")
    args = parser.parse_args(argv)
    install_console()
    try:
        out = convert_to_hf(args.src, args.out, overwrite=args.overwrite)
    except (UnsupportedModelError, FileExistsError, FileNotFoundError) as exc:
        print(f"convert_to_hf: {exc}", file=sys.stderr)
        return 2
    print(f"transformers-native checkpoint written to {out}")
    if args.no_check:
        return 0
    return self_check(args.src, out, args.tolerance, device=args.device)


if __name__ == "__main__":
    raise SystemExit(main())
