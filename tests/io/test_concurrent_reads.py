"""One opened slide read from several threads at once gives the pixels of reads one by one
(the segmentation reads its tiles ahead in a thread of its own; a caller may read the same
opened slide meanwhile)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from histo.io import _levels, open_slide, read_region, slide_from_array

#: (y0 µm, x0 µm, h px, w px, µm/px as a multiple of level 0's): overlapping windows at
#: several resolutions, so that reads share stored tiles and span pyramid levels
WINDOWS = [
    (y, x, 96, 128, scale)
    for scale in (0.5, 1.0, 2.0, 3.0)
    for y in (0.0, 37.0, 150.0)
    for x in (0.0, 91.0, 260.0)
]


def _read_all(slide, order) -> list[np.ndarray]:
    ps = slide.pixel_size_um
    return [read_region(slide, y * ps, x * ps, h, w, s * ps) for y, x, h, w, s in order]


@pytest.mark.parametrize(
    "kind", ["ome", "svs", "ndpi", "tiled", "strip", "zarr3", "zarr2", "png", "jpeg", "array"]
)
def test_threads_reading_one_slide_get_the_pixels_of_reads_one_by_one(
    files, rgb, kind, monkeypatch
):
    def opened():
        if kind == "array":
            return slide_from_array(rgb, pixel_size_um=0.5)
        return open_slide(files[kind], pixel_size_um=0.5 if kind in ("png", "jpeg") else None)

    with opened() as alone:
        expected = _read_all(alone, WINDOWS)
    # a cache of a few tiles: threads evict each other's tiles and decode them again
    monkeypatch.setattr(_levels, "CHUNK_CACHE_BYTES", 3 * 128 * 128 * 3)
    n_threads, rounds = 4, 3
    start = threading.Barrier(n_threads)

    def reader(k: int) -> list[np.ndarray]:
        start.wait(10)
        got = []
        for r in range(rounds):
            order = WINDOWS[k + r :] + WINDOWS[: k + r]  # each thread starts elsewhere
            got.append(dict(zip(map(tuple, order), _read_all(slide, order), strict=True)))
        return got

    with opened() as slide, ThreadPoolExecutor(n_threads) as pool:
        results = list(pool.map(reader, range(n_threads)))
    for per_thread in results:
        for by_window in per_thread:
            for window, want in zip(WINDOWS, expected, strict=True):
                assert np.array_equal(by_window[tuple(window)], want), (kind, window)
