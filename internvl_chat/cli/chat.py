"""Chat with an InternVL checkpoint from the terminal.

    python -m internvl_chat.cli.chat MODEL_DIR --image photo.jpg --question "What is in the picture?"
    python -m internvl_chat.cli.chat MODEL_DIR            # interactive; /image PATH, /reset, /quit

Answers stream as they are generated. Works on CPU and GPU; nothing is downloaded, no checkpoint code runs (unless
--trust-remote-code, for a tokenizer that only exists as code) and no pickle is loaded (unless --allow-pickle).
"""

from __future__ import annotations

import argparse
import sys
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from ..inference import chat_template, images_for_model, multi_image_prefix
from ..model import InternVLChatModel, load_tokenizer
from ..model.weight_files import CorruptWeightsError, UnsafeWeightsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m internvl_chat.cli.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory in the official layout")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--question", help="ask one question and exit (default: interactive)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-num", type=int, default=None, help="max tiles per image (default: the model's config)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto = bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--system", default=None, help="override the system message")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a tokenizer that only exists as checkpoint code (InternLM2 has a built-in equivalent)")
    p.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                   help="accept pickle weight files (pytorch_model.bin, *.pt); by default only safetensors are "
                        "loaded and a folder holding pickle weights is refused")
    return p


class ChatSession:
    def __init__(self, model, tokenizer, generation: dict, max_num: int | None) -> None:
        self.model, self.tokenizer, self.generation, self.max_num = model, tokenizer, generation, max_num
        self.history: list[tuple[str, str]] | None = None
        self.images: list[str] = []
        self.pixel_values = None

    def set_images(self, images: list[str]) -> None:
        self.images = list(images)
        pixels, self.num_patches = images_for_model(self.model, self.images, self.max_num)
        if pixels is not None:
            pixels = pixels.to(self.model.device, self.model.dtype)
        self.pixel_values = pixels
        self.history = None

    def ask(self, question: str, out=sys.stdout) -> str:
        if self.history is None and len(self.images) > 1 and "<image>" not in question:
            question = multi_image_prefix(len(self.images)) + question
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result = {}

        def run():
            result["answer"], result["history"] = self.model.chat(
                self.tokenizer, self.pixel_values, question, dict(self.generation, streamer=streamer),
                history=self.history, return_history=True,
                num_patches_list=self.num_patches if self.pixel_values is not None else None,
            )

        thread = Thread(target=run, daemon=True)
        thread.start()
        stop = chat_template(self.model).stop_str
        for piece in streamer:
            out.write(piece.split(stop)[0])
            out.flush()
        thread.join()
        out.write("\n")
        self.history = result["history"]
        return result["answer"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        model = InternVLChatModel.from_pretrained(args.model, torch_dtype=dtype, allow_pickle=args.allow_pickle)
    except (UnsafeWeightsError, CorruptWeightsError) as e:  # a verdict on the folder, not a crash
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = model.to(device).eval()
    if args.system is not None:
        model.system_message = args.system
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if args.sample:
        generation.update(temperature=args.temperature, top_p=args.top_p)
    session = ChatSession(model, tokenizer, generation, args.max_num)
    session.set_images(args.image)
    if args.question is not None:
        session.ask(args.question)
        return 0
    print("Type a question. /image PATH [PATH ...] sets images, /reset clears history, /quit exits.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.history = None
            continue
        if line.startswith("/image"):
            session.set_images(line.split()[1:])
            print(f"{len(session.images)} image(s), {sum(session.num_patches)} tiles")
            continue
        sys.stdout.write("model> ")
        session.ask(line)


if __name__ == "__main__":
    raise SystemExit(main())
