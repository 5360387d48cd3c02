"""``histo synth``: write a synthetic TRAP-stained slide with its ground truth."""

from __future__ import annotations

import argparse
import json

from histo.cli._options import option_values
from histo.cli._progress import progress_bar

HELP = "write a synthetic TRAP-stained slide (OME-TIFF) and its ground truth"
DESCRIPTION = """\
Write a synthetic TRAP-stained bone section as a tiled, pyramidal OME-TIFF carrying its pixel
size, and beside it the ground truth: NAME.classes.tif (class map, codes 0 background, 1 marrow,
2 bone, 3 osteoclast, 4 osteocyte; long bones add 5 cartilage and 6 soft tissue),
NAME.osteoclasts.tif and NAME.osteocytes.tif (instance labels) and NAME.truth.json (the true
indices, same names and units as indices.csv).

--anatomy field (default): a piece of metaphysis. Slides larger than about 2.5 mm are mosaics
of independent section fields, rendered one at a time so memory stays bounded (--size 32768
works).
--anatomy long-bone: a longitudinal section of a mouse proximal tibia / distal femur (growth
plate at the top, 3 mm x 2 mm by default; --size is the long side). Also writes
NAME.regions.tif (1 epiphysis, 2 growth plate, 3 primary spongiosa, 4 secondary spongiosa,
5 cortex, 6 soft tissue) and NAME.standard.tif (the standard region); the truth indices are
those of the standard region.

examples:
  histo synth --phenotype normal --out normal.ome.tif
  histo synth --phenotype oc-poor --size 4096 --pixel-size 0.5 --seed 3 --out poor.ome.tif
  histo synth --phenotype normal --anatomy long-bone --out tibia.ome.tif
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from histo.synth import ANATOMIES, COUNTERSTAINS, PHENOTYPES

    parser.add_argument("--phenotype", required=True, choices=PHENOTYPES)
    parser.add_argument("--out", required=True, metavar="FILE", help="output .ome.tif path")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="PX",
        help="larger side in pixels (field: 2048 square; long bone: 3 mm at the pixel size)",
    )
    parser.add_argument(
        "--anatomy", choices=ANATOMIES, default="field", help="field (default) or long-bone"
    )
    parser.add_argument(
        "--pixel-size", type=float, default=1.0, metavar="UM", help="µm per pixel (1.0)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (0)")
    parser.add_argument(
        "--counterstain", choices=COUNTERSTAINS, default=None, help="random when not given"
    )


def run(args: argparse.Namespace) -> int:
    from histo.synth import write_synthetic_slide

    try:
        with progress_bar(f"synth {args.out}") as progress:
            generator = option_values(
                args, "size", "seed", "counterstain", "anatomy", pixel_size_um="pixel_size"
            )
            truth = write_synthetic_slide(args.out, args.phenotype, progress=progress, **generator)
    except ValueError as exc:  # the generator's own argument checks (pixel size, size)
        raise SystemExit(f"histo synth: error: {exc}") from None
    summary = {k: round(v, 4) for k, v in truth["indices"].items()}
    print(json.dumps({"slide": args.out, "phenotype": args.phenotype, "truth": summary}))
    return 0
