"""Make docs/synthetic.png: a full-resolution crop of each phenotype and counterstain.

Run: .venv/bin/python -m benchmarks.synth_gallery
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from histo.synth import make_section

CROP = 512


def main(out: str = "docs/synthetic.png") -> None:
    rows = []
    for phenotype, seed in (("normal", 21), ("oc-rich", 22), ("oc-poor", 23)):
        tiles = []
        for counterstain in ("hematoxylin", "fast-green", "methyl-green"):
            s = make_section(phenotype, 1536, 1.0, seed=seed, counterstain=counterstain)
            # the crop with most bone surface, at full resolution (1 µm/px)
            best, best_score = (0, 0), -1
            for y in range(256, 1536 - CROP - 256, 128):
                for x in range(256, 1536 - CROP - 256, 128):
                    c = s.class_map[y : y + CROP, x : x + CROP]
                    score = (c == 3).sum() * 5 + (c == 2).sum() ** 0.5 * (c == 1).sum() ** 0.5
                    if score > best_score:
                        best, best_score = (y, x), score
            y, x = best
            tile = s.image[y : y + CROP, x : x + CROP].copy()
            label = f"{phenotype} / {counterstain}"
            cv2.putText(tile, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 3)
            cv2.putText(tile, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 1)
            cv2.line(tile, (CROP - 120, CROP - 20), (CROP - 20, CROP - 20), (0, 0, 0), 4)
            cv2.putText(
                tile, "100 um", (CROP - 120, CROP - 30), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1
            )
            tiles.append(tile)
        rows.append(np.hstack(tiles))
    img = np.vstack(rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(out, img[..., ::-1])
    print(f"wrote {out} {img.shape}")


if __name__ == "__main__":
    main()
