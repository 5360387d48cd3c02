"""Block-wise access to 2-D array-likes (numpy, zarr): the unit of bounded-memory work.

A map is tiled by :func:`iter_blocks` into cores that cover it once, each read with a margin
(its window); :class:`Prefetch` reads the next block in a thread while one is worked on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from histo.errors import ClassMapError

__all__ = ["Block", "Prefetch", "downsample_nearest", "iter_blocks", "read_2d", "shape_2d"]


@dataclass(frozen=True)
class Block:
    """One block: its core (owned pixels) and its window (core plus margin, clipped).

    Attributes
    ----------
    y0, y1, x0, x1 : int
        Core rows [y0, y1) and columns [x0, x1) in pixels of the map.
    wy0, wy1, wx0, wx1 : int
        Window rows and columns (the core grown by the margin, clipped to the map).
    """

    y0: int
    y1: int
    x0: int
    x1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    @property
    def core(self) -> tuple[slice, slice]:
        """The core as slices of the window."""
        return (
            slice(self.y0 - self.wy0, self.y1 - self.wy0),
            slice(self.x0 - self.wx0, self.x1 - self.wx0),
        )

    @property
    def window(self) -> tuple[slice, slice]:
        """The window as slices of the map."""
        return slice(self.wy0, self.wy1), slice(self.wx0, self.wx1)

    def grown(self, margin: int) -> tuple[slice, slice]:
        """The core grown by ``margin`` px (clipped to the window), as slices of the window."""
        return (
            slice(
                max(self.y0 - margin, self.wy0) - self.wy0,
                min(self.y1 + margin, self.wy1) - self.wy0,
            ),
            slice(
                max(self.x0 - margin, self.wx0) - self.wx0,
                min(self.x1 + margin, self.wx1) - self.wx0,
            ),
        )


def iter_blocks(shape: tuple[int, int], block_px: int, margin_px: int = 0) -> Iterator[Block]:
    """Blocks of ``block_px`` tiling ``shape`` in raster order, each with a window of margin.

    Parameters
    ----------
    shape : (int, int)
        (H, W) in pixels.
    block_px : int
        Core side in pixels (the last row and column of blocks may be smaller).
    margin_px : int
        Margin of the window around each core, in pixels.
    """
    h, w = int(shape[0]), int(shape[1])
    b = max(int(block_px), 1)
    m = max(int(margin_px), 0)
    for y0 in range(0, h, b):
        y1 = min(y0 + b, h)
        for x0 in range(0, w, b):
            x1 = min(x0 + b, w)
            yield Block(
                y0, y1, x0, x1, max(y0 - m, 0), min(y1 + m, h), max(x0 - m, 0), min(x1 + m, w)
            )


def read_2d(array: Any, ys: slice, xs: slice) -> np.ndarray:
    """``array[ys, xs]`` as a 2-D numpy array (a trailing axis of length 1 is dropped)."""
    out = np.asarray(array[ys, xs])
    if out.ndim == 3 and out.shape[-1] == 1:
        out = out[..., 0]
    return out


def shape_2d(array: Any) -> tuple[int, int]:
    """(H, W) of a 2-D array-like (or (H, W, 1)); ClassMapError for any other shape."""
    shape = tuple(int(n) for n in array.shape)
    if len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    if len(shape) != 2:
        raise ClassMapError(f"class map must be 2-D (H, W), got shape {shape}")
    return shape  # type: ignore[return-value]


def downsample_nearest(array: Any, shape: tuple[int, int], band_px: int = 1024) -> np.ndarray:
    """Nearest-neighbour resample of a 2-D array-like to ``shape``, read band by band.

    Output pixel i samples input pixel ``floor(i * H / h)`` (the ``cv2.INTER_NEAREST`` grid);
    only rows that are sampled are read, at most ``band_px`` rows of the input at a time.
    """
    h, w = shape_2d(array)
    oh, ow = int(shape[0]), int(shape[1])
    rows = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int64), w - 1)
    out = None
    for start in range(0, oh, max(1, band_px // max(1, h // oh))):
        stop = min(oh, start + max(1, band_px // max(1, h // oh)))
        r0, r1 = int(rows[start]), int(rows[stop - 1]) + 1
        band = read_2d(array, slice(r0, r1), slice(0, w))
        part = band[rows[start:stop] - r0][:, cols]
        if out is None:
            out = np.zeros((oh, ow), part.dtype)
        out[start:stop] = part
    assert out is not None
    return out


class Prefetch:
    """``(block, fetch(block))`` for each block, fetching the next block in a thread while the
    caller works on this one (reads overlap computation; two blocks in memory at most).

    A context manager: leaving it (also on an error) waits for the read in flight, so no
    read outlives the arrays. One reading thread: no array is read by two threads at once.
    """

    def __init__(self, blocks: list[Block], fetch: Callable[[Block], Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.blocks = blocks
        self.fetch = fetch
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histo-measure-read")

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[tuple[Block, Any]]:
        if not self.blocks:
            return
        pending = self.pool.submit(self.fetch, self.blocks[0])
        for k, b in enumerate(self.blocks):
            data = pending.result()
            if k + 1 < len(self.blocks):
                pending = self.pool.submit(self.fetch, self.blocks[k + 1])
            yield b, data
