#!/usr/bin/env python
"""Change the tile size of a chat checkpoint's ViT: python tools/resize_pos_embed.py MODEL_PATH OUTPUT_PATH SIZE

The ViT's position table is resampled to the new patch grid with the official interpolation (bicubic in float32,
CLS position kept) and `vision_config.image_size` and `force_image_size` become SIZE, as the official tool does.
SIZE must be a multiple of 28 for patch 14 and pixel shuffle 0.5 (whole patches, an even grid); the image tokens
per tile change with it ((SIZE / 14)^2 / 4: 448 -> 256, 224 -> 64). OUTPUT_PATH gets the model, the tokenizer (with
the serving chat template and eos, internvl_chat/serving.py) and MODEL_PATH's *.py files; it must not exist yet (or
be empty).

Check: the written checkpoint loads, and its ViT features on a random SIZE-px tile equal the source model's, which
interpolates the same table on the fly (max |diff| printed; exit 1 above --atol).
"""

import argparse
import os
import sys

import torch

from internvl_chat.console import install as install_console


def vit_features(model, image_size: int) -> torch.Tensor:
    """ViT + projector output for one fixed random tile, in float32 (the resized and the source model compared)."""
    gen = torch.Generator().manual_seed(0)
    tile = torch.randn(1, 3, image_size, image_size, generator=gen).to(model.vision_model.dtype)
    with torch.no_grad():
        return model.extract_feature(tile).float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path", help="InternVL chat checkpoint folder")
    parser.add_argument("output_path", help="folder to write (must not exist yet, or be empty)")
    parser.add_argument("force_image_size", type=int, help="new tile size in pixels (e.g. 224, 336, 448)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="dtype to load and write (auto: as stored)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest feature difference the check accepts (float32; loosen for 16-bit models)")
    parser.add_argument("--allow_pickle", "--allow-pickle", action="store_true",
                        help="accept a checkpoint whose weights are pickle files (pytorch_model.bin, ...)")
    args = parser.parse_args(argv)
    install_console()
    from internvl_chat.model import InternVLChatModel, load_tokenizer
    from internvl_chat.model.parts import PartsError, check_image_size, resize_position_embedding
    from internvl_chat.model.weight_files import CorruptWeightsError, UnsafeWeightsError
    from internvl_chat.serving import save_servable

    if os.path.exists(args.output_path) and (not os.path.isdir(args.output_path) or os.listdir(args.output_path)):
        parser.error(f"{args.output_path} exists and is not an empty folder; choose a new one")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = InternVLChatModel.from_pretrained(args.model_path, torch_dtype=dtype, allow_pickle=args.allow_pickle)
        check_image_size(args.force_image_size, model.config.vision_config.patch_size, model.config.downsample_ratio)
    except (OSError, PartsError, UnsafeWeightsError, CorruptWeightsError) as exc:
        parser.error(str(exc))
    old_size, old_tokens = model.config.vision_config.image_size, model.config.num_image_token
    reference = vit_features(model, args.force_image_size)  # the source ViT interpolating on the fly
    resize_position_embedding(model, args.force_image_size)
    model.config.force_image_size = args.force_image_size
    model.num_image_token = model.config.num_image_token
    save_servable(model, load_tokenizer(args.model_path), args.output_path, code_from=(args.model_path,))

    resized = InternVLChatModel.from_pretrained(args.output_path, torch_dtype=dtype)
    diff = (vit_features(resized, args.force_image_size) - reference).abs().max().item()
    grid = args.force_image_size // resized.config.vision_config.patch_size
    print(f"ViT tile size {old_size} -> {args.force_image_size} px ({grid}x{grid} patches); image tokens per tile "
          f"{old_tokens} -> {resized.config.num_image_token}; written to {args.output_path}")
    print(f"check: ViT features of the written checkpoint vs the source interpolating on the fly: max |diff| "
          f"{diff:.2e}")
    if resized.vision_model.embeddings.position_embedding.shape[1] != grid * grid + 1 or diff > args.atol:
        print(f"error: the written checkpoint does not reproduce the source ViT (tolerance {args.atol})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
