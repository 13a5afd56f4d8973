#!/usr/bin/env python
"""Convert a transformers-native InternVL checkpoint (InternVLForConditionalGeneration) into the official layout.

    python tools/convert_from_hf.py work_dirs/my_model-hf work_dirs/my_model

For -hf checkpoints from OpenGVLab's -HF releases or trained with LLaMA-Factory / TRL, so they can be fine-tuned
here. An export of tools/convert_to_hf.py comes back bit-exact (same safetensors keys and tensors, the original
config.json, an InternLM2 LLM as InternLM2). Other native checkpoints get a config.json built from their native
fields and image-processor settings (ps_version v2, tiling from crop_to_patches / min_patches / max_patches; the
template is the usual one of the LLM family: check `template` before training); a native Llama text model, such
as InternVL3-9B's InternLM3, comes back as LlamaForCausalLM (same weights, same outputs).

--check runs both models in float32 on a probe (text and a 3-tile image) and prints the max |logits diff|;
exit status 1 above --tolerance.
"""

import argparse
import json
import sys
from pathlib import Path

from internvl_chat.console import install as install_console
from internvl_chat.hf_convert import SOURCE_CONFIG_KEY, UnsupportedModelError, convert_from_hf, self_check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="transformers-native checkpoint folder (config.json with model_type internvl)")
    parser.add_argument("out", help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out folder")
    parser.add_argument("--check", action="store_true", help="compare both models' logits in float32")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |logit diff| (float32)")
    parser.add_argument("--device", default="cpu", help="where the self-check runs both models, e.g. cuda")
    args = parser.parse_args(argv)
    install_console()
    try:
        out = convert_from_hf(args.src, args.out, overwrite=args.overwrite)
    except (UnsupportedModelError, FileExistsError, FileNotFoundError) as exc:
        print(f"convert_from_hf: {exc}", file=sys.stderr)
        return 2
    print(f"official-layout checkpoint written to {out}")
    if SOURCE_CONFIG_KEY not in json.loads((Path(args.src) / "config.json").read_text()):
        template = json.loads((out / "config.json").read_text())["template"]
        print(f"not an export of ours: config.json built from the native fields, template {template!r} "
              "(the usual one of its LLM family; check it before training)")
    if not args.check:
        return 0
    return self_check(out, args.src, args.tolerance, device=args.device)


if __name__ == "__main__":
    raise SystemExit(main())
