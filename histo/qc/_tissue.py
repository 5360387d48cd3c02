"""Focus of the tissue, and where it is smooth matrix (left out of the nucleus search)."""

from __future__ import annotations

import cv2
import numpy as np

from histo.io.color import summed_od
from histo.qc._stain import OD_FLOOR

#: pre-smoothing (µm) that takes pixel noise and JPEG blocking out of the focus measure
FOCUS_PRESMOOTH_UM = 0.5
#: known extra blur (µm) the focus measure compares against
FOCUS_REBLUR_UM = 1.0
#: bone matrix is smooth at this scale (µm) where marrow is speckled with nuclei
MATRIX_WINDOW_UM = 4.0
#: coefficient of variation of OD below which tissue counts as smooth matrix
MATRIX_MAX_CV = 0.25
#: smooth patches narrower than this (µm) are not bone (trabeculae are 40-60 µm thick in mice)
MATRIX_MIN_WIDTH_UM = 12.0


def _gradient_energy(image: np.ndarray, sigma_px: float, where: np.ndarray) -> float:
    smooth = cv2.GaussianBlur(image, (0, 0), sigma_px)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=1) * 0.5
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=1) * 0.5
    return float(np.mean((gx * gx + gy * gy)[where]))


def blur_um(
    tiles: list[np.ndarray], pixel_size_um: float, od_sums: list[np.ndarray] | None = None
) -> float:
    """Apparent blur of the tissue (Gaussian sigma, µm), by re-blurring.

    A Gaussian-blurred edge of width ``s`` carries gradient energy proportional to ``1 / s``;
    blurring it further by a known ``r`` lowers the energy by ``sqrt(s^2 + r^2) / s``. The
    ratio of the tissue's gradient energy before and after a known blur thus measures ``s`` in
    µm, whatever the contrast and the pixel size (Crete-Roffet et al., SPIE 2007;6492 use the
    same idea). ``od_sums``: the tiles' summed OD when the caller has them. Returns NaN
    without tissue.
    """
    p, r = FOCUS_PRESMOOTH_UM, FOCUS_REBLUR_UM
    before, after = 0.0, 0.0
    if od_sums is None:
        od_sums = [summed_od(tile) for tile in tiles]
    for od in od_sums:
        where = cv2.GaussianBlur(od, (0, 0), 2.0 / pixel_size_um) > OD_FLOOR
        if where.sum() < 1000:
            continue
        before += _gradient_energy(od, p / pixel_size_um, where) * where.sum()
        after += _gradient_energy(od, np.hypot(p, r) / pixel_size_um, where) * where.sum()
    if before <= 0 or after <= 0:
        return float("nan")
    q2 = (before / after) ** 2
    if q2 <= 1.0:
        return float("inf")
    return float(np.sqrt(max(r * r / (q2 - 1.0) - p * p, 0.0)))


def matrix_mask(
    tile: np.ndarray, pixel_size_um: float, od_sum: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, stained) masks of one tile: smooth wide stained patches, and stained tissue.

    Marrow is speckled with nuclei a few µm apart; bone matrix is smooth between osteocyte
    lacunae 20-30 µm apart. Smooth stained patches wider than :data:`MATRIX_MIN_WIDTH_UM`
    count as matrix. ``od_sum``, the tile's summed optical density, is computed when not given.
    """
    sigma = MATRIX_WINDOW_UM / pixel_size_um
    radius = max(1, int(round(MATRIX_MIN_WIDTH_UM / 2 / pixel_size_um)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    od = summed_od(tile) if od_sum is None else od_sum
    mean = cv2.GaussianBlur(od, (0, 0), sigma)
    sq = cv2.GaussianBlur(od * od, (0, 0), sigma)
    cv = np.sqrt(np.clip(sq - mean * mean, 0.0, None)) / np.maximum(mean, 1e-3)
    stained = mean > OD_FLOOR
    smooth = (stained & (cv < MATRIX_MAX_CV)).astype(np.uint8)
    return cv2.morphologyEx(smooth, cv2.MORPH_OPEN, disk).astype(bool), stained
