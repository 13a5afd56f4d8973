"""The tokenizer and data flags of the data tools (`check_data`, `inspect_data`), under the training flag names.

The flags become a :class:`~internvl_chat.data.config.DataConfig` through the same
:meth:`~internvl_chat.data.config.DataConfig.from_args` as training, with a checkpoint's ``config.json`` data
settings (``--model``) filling what the command line leaves unset.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from internvl_chat.data.config import DataConfig
from internvl_chat.data.video_decode import BACKENDS as VIDEO_BACKENDS

__all__ = ["SetupError", "add_data_arguments", "checkpoint_data_settings", "setup_from_args"]


class SetupError(ValueError):
    """The command line does not describe a usable tokenizer / data configuration."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


_bool.__name__ = "bool"  # argparse names the type in its error messages


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The tokenizer and data flags, with the official training flag names (unset flags: the
    checkpoint's ``config.json`` with ``--model``, else the training defaults)."""
    group = parser.add_argument_group("model, tokenizer and data settings (as for training)")
    group.add_argument("--model", help="InternVL checkpoint folder: its tokenizer and config.json data settings")
    group.add_argument("--tokenizer", help="tokenizer folder (with --template), instead of --model")
    group.add_argument("--template", "--conv_style", dest="template", help="conversation template (conv_style)")
    group.add_argument("--trust_remote_code", action="store_true", help="load a remote-code tokenizer's own code")
    group.add_argument("--max_seq_length", type=int, help="token limit (training default 8192)")
    group.add_argument("--force_image_size", type=int, help="tile size in pixels (default 448)")
    group.add_argument("--down_sample_ratio", type=float, help="pixel-shuffle ratio, for tokens per tile (0.5)")
    group.add_argument("--num_image_token", type=int, help="context tokens per tile (default from the above)")
    for name in ("dynamic_image_size", "use_thumbnail", "pad2square"):
        group.add_argument(f"--{name}", type=_bool, nargs="?", const=True, metavar="BOOL")
    group.add_argument("--min_dynamic_patch", type=int)
    group.add_argument("--max_dynamic_patch", type=int)
    group.add_argument("--min_num_frame", type=int)
    group.add_argument("--max_num_frame", type=int)
    group.add_argument("--video_sample", help="rand | middle | fpsX (default rand)")
    group.add_argument("--video_backend", choices=VIDEO_BACKENDS)
    group.add_argument("--seed", type=int, help="seed of fractional repeat_time subsets and frame draws (42)")
    group.add_argument("--max_image_pixels", type=int,
                       help="images / video frames with more pixels are bad (image_too_large); default 178956970 "
                            "(PIL's own bomb limit), 0 = no limit")
    group.add_argument("--allow_truncated_images", type=_bool, nargs="?", const=True, metavar="BOOL",
                       help="accept truncated image files (grey fill, the official behaviour) instead of reporting "
                            "them (truncated_image)")
    group.add_argument("--max_video_frames", type=int, help="videos with more frames are bad (video_too_long); "
                                                            "default 1000000, 0 = no limit")
    group.add_argument("--max_video_seconds", type=float, help="longer videos are bad (video_too_long); default "
                                                               "36000, 0 = no limit")
    group.add_argument("--confine_paths", action="store_true", default=None,
                       help="image/video paths that resolve outside the dataset root are bad samples (as training "
                            "with --confine_paths), not warnings")


def checkpoint_data_settings(model_path: str | os.PathLike) -> dict[str, Any]:
    """The data settings a checkpoint's ``config.json`` holds, as a ``base`` for ``DataConfig.from_args``.

    ``template``, the tile geometry (``image_size`` from ``force_image_size``, else the ViT's; the ViT's
    ``patch_size``; ``downsample_ratio``), ``dynamic_image_size``, ``use_thumbnail``, ``min/max_dynamic_patch``,
    ``pad2square`` and ``normalize_type``. Training takes these from its own flags, so pass the flags you will
    train with.
    """
    path = os.path.join(os.fspath(model_path), "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            cfg = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{model_path} has no config.json (is it an InternVL checkpoint folder?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    vision = cfg.get("vision_config") or {}
    image_size = cfg.get("force_image_size") or vision.get("image_size") or 448
    if isinstance(image_size, list):
        image_size = image_size[0]
    settings: dict[str, Any] = {"image_size": int(image_size), "patch_size": vision.get("patch_size"),
                                "down_sample_ratio": cfg.get("downsample_ratio")}
    for key in ("template", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch",
                "pad2square", "normalize_type"):
        settings[key] = cfg.get(key)
    return {k: v for k, v in settings.items() if v is not None}


def setup_from_args(args: argparse.Namespace) -> tuple[Any, DataConfig, str | None]:
    """``(tokenizer or None, DataConfig, tokenizer path)`` from :func:`add_data_arguments` flags.

    Raises :class:`SetupError` for contradictory or incomplete flags and unloadable tokenizers.
    """
    if args.model and args.tokenizer:
        raise SetupError("pass --model or --tokenizer, not both")
    tokenizer_path = args.model or args.tokenizer
    has_config = bool(tokenizer_path) and os.path.isfile(os.path.join(tokenizer_path, "config.json"))
    try:
        if args.model or (args.tokenizer and has_config and not args.template):
            base = checkpoint_data_settings(tokenizer_path)
        elif args.tokenizer and not args.template:
            raise SetupError(f"--tokenizer {args.tokenizer} needs --template (the conv_style you train with)")
        else:
            base = None
        config = DataConfig.from_args(args, base=base)
    except ValueError as exc:
        if isinstance(exc, SetupError):
            raise
        raise SetupError(str(exc)) from exc
    if not tokenizer_path:
        return None, config, None
    try:
        from internvl_chat.model.tokenizer import load_tokenizer  # transformers: seconds to import, only when needed

        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    return tokenizer, config, os.path.abspath(tokenizer_path)
