"""Speed of tiled segmentation (``histo.segment.segment_slide``) on a 4096² synthetic image.

The image is a 2048² synthetic oc-rich section at 1.0 µm/px (the working resolution) tiled 2 x 2,
so every pixel is tissue-like content (no glass to skip). The timing covers the whole of
``segment_slide``: network (or classical baseline) on overlapping tiles, tapered blending,
argmax, osteoclast watershed and slide-wide instance labelling. Prints megapixels per second.

    .venv/bin/python benchmarks/bench_segment.py [--model default] [--size 4096] [--tile 768]
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
    t0 = time.perf_counter()
    res = segment_slide(image, model, tile_px=args.tile, overlap_px=args.overlap)
    dt = time.perf_counter() - t0
    mp = image.shape[0] * image.shape[1] / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"segment_slide model={model.name} image={image.shape[1]}x{image.shape[0]} @ "
        f"{model.working_pixel_size_um} µm/px tile={args.tile} overlap={args.overlap} "
        f"threads={args.threads}: {dt:.1f} s, {mp / dt:.2f} MP/s, "
        f"{res.n_osteoclasts} osteoclasts, {res.n_osteocytes} osteocytes, peak RSS {peak:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
