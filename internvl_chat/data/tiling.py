"""Dynamic high-resolution tiling: pick a grid of square tiles for an image and cut it.

InternVL shows a large image to the ViT as a grid of ``image_size`` x ``image_size`` tiles
(plus, optionally, a thumbnail of the whole image). Which grid is chosen decides the number of
image tokens in the prompt, so it must match the official ``dynamic_preprocess`` exactly, including
its two quirks:

* Candidate grids are visited in area order, and grids of EQUAL area in the order in which
  CPython happens to iterate the ``set`` the official code builds them in. That order only matters
  for an exact float tie between two grids of equal area, but then it decides the grid's shape, so
  we reproduce it.
  :func:`candidate_grids` does so without relying on the interpreter's ``set``: it replays CPython's
  (3.8 and later, 64-bit) tuple hash and open-addressing set layout, so the order is the same on any
  Python implementation and stays what official checkpoints were trained with even if a future
  CPython changes its set internals.
* A candidate replaces the best one only if it is strictly closer in aspect ratio; on an exact float
  tie the later grid in that order wins only if the source image has more than half the pixels
  of that grid's canvas (``width*height > 0.5*image_size**2*cols*rows``).

The pixels come from one PIL ``resize`` (BICUBIC, Pillow's default for RGB) of the whole image to
the grid canvas, cropped row-major; the thumbnail is the ORIGINAL image resized to one tile.

Opt-in fast path (``--fast_image_decode``, :func:`fast_dynamic_preprocess`): the grid is still planned
from the original size (the header's, before decoding), so tiles and image tokens are the same in number;
the pixels may come from a JPEG decoded at a DCT scale of 1/2, 1/4 or 1/8 that still covers
:func:`canvas_size`, are resized with PIL's ``reducing_gap``, and the thumbnail is cut from the canvas
rather than the original. Close to the exact tiles (about 44 dB PSNR on photos), not equal to them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from functools import lru_cache

from PIL import Image

__all__ = ["candidate_grids", "plan_tiles", "dynamic_preprocess", "canvas_size", "fast_dynamic_preprocess",
           "REDUCING_GAP"]

_U64 = (1 << 64) - 1
# xxHash-derived constants of CPython's tuple hash (Objects/tupleobject.c, CPython >= 3.8, 64-bit).
_XXPRIME_1 = 11400714785074694791
_XXPRIME_2 = 14029467366897019727
_XXPRIME_5 = 2870177450012600261
# CPython set table parameters (Objects/setobject.c): initial size, linear probe run, perturb shift.
_SET_MINSIZE = 8
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5
# PIL's ``reducing_gap`` of the fast path: an integer box reduction first, only while the remaining bicubic step
# still shrinks at least 3x (PIL's docs: 3.0 is indistinguishable from plain resampling in most cases; 2.0 cost
# ~10 dB PSNR on the thumbnails of crisp text pages for no measurable time).
REDUCING_GAP = 3.0


def _tuple_hash(pair: tuple[int, int]) -> int:
    """CPython's ``hash(pair)`` for a pair of small non-negative ints, as unsigned 64 bits."""
    acc = _XXPRIME_5
    for lane in pair:  # hash(n) == n for 0 <= n < 2**61 - 1
        acc = (acc + lane * _XXPRIME_2) & _U64
        acc = ((acc << 31) | (acc >> 33)) & _U64
        acc = (acc * _XXPRIME_1) & _U64
    acc = (acc + (len(pair) ^ (_XXPRIME_5 ^ 3527539))) & _U64
    return 1546275796 if acc == _U64 else acc  # -1 is reserved for errors in C


def _free_slot(table: list, hash_: int) -> int:
    """First empty slot on CPython's probe sequence for ``hash_`` (nothing is ever deleted)."""
    mask = len(table) - 1
    i = hash_ & mask
    perturb = hash_
    while True:
        run = _LINEAR_PROBES if i + _LINEAR_PROBES <= mask else 0
        for k in range(i, i + run + 1):
            if table[k] is None:
                return k
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


