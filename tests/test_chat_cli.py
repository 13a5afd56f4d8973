"""The chat CLI as a person uses it: a real process on a pseudo-terminal, a tiny model, typed lines and Ctrl-C."""

from __future__ import annotations

import codecs
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from internvl_chat.tiny_model import make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the real CLI; while the file named by CHAT_SLOW_FLAG exists every streamed token takes 0.5 s, so a test can
# press Ctrl-C in the middle of an answer.
LAUNCH = """
import os, sys, time
from transformers import TextIteratorStreamer
put = TextIteratorStreamer.put
def slow_put(self, value):
    if os.path.exists(os.environ["CHAT_SLOW_FLAG"]):
        time.sleep(0.5)
    put(self, value)
TextIteratorStreamer.put = slow_put
from internvl_chat.cli.chat import main
sys.exit(main(sys.argv[1:]))
"""


class Terminal:
    """A child process whose stdin/stdout/stderr are a pseudo-terminal; `expect` waits for text in its output."""

    def __init__(self, args, env):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *args], stdin=slave, stdout=slave, stderr=slave,
                                     cwd=REPO, env=env, close_fds=True)
        os.close(slave)
        self.fd, self.output, self.pos = master, "", 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                data = b""
            self.output += self.decoder.decode(data).replace("\r\n", "\n")
            return bool(data)
        return True

    def expect(self, pattern, timeout=30):
        """Wait for `pattern` (a regex) after the previous match; return the text up to and including it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.output, self.pos)
            if match:
                seen, self.pos = self.output[self.pos:match.end()], match.end()
                return seen
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)) and self.proc.poll() is not None:
                raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.output[self.pos:]}")

    def send(self, line):
        os.write(self.fd, line.encode() + b"\n")

    def wait(self, timeout=20):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0) and select.select([self.fd], [], [], 0)[0]:
            pass
        return self.proc.wait(timeout=1)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = make_tiny_model(root / "model", llm="qwen2", template="internvl2_5", seed=0)
    for name, colour in (("cat.png", (200, 120, 40)), ("dog.png", (40, 120, 200))):
        Image.new("RGB", (64, 48), colour).save(root / name)
    (root / "bad.jpg").write_text("this is text, not a picture\n")
    return root, model


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, TERM="dumb", CHAT_SLOW_FLAG=str(tmp_path / "slow"), PYTHONUNBUFFERED="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def answer_done(term):
    """The model's answer streamed and the next prompt is up."""
    term.expect(r"model> ")
    return term.expect(r"you> ")


def test_session_survives_mistakes_and_ctrl_c(files, env):
    root, model = files
    term = Terminal([str(model), "--max-new-tokens", "4"], env)
    try:
        term.expect(r"/help lists the commands.*\nyou> ", timeout=60)
        term.send("hello")
        answer_done(term)

        # a missing file and a text file named .jpg: one line each, the session goes on
        term.send(f"/image {root}/nope.jpg")
        assert re.search(r"error: \S*nope\.jpg: no such file\n", term.expect(r"you> "))
        term.send(f"/image {root}/bad.jpg")
        seen = term.expect(r"you> ")
        assert f"error: cannot load image '{root}/bad.jpg'" in seen and "Traceback" not in seen
        term.send(f"what is <img>{root}/missing.png</img>?")
        assert "no such file (nothing sent; history kept)" in term.expect(r"you> ")
        term.send("second question")
        answer_done(term)

        # inline images, several per message
        term.send(f"compare <img>{root}/cat.png</img> and <img>{root}/dog.png</img>")
        answer_done(term)
        # a bare <image> asks for the path
        term.send("and this one? <image>")
        term.expect(r"image path for <image>: ")
        term.send(str(root / "cat.png"))
        answer_done(term)

        # several files for the next message
        term.send(f"/image {root}/cat.png {root}/dog.png")
        assert re.search(r"attached \S*cat\.png; .*\nattached \S*dog\.png; it goes with your next message\n",
                         term.expect(r"you> "))

        # Ctrl-C while the answer streams: the answer stops, the process lives, the turn is not kept (the attached
        # images wait for the next message)
        open(env["CHAT_SLOW_FLAG"], "w").close()
        term.send("tell me a long story")
        term.expect(r"model> ")
        term.expect(r"\S", timeout=20)  # the first word of the answer is out
        term.proc.send_signal(signal.SIGINT)
        term.expect(r"\(answer stopped; this turn is not kept\)\nyou> ", timeout=10)
        os.remove(env["CHAT_SLOW_FLAG"])
        assert term.proc.poll() is None
        term.send("still there?")
        answer_done(term)

        term.send("/help")
        help_text = term.expect(r"you> ")
        for command in ("<img>PATH</img>", "<video>PATH</video>", "/image PATH", "/video PATH", "/reset", "/quit"):
            assert command in help_text
        # 5 answered turns (hello, second, two image turns, still there); 5 images in the history
        term.send("/reset")
        assert re.search(r"cleared 5 turn\(s\) of history, 5 image\(s\) and 0 video\(s\): \S*cat\.png, \S*dog\.png, "
                         r"\S*cat\.png, \S*cat\.png, \S*dog\.png\n", term.expect(r"you> "))
        term.send("/reset")
        assert "cleared 0 turn(s) of history, 0 image(s) and 0 video(s)\n" in term.expect(r"you> ")
        # Ctrl-C at the prompt exits cleanly (the pause lets the child reach the prompt's read, as a person would)
        time.sleep(0.3)
        term.proc.send_signal(signal.SIGINT)
        assert term.wait() == 0
        assert "Traceback" not in term.output
    finally:
        term.close()


