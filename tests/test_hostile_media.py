"""Hostile media: decompression bombs, truncated and odd images, special files, broken videos.

One generated corpus (a JSONL line per case, media made in tmp_path) goes through the checker, which must
name every bad line with its exact kind, and through the training dataset, which must skip exactly those
lines and report each with its kind. Good odd images (CMYK, 16-bit, palette with alpha, EXIF-rotated, 1x1,
1x8000, animated GIF) must load with the right pixels. Bombs (a 60000x60000 PNG header over a tiny body, a
real 20000x20000 PNG of 48 kB, a GIF whose screen is 65535x65535) must be refused from the header in well
under a second without allocating the image; FIFOs, /dev/zero, directories and symlink loops must be named
without ever being opened for a blocking read.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from internvl_chat.data import media
from internvl_chat.data import video as V
from internvl_chat.data import video_decode as D
from internvl_chat.data.check import StandInTokenizer, check_dataset
from internvl_chat.data.config import DataConfig
from internvl_chat.data.dataset import SupervisedDataset
from internvl_chat.data.errors import DataError, parse_report
from internvl_chat.data.media import MediaLimits, open_regular_file, sniff_image_size
from internvl_chat.data.meta import load_meta
from internvl_chat.data.transforms import ImageLoadError, ImageTooLargeError, image_size, load_image

av = pytest.importorskip("av")

REPO = Path(__file__).resolve().parents[1]
HAS_FIFO = hasattr(os, "mkfifo")
HAS_DEV_ZERO = os.path.exists("/dev/zero")


@pytest.fixture(autouse=True)
def watchdog():
    """A read that blocks (the bug these tests guard against) fails the test instead of hanging the suite."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def blocked(signum, frame):
        raise TimeoutError("a media read blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ generators


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(width: int, height: int, idat: bytes, depth: int = 8) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)  # greyscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def header_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A hand-made IHDR claiming a huge image over a body of 100 bytes."""
    return _png(width, height, zlib.compress(bytes(100)))


