"""Read speed and memory of histo.io on a 16k x 16k JPEG-compressed pyramidal OME-TIFF.

Writes the slide (0.5 µm/px, 512-px JPEG tiles, levels 1/2 ... 1/16 in SubIFDs) to a temporary
folder in a child process, then reads every tile of the whole slide at several working
resolutions with ``histo.io.read_tile`` and prints megapixels per second (output pixels) and
the peak resident memory of the reading process.

    .venv/bin/python benchmarks/bench_read.py [--size 16384] [--keep DIR]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from histo.io._levels import CHUNK_CACHE_BYTES

TILE = 512
PIXEL_SIZE_UM = 0.5


def _tile_bank(seed: int = 0, n: int = 16) -> list[np.ndarray]:
    """A few textured RGB tiles (pinkish tissue with nuclei-like blobs) reused across the
    slide, so that writing is quick but JPEG sees realistic content."""
    import cv2

    rng = np.random.default_rng(seed)
    bank = []
    for _ in range(n):
        base = rng.normal((215, 160, 190), 15, (TILE, TILE, 3))
        for _ in range(120):
            cy, cx = rng.integers(0, TILE, 2)
            cv2.circle(base, (int(cx), int(cy)), int(rng.integers(3, 9)), (90, 60, 140), -1)
        bank.append(np.clip(cv2.GaussianBlur(base, (0, 0), 1.2), 0, 255).astype(np.uint8))
    return bank


def write_slide(path: Path, size: int) -> None:
    """Write the benchmark slide from iterators of tiles (bounded memory)."""
    import tifffile

    bank = _tile_bank()
    n_levels = 5

    def tiles(level_size: int):
        per_row = -(-level_size // TILE)
        for i in range(per_row):
            for j in range(per_row):
                yield bank[(i * 7 + j * 3) % len(bank)]

    opts = dict(
        tile=(TILE, TILE),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 85},
        dtype=np.uint8,
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            tiles(size),
            shape=(size, size, 3),
            subifds=n_levels - 1,
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": PIXEL_SIZE_UM,
                "PhysicalSizeY": PIXEL_SIZE_UM,
            },
            **opts,
        )
        for k in range(1, n_levels):
            s = size >> k
            tif.write(tiles(s), shape=(s, s, 3), subfiletype=1, **opts)


def bench(path: Path, resolutions: list[float]) -> list[dict]:
    from histo.io import choose_level, iter_tiles, open_slide, read_tile

    rows = []
    slide = open_slide(path)
    for ps in resolutions:
        t0 = time.perf_counter()
        n_tiles = 0
        checksum = 0
        for tile in iter_tiles(slide, ps, TILE, 0):
            block = read_tile(slide, tile)
            checksum += int(block[0, 0, 0])
            n_tiles += 1
        dt = time.perf_counter() - t0
        mp = n_tiles * TILE * TILE / 1e6
        rows.append(
            {
                "um_per_px": ps,
                "level": choose_level(slide, ps),
                "tiles": n_tiles,
                "MP": mp,
                "s": dt,
                "MP/s": mp / dt,
            }
        )
    slide.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="slide side in pixels")
    parser.add_argument("--keep", type=Path, help="write the slide here and keep it")
    parser.add_argument(
        "--resolutions",
        type=float,
        nargs="+",
        default=[1.0, 0.5, 0.7, 2.0],
        help="working resolutions to read at (µm/px)",
    )
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_only:
        write_slide(args.write_only, args.size)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"bench_{args.size}.ome.tif"
        if not path.exists():
            t0 = time.perf_counter()
            # written by a child process so that its memory is not counted below
            subprocess.run(
                [sys.executable, __file__, "--size", str(args.size), "--write-only", str(path)],
                check=True,
            )
            print(
                f"wrote {path.name}: {args.size}x{args.size} RGB, "
                f"{path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s"
            )
        import histo.io  # noqa: F401  (imports count in the baseline, not in reading)

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = bench(path, args.resolutions)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"\nread_tile over the whole slide, {TILE}-px tiles, level 0 = {PIXEL_SIZE_UM} µm/px")
    print(f"{'µm/px':>6} {'level':>5} {'tiles':>6} {'MP':>8} {'s':>7} {'MP/s':>7}")
    for r in rows:
        print(
            f"{r['um_per_px']:>6.2f} {r['level']:>5d} {r['tiles']:>6d} {r['MP']:>8.1f} "
            f"{r['s']:>7.2f} {r['MP/s']:>7.1f}"
        )
    print(
        f"\npeak RSS of the reading process: {peak:.0f} MiB "
        f"(after imports, before reading: {rss_before:.0f} MiB; tile cache "
        f"{CHUNK_CACHE_BYTES / 2**20:.0f} MiB per level)"
    )


if __name__ == "__main__":
    main()
