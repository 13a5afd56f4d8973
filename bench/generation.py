#!/usr/bin/env python
"""Chat generation tokens/s with a KV cache: ours vs the transformers-native InternVL class, same weights.

    python bench/generation.py                  # ~1-2 minutes on 2 CPU cores
    python bench/generation.py --quick          # tiny model, < 1 minute (CI smoke run)
    python bench/generation.py --device cuda    # bf16 weights, flash-attention 2 when installed, SDPA otherwise
    python bench/run.py --only generation       # the same, as a section of BENCHMARKS.md

The benchmark model of bench/train_step.py (random weights, official layout, the real 151,674-token vocabulary)
is exported with internvl_chat/hf_convert.py; `InternVLChatModel.generate` (what `model.chat` calls) and
`InternVLForConditionalGeneration.generate` then answer the same chat prompt (Hermes-2 template, one 2:1 picture
as 2 tiles + thumbnail) greedily, with the end token disabled so both produce exactly `--new-tokens` tokens.
Prefill is timed as a 1-token generation (ViT, projector and the prompt's forward), end to end as the full
generation, decode as the difference per further token. Rounds alternate the order; each keeps its fastest time.
The generated tokens of both must be identical (exit code 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the helpers live next to this file, whether run as a script or imported
    sys.path.insert(0, str(_HERE))

import _vlm  # noqa: E402

SECTION = "generation"
QUESTION = "<image>\nDescribe the picture in detail."


def _models(tmp: str, shape: _vlm.Shape, device: str):
    from transformers import InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from internvl_chat.hf_convert import convert_to_hf
    from internvl_chat.model import InternVLChatModel
    from internvl_chat.model.tokenizer import load_tokenizer

    dtype, attn = _vlm.model_dtype(device), _vlm.attn_implementation(device)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        official = _vlm.write_model(Path(tmp) / "official", shape)
        native_dir = convert_to_hf(official, Path(tmp) / "native")
        ours = InternVLChatModel.from_pretrained(str(official), dtype=dtype, attn_implementation=attn)
        native = InternVLForConditionalGeneration.from_pretrained(str(native_dir), dtype=dtype,
                                                                  attn_implementation=attn)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = load_tokenizer(official)
    ours.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return ours.eval().to(device), native.eval().to(device), tokenizer


def _inputs(model, tokenizer, device: str):
    from internvl_chat import inference
    from internvl_chat.data.transforms import image_to_tiles, normalize_tiles
    from internvl_chat.hf_convert import probe_image

    cfg = model.config
    tiles = image_to_tiles(probe_image(cfg.image_size), dynamic=True, min_num=1, max_num=cfg.max_dynamic_patch,
                           image_size=cfg.image_size, use_thumbnail=cfg.use_thumbnail)
    pixel_values = normalize_tiles(tiles).to(device, _vlm.model_dtype(device))
    prompt = inference.build_prompt(model, QUESTION, num_patches_list=[len(pixel_values)])
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    return pixel_values, input_ids


def measure(quick: bool = False, device: str = "cpu", new_tokens: int | None = None, rounds: int | None = None):
    """Best prefill and end-to-end times of both models, alternating, and both token sequences."""
    import torch

    shape = _vlm.QUICK_SHAPE if quick else _vlm.FULL_SHAPE
    new_tokens = new_tokens or (16 if quick else 64)
    rounds = rounds or (2 if quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench_gen_") as tmp:
        ours, native, tokenizer = _models(tmp, shape, device)
    pixel_values, input_ids = _inputs(ours, tokenizer, device)
    mask = torch.ones_like(input_ids)
    common = dict(do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    prompt_len = int(input_ids.shape[1])

    def run(name: str, n: int) -> list[int]:
        if name == "ours":
            out = ours.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask,
                                max_new_tokens=n, min_new_tokens=n, **common)
            return out[0].tolist()
        out = native.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask,
                              max_new_tokens=n, min_new_tokens=n, **common)
        return out[0, prompt_len:].tolist()

    def timed(name: str, n: int) -> tuple[float, list[int]]:
        _vlm.sync(device)
        start = time.perf_counter()
        tokens = run(name, n)
        _vlm.sync(device)
        return time.perf_counter() - start, tokens

    best = {(name, kind): float("inf") for name in ("ours", "native") for kind in ("prefill", "e2e")}
    tokens: dict[str, list[int]] = {}
    with torch.inference_mode():
        for name in ("ours", "native"):  # warm-up: first-call allocations and kernel selection
            run(name, 2)
        for r in range(rounds):
            for name in ("ours", "native") if r % 2 == 0 else ("native", "ours"):
                t, _ = timed(name, 1)
                best[name, "prefill"] = min(best[name, "prefill"], t)
                t, tokens[name] = timed(name, new_tokens)
                best[name, "e2e"] = min(best[name, "e2e"], t)
    result = {"quick": quick, "device": device, "shape": shape.describe(), "prompt_tokens": prompt_len,
              "tiles": int(pixel_values.shape[0]), "new_tokens": new_tokens, "rounds": rounds,
              "identical": tokens["ours"] == tokens["native"], "tokens": tokens}
    for name in ("ours", "native"):
        prefill, e2e = best[name, "prefill"], best[name, "e2e"]
        result[name] = {"prefill_s": prefill, "e2e_s": e2e, "prefill_tok_s": prompt_len / prefill,
                        "decode_tok_s": (new_tokens - 1) / max(e2e - prefill, 1e-9), "e2e_tok_s": new_tokens / e2e}
    return result


def format_section(m: dict) -> str:
    flag = " --quick" if m["quick"] else ""
    dev = f" --device {m['device']}" if m["device"] != "cpu" else ""
    ours, native = m["ours"], m["native"]
    out = [f"## Chat generation{' (quick mode: tiny model, figures not meaningful)' if m['quick'] else ''}", ""]
    out.append(
        f"Greedy chat generation with a KV cache, ours (`InternVLChatModel.generate`, what `model.chat` calls) vs "
        f"the transformers-native `InternVLForConditionalGeneration.generate`, on the same weights (exported with "
        f"`internvl_chat/hf_convert.py`), prompt and image. Model: random weights in the official layout, "
        f"{m['shape']}. Prompt: Hermes-2 template, one picture as {m['tiles']} tiles, {m['prompt_tokens']:,} tokens; "
        f"{m['new_tokens']} new tokens (end token disabled). Prefill = a 1-token generation (ViT, projector, prompt "
        f"forward); decode = (end to end - prefill) per further token. {m['rounds']} rounds alternating the order, "
        f"fastest time of each.")
    out += ["", f"Reproduce: `python bench/run.py --only generation{flag}` or `python bench/generation.py{flag}{dev}`.",
            "", _vlm.machine(m["device"]), ""]
    out += ["| | prefill tokens/s | decode tokens/s | end-to-end tokens/s |", "|---|---:|---:|---:|"]
    for label, r in (("ours", ours), ("native", native)):
        out.append(f"| {label} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | {r['e2e_tok_s']:,.1f} |")
    ratio = {k: ours[k] / native[k] for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")}
    out.append(f"| **ours / native** | **{ratio['prefill_tok_s']:.2f}x** | **{ratio['decode_tok_s']:.2f}x** | "
               f"**{ratio['e2e_tok_s']:.2f}x** |")
    same = ("identical" if m["identical"] else "**DIFFERENT** (ours "
            f"{m['tokens']['ours'][:8]}..., native {m['tokens']['native'][:8]}...)")
    out += ["", f"Generated tokens: {same} ({m['new_tokens']} of {m['new_tokens']})."]
    if not m["quick"]:
        out.append(f"<!-- headline: chat generation {ratio['e2e_tok_s']:.2f}x the native InternVL class end to end "
                   f"(prefill {ratio['prefill_tok_s']:.2f}x, decode {ratio['decode_tok_s']:.2f}x), "
                   f"{'identical' if m['identical'] else 'DIFFERENT'} tokens -->")
    return "\n".join(out) + "\n"


def section(quick: bool = False, device: str = "cpu") -> str:
    """The BENCHMARKS.md section `generation` (see the module docstring)."""
    return format_section(measure(quick=quick, device=device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer tokens and rounds (CI smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--new-tokens", type=int, help="tokens to generate (default 64, quick 16)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5, quick 2)")
    parser.add_argument("--json", action="store_true", help="print the raw measurements as JSON")
    args = parser.parse_args(argv)
    m = measure(quick=args.quick, device=args.device, new_tokens=args.new_tokens, rounds=args.rounds)
    print(json.dumps(m, indent=2) if args.json else format_section(m))
    return 0 if m["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
