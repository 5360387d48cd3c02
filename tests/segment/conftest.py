"""Fixtures of the segmentation tests: drawn shapes whose answer is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

#: colours of the drawn test image (RGB)
BLUE_GREY = (150, 160, 185)  # bone-like smooth matrix
RED = (150, 20, 60)  # TRAP+ red-violet
DARK = (60, 50, 90)  # osteocyte lacuna with its nucleus
#: red discs (row, column, radius) of ``drawn_shapes``: osteoclasts, some on tile borders and
#: two of them touching
DISCS = [
    (120, 130, 18),
    (250, 256, 20),
    (384, 384, 22),
    (500, 700, 16),
    (600, 200, 19),
    (200, 620, 17),
]


@pytest.fixture(scope="session")
def drawn_shapes():
    """A 700 x 900 px blue-grey field (bone) with red discs (osteoclasts, two of them
    touching) and small dark ellipses (lacunae), some on tile borders of 256/384/512 px."""
    rng = np.random.default_rng(0)
    img = np.empty((700, 900, 3), np.uint8)
    img[:] = BLUE_GREY
    img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    discs = DISCS
    for y, x, r in discs:
        cv2.circle(img, (x, y), r, RED, -1)
    lacunae = [
        (60, 60),
        (256, 100),
        (300, 512),
        (384, 600),
        (640, 640),
        (512, 300),
        (100, 800),
        (450, 850),
    ]
    for y, x in lacunae:
        cv2.ellipse(img, (x, y), (5, 3), 30, 0, 360, DARK, -1)
    return img, len(discs), len(lacunae)
