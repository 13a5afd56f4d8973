"""Dynamic tiling against the official grid choices and tiles in fixtures/data."""

from __future__ import annotations

import json
import platform
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl_chat.data.tiling import candidate_grids, dynamic_preprocess, plan_tiles
from internvl_chat.data.transforms import image_to_tiles, load_image

DATA = Path(__file__).resolve().parent / "fixtures" / "data"

# The official order of candidate grids (official `dynamic_preprocess`) for max 6 and max 12.
OFFICIAL_ORDER_MAX6 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3),
    (1, 6), (3, 2),
]  # fmt: skip
OFFICIAL_ORDER_MAX12 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
    (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
    (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6),
]  # fmt: skip


@cache
def _json(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _tiling_rows() -> list[list[int]]:
    table = _json("tiling.json")
    assert table["columns"] == [
        "width", "height", "min_num", "max_num", "image_size", "use_thumbnail", "cols", "rows",
        "num_tiles",
    ]  # fmt: skip
    return table["rows"] + table["extra_rows"]


def test_every_fixture_row_gets_the_official_grid():
    rows = _tiling_rows()
    assert len(rows) > 1000
    wrong = []
    for width, height, min_num, max_num, size, thumb, cols, n_rows, num_tiles in rows:
        got = plan_tiles(width, height, min_num, max_num, size, bool(thumb))
        if got != (cols, n_rows, num_tiles):
            wrong.append(
                ((width, height, min_num, max_num, size, thumb), got, (cols, n_rows, num_tiles))
            )
    assert not wrong, f"{len(wrong)} rows differ, first: {wrong[:5]}"


def _tied_grids(width, height, min_num, max_num):
    """Grids sharing the smallest aspect-ratio distance, computed from scratch in float."""
    grids = [
        (i, j)
        for i in range(1, max_num + 1)
        for j in range(1, max_num + 1)
        if min_num <= i * j <= max_num
    ]
    diffs = {g: abs(width / height - g[0] / g[1]) for g in grids}
    best = min(diffs.values())
    return [g for g, d in diffs.items() if d == best]


def test_tie_sizes_are_real_ties_and_decided_both_ways():
    """The tie rows exercise the rule in both directions, so a wrong rule fails the row test.

    A tie is two grids at exactly the same float distance: equal ratios of different area, e.g.
    (1, 1) and (2, 2), or two ratios on either side of the image's aspect.
    """
    tie_sizes = {tuple(size) for size in _json("tiling.json")["tie_sizes"]}
    assert tie_sizes
    later_won = earlier_kept = 0
    ties_seen = set()
    for width, height, min_num, max_num, size, _, cols, n_rows, _ in _tiling_rows():
        if (width, height) not in tie_sizes:
            continue
        tied = _tied_grids(width, height, min_num, max_num)
        if len(tied) < 2:
            continue  # this (min_num, max_num) has a unique closest grid
        ties_seen.add((width, height))
        assert (cols, n_rows) in tied
        order = candidate_grids(min_num, max_num)
        first = min(tied, key=order.index)
        if (cols, n_rows) == first:
            earlier_kept += 1
        else:
            later_won += 1
            assert width * height > 0.5 * size * size * cols * n_rows
    assert ties_seen == tie_sizes
    assert later_won and earlier_kept


def test_candidate_order_matches_the_listed_official_orders():
    assert candidate_grids(1, 6) == OFFICIAL_ORDER_MAX6
    assert candidate_grids(1, 12) == OFFICIAL_ORDER_MAX12


@pytest.mark.parametrize(
    "min_num,max_num", [(1, 1), (1, 40), (2, 6), (3, 3), (4, 12), (5, 90), (30, 64)]
)
def test_candidate_set_is_every_grid_in_range_sorted_by_area(min_num, max_num):
    grids = candidate_grids(min_num, max_num)
    expected = {
        (i, j)
        for i in range(1, max_num + 1)
        for j in range(1, max_num + 1)
        if min_num <= i * j <= max_num
    }
    assert len(grids) == len(set(grids)) and set(grids) == expected
    areas = [i * j for i, j in grids]
    assert areas == sorted(areas)


@pytest.mark.skipif(
    platform.python_implementation() != "CPython" or sys.maxsize <= 2**32,
    reason="the official order is CPython's 64-bit set order",
)
def test_candidate_order_equals_the_interpreters_set_order():
    """Independent check: build the set exactly as the official nested loops do and sort by area."""
    for min_num in range(1, 13):
        for max_num in range(min_num, 73, 3):
            official = set(
                (i, j)
                for n in range(min_num, max_num + 1)
                for i in range(1, n + 1)
                for j in range(1, n + 1)
                if min_num <= i * j <= max_num
            )
            expected = sorted(official, key=lambda g: g[0] * g[1])
            assert candidate_grids(min_num, max_num) == expected, (min_num, max_num)


def test_worked_examples_of_the_official_tiling():
    # Grids worked by hand from the official `dynamic_preprocess` (image_size 448, thumbnail on); independent of
    # tiling.json.
    for (w, h), six, twelve in [
        ((800, 600), (3, 2, 7), (4, 3, 13)),
        ((1000, 1000), (2, 2, 5), (3, 3, 10)),
        ((300, 300), (1, 1, 1), (1, 1, 1)),
        ((1920, 1080), (2, 1, 3), (4, 2, 9)),
        ((1080, 1920), (1, 2, 3), (2, 4, 9)),
        ((897, 1152), (2, 3, 7), (3, 4, 13)),
        ((4000, 100), (6, 1, 7), (12, 1, 13)),
    ]:
        assert plan_tiles(w, h, 1, 6, 448, True) == six
        assert plan_tiles(w, h, 1, 12, 448, True) == twelve


@pytest.mark.parametrize("bad", [(0, 6), (7, 6), (-1, 3)])
def test_bad_range_is_rejected(bad):
    with pytest.raises(ValueError, match="min_num"):
        plan_tiles(100, 100, *bad, 448, False)
    with pytest.raises(ValueError, match="min_num"):
        candidate_grids(*bad)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="height"):
        plan_tiles(100, 0, 1, 6, 448, False)
    with pytest.raises(TypeError, match="PIL image"):
        dynamic_preprocess(np.zeros((4, 4, 3), np.uint8))