def _cpython_set_order(keys: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    """Iteration order of ``set(keys)`` on CPython: the slot order of its hash table."""
    table: list = [None] * _SET_MINSIZE
    seen: set[tuple[int, int]] = set()
    for key in keys:
        if key in seen:  # re-adding an existing key leaves the table untouched
            continue
        seen.add(key)
        table[_free_slot(table, _tuple_hash(key))] = key
        mask = len(table) - 1
        if len(seen) * 5 >= mask * 3:  # fill reached 3/5: grow to > 4x the used count, re-insert
            min_used = len(seen) * (2 if len(seen) > 50000 else 4)
            size = _SET_MINSIZE
            while size <= min_used:
                size <<= 1
            old, table = table, [None] * size
            for k in old:
                if k is not None:
                    table[_free_slot(table, _tuple_hash(k))] = k
    return [k for k in table if k is not None]


def _official_insertion_order(min_num: int, max_num: int) -> Iterator[tuple[int, int]]:
    """The grids in the order the official nested loops first produce them.

    The official code loops ``n`` from ``min_num`` to ``max_num`` and, for each, every (i, j) with
    i, j <= n, adding the ones whose area is in range. Only first insertions shape the set, and a
    grid is first produced at ``n = max(i, j, min_num)``, so we enumerate just those.
    """

    def in_range(i: int, j: int) -> bool:
        return min_num <= i * j <= max_num

    for i in range(1, min_num + 1):
        for j in range(1, min_num + 1):
            if in_range(i, j):
                yield (i, j)
    for n in range(min_num + 1, max_num + 1):
        for i in range(1, n):
            if in_range(i, n):
                yield (i, n)
        for j in range(1, n + 1):
            if in_range(n, j):
                yield (n, j)


def _as_int(name: str, value: object) -> int:
    """``value`` as a Python int (numpy ints welcome), refusing bools, floats and strings."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _check_range(min_num: object, max_num: object) -> tuple[int, int]:
    min_num, max_num = _as_int("min_num", min_num), _as_int("max_num", max_num)
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    return min_num, max_num


def _positive_int(name: str, value: object) -> int:
    number = _as_int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


@lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    order = _cpython_set_order(_official_insertion_order(min_num, max_num))
    return tuple(sorted(order, key=lambda g: g[0] * g[1]))  # stable: ties keep set order


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All grids ``(cols, rows)`` with ``min_num <= cols*rows <= max_num``, in the official order.

    Sorted by area; within one area, in CPython's set iteration order after the official
    construction (see the module docstring). E.g. max 6 gives ``(1,1),(1,2),(2,1),(3,1),(1,3),...``.
    """
    return list(_candidate_grids(*_check_range(min_num, max_num)))


def plan_tiles(
    width: int,
    height: int,
    min_num: int,
    max_num: int,
    image_size: int,
    use_thumbnail: bool,
) -> tuple[int, int, int]:
    """Choose the grid for a ``width`` x ``height`` image: returns ``(cols, rows, num_tiles)``.

    The grid whose ``cols/rows`` is closest to ``width/height`` wins (strictly closer replaces the
    best so far; exact float ties go to the later grid iff the image has more than half of that
    grid's canvas pixels). Resolution plays no other part: small images are upscaled to many tiles.
    ``num_tiles`` counts the thumbnail, which is added only when ``use_thumbnail`` and the grid has
    more than one tile.
    """
    min_num, max_num = _check_range(min_num, max_num)
    width, height, image_size = (
        _positive_int(name, value)
        for name, value in (("width", width), ("height", height), ("image_size", image_size))
    )
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    blocks = cols * rows
    return cols, rows, blocks + (1 if use_thumbnail and blocks != 1 else 0)


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Cut ``image`` into ``image_size`` square tiles on the grid :func:`plan_tiles` picks.

    Returns the tiles row-major, then the thumbnail (the original image resized to one tile) when
    ``use_thumbnail`` and there is more than one tile. Pass an RGB image (see
    ``transforms.to_rgb``): resizing uses PIL BICUBIC, as the official code does via Pillow's
    default for RGB, and other modes would be resampled differently.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"dynamic_preprocess expects a PIL image, got {type(image).__name__}")
    width, height = image.size
    cols, rows, num_tiles = plan_tiles(width, height, min_num, max_num, image_size, use_thumbnail)
    canvas = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = []
    for row in range(rows):
        for col in range(cols):
            x, y = col * image_size, row * image_size
            tiles.append(canvas.crop((x, y, x + image_size, y + image_size)))
    if num_tiles > len(tiles):
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def canvas_size(
    width: int, height: int, min_num: int, max_num: int, image_size: int, use_thumbnail: bool
) -> tuple[int, int]:
    """``(width, height)`` of the grid canvas :func:`dynamic_preprocess` resizes the image to: the largest
    size any of its tiles is cut from, hence the size a reduced JPEG decode must still cover."""
    cols, rows, _ = plan_tiles(width, height, min_num, max_num, image_size, use_thumbnail)
    return cols * image_size, rows * image_size


def fast_dynamic_preprocess(
    image: Image.Image,
    source_size: tuple[int, int],
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """The tiles of :func:`dynamic_preprocess`, approximately and faster (the opt-in fast image path).

    ``source_size`` is the original image's ``(width, height)``: the grid is planned from it, exactly as the exact
    path does, so the tile count and the image tokens are the same even when ``image`` is a reduced decode (JPEG
    ``draft``) whose rounded-up size has a slightly different aspect. Resizes use ``reducing_gap``
    (:data:`REDUCING_GAP`), and the thumbnail is the canvas resized to one tile (a smaller source than the image).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"fast_dynamic_preprocess expects a PIL image, got {type(image).__name__}")
    width, height = source_size
    cols, rows, num_tiles = plan_tiles(width, height, min_num, max_num, image_size, use_thumbnail)
    canvas = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC,
                          reducing_gap=REDUCING_GAP)
    tiles = [canvas.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if num_tiles > len(tiles):
        tiles.append(canvas.resize((image_size, image_size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP))
    return tiles
