"""Tissue detection: a section on glass with dust is found, dust and glass are not."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histo.io import detect_tissue, iter_tiles, slide_from_array
from histo.io.tissue import TissueMask


def _glass(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(246, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def _section_on_glass(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A 4 x 6 mm field at 4 µm/px: an elliptical section (marrow-pink with bone-blue
    patches and white adipocyte holes) and dark dust specks on glass. Returns the image and
    the section's mask."""
    h, w = 1000, 1500
    rng = np.random.default_rng(seed)
    image = _glass(h, w, seed)
    blob = np.zeros((h, w), np.uint8)
    cv2.ellipse(blob, (700, 480), (450, 300), 20, 0, 360, 1, -1)
    blob = blob.astype(bool)
    tissue = np.clip(rng.normal((205, 150, 185), 18, (h, w, 3)), 0, 255).astype(np.uint8)
    bone = np.zeros((h, w), np.uint8)
    for _ in range(25):
        cv2.circle(
            bone,
            (int(rng.integers(350, 1050)), int(rng.integers(250, 700))),
            int(rng.integers(10, 40)),
            1,
            -1,
        )
    tissue[bone.astype(bool)] = (170, 190, 225)
    image[blob] = tissue[blob]
    for _ in range(200):  # adipocyte ghosts, 20-50 µm: white holes inside the section
        cy, cx = int(rng.integers(250, 700)), int(rng.integers(350, 1050))
        if blob[cy, cx]:
            cv2.circle(image, (cx, cy), int(rng.integers(3, 7)), (247, 246, 248), -1)
    for _ in range(40):  # dust: 8-40 µm dark specks on the glass
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        if not blob[max(0, cy - 20) : cy + 20, max(0, cx - 20) : cx + 20].any():
            cv2.circle(image, (cx, cy), int(rng.integers(1, 5)), (60, 60, 60), -1)
    return image, blob


def test_section_found_dust_excluded():
    image, blob = _section_on_glass()
    slide = slide_from_array(image, 4.0)
    tissue = detect_tissue(slide, 16.0)
    assert isinstance(tissue, TissueMask)
    assert tissue.pixel_size_um == 16.0
    assert tissue.mask.shape == (250, 375)
    truth = cv2.resize(blob.astype(np.uint8), (375, 250), interpolation=cv2.INTER_AREA) > 0.5
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.95
    assert not (tissue.mask & ~cv2.dilate(truth.astype(np.uint8), np.ones((5, 5)))).any()
    assert tissue.tissue_fraction == pytest.approx(truth.mean(), rel=0.05)
    area_mm2 = np.pi * 1.8 * 1.2  # ellipse semi-axes 450 and 300 px at 4 µm
    assert tissue.tissue_area_mm2 == pytest.approx(area_mm2, rel=0.05)
    mask, size = tissue  # unpacks like the (mask, pixel size) of docs/internals.md
    assert mask is tissue.mask and size == 16.0


def test_blank_slide_gives_empty_mask():
    slide = slide_from_array(_glass(800, 800, 3), 2.0)
    tissue = detect_tissue(slide)
    assert tissue.is_empty
    assert tissue.tissue_fraction == 0.0
    white = slide_from_array(np.full((300, 300, 3), 255, np.uint8), 2.0)
    assert detect_tissue(white).is_empty


def test_array_input_and_tile_skipping():
    image, blob = _section_on_glass(seed=2)
    tissue = detect_tissue(image, 16.0, image_pixel_size_um=4.0)
    slide = slide_from_array(image, 4.0)
    all_tiles = list(iter_tiles(slide, 4.0, 256, 32))
    kept = list(iter_tiles(slide, 4.0, 256, 32, tissue=tissue))
    assert 0 < len(kept) < len(all_tiles)
    for tile in kept:
        assert blob[tile.core].any() or blob[tile.y : tile.y + 256, tile.x : tile.x + 256].any()


def test_a_field_inside_pale_tissue_is_all_tissue():
    """No glass in the frame: pale marrow-like tissue edge to edge with small dark specks.
    Otsu's split falls between the tissue and the specks; the whole field is tissue."""
    rng = np.random.default_rng(4)
    image = np.clip(rng.normal((215, 200, 212), 6, (500, 500, 3)), 0, 255).astype(np.uint8)
    for _ in range(60):  # dark cells of 40 µm: each far below the smallest piece of tissue
        cy, cx = (int(v) for v in rng.integers(10, 490, 2))
        cv2.circle(image, (cx, cy), 5, (90, 60, 110), -1)
    tissue = detect_tissue(image, 16.0, image_pixel_size_um=4.0)
    # all but the frame's outer 2 pixels, which closing with an empty border takes off
    assert tissue.tissue_fraction > 0.9
    assert tissue.threshold_od == pytest.approx(0.06)