def test_tiles_are_row_major_crops_and_thumbnail_is_last():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 200, 3), dtype=np.uint8))
    tiles = dynamic_preprocess(image, 1, 6, image_size=32, use_thumbnail=True)
    cols, rows, num_tiles = plan_tiles(200, 90, 1, 6, 32, True)
    assert (cols, rows, num_tiles) == (2, 1, 3) and len(tiles) == num_tiles
    canvas = np.asarray(image.resize((64, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[0]), canvas[:, :32])
    assert np.array_equal(np.asarray(tiles[1]), canvas[:, 32:])
    assert np.array_equal(
        np.asarray(tiles[2]), np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))
    )
    # A single-tile grid never gets a thumbnail.
    assert (
        len(dynamic_preprocess(image.resize((40, 40)), 1, 6, image_size=32, use_thumbnail=True))
        == 1
    )


def _fixture_tile_dirs() -> dict[str, dict]:
    cases = {case["tiles_dir"]: case for case in _json("pixels.json")["cases"]}
    on_disk = {f"tiles/{d.name}" for d in (DATA / "tiles").iterdir() if d.is_dir()}
    assert on_disk and on_disk == set(cases), (
        "every tiles/<image>__<case> dir has a pixels.json case"
    )
    return cases


def test_every_fixture_tile_png_is_reproduced_bit_exactly():
    for tiles_dir, case in sorted(_fixture_tile_dirs().items()):
        image = load_image(DATA / case["image"])
        assert [*image.size] == case["source_size"]
        if case["dynamic_image_size"]:
            tiles = [
                np.asarray(t)
                for t in dynamic_preprocess(
                    image,
                    case["min_num"],
                    case["max_num"],
                    case["image_size"],
                    case["use_thumbnail"],
                )
            ]
        else:  # whole-image cases: one tile, optionally padded (see test_transforms for the rest)
            tiles = list(
                image_to_tiles(
                    image,
                    dynamic=False,
                    image_size=case["image_size"],
                    pad2square=case["pad2square"],
                    normalize_type=case["normalize_type"],
                ).numpy()
            )
        pngs = sorted((DATA / tiles_dir).glob("*.png"))
        assert len(pngs) == case["num_tiles"] == len(tiles), tiles_dir
        for png, tile in zip(pngs, tiles, strict=True):
            expected = np.asarray(Image.open(png).convert("RGB"))
            assert tile.dtype == np.uint8 and np.array_equal(tile, expected), f"{png} differs"
