"""Chat with an InternVL checkpoint from the terminal.

    python -m internvl_chat.cli.chat MODEL_DIR --image photo.jpg --question "What is in the picture?"
    python -m internvl_chat.cli.chat MODEL_DIR --video clip.mp4 --num-segments 8 --text "What happens?"
    python -m internvl_chat.cli.chat MODEL_DIR            # interactive

Interactive messages may attach files inline, several per message: `<img>photo.jpg</img>`, `<video>clip.mp4</video>`;
a bare `<image>` or `<video>` asks for the path. Commands: /image PATH, /video PATH (attach to the next message),
/reset (forget history and media), /help, /quit. A missing or unreadable file is reported in one line and the
conversation goes on; Ctrl-C stops the current answer (the turn is not kept), Ctrl-C or Ctrl-D at the prompt exits.
Videos are sampled as in the official video chat: --num-segments frames, one tile each, `Frame1: <image>` lines.

Answers stream as they are generated. Works on CPU and GPU; nothing is downloaded, no checkpoint code runs (unless
--trust-remote-code, for a tokenizer that only exists as code) and no pickle is loaded (unless --allow-pickle).
Errors are one line, without a traceback (--debug shows it); a wrong folder or media file exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")

HELP = """\
  <img>PATH</img>      attach an image inline (several per message)
  <video>PATH</video>  attach a video inline
  <image> / <video>    ask for the path of an image / video here
  /image PATH ...      attach images to the next message
  /video PATH ...      attach videos to the next message
  /reset               forget the history and the media
  /help                this text
  /quit                exit (also Ctrl-D; Ctrl-C stops an answer)"""


class UserError(Exception):
    """A problem the user can fix (wrong folder, bad file): one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m internvl_chat.cli.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("model", help="checkpoint directory in the official layout")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--video", action="append", default=[], help="video file, GIF or frame folder (repeatable)")
    p.add_argument("--question", "--text", dest="question",
                   help="ask one question and exit (default: interactive); --text is an alias")
    p.add_argument("--num-segments", type=int, default=8, help="frames sampled per video, one tile each")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-num", type=int, default=None, help="max tiles per image (default: the model's config)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto = bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--system", default=None, help="override the system message")
    p.add_argument("--thinking", action="store_true",
                   help="InternVL3/3.5 thinking mode: the system message that asks for reasoning in <think> tags "
                        "(the harmony analysis channel for GPT-OSS models) before the answer; not with --system")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a tokenizer that only exists as checkpoint code (InternLM2 has a built-in equivalent)")
    p.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                   help="accept pickle weight files (pytorch_model.bin, *.pt); by default only safetensors are "
                        "loaded and a folder holding pickle weights is refused")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def check_checkpoint(path: str) -> None:
    """Name a folder that is not an InternVL chat checkpoint as such, before any tokenizer or weight is read."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{path}: no such directory")
    if not folder.is_dir():
        raise UserError(f"{path} is a file; give the checkpoint directory (the folder holding config.json)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not an InternVL checkpoint: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file} cannot be read as JSON: {e}") from e
    if not isinstance(config, dict):
        raise UserError(f"{path} is not an InternVL checkpoint: config.json is not a JSON object")
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type != "internvl_chat" and "InternVLChatModel" not in archs:
        raise UserError(f"{path} is not an InternVL chat checkpoint: config.json has model_type {model_type!r} and "
                        f"architectures {archs!r} (expected internvl_chat / InternVLChatModel)")


def load(args):
    import torch

    from ..data.templates import thinking_system_message
    from ..inference import chat_template
    from ..model import InternVLChatModel, load_tokenizer
    from ..model.tokenizer import TokenizerLoadError
    from ..model.weight_files import CorruptWeightsError, UnsafeWeightsError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        model = InternVLChatModel.from_pretrained(args.model, torch_dtype=dtype, allow_pickle=args.allow_pickle)
        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    except (UnsafeWeightsError, CorruptWeightsError, TokenizerLoadError) as e:  # a verdict on the folder, not a crash
        raise UserError(str(e)) from e
    model = model.to(device).eval()
    if args.system is not None:
        model.system_message = args.system
    elif args.thinking:
        model.system_message = thinking_system_message(chat_template(model))
    return model, tokenizer


def interact(session, out=sys.stdout) -> int:
    from .chat_session import MediaError

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history with the arrow keys, as in a shell)
        except ImportError:
            pass
    print("Type a message; /help lists the commands (files: <img>PATH</img>, /image PATH, /video PATH).", file=out)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/help":
                print(HELP, file=out)
            elif command == "/reset":
                print(session.reset(), file=out)
            elif command in ("/image", "/video"):
                if not rest.strip():
                    print(f"usage: {command} PATH [PATH ...]", file=out)
                    continue
                # one path (spaces allowed) or several, shell-quoted; all are checked before any is attached
                paths = [rest.strip()] if Path(rest.strip().strip("'\"")).exists() else shlex.split(rest)
                for media in [session.check(command[1:], path) for path in paths]:
                    session.pending.append(media)
                    detail = f", {len(media.frame_patches)} frames" if media.kind == "video" else ""
                    print(f"attached {media.path}{detail}; it goes with your next message", file=out)
            elif command.startswith("/"):
                print(f"unknown command {command}; /help lists the commands", file=out)
            else:
                if session.ask(line, out=out, header="model> ") is None:
                    print("(answer stopped; this turn is not kept)", file=out)
        except MediaError as e:
            print(f"\nerror: {e} (nothing sent; history kept)" if command[:1] != "/" else f"error: {e}", file=out)
        except KeyboardInterrupt:  # Ctrl-C at a path prompt: drop this message
            print("\n(cancelled)", file=out)
        except Exception as e:  # anything else wrong with one message must not end the conversation
            print("error: " + (" ".join(str(e).split()) or type(e).__name__), file=out)


def main(argv=None) -> int:
    from ..console import install

    install()  # third-party warnings: internvl_chat/console.py
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.thinking and args.system is not None:
        parser.error("--thinking sets the system message: give either --thinking or --system")
    try:
        if args.num_segments < 1:
            raise UserError(f"--num-segments must be at least 1, got {args.num_segments}")
        check_checkpoint(args.model)
        for path in args.image + args.video:  # before the model loads: a typo is reported in the first second
            if not Path(path).exists():
                raise UserError(f"{path}: no such file")
        from .chat_session import ChatSession, MediaError

        model, tokenizer = load(args)
        generation = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
        if args.sample:
            generation.update(temperature=args.temperature, top_p=args.top_p)
        session = ChatSession(model, tokenizer, generation, args.max_num, num_segments=args.num_segments)
        try:
            for path in args.image:
                session.attach("image", path)
            for path in args.video:
                session.attach("video", path)
        except MediaError as e:
            raise UserError(str(e)) from e
        if args.question is None:
            return interact(session)
        try:
            answer = session.ask(args.question)
        except MediaError as e:
            raise UserError(str(e)) from e
        return 0 if answer is not None else 130
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
