#!/usr/bin/env python
"""Save the projector (mlp1) of an InternVL chat checkpoint: python tools/extract_mlp.py MODEL_PATH OUTPUT_DIR

Writes OUTPUT_DIR/mlp_projector.safetensors (or OUTPUT_DIR itself when it ends in .safetensors): the six mlp1
tensors under the keys `0.weight` ... `3.bias`, which `finetune.py --mlp_path FILE` loads into a model built from
parts (--vision_path/--llm_path) or from a checkpoint. The official tool writes the same tensors as a pickle
(mlp_projector.pth, bf16); this one writes safetensors in the checkpoint's own dtype unless --dtype says otherwise.
Only the mlp1 tensors are read (no model is built), so it is quick on any model size. Check: the written file is
read back and must hold the six tensors with the shapes the checkpoint's config implies, equal to the source.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from internvl_chat.console import install as install_console
from internvl_chat.model.parts import (
    PROJECTOR_FILE,
    PROJECTOR_KEYS,
    PartsError,
    check_projector,
    projector_shapes,
    read_projector,
)
from internvl_chat.model.weight_files import (
    CorruptWeightsError,
    UnsafeWeightsError,
    check_weights_dir,
    safetensors_files,
)


def read_checkpoint_projector(model_path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The mlp1 tensors of a chat checkpoint folder (safetensors, single file or sharded)."""
    from safetensors import safe_open

    if check_weights_dir(model_path, allow_pickle):
        state = {}
        for name in safetensors_files(model_path):
            with safe_open(os.path.join(model_path, name), "pt") as handle:
                for key in handle.keys():
                    if key.startswith("mlp1."):
                        state[key.removeprefix("mlp1.")] = handle.get_tensor(key)
        return state
    from internvl_chat.model import InternVLChatModel  # an allowed pickle-only folder: load it the slow way

    model = InternVLChatModel.from_pretrained(model_path, torch_dtype="auto", allow_pickle=True)
    return dict(model.mlp1.state_dict())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path", help="InternVL chat checkpoint folder")
    parser.add_argument("output_dir", help=f"folder to write {PROJECTOR_FILE} into (or a .safetensors file path)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="dtype of the written tensors (auto: as stored in the checkpoint)")
    parser.add_argument("--allow_pickle", "--allow-pickle", action="store_true",
                        help="accept a checkpoint whose weights are pickle files (pytorch_model.bin, ...)")
    args = parser.parse_args(argv)
    install_console()
    from safetensors.torch import save_file

    config_file = Path(args.model_path, "config.json")
    if not config_file.is_file():
        parser.error(f"{args.model_path}: no config.json, so not an InternVL chat checkpoint")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") != "internvl_chat":
        parser.error(f"{args.model_path}: model_type {config.get('model_type')!r}, not an InternVL chat checkpoint")
    try:
        state = read_checkpoint_projector(args.model_path, args.allow_pickle)
        expected = projector_shapes(config["vision_config"]["hidden_size"], config["llm_config"]["hidden_size"],
                                    config.get("downsample_ratio", 0.5))
        check_projector({k: tuple(v.shape) for k, v in state.items()}, expected, args.model_path)
    except (PartsError, UnsafeWeightsError, CorruptWeightsError) as exc:
        parser.error(str(exc))
    if args.dtype != "auto":
        state = {k: v.to(getattr(torch, args.dtype)) for k, v in state.items()}
    out = args.output_dir if args.output_dir.endswith(".safetensors") else os.path.join(args.output_dir, PROJECTOR_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    metadata = {"format": "pt", "source": os.path.abspath(args.model_path),
                "vit_hidden_size": str(config["vision_config"]["hidden_size"]),
                "llm_hidden_size": str(config["llm_config"]["hidden_size"]),
                "downsample_ratio": str(config.get("downsample_ratio", 0.5))}
    save_file({k: state[k].contiguous() for k in PROJECTOR_KEYS}, out, metadata=metadata)

    back = read_projector(out)  # the check: what --mlp_path will read is what the checkpoint holds
    if set(back) != set(PROJECTOR_KEYS) or any(not torch.equal(back[k], state[k]) for k in PROJECTOR_KEYS):
        print(f"error: {out} does not read back as the checkpoint's projector", file=sys.stderr)
        return 1
    n = sum(v.numel() for v in back.values())
    shuffled, hidden = back["1.weight"].shape[1], back["1.weight"].shape[0]
    print(f"projector mlp1 ({shuffled} -> {hidden}, {n:,} parameters, {back['1.weight'].dtype}) written to {out}; "
          f"use it with --mlp_path {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
