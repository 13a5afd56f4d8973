#!/usr/bin/env python
"""Write a tiny random-weight InternVL checkpoint in the official layout (config.json, safetensors, tokenizer).

    python tools/make_tiny_model.py work_dirs/tiny --llm qwen2 --vit 300m --template internvl2_5

Deterministic for a --seed. Used by the tests, the demo and the benchmarks: no weights are ever downloaded.
"""

import argparse

from internvl_chat.console import install as install_console
from internvl_chat.tiny_model import LLM_PRESETS, VIT_STYLES, make_tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write (must be empty unless --overwrite)")
    parser.add_argument("--llm", choices=sorted(LLM_PRESETS), default="qwen2", help="LLM family")
    parser.add_argument("--vit", choices=sorted(VIT_STYLES), default="300m", help="InternViT style")
    parser.add_argument("--template", default=None, help="chat template (default: the family's usual one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--select-layer", type=int, default=-1)
    parser.add_argument("--ps-version", choices=["v1", "v2"], default="v2")
    parser.add_argument("--max-shard-size", default=None, help="e.g. 200KB to write a sharded checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    install_console()  # third-party warnings: internvl_chat/console.py
    out = make_tiny_model(
        args.out_dir, llm=args.llm, vit=args.vit, template=args.template, seed=args.seed, dtype=args.dtype,
        overwrite=args.overwrite, max_shard_size=args.max_shard_size, select_layer=args.select_layer,
        ps_version=args.ps_version,
    )
    print(f"tiny InternVL ({args.llm}, InternViT-{args.vit}) written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
