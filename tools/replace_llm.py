#!/usr/bin/env python
"""Swap the LLM of an InternVL chat checkpoint: python tools/replace_llm.py MODEL_PATH LLM_PATH [OUTPUT_PATH]

The ViT, the chat fields and the projector of MODEL_PATH are kept, the LLM and its tokenizer come from LLM_PATH
(a Qwen2/2.5, Llama, Phi-3 or InternLM2 folder, loaded without remote code), as the official tool does. Beyond it:
- the InternVL tokens are added to the new tokenizer, and the vocabulary grows when they do not fit;
- a projector whose output width is not the new LLM's hidden size cannot be kept: it is re-initialised (PyTorch
  default, as a model built from parts starts), with a message saying it must be trained again (stage 1);
- --template sets the conversation template for the new LLM (the old one is kept otherwise: a template belongs
  to an LLM family, so a new family usually needs a new one).
OUTPUT_PATH defaults to MODEL_PATH_replace_llm (the official name) and must not exist yet (or be empty).

Check: the written checkpoint loads; a text prompt gives, through the chat model, the logits the LLM of LLM_PATH
gives alone (max |diff| printed), and a prompt with one image tile runs through the whole model.
"""

import argparse
import os
import sys

import torch

from internvl_chat.console import install as install_console


def probe_ids(tokenizer, image_tokens: int = 0) -> torch.Tensor:
    """A short prompt, with one image block of `image_tokens` context tokens when asked."""
    from internvl_chat.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

    text = "Describe the picture in one sentence."
    if image_tokens:
        text = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * image_tokens + IMG_END_TOKEN + "\n" + text
    return tokenizer(text, return_tensors="pt")["input_ids"]


def check_written(output_path: str, llm_path: str, dtype, allow_pickle: bool) -> float:
    """Reload the written checkpoint and run the probes; returns max |diff| of the text logits vs the LLM alone."""
    from internvl_chat.model import InternVLChatModel, load_tokenizer
    from internvl_chat.model.configuration import InternVLChatConfig
    from internvl_chat.model.parts import llm_config_of, load_llm_part

    model = InternVLChatModel.from_pretrained(output_path, torch_dtype=dtype).eval()
    tokenizer = load_tokenizer(output_path)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    config = InternVLChatConfig(vision_config=model.config.vision_config.to_dict(), llm_config=llm_config_of(llm_path))
    alone = load_llm_part(llm_path, config, model.dtype, allow_pickle).eval()
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        theirs = alone(input_ids=ids).logits.float()
        vocab = min(ours.shape[-1], theirs.shape[-1])  # rows added for the InternVL tokens are new
        diff = (ours[..., :vocab] - theirs[..., :vocab]).abs().max().item()
        size = model.config.image_size
        tile = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.dtype)
        logits = model(pixel_values=tile, input_ids=probe_ids(tokenizer, model.num_image_token),
                       image_flags=torch.ones(1, dtype=torch.long)).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the image probe gave non-finite logits")
    return diff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path", help="InternVL chat checkpoint folder")
    parser.add_argument("llm_path", help="folder of the new LLM (its config.json, weights and tokenizer)")
    parser.add_argument("output_path", nargs="?", default=None,
                        help="folder to write (default: MODEL_PATH_replace_llm)")
    parser.add_argument("--template", default=None, help="conversation template for the new LLM (default: keep)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="dtype of the written model (auto: the chat checkpoint's)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest text-logit difference the check accepts (float32; loosen for 16-bit models)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow tokenizer code from LLM_PATH")
    parser.add_argument("--allow_pickle", "--allow-pickle", action="store_true",
                        help="accept weight files that are pickles (pytorch_model.bin, ...)")
    args = parser.parse_args(argv)
    install_console()
    from internvl_chat.data.templates import get_template
    from internvl_chat.model import InternVLChatModel, load_tokenizer
    from internvl_chat.model.parts import PartsError, llm_config_of, replace_llm, resize_embeddings
    from internvl_chat.model.tokenizer import TokenizerLoadError
    from internvl_chat.model.weight_files import CorruptWeightsError, UnsafeWeightsError
    from internvl_chat.serving import save_servable

    output = args.output_path or os.path.normpath(args.model_path) + "_replace_llm"
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        parser.error(f"{output} exists and is not an empty folder; choose a new one")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        if args.template:
            get_template(args.template)
        llm_config_of(args.llm_path)  # a wrong folder fails before the chat model loads
        model = InternVLChatModel.from_pretrained(args.model_path, torch_dtype=dtype, allow_pickle=args.allow_pickle)
        tokenizer = load_tokenizer(args.llm_path, trust_remote_code=args.trust_remote_code)
        old_llm = f"{type(model.language_model).__name__} (hidden {model.config.llm_config.hidden_size})"
        model, reinitialised = replace_llm(model, args.llm_path, allow_pickle=args.allow_pickle)
    except (OSError, ValueError, PartsError, TokenizerLoadError, UnsafeWeightsError, CorruptWeightsError) as exc:
        parser.error(str(exc))
    if len(tokenizer) > model.config.llm_config.vocab_size:
        resize_embeddings(model, len(tokenizer))
    if args.template:
        model.config.template = model.template = args.template
    save_servable(model, tokenizer, output, code_from=(args.model_path, args.llm_path))

    new_llm = f"{type(model.language_model).__name__} (hidden {model.config.llm_config.hidden_size})"
    print(f"LLM {old_llm} -> {new_llm}, vocabulary {model.config.llm_config.vocab_size}, template "
          f"{model.config.template}; written to {output}")
    if reinitialised:
        print("note: the projector (mlp1) was re-initialised: its output width did not match the new LLM's hidden "
              "size. Train it before use (the official stage 1: --freeze_llm True --freeze_backbone True).")
    if not args.template:
        print(f"note: the template stays {model.config.template}; pass --template if the new LLM needs another")
    diff = check_written(output, args.llm_path, dtype, args.allow_pickle)
    print(f"check: text logits through the written chat model vs the LLM alone: max |diff| {diff:.2e}; image probe ok")
    if diff > args.atol:
        print(f"error: the written checkpoint does not carry the new LLM unchanged (tolerance {args.atol})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
