"""Speed of ``histo.measure.measure`` on 4-megapixel (2048²) class maps.

Three maps: a synthetic oc-rich section and a synthetic normal section at 1.0 µm/px (with their
instance maps and RGB image), and a dense random texture (bone fraction 50 %, about 10x the
bone perimeter of a real section: the worst case of the contour estimator). Prints the median of
``--repeat`` runs for each, with and without the image (nuclei, TRAP signal, lacuna occupancy).
Not a timed test: the target is well under a second per 4 MP map.

    .venv/bin/python benchmarks/bench_measure.py [--size 2048] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage as ndi

from histo import classes
from histo.measure import measure


def _texture(size: int, seed: int = 0) -> np.ndarray:
    """Random bone/marrow texture with lacunae and TRAP+ blobs (a worst case for perimeters)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 6)
    cmap = np.where(field > 0, classes.BONE, classes.MARROW).astype(np.uint8)
    spots = ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 2)
    cmap[(spots > 0.35) & (cmap == classes.BONE) & (field > 0.05)] = classes.OSTEOCYTE
    cmap[(spots < -0.4) & (cmap == classes.MARROW)] = classes.OSTEOCLAST
    cmap[:8] = classes.BACKGROUND
    return cmap


def _time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from histo.synth import make_section

    cases = []
    for phenotype in ("oc-rich", "normal"):
        s = make_section(phenotype, args.size, 1.0, seed=7)
        cases.append(
            (
                f"synthetic {phenotype}",
                s.class_map,
                s.osteoclast_labels,
                s.osteocyte_labels,
                s.image,
            )
        )
    cases.append(("random texture", _texture(args.size), None, None, None))

    mp = args.size * args.size / 1e6
    print(
        f"measure() on {args.size}x{args.size} class maps ({mp:.1f} MP), median of "
        f"{args.repeat} runs"
    )
    for name, cmap, oc, ot, image in cases:
        m = measure(cmap, 1.0, osteoclast_labels=oc, osteocyte_labels=ot)
        t_plain = _time(
            lambda cmap=cmap, oc=oc, ot=ot: measure(
                cmap, 1.0, osteoclast_labels=oc, osteocyte_labels=ot
            ),
            args.repeat,
        )
        line = (
            f"  {name:18s} class map only {t_plain:6.3f} s "
            f"(B.Pm {m.indices['B.Pm']:.1f} mm, N.Oc {m.indices['N.Oc']}, "
            f"N.Ot {m.indices['N.Ot']})"
        )
        if image is not None:
            t_image = _time(
                lambda cmap=cmap, oc=oc, ot=ot, image=image: measure(
                    cmap, 1.0, osteoclast_labels=oc, osteocyte_labels=ot, image=image
                ),
                args.repeat,
            )
            line += f"; with image {t_image:6.3f} s"
        print(line)


if __name__ == "__main__":
    main()
