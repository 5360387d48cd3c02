"""Classical baseline: colour, thresholds and morphology, as threshold-based tools work.

What TrapHisto (ImageJ thresholds) or a QuPath pixel classifier with positive-cell detection do,
written down as a segmenter with the network's interface, so that the network has a bar to clear:

1. **Glass**: bright, unsaturated pixels in large connected regions (adipocyte ghosts inside the
   marrow are small and stay tissue).
2. **TRAP+ osteoclasts**: red to red-violet hue (HSV hue 300-10°), saturated and not pale,
   at least ``min_osteoclast_um2`` in area and touching bone (the counting rule; mononuclear
   precursors in the marrow are too small or off bone).
3. **Bone vs marrow**: bone matrix is smooth; marrow is a dense texture of nuclei and gaps.
   Local coefficient of variation of the optical density (Gaussian window, TRAP+ cells and glass
   left out) below a fixed threshold, cleaned by opening/closing and hole filling.
4. **Osteocyte lacunae**: small blobs inside bone that differ from the local bone colour
   (darker nucleus or paler empty lacuna), 8-150 µm².

Touching osteoclasts are split like a classical pipeline does, by the distance transform
(returned as the centre map).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo.classes import BACKGROUND, BONE, MARROW, OSTEOCLAST, OSTEOCYTE
from histo.io.color import optical_density
from histo.segment import Segmenter


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[lab]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    return mask | ~_remove_small(~mask, max_px + 1) & ~mask & _bounded(~mask)


def _bounded(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` components that do not touch the array border."""
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    inner = np.ones(n, bool)
    inner[border] = False
    inner[0] = False
    return inner[lab]


def _trap_positive(
    hue: np.ndarray, sat: np.ndarray, val: np.ndarray, tissue: np.ndarray
) -> np.ndarray:
    """TRAP+ pixels: red to red-violet hue (degrees), saturated, not pale, in tissue."""
    red_hue = (hue >= 290) | (hue <= 12)
    trap = red_hue & (sat > 0.18) & (val < 0.75) & tissue
    trap = cv2.morphologyEx(trap.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    return cv2.morphologyEx(trap.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8)) > 0