def write_video(path, num_frames=20, fps=10):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(num_frames):
            pixels = np.full((48, 64, 3), (i * 12) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_one_shot_and_interactive(files, env, tmp_path):
    _, model = files
    clip = write_video(tmp_path / "clip.mp4")
    one_shot = subprocess.run(
        [sys.executable, "-m", "internvl_chat.cli.chat", str(model), "--video", str(clip), "--num-segments", "4",
         "--text", "what happens?", "--max-new-tokens", "3", "--debug"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout.strip()

    term = Terminal([str(model), "--max-new-tokens", "3", "--num-segments", "3"], env)
    try:
        term.expect(r"you> ", timeout=60)
        term.send(f"/video {clip}")
        assert re.search(r"attached \S*clip\.mp4, 3 frames", term.expect(r"you> "))
        term.send("what happens?")
        answer_done(term)
        term.send(f"and here <video>{clip}</video>")
        answer_done(term)
        # Ctrl-C at the path prompt drops that message only
        term.send("and <video>")
        term.expect(r"video path for <video>: ")
        time.sleep(0.3)
        term.proc.send_signal(signal.SIGINT)
        term.expect(r"\(cancelled\)\nyou> ")
        term.send("/reset")
        assert "cleared 2 turn(s) of history, 0 image(s) and 2 video(s)" in term.expect(r"you> ")
        time.sleep(0.3)
        os.write(term.fd, b"\x04")  # Ctrl-D at the prompt exits cleanly
        assert term.wait() == 0
    finally:
        term.close()


def test_video_frames_reach_the_model_as_official_frame_lines(files, tmp_path):
    """`Frame1: <image>` lines, one tile per frame, in the question sent to model.chat."""
    from internvl_chat.cli.chat_session import ChatSession
    from internvl_chat.model import InternVLChatModel, load_tokenizer

    _, model_dir = files
    clip = write_video(tmp_path / "clip.mp4")
    model = InternVLChatModel.from_pretrained(model_dir).eval()
    session = ChatSession(model, load_tokenizer(model_dir), dict(max_new_tokens=2), None, num_segments=3)
    question, items = session.compose(f"<video>{clip}</video>What happens?")
    assert question == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?"
    assert items[0].frames.shape[0] == 3 and items[0].frame_patches == [1, 1, 1]
    with open(os.devnull, "w") as devnull:
        session.ask(f"<video>{clip}</video>What happens?", out=devnull)
        assert session.history[0][0] == question and session.num_patches == [1, 1, 1]

        # attached media go first (images, then videos), inline ones where they stand; tiles follow that order
        root = model_dir.parent
        session.attach("video", str(clip))
        session.attach("image", str(root / "cat.png"))
        session.ask(f"and <img>{root / 'dog.png'}</img>?", out=devnull)
    assert session.history[1][0] == "<image>\nFrame1: <image>\nFrame2: <image>\nFrame3: <image>\nand <image>?"
    assert [m.kind for m in session.media] == ["video", "image", "video", "image"]
    assert session.num_patches[4:7] == [1, 1, 1] and len(session.num_patches) == 8
    assert session.pixel_values.shape[0] == sum(session.num_patches) and session.pending == []


def test_missing_file_in_one_shot_is_one_line_before_loading(files, tmp_path):
    _, model = files
    proc = subprocess.run([sys.executable, "-m", "internvl_chat.cli.chat", str(model), "--image",
                           str(tmp_path / "nope.jpg"), "--question", "hi"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stderr) == (2, f"error: {tmp_path / 'nope.jpg'}: no such file\n")


@pytest.mark.parametrize("case", ["no_config", "other_model", "missing"])
def test_not_a_checkpoint_is_named(files, tmp_path, case):
    folder = tmp_path / "folder"
    if case != "missing":
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text("{}")
    if case == "other_model":
        (folder / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    proc = subprocess.run([sys.executable, "-m", "internvl_chat.cli.chat", str(folder), "--question", "hi"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    expected = {
        "no_config": f"error: {folder} is not an InternVL checkpoint: it has no config.json\n",
        "other_model": f"error: {folder} is not an InternVL chat checkpoint: config.json has model_type 'llama' and "
                       "architectures ['LlamaForCausalLM'] (expected internvl_chat / InternVLChatModel)\n",
        "missing": f"error: {folder}: no such directory\n",
    }[case]
    assert proc.stderr == expected
