"""docs/longbone.png: a synthetic long-bone section with its standard region outlined.

PYTHONPATH=. python benchmarks/longbone_figure.py [OUT.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from histo.regions import find_regions
from histo.synth import make_section


def main(out: str = "docs/longbone.png") -> None:
    s = make_section(
        "normal", pixel_size_um=1.0, seed=1, anatomy="long-bone", counterstain="hematoxylin"
    )
    found = find_regions(s.class_map, 1.0).regions
    img = np.ascontiguousarray(np.rot90(s.image, -1))  # growth plate on the left: a wide figure
    for mask, colour in ((found.standard, (255, 220, 0)), (found.growth_plate, (190, 60, 255))):
        m = np.ascontiguousarray(np.rot90(mask, -1)).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, colour, 10)
    small = cv2.resize(img, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(out, small[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])


if __name__ == "__main__":
    main(*sys.argv[1:])