def real_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of zeros (48 kB for 20000 x 20000), compressed row block by row block: the 50 MB of
    raw rows are never held at once and no 400 MB array is built."""
    compressor = zlib.compressobj(9)
    row = bytes((width + 7) // 8 + 1)  # filter byte + packed bits
    rows_per_block = max(1, (1 << 20) // len(row))
    parts, left = [], height
    while left:
        count = min(rows_per_block, left)
        parts.append(compressor.compress(row * count))
        left -= count
    parts.append(compressor.flush())
    return _png(width, height, b"".join(parts), depth=1)


def gif_bomb() -> bytes:
    """A 1x1 GIF whose logical screen claims 65535 x 65535 pixels."""
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 90, np.float32)], axis=2).astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_video(path: Path, num_frames: int = 6, fps: int = 5) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: Path, colours: list[tuple[int, int, int]], size=(16, 12)) -> Path:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def make_media(folder: Path) -> None:
    """Every file the corpus names (the special files only where the platform has them)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(64, 48)).save(folder / "good.png")
    jpeg = encoded(Image.fromarray(gradient(64, 48)), "JPEG", quality=90)
    (folder / "trunc.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    png = encoded(Image.fromarray(noise), "PNG")
    (folder / "trunc.png").write_bytes(png[: len(png) * 6 // 10])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "fake.jpg").write_text("this is a text file, not a JPEG\n")
    Image.new("CMYK", (40, 30), (10, 200, 30, 40)).save(folder / "cmyk.jpg", quality=95)
    deep = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)  # up to 64746
    Image.fromarray(deep).save(folder / "deep16.png")
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(folder / "palette_alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(gradient(40, 20)).save(folder / "exif6.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (200, 100, 50)).save(folder / "one.png")
    Image.new("RGB", (1, 8000), (10, 20, 30)).save(folder / "tall.png")
    (folder / "header_bomb.png").write_bytes(header_bomb())
    (folder / "real_bomb.png").write_bytes(real_bomb())
    write_gif(folder / "anim.gif", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    (folder / "gif_bomb.gif").write_bytes(gif_bomb())
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    (folder / "folder.png").mkdir()
    write_video(folder / "clip.mp4")
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage, not a movie" * 16)
    with av.open(str(folder / "zero.avi"), "w") as container:  # a stream, and not one frame in it
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # writes the header although no frame follows
    for name, count in (("frames", 2), ("frames_trunc", 1), ("frames_fifo", 2)):
        (folder / name).mkdir()
        for k in range(count):
            Image.new("RGB", (32, 24), (50 * k, 90, 120)).save(folder / name / f"frame_{k + 1}.png")
    (folder / "frames_trunc" / "frame_2.png").write_bytes(png[: len(png) // 2])
    if HAS_FIFO:
        os.mkfifo(folder / "fifo.png")
        os.mkfifo(folder / "fifo.mp4")
        os.mkfifo(folder / "frames_fifo" / "frame_3.png")  # not a file: not a frame, and never opened


def image_line(path: str) -> dict:
    return {"image": path, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                             {"from": "gpt", "value": "A picture."}]}


def video_line(path: str, **extra) -> dict:
    return {"video": path, **extra, "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                      {"from": "gpt", "value": "Not much."}]}


# line -> (expected kind, or None for a good line; the record)
CORPUS = [
    (None, image_line("good.png")),
    ("truncated_image", image_line("trunc.jpg")),
    ("truncated_image", image_line("trunc.png")),
    ("corrupt_image", image_line("empty.jpg")),
    ("corrupt_image", image_line("fake.jpg")),
    (None, image_line("cmyk.jpg")),
    (None, image_line("deep16.png")),
    (None, image_line("palette_alpha.png")),
    (None, image_line("exif6.jpg")),
    (None, image_line("one.png")),
    (None, image_line("tall.png")),
    ("image_too_large", image_line("header_bomb.png")),
    ("image_too_large", image_line("real_bomb.png")),
    (None, image_line("anim.gif")),
    ("image_too_large", image_line("gif_bomb.gif")),
    ("missing_file", image_line("missing.png")),
    ("not_a_file", image_line("loop.png")),
    ("missing_file", image_line("dangling.png")),
    ("not_a_file", image_line("folder.png")),
    (None, video_line("clip.mp4")),
    ("corrupt_video", video_line("corrupt.mp4")),
    ("empty_video", video_line("zero.avi")),
    ("clip_out_of_range", video_line("clip.mp4", clip=[5.0, 6.0])),
    (None, video_line("frames")),
    ("truncated_image", video_line("frames_trunc")),
    ("image_too_large", video_line("gif_bomb.gif")),
    ("missing_file", video_line("gone.mp4")),
]
if HAS_FIFO:
    CORPUS += [
        ("not_a_file", image_line("fifo.png")),
        ("not_a_file", video_line("fifo.mp4")),
        (None, video_line("frames_fifo")),
    ]
if HAS_DEV_ZERO:
    CORPUS += [
        ("not_a_file", image_line("/dev/zero")),
        ("not_a_file", video_line("/dev/zero")),
    ]


def expected() -> dict[int, str]:
    return {n: kind for n, (kind, _) in enumerate(CORPUS, start=1) if kind is not None}


def line_of(path: str) -> int:
    return next(n for n, (_, record) in enumerate(CORPUS, start=1) if record.get("image") == path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile_media")
    make_media(folder)
    (folder / "media.jsonl").write_text("".join(json.dumps(record) + "\n" for _, record in CORPUS))
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"media": {"root": str(folder), "annotation": str(folder / "media.jsonl"),
                                          "data_augment": False, "repeat_time": 1}}))
    return meta


def config(**overrides) -> DataConfig:
    values = dict(template="internvl2_5", dynamic_image_size=False, min_num_frame=2, max_num_frame=2,
                  bad_data="fail")
    values.update(overrides)
    return DataConfig(**values)


# ------------------------------------------------------------------------------------------------ checker


def test_checker_names_every_hostile_media_line(corpus):
    started = time.perf_counter()
    report = check_dataset(corpus, None, config(), write_lengths=False)
    assert time.perf_counter() - started < 30  # two bombs among them: nothing is decoded
    found = {p.line: p.kind for p in report.problems}
    assert found == expected()
    assert {p.file for p in report.problems} == {str(corpus.parent / "media.jsonl")}
    assert report.records == len(CORPUS) and not report.fatal
    reasons = {p.line: p.reason for p in report.problems}
    assert "60000 x 60000 = 3,600,000,000 pixels, over the limit of 178,956,970" in reasons[line_of("header_bomb.png")]
    assert "20000 x 20000" in reasons[line_of("real_bomb.png")]
    assert "65535 x 65535" in reasons[line_of("gif_bomb.gif")]
    assert "truncated" in reasons[line_of("trunc.jpg")] and "--allow_truncated_images" in reasons[2]
    assert "empty (0 bytes)" in reasons[line_of("empty.jpg")]
    assert "symlink loop" in reasons[line_of("loop.png")]
    assert "dangling symlink" in reasons[line_of("dangling.png")]
    assert "is a directory" in reasons[line_of("folder.png")]
    if HAS_FIFO:
        assert "is a FIFO (named pipe)" in reasons[line_of("fifo.png")]
        assert "is a FIFO (named pipe)" in reasons[line_of("fifo.png") + 1]  # the video
    if HAS_DEV_ZERO:
        assert "is a character device" in reasons[line_of("/dev/zero")]


def test_check_data_cli_flags(corpus, capsys):
    """tools/check_data.py: --allow_truncated_images accepts the cut files, --max_image_pixels sets the limit."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_data_under_test", REPO / "tools" / "check_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--meta_path", str(corpus), "--template", "internvl2_5", "--dynamic_image_size", "False",
            "--min_num_frame", "2", "--max_num_frame", "2", "--json"]
    code = tool.main([*argv, "--allow_truncated_images", "--max_image_pixels", "5000"])
    report = json.loads(capsys.readouterr().out)
    found = {p["line"]: p["kind"] for p in report["problems"]["items"]}
    wanted = {n: kind for n, kind in expected().items() if kind != "truncated_image"}
    wanted[line_of("tall.png")] = "image_too_large"  # 1 x 8000 > 5000; every other good image is smaller
    assert code == 1 and found == wanted
    assert "over the limit of 5,000" in {p["line"]: p["reason"] for p in report["problems"]["items"]}[
        line_of("tall.png")]


# ------------------------------------------------------------------------------------------------ training


def test_dataset_skips_and_reports_exactly_the_bad_lines(corpus):
    dataset = SupervisedDataset(load_meta(corpus), StandInTokenizer(), config(bad_data="skip",
                                                                              max_consecutive_bad=len(CORPUS)))
    skipped: dict[int, str] = {}
    good_lines = set()
    for index in range(len(dataset)):
        item = dataset[index]
        good_lines.add(int(item["sample_id"].rsplit(":", 1)[1]))
        for report in item["skipped"]:
            err = parse_report(report)
            assert err.file == str(corpus.parent / "media.jsonl")
            assert skipped.setdefault(err.line, err.kind) == err.kind
    assert skipped == expected()
    assert good_lines == {n for n, (kind, _) in enumerate(CORPUS, start=1) if kind is None}


def test_fail_policy_raises_the_named_error(corpus):
    dataset = SupervisedDataset(load_meta(corpus), StandInTokenizer(), config())
    for path in ("header_bomb.png", "loop.png", "trunc.png"):
        n = line_of(path)
        with pytest.raises(DataError) as info:
            dataset[n - 1]
        assert (info.value.line, info.value.kind) == (n, CORPUS[n - 1][0])


def test_allow_truncated_images_restores_the_official_loading(corpus, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    folder = corpus.parent
    for name in ("trunc.jpg", "trunc.png"):
        with pytest.raises(ImageLoadError) as info:
            load_image(folder / name)
        assert info.value.kind == "truncated_image" and name in str(info.value)
        assert load_image(folder / name, allow_truncated=True).size == (64, 48)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # only lifted while loading
    report = check_dataset(corpus, None, config(allow_truncated_images=True), write_lengths=False)
    assert {p.line: p.kind for p in report.problems} == {
        n: kind for n, kind in expected().items() if kind != "truncated_image"}


# ------------------------------------------------------------------------------------------------ good images


def test_odd_but_good_images_load_with_the_right_pixels(corpus):
    folder = corpus.parent
    with Image.open(folder / "cmyk.jpg") as raw:  # PIL's plain CMYK conversion, as the official code
        assert np.array_equal(np.asarray(load_image(folder / "cmyk.jpg")), np.asarray(raw.convert("RGB")))
    deep = np.asarray(Image.open(folder / "deep16.png")).astype(np.int64)
    assert deep.max() > 255
    grey = ((2 * deep + 257) // (2 * 257)).astype(np.uint8)  # 16-bit scaled by 255/65535, rounded
    assert np.array_equal(np.asarray(load_image(folder / "deep16.png")), np.repeat(grey[..., None], 3, axis=2))
    palette = np.asarray(load_image(folder / "palette_alpha.png"))
    assert palette[0, 0].tolist() == [255, 0, 0] and palette[5, 5].tolist() == [0, 0, 255]  # alpha dropped
    with Image.open(folder / "exif6.jpg") as raw:
        upright = ImageOps.exif_transpose(raw).convert("RGB")
        assert raw.size == (40, 20) and upright.size == (20, 40)
    rotated = load_image(folder / "exif6.jpg")
    assert rotated.size == (20, 40) and np.array_equal(np.asarray(rotated), np.asarray(upright))
    assert image_size(folder / "exif6.jpg") == (20, 40)
    assert image_size(folder / "exif6.jpg", exif_transpose=False) == (40, 20)
    assert np.asarray(load_image(folder / "one.png")).tolist() == [[[200, 100, 50]]]
    tall = load_image(folder / "tall.png")
    assert tall.size == (1, 8000) and (np.asarray(tall) == [10, 20, 30]).all()
    first = load_image(folder / "anim.gif")  # only the first frame is decoded
    assert first.size == (16, 12) and (np.asarray(first) == [255, 0, 0]).all()


def test_size_fn_of_ms_swift_boxes_has_the_same_checks(corpus):
    dataset = SupervisedDataset(load_meta(corpus), StandInTokenizer(), config())
    size = dataset._size_fn(dataset.entries[0])
    assert size("exif6.jpg") == (20, 40)
    cases = {"header_bomb.png": "image_too_large", "loop.png": "not_a_file", "trunc.png": "truncated_image",
             "missing.png": "missing_file"}
    if HAS_FIFO:
        cases["fifo.png"] = "not_a_file"
    for path, kind in cases.items():
        with pytest.raises(DataError) as info:
            size(path)
        assert info.value.kind == kind, path


# ------------------------------------------------------------------------------------------------ bombs


_BOMB_PROBE = """
import json, resource, sys, time
from internvl_chat.data import video
from internvl_chat.data.errors import DataError
from internvl_chat.data.transforms import ImageLoadError, image_size, load_image
out = {}
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    kinds = []
    for call in (load_image, image_size):
        try:
            call(path)
            kinds.append(None)
        except ImageLoadError as exc:
            kinds.append(exc.kind)
    if path.endswith(".gif"):
        try:
            video.read_frames(path, num_frames=2)
        except DataError as exc:
            kinds.append(exc.kind)
    out[path] = {"kinds": kinds, "seconds": time.perf_counter() - started,
                 "grown_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="ru_maxrss needs the resource module")
def test_bombs_are_refused_fast_without_allocating(corpus):
    """In a fresh process (so the peak RSS is not an earlier test's): each bomb costs milliseconds and no
    memory, where decoding would take 0.4 GB (20000^2 bytes) to 3.6 GB."""
    folder = corpus.parent
    paths = [str(folder / name) for name in ("header_bomb.png", "real_bomb.png", "gif_bomb.gif")]
    assert len(real_bomb()) < 60_000  # a real, valid image: 48 kB on disk
    done = subprocess.run([sys.executable, "-c", _BOMB_PROBE, *paths], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    for path in paths:
        result = results[path]
        assert set(result["kinds"]) == {"image_too_large"}, (path, result)
        assert result["seconds"] < 5 and result["grown_mb"] < 50, (path, result)


def test_header_sniffing_reads_only_the_header():
    cases = {
        "PNG": encoded(Image.new("RGB", (37, 21)), "PNG"),
        "GIF": encoded(Image.new("P", (37, 21)), "GIF"),
        "BMP": encoded(Image.new("RGB", (37, 21)), "BMP"),
        "WEBP-lossy": encoded(Image.new("RGB", (37, 21)), "WEBP", quality=80),
        "WEBP-lossless": encoded(Image.new("RGB", (37, 21)), "WEBP", lossless=True),
        "WEBP-alpha": encoded(Image.new("RGBA", (37, 21)), "WEBP"),
        "JPEG+EXIF": encoded(Image.new("RGB", (37, 21)), "JPEG", exif=Image.Exif().tobytes() + b"\0" * 5000),
        "JPEG-progressive": encoded(Image.new("RGB", (37, 21)), "JPEG", progressive=True),
    }
    for name, data in cases.items():
        stream = io.BytesIO(data)
        stream.seek(0)
        assert sniff_image_size(stream) == (37, 21), name
        assert stream.tell() == 0, name
    assert sniff_image_size(io.BytesIO(encoded(Image.new("RGB", (37, 21)), "TIFF"))) is None  # PIL's header then
    assert sniff_image_size(io.BytesIO(header_bomb(70000, 3))) == (70000, 3)


def test_pixel_limit_is_configurable_and_zero_means_none(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), (1, 2, 3)).save(path)
    with pytest.raises(ImageTooLargeError, match=r"big.png' is 3000 x 2000 = 6,000,000 pixels, over the limit "
                                                 r"of 1,000,000") as info:
        load_image(path, max_image_pixels=1_000_000)
    assert isinstance(info.value, ValueError) and info.value.kind == "image_too_large"
    assert load_image(path, max_image_pixels=0).size == (3000, 2000)
    assert load_image(path, max_image_pixels=6_000_000).size == (3000, 2000)
    # PIL's own limit below ours: ours decides, PIL's global is only lifted while our load runs
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert load_image(path, max_image_pixels=0).size == (3000, 2000)
    assert load_image(path).size == (3000, 2000)  # default 178,956,970 > PIL's 2000
    with pytest.raises(ImageTooLargeError, match="3000 x 2000"):
        load_image(path, max_image_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 1000
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_image_pixels"):
            load_image(path, max_image_pixels=bad)
    with pytest.raises(ValueError, match="max_image_pixels"):
        DataConfig(max_image_pixels=-5)


def test_chat_loader_raises_a_clear_value_error(corpus):
    from internvl_chat.inference import load_image_tiles

    with pytest.raises(ValueError, match=r"header_bomb.png.*60000 x 60000.*over the limit"):
        load_image_tiles(str(corpus.parent / "header_bomb.png"))
    tiles = load_image_tiles(str(corpus.parent / "tall.png"), image_size=28, max_num=2)
    assert tiles.shape[1:] == (3, 28, 28)
    with pytest.raises(ValueError, match="1 x 8000"):
        load_image_tiles(str(corpus.parent / "tall.png"), max_image_pixels=100)


# ------------------------------------------------------------------------------------------------ special files


@pytest.mark.skipif(not HAS_FIFO, reason="no os.mkfifo on this platform")
def test_a_fifo_swapped_in_after_the_stat_cannot_block(tmp_path, monkeypatch):
    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(media, "check_media_path", lambda path, **_: None)  # the stat saw a regular file
    started = time.perf_counter()
    with pytest.raises(DataError, match="is a FIFO") as info:
        open_regular_file(fifo)
    assert info.value.kind == "not_a_file" and time.perf_counter() - started < 5


# ------------------------------------------------------------------------------------------------ video bounds


def test_video_frame_count_duration_and_frame_size_are_bounded(corpus, tmp_path):
    folder = corpus.parent
    clip = folder / "clip.mp4"  # 6 frames of 64 x 48 at 5 fps: 1.2 s
    read = lambda path, **limits: V.read_frames(path, num_frames=2, sample="middle",  # noqa: E731
                                                limits=MediaLimits(**limits))
    assert len(read(clip)[0]) == 2
    cases = [
        (clip, dict(max_video_frames=5), "video_too_long", "holds 6 frames, over max_video_frames=5"),
        (clip, dict(max_video_seconds=1.0), "video_too_long", "lasts 1.2 s"),
        (clip, dict(max_image_pixels=3000), "image_too_large", "64 x 48 = 3,072 pixels"),
        (folder / "anim.gif", dict(max_video_frames=2), "video_too_long", "holds 3 frames"),
        (folder / "anim.gif", dict(max_image_pixels=100), "image_too_large", "16 x 12"),
        (folder / "frames", dict(max_video_frames=1), "video_too_long", "holds 2 frames"),
        (folder / "frames", dict(max_image_pixels=100), "image_too_large", "32 x 24"),
    ]
    for path, limits, kind, words in cases:
        with pytest.raises(DataError) as info:
            read(path, **limits)
        assert info.value.kind == kind and words in str(info.value), (path, limits, str(info.value))
    # 0 = no bound
    assert len(read(clip, max_video_frames=0, max_video_seconds=0, max_image_pixels=0)[0]) == 2
    # a container that declares no frame count is counted by demuxing, which stops past the bound
    mkv = tmp_path / "clip.mkv"
    with av.open(str(clip)) as source, av.open(str(mkv), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    with pytest.raises(DataError, match="more than 3 frames") as info:
        read(mkv, max_video_frames=3)
    assert info.value.kind == "video_too_long"
    with pytest.raises(ValueError, match="max_video_seconds"):
        MediaLimits(max_video_seconds=-1)


def test_gif_scan_matches_pil_without_decoding(tmp_path):
    path = tmp_path / "timed.gif"
    frames = [Image.new("RGB", (20, 10), (40 * k, 0, 0)) for k in range(4)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[30, 0, 250, 70], loop=0)
    with open(path, "rb") as fp:
        durations, size = D._scan_gif(fp, 0)
    with Image.open(path) as image:
        pil = []
        for k in range(image.n_frames):
            image.seek(k)
            pil.append(image.info.get("duration") or 100)
    assert durations == pil and size == (20, 10)
    with open(path, "rb") as fp:
        assert len(D._scan_gif(fp, 2)[0]) == 3  # stops one past the bound


def test_fps_sampling_of_an_absurd_frame_count_stays_small():
    """fpsX with a cap builds only the timestamps it keeps (a declared 10^12 frames used to mean an
    array of 10^12 floats); the kept indices are the official full computation's."""
    started = time.perf_counter()
    indices = V.sample_frame_indices(4, 10**12, sample="fps1", fps=30.0)
    assert time.perf_counter() - started < 1 and indices == [15, 45, 75, 105]
    for vlen, fps, rate, cap in ((300, 29.97, "fps2", 7), (1000, 24.0, "fps0.5", 3), (50, 10.0, "fps3", 100)):
        duration, delta = vlen / fps, 1.0 / float(rate[3:])
        full = np.arange(delta / 2, duration + delta / 2, delta)
        official = [int(i) for i in np.around(full * fps).astype(int) if i < vlen][:cap]
        assert V.sample_frame_indices(cap, vlen, sample=rate, fps=fps) == official
