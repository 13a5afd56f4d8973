"""Video frames: the official index rules (worked by hand from the official formulas), decoding of
video files / GIFs / frame folders identified by per-frame colour, errors, and prompt prefixes."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
from PIL import Image

from internvl_chat.data import video as V
from internvl_chat.data import video_decode as D
from internvl_chat.data.errors import DataError
from internvl_chat.data.tiling import plan_tiles

# Frame i of every generated clip is a solid colour from a 4x4x4 grid: neighbours differ by 85 per
# channel, far more than mpeg4 compression moves a flat colour, so a decoded frame names itself.
LEVELS = (0, 85, 170, 255)
PALETTE = [(LEVELS[i % 4], LEVELS[(i // 4) % 4], LEVELS[(i // 16) % 4]) for i in range(64)]


def frame_id(image: Image.Image) -> int:
    assert image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.float64)
    h, w = pixels.shape[:2]
    centre = pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3).mean(0)
    distances = [np.abs(centre - np.array(c)).sum() for c in PALETTE]
    best = int(np.argmin(distances))
    assert distances[best] < 60, f"decoded colour {centre} is near no palette entry"
    return best


def write_video(path, num_frames=30, fps=10, options=None, codec_options=None, gop=None):
    av = pytest.importorskip("av")
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=fps, options=codec_options or {})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(num_frames):
            pixels = np.empty((48, 64, 3), np.uint8)
            pixels[:] = PALETTE[i]
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def packet_positions(path):
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [p.pos for p in container.demux(stream) if p.size > 0]


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.fixture(scope="module")
def mkv(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mkv")


def official_intervals(num_frames, vlen):
    """Interval bounds as the official code computes them: linspace(0, vlen, n+1).astype(int)."""
    n = min(num_frames, vlen)
    edges = [int(x) for x in np.linspace(0, vlen, n + 1)]
    return [(edges[k], edges[k + 1] - 1) for k in range(n)]


# --------------------------------------------------------------------------------------------
# Index rules


def test_middle_is_the_interval_midpoint():
    # vlen 30, 8 frames: edges 0,3,7,11,15,18,22,26,30 -> midpoints of (0,2),(3,6),...,(26,29).
    assert V.sample_frame_indices(8, 30, sample="middle") == [1, 4, 8, 12, 16, 19, 23, 27]
    assert V.sample_frame_indices(1, 30, sample="middle") == [14]
    assert V.sample_frame_indices(3, 3, sample="middle") == [0, 1, 2]


def test_rand_draws_inside_each_interval_like_the_official_choice():
    intervals = official_intervals(8, 30)
    seen_first = set()
    for seed in range(200):
        indices = V.sample_frame_indices(8, 30, sample="rand", rng=random.Random(seed))
        # Official draw: choice(range(lo, hi)) -> lo <= i < hi (an interval's last frame never).
        assert all(lo <= i < hi for i, (lo, hi) in zip(indices, intervals, strict=True))
        seen_first.add(indices[0])
        expected_rng = random.Random(seed)
        assert indices == [expected_rng.choice(range(lo, hi)) for lo, hi in intervals]
    assert seen_first == {0, 1}


def test_rand_is_seed_deterministic_and_leaves_global_rngs_alone():
    py_state, np_state = random.getstate(), np.random.get_state()
    a = V.sample_frame_indices(16, 500, sample="rand", rng=random.Random(7))
    b = V.sample_frame_indices(16, 500, sample="rand", rng=random.Random(7))
    c = V.sample_frame_indices(16, 500, sample="rand", rng=np.random.default_rng(7))
    d = V.sample_frame_indices(16, 500, sample="rand", rng=np.random.default_rng(7))
    V.sample_frame_indices(16, 500, sample="rand")  # unseeded: a private generator
    assert a == b and c == d
    assert all(lo <= i < hi for i, (lo, hi) in zip(c, official_intervals(16, 500), strict=True))
    assert random.getstate() == py_state
    restored = np.random.get_state()
    assert restored[0] == np_state[0] and np.array_equal(restored[1], np_state[1])
    with pytest.raises(TypeError, match="rng"):
        V.sample_frame_indices(4, 30, rng=42)


def test_rand_falls_back_to_a_sorted_subset_when_an_interval_has_one_frame():
    # vlen 10, 8 frames: edges 0,1,2,3,5,6,7,8,10 -> (0,0) is a one-frame interval.
    assert official_intervals(8, 10)[0] == (0, 0)
    for seed in range(20):
        indices = V.sample_frame_indices(8, 10, sample="rand", rng=random.Random(seed))
        assert len(set(indices)) == 8 and indices == sorted(indices)
        assert all(0 <= i < 10 for i in indices)


@pytest.mark.parametrize("sample", ["rand", "middle"])
def test_short_video_is_padded_by_repeating_the_last_index(sample):
    padded = V.sample_frame_indices(8, 5, sample=sample, rng=random.Random(0))
    assert padded == [0, 1, 2, 3, 4, 4, 4, 4]
    assert V.sample_frame_indices(3, 1, sample=sample, rng=random.Random(0)) == [0, 0, 0]


def test_fps_rule_on_a_three_second_clip():
    # 5 s at 10 fps, clip [1, 4]: first 10, 30 frames. fps2: seconds 0.25, 0.75, ..., 2.75 ->
    # frames 2.5, 7.5, ... rounded half to even -> 2, 8, 12, 18, 22, 28; shifted by 10.
    got = V.sample_frame_indices(None, 50, sample="fps2", fps=10, clip=[1, 4])
    assert got == [12, 18, 22, 28, 32, 38]
    # num_frames caps fps sampling by keeping the first ones; no padding.
    assert V.sample_frame_indices(3, 50, sample="fps2", fps=10, clip=[1, 4]) == [12, 18, 22]
    assert V.sample_frame_indices(20, 30, sample="fps1", fps=10) == [5, 15, 25]
    # fps 0.5 on 30 frames at 10 fps: one frame at 1 s (frame 10); the next, 3 s, is past the end.
    assert V.sample_frame_indices(None, 30, sample="fps0.5", fps=10) == [10]
    with pytest.raises(ValueError, match="frame rate"):
        V.sample_frame_indices(4, 30, sample="fps1")


def test_clip_shifts_indices_by_start_times_fps():
    # 30 frames at 10 fps, clip [1, 2.5]: first int(10) = 10, int(1.5 * 10) = 15 frames;
    # 4 frames: edges 0,3,7,11,15 -> midpoints 1,4,8,12 -> +10.
    assert V.sample_frame_indices(4, 30, sample="middle", fps=10, clip=[1, 2.5]) == [11, 14, 18, 22]
    assert V.clip_window(30, 10, [1, 2.5]) == (10, 15)
    # An end up to CLIP_END_TOLERANCE_S past the video is clamped: [2, 3.5] keeps frames 20..29.
    assert V.clip_window(30, 10, [2, 3.5]) == (20, 10)
    assert V.sample_frame_indices(2, 30, sample="middle", fps=10, clip=[2, 3.5]) == [22, 27]
    rng_a, rng_b = random.Random(3), random.Random(3)
    clipped = V.sample_frame_indices(6, 100, sample="rand", fps=10, clip=[4, 6], rng=rng_a)
    assert clipped == [40 + i for i in V.sample_frame_indices(6, 20, sample="rand", rng=rng_b)]


@pytest.mark.parametrize(
    ("clip", "kind"),
    [
        ([3.5, 4.0], "clip_out_of_range"),  # starts after the 3 s video
        ([1.0, 4.5], "clip_out_of_range"),  # ends 1.5 s after it
        ([2.0, 1.0], "bad_clip"),
        ([-1.0, 1.0], "bad_clip"),
        ([1.0, 1.05], "bad_clip"),  # shorter than one frame at 10 fps
        ([1.0], "bad_clip"),
        ("1-2", "bad_clip"),
        ([float("nan"), 1.0], "bad_clip"),
    ],
)
def test_bad_clips_are_data_errors(clip, kind):
    with pytest.raises(DataError) as info:
        V.sample_frame_indices(4, 30, sample="middle", fps=10, clip=clip)
    assert info.value.kind == kind


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampling rule"):
        V.sample_frame_indices(4, 30, sample="uniform")
    with pytest.raises(ValueError, match="sampling rule"):
        V.sample_frame_indices(4, 30, sample="fps0", fps=10)
    with pytest.raises(ValueError, match="num_frames"):
        V.sample_frame_indices(0, 30)
    with pytest.raises(ValueError, match="frame rate"):
        V.sample_frame_indices(4, 30, clip=[0, 1])
    with pytest.raises(DataError) as info:
        V.sample_frame_indices(4, 0)
    assert info.value.kind == "empty_video"


def test_choose_num_frames_is_uniform_over_the_inclusive_range():
    draws = {V.choose_num_frames(8, 11, random.Random(s)) for s in range(200)}
    assert draws == {8, 9, 10, 11}
    gen_draws = {V.choose_num_frames(2, 4, np.random.default_rng(s)) for s in range(100)}
    assert gen_draws == {2, 3, 4}
    assert V.choose_num_frames(5, 5, random.Random(0)) == 5
    assert V.choose_num_frames(8, 32, random.Random(9)) == random.Random(9).randint(8, 32)
    with pytest.raises(ValueError, match="must not exceed"):
        V.choose_num_frames(9, 8, random.Random(0))
    with pytest.raises(ValueError, match="min_num_frame"):
        V.choose_num_frames(0, 8, random.Random(0))


def test_chat_rule_matches_the_readme_formula():
    # max_frame 29, seg 29/8 = 3.625; k -> int(1.8125 + round(3.625 k)), round halves to even.
    assert V.chat_frame_indices(30, 10, 8) == [1, 5, 8, 12, 15, 19, 23, 26]
    # bound (1, 2) s: start 10, end 20, seg 2.5 -> 11.25 + round(0, 2.5, 5, 7.5) = 0, 2, 5, 8.
    assert V.chat_frame_indices(30, 10, 4, bound=(1, 2)) == [11, 13, 16, 19]
    # first_idx raises the start: 5..29, seg 6 -> 8, 14, 20, 26.
    assert V.chat_frame_indices(30, 10, 4, first_idx=5) == [8, 14, 20, 26]
    # An end past the video is cut to max_frame, as in the README.
    past_end = V.chat_frame_indices(30, 10, 2, bound=(2, 100))
    assert past_end == V.chat_frame_indices(30, 10, 2, bound=(2, 2.9))
    # A negative start is clamped to first_idx, as in the README.
    assert V.chat_frame_indices(30, 10, 4, bound=(-3, 100)) == V.chat_frame_indices(30, 10, 4)
    with pytest.raises(DataError) as info:
        V.chat_frame_indices(30, 10, 4, bound=(5, 6))
    assert info.value.kind == "clip_out_of_range"


# --------------------------------------------------------------------------------------------
# Decoding


def test_probe_reads_count_and_rate_from_metadata_or_by_counting(mp4, mkv):
    assert D.probe_video(mp4) == D.VideoInfo(str(mp4), "video", 30, 10.0)
    # Matroska declares no frame count: it is counted from the packets.
    assert D.probe_video(mkv).num_frames == 30


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_decoded_frames_are_the_sampled_ones(container, mp4, mkv):
    path = {"mp4": mp4, "mkv": mkv}[container]
    frames, indices = V.read_frames(path, num_frames=8, sample="middle")
    assert indices == V.sample_frame_indices(8, 30, sample="middle")
    assert [frame_id(f) for f in frames] == indices
    assert all(f.size == (64, 48) for f in frames)

    frames, indices = V.read_frames(path, num_frames=6, sample="rand", rng=random.Random(1))
    assert indices == V.sample_frame_indices(6, 30, sample="rand", rng=random.Random(1))
    assert [frame_id(f) for f in frames] == indices

    frames, indices = V.read_frames(path, num_frames=4, sample="middle", clip=[1, 2.5])
    assert indices == [11, 14, 18, 22]
    assert [frame_id(f) for f in frames] == indices

    frames, indices = V.read_frames(path, num_frames=None, sample="fps2")
    assert [frame_id(f) for f in frames] == indices == [2, 8, 12, 18, 22, 28]


def test_padding_repeats_the_last_decoded_frame(tmp_path):
    path = write_video(tmp_path / "short.mp4", num_frames=5)
    frames, indices = V.read_frames(path, num_frames=8, sample="middle")
    assert indices == [0, 1, 2, 3, 4, 4, 4, 4]
    assert [frame_id(f) for f in frames] == indices


def test_seeking_to_a_late_clip_gives_the_same_frames(tmp_path, monkeypatch):
    # Keyframes every 10 frames, B-frames (decode order != presentation order).
    path = write_video(
        tmp_path / "gop.mp4", num_frames=60, gop=10,
        codec_options={"sc_threshold": "1000000000", "bf": "2"},
    )
    expected = V.sample_frame_indices(5, 60, sample="middle", fps=10, clip=[3.2, 5.8])
    assert expected[0] > 30
    monkeypatch.setattr(D, "_SEEK_MIN_FRAMES", 0)

    def no_sequential_decode(*args):
        raise AssertionError("expected the seek path, not a decode from the start")

    monkeypatch.setattr(D._PyAVSource, "_collect_in_order", no_sequential_decode)
    frames, indices = V.read_frames(path, num_frames=5, sample="middle", clip=[3.2, 5.8])
    assert indices == expected
    assert [frame_id(f) for f in frames] == indices


def test_metadata_overcount_is_resampled_with_the_true_count(tmp_path):
    # faststart: the index (30 frames) sits before the data; cut the data after frame 20.
    path = write_video(tmp_path / "cut.mp4", options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: packet_positions(path)[20]])
    assert D.probe_video(cut).num_frames == 30
    frames, indices = V.read_frames(cut, num_frames=8, sample="middle")
    assert indices == V.sample_frame_indices(8, 20, sample="middle")
    assert [frame_id(f) for f in frames] == indices


def make_gif(path, num_frames=12, duration_ms=50, mode="P"):
    frames = []
    for i in range(num_frames):
        if mode == "RGBA":
            frame = Image.new("RGBA", (40, 30), PALETTE[i] + (255,))
            frame.putpixel((0, 0), (0, 0, 0, 0))  # some transparency
        else:
            frame = Image.new("RGB", (40, 30), PALETTE[i])
        frames.append(frame)
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0, disposal=1
    )
    return path


@pytest.mark.parametrize("mode", ["P", "RGBA"])
def test_gif_frames(tmp_path, mode):
    path = make_gif(tmp_path / "anim.gif", mode=mode)
    info = D.probe_video(path)
    assert (info.kind, info.num_frames, info.fps) == ("gif", 12, 20.0)  # 50 ms per frame
    # 12 frames, 4 wanted: edges 0,3,6,9,12 -> midpoints 1,4,7,10.
    frames, indices = V.read_frames(path, num_frames=4, sample="middle")
    assert indices == [1, 4, 7, 10]
    assert all(f.mode == "RGB" for f in frames)
    assert [frame_id(f) for f in frames] == indices
    frames, indices = V.read_frames(path, num_frames=14, sample="middle")
    assert indices == list(range(12)) + [11, 11]
    assert [frame_id(f) for f in frames] == indices
    # fps10 on 0.6 s at 20 fps: seconds 0.05, 0.15, ... -> frames 1, 3, 5, 7, 9, 11.
    _, indices = V.read_frames(path, num_frames=None, sample="fps10")
    assert indices == [1, 3, 5, 7, 9, 11]


def make_folder(path, names, colours=None):
    path.mkdir()
    for i, name in enumerate(names):
        Image.new("RGB", (32, 24), PALETTE[colours[i] if colours else i]).save(path / name)
    return path


def test_frame_folder_is_sorted_by_trailing_number_and_subsampled_only_when_longer(tmp_path):
    names = [f"frame_{n}.png" for n in range(1, 13)]
    order = list(range(12))
    random.Random(0).shuffle(order)  # creation order says nothing
    folder = make_folder(tmp_path / "frames", [names[i] for i in order], colours=order)
    (folder / "notes.txt").write_text("not a frame")
    info = D.probe_video(folder)
    assert (info.kind, info.num_frames, info.fps) == ("folder", 12, 1.0)

    frames, indices = V.read_frames(folder, num_frames=4, sample="middle")
    assert indices == [1, 4, 7, 10]
    assert [frame_id(f) for f in frames] == indices  # frame_2.png holds colour 1, ...
    # Not more frames than asked: all of them, in order, without padding (official).
    frames, indices = V.read_frames(folder, num_frames=20, sample="rand", rng=random.Random(0))
    assert indices == list(range(12))
    assert [frame_id(f) for f in frames] == indices
    # A clip (seconds at folder_fps) picks a window first.
    _, indices = V.read_frames(folder, num_frames=8, sample="middle", clip=[2, 5], folder_fps=2.0)
    assert indices == list(range(4, 10))


def test_frame_folder_sort_handles_numbers_of_different_width_and_jpg(tmp_path):
    names = ["img_10.jpg", "img_9.jpg", "img_100.jpg"]
    folder = make_folder(tmp_path / "f", names, colours=[1, 0, 2])
    frames, indices = V.read_frames(folder, num_frames=3, sample="middle")
    assert [frame_id(f) for f in frames] == [0, 1, 2]
    natural = make_folder(tmp_path / "n", ["b2x.png", "a10x.png", "a9x.png"], colours=[2, 1, 0])
    frames, _ = V.read_frames(natural, num_frames=3, sample="middle")
    assert [frame_id(f) for f in frames] == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Errors


def kind_of(call):
    with pytest.raises(DataError) as info:
        call()
    assert str(info.value)
    return info.value.kind


def test_data_errors(tmp_path, mp4, mkv):
    read = lambda p, **kw: V.read_frames(p, num_frames=4, sample="middle", **kw)  # noqa: E731
    assert kind_of(lambda: read(tmp_path / "nope.mp4")) == "missing_file"
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video\xff" * 64)
    assert kind_of(lambda: read(garbage)) == "corrupt_video"
    bad_gif = tmp_path / "bad.gif"
    bad_gif.write_bytes(b"GIF89a" + b"\x00" * 3)
    assert kind_of(lambda: read(bad_gif)) == "corrupt_video"
    # A Matroska header with the data cut off before the first frame: zero frames.
    no_frames = tmp_path / "empty.mkv"
    no_frames.write_bytes(mkv.read_bytes()[: packet_positions(mkv)[0]])
    assert kind_of(lambda: read(no_frames)) == "empty_video"
    (tmp_path / "empty_dir").mkdir()
    assert kind_of(lambda: read(tmp_path / "empty_dir")) == "empty_video"
    broken_frames = make_folder(tmp_path / "broken", ["f_1.png", "f_2.png"])
    (broken_frames / "f_3.png").write_bytes(b"not a png")
    assert kind_of(lambda: V.read_frames(broken_frames, num_frames=3)) == "corrupt_video"
    assert kind_of(lambda: read(mp4, clip=[5, 6])) == "clip_out_of_range"
    late_bound = lambda: V.load_video_tiles(mp4, bound=(4, 5), image_size=16)  # noqa: E731
    assert kind_of(late_bound) == "clip_out_of_range"


def test_decord_is_used_only_when_asked_and_installed(mp4, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    with pytest.raises(ImportError, match="decord"):
        V.read_frames(mp4, num_frames=4, backend="decord")
    with pytest.raises(ImportError, match="decord"):
        V.load_video_tiles(mp4, backend="decord")
    frames, _ = V.read_frames(mp4, num_frames=4, sample="middle")  # default backend unaffected
    assert len(frames) == 4
    with pytest.raises(ValueError, match="backend"):
        V.read_frames(mp4, num_frames=4, backend="opencv")


def test_decord_backend_gives_the_same_frames(mp4):
    pytest.importorskip("decord")
    frames, indices = V.read_frames(mp4, num_frames=8, sample="middle", backend="decord")
    assert indices == V.sample_frame_indices(8, 30, sample="middle")
    assert [frame_id(f) for f in frames] == indices


# --------------------------------------------------------------------------------------------
# Chat helper and prompts


def test_load_video_tiles_one_tile_per_frame(mp4):
    tiles, num_patches = V.load_video_tiles(mp4, num_segments=8, image_size=32)
    assert tiles.dtype == V.torch.uint8 and tiles.shape == (8, 32, 32, 3)
    assert num_patches == [1] * 8
    got = [frame_id(Image.fromarray(t.numpy())) for t in tiles]
    assert got == V.chat_frame_indices(30, 10, 8) == [1, 5, 8, 12, 15, 19, 23, 26]


def test_load_video_tiles_dynamic_tiling_per_frame(mp4):
    tiles, num_patches = V.load_video_tiles(
        mp4, num_segments=3, bound=(0.5, 2.5), image_size=16, max_num=4
    )
    per_frame = plan_tiles(64, 48, 1, 4, 16, True)[2]
    assert per_frame > 1
    assert num_patches == [per_frame] * 3
    assert tiles.shape == (3 * per_frame, 16, 16, 3)


def test_prompt_prefixes_chat_and_training():
    assert V.video_prompt_prefix(2) == "Frame1: <image>\nFrame2: <image>\n"
    assert V.video_prompt_prefix(2, training=True) == "Frame-1: <image>\nFrame-2: <image>\n"
    with pytest.raises(ValueError):
        V.video_prompt_prefix(0)


def test_expand_video_placeholder_matches_the_official_training_text(fixtures_dir):
    results = json.loads((fixtures_dir / "data" / "preprocess.json").read_text())["results"]
    case = next(r for r in results if r["id"] == "video_frames_4")
    official = case["conversation"][0]["value"]
    question = official.split("\n")[-1]
    assert V.expand_video_placeholder("<video>\n" + question, 4) == official
    assert V.expand_video_placeholder(question, 4) == official  # prepended when absent
    assert V.expand_video_placeholder("<video>" + question, 4) == official
    with pytest.raises(DataError) as info:
        V.expand_video_placeholder("<video>\n<video>\nhi", 2)
    assert info.value.kind == "placeholder_count"
