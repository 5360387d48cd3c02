"""Speed of tiled segmentation (``histo.segment.segment_slide``) on a 4096² synthetic image.

The image is a 2048² synthetic oc-rich section at 1.0 µm/px (the working resolution) tiled 2 x 2,
so every pixel is tissue-like content (no glass to skip). The timing covers the whole of
``segment_slide``: network (or classical baseline) on overlapping tiles, tapered blending,
argmax, osteoclast watershed and slide-wide instance labelling. Prints megapixels per second
and CPU seconds (the process's, all threads) of each of ``--repeat`` runs, and the network's
own share: ``predict_scores`` on the same tiles one after the other (``--network``).

    .venv/bin/python benchmarks/bench_segment.py [--model default] [--size 4096] [--tile 768] \
        [--repeat 3] [--network]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=768)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--network", action="store_true", help="also time the network alone")
    args = parser.parse_args(argv)

    import torch

    from histo.runtime import tune_gc, tune_malloc
    from histo.segment import load_model, segment_slide
    from histo.synth import make_section

    # the process settings of the ``histo`` command (this script is an entry point too)
    tune_malloc()
    tune_gc()
    torch.set_num_threads(args.threads)
    half = args.size // 2
    sec = make_section(
        "oc-rich", size=half, pixel_size_um=1.0, seed=4242, counterstain="hematoxylin"
    )
    image = np.ascontiguousarray(np.tile(sec.image, (2, 2, 1))[: args.size, : args.size])
    model = load_model(args.model)
    segment_slide(image[:512, :512], model, tile_px=512, overlap_px=args.overlap)  # warm-up
    mp = image.shape[0] * image.shape[1] / 1e6
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        res = segment_slide(image, model, tile_px=args.tile, overlap_px=args.overlap)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"segment_slide model={model.name} image={image.shape[1]}x{image.shape[0]} @ "
            f"{model.working_pixel_size_um} µm/px tile={args.tile} overlap={args.overlap} "
            f"threads={args.threads}: {dt:.2f} s ({cpu:.2f} CPU s), {mp / dt:.2f} MP/s, "
            f"{res.n_osteoclasts} osteoclasts, {res.n_osteocytes} osteocytes, "
            f"peak RSS {peak:.0f} MB"
        )
    if args.network:
        _time_network(model, image, args.tile, args.overlap, args.repeat)
    return 0


def _time_network(model, image: np.ndarray, tile: int, overlap: int, repeat: int) -> None:
    """``predict_scores`` on the tiles segment_slide runs, one after the other."""
    from histo.segment.tiled import TileSchedule

    schedule = TileSchedule.plan(image.shape[:2], tile, overlap, 1.0, 10**9, 1)
    tiles = [np.ascontiguousarray(image[y : y + h, x : x + w]) for y, x, h, w in schedule.jobs()]
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        for t in tiles:
            model.predict_scores(t)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"network alone: {len(tiles)} tiles, {dt:.2f} s ({cpu:.2f} CPU s)")


if __name__ == "__main__":
    raise SystemExit(main())