class ClassicalSegmenter(Segmenter):
    """Threshold-and-morphology baseline (see module docstring).

    Parameters are in µm so the baseline works at any working resolution.
    """

    def __init__(
        self,
        working_pixel_size_um: float = 1.0,
        glass_min_um2: float = 4000.0,
        min_osteoclast_um2: float = 150.0,
        texture_sigma_um: float = 6.0,
        lacuna_min_um2: float = 8.0,
        lacuna_max_um2: float = 150.0,
        smooth_cv: float = 0.32,
    ) -> None:
        self.name = "classical"
        self.working_pixel_size_um = float(working_pixel_size_um)
        self.n_outputs = 6
        self.glass_min_um2 = glass_min_um2
        self.min_osteoclast_um2 = min_osteoclast_um2
        self.texture_sigma_um = texture_sigma_um
        self.lacuna_min_um2 = lacuna_min_um2
        self.lacuna_max_um2 = lacuna_max_um2
        self.smooth_cv = smooth_cv

    def classify(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class map of one RGB field at the working resolution."""
        rgb = np.ascontiguousarray(np.asarray(rgb)[..., :3], dtype=np.uint8)
        od_sum = optical_density(rgb, base=math.e).sum(-1)
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        hue = hsv[..., 0].astype(np.int16) * 2  # degrees
        sat = hsv[..., 1].astype(np.float32) / 255.0
        val = hsv[..., 2].astype(np.float32) / 255.0
        glass = self._glass(od_sum, sat)
        tissue = ~glass
        trap = _trap_positive(hue, sat, val, tissue)
        bone, bone_filled = self._bone(od_sum, tissue, trap)
        osteoclast = self._osteoclasts(trap, bone_filled)
        lacuna = self._lacunae(od_sum, bone, bone_filled)
        cm = np.full(rgb.shape[:2], MARROW, np.uint8)
        cm[glass] = BACKGROUND
        cm[bone_filled] = BONE
        cm[lacuna] = OSTEOCYTE
        cm[osteoclast] = OSTEOCLAST
        return cm

    def _glass(self, od_sum: np.ndarray, sat: np.ndarray) -> np.ndarray:
        """Bright, unsaturated pixels in large regions (adipocytes enclosed by tissue are
        small: they stay tissue)."""
        px = self.working_pixel_size_um
        smooth_od = cv2.GaussianBlur(od_sum, (0, 0), 2.0 / px)
        smooth_sat = cv2.GaussianBlur(sat, (0, 0), 2.0 / px)
        bright = (smooth_od < 0.45) & (smooth_sat < 0.07)
        return _remove_small(bright, self.glass_min_um2 / (px * px))

    def _bone(
        self, g: np.ndarray, tissue: np.ndarray, trap: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bone by texture: smooth matrix against the dense nuclei of marrow. Returns the
        bone and the bone with its small holes filled (lacunae), TRAP+ pixels left out."""
        px = self.working_pixel_size_um
        a = px * px  # µm² per pixel
        s = self.texture_sigma_um / px
        # normalised convolution: TRAP+ cells and glass do not count in a pixel's texture
        wmask = (tissue & ~trap).astype(np.float32)
        norm = cv2.GaussianBlur(wmask, (0, 0), s) + 1e-4
        mean = cv2.GaussianBlur(g * wmask, (0, 0), s) / norm
        sq = cv2.GaussianBlur(g * g * wmask, (0, 0), s) / norm
        # coefficient of variation: scale-free, so it works for pale and dark counterstains
        local_cv = np.log(np.sqrt(np.maximum(sq - mean * mean, 0)) / (mean + 0.05) + 1e-3)
        region = tissue & ~trap
        # a fixed threshold (not Otsu per field) keeps the result independent of the tiling
        smooth = region & (local_cv < float(np.log(self.smooth_cv)))
        k = max(1, int(round(4 / px)))
        ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        bone = cv2.morphologyEx(smooth.astype(np.uint8), cv2.MORPH_OPEN, ker) > 0
        bone = cv2.morphologyEx(bone.astype(np.uint8), cv2.MORPH_CLOSE, ker) > 0
        bone &= tissue
        bone = _remove_small(bone, 400.0 / a)
        return bone, _fill_small_holes(bone, 800.0 / a) & ~trap

    def _osteoclasts(self, trap: np.ndarray, bone_filled: np.ndarray) -> np.ndarray:
        """TRAP+ objects big enough and touching bone."""
        px = self.working_pixel_size_um
        a = px * px
        trap = _remove_small(trap, self.min_osteoclast_um2 / a)
        near_bone = cv2.dilate(bone_filled.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        n, lab = cv2.connectedComponents(trap.astype(np.uint8), connectivity=8)
        touching = np.zeros(n, bool)
        touching[np.unique(lab[trap & near_bone])] = True
        touching[0] = False
        return touching[lab]

    def _lacunae(self, g: np.ndarray, bone: np.ndarray, bone_filled: np.ndarray) -> np.ndarray:
        """Blobs in bone off the local bone colour, of a lacuna's size."""
        px = self.working_pixel_size_um
        a = px * px
        inside = cv2.erode(bone_filled.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        bg = cv2.medianBlur(
            np.clip(g * 80, 0, 255).astype(np.uint8), max(3, int(round(15 / px)) | 1)
        )
        diff = np.abs(np.clip(g * 80, 0, 255) - bg.astype(np.float32))
        cand = (diff > 25) & inside | (bone_filled & ~bone)
        cand = (
            cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
        )
        n, lab, stats, _ = cv2.connectedComponentsWithStats(cand.astype(np.uint8), connectivity=8)
        area = stats[:, cv2.CC_STAT_AREA] * a
        ok = (area >= self.lacuna_min_um2) & (area <= self.lacuna_max_um2)
        ok[0] = False
        return ok[lab] & bone_filled

    def predict_scores(self, rgb: np.ndarray) -> np.ndarray:
        cm = self.classify(rgb)
        h, w = cm.shape
        scores = np.zeros((6, h, w), np.float32)
        for c in range(5):
            scores[c] = cm == c
        oc = cm == OSTEOCLAST
        if oc.any():
            dist = cv2.distanceTransform(oc.astype(np.uint8), cv2.DIST_L2, 3)
            n, lab = cv2.connectedComponents(oc.astype(np.uint8), connectivity=8)
            mx = np.asarray(ndi.maximum(dist, lab, index=np.arange(n)), np.float32)
            mx[mx == 0] = 1
            # seeds at 0.5 of the maximum distance: splits cells joined by a narrow neck
            scores[5] = np.where(oc, dist / mx[lab], 0)
        return scores
