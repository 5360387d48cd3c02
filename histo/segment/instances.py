"""Instances from a class map: osteoclasts split by the centre map, osteocyte lacunae.

Used by the tiled inference (:mod:`histo.segment.tiled`) on row bands of the slide and by the
training code to build the centre-map target from ground-truth instance labels.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from histo.classes import BONE, OSTEOCLAST, OSTEOCYTE

#: smallest osteoclast kept, µm² (a 12 µm disc; real osteoclasts are 20-100 µm)
MIN_OSTEOCLAST_AREA_UM2 = 120.0
#: smallest osteocyte lacuna kept, µm² (lacunae are ~8-12 x 4-6 µm, i.e. 25-55 µm²)
MIN_OSTEOCYTE_AREA_UM2 = 12.0
#: centre-map level above which pixels seed an osteoclast (the map is 1 at a cell's centre)
CENTRE_SEED_LEVEL = 0.25
#: an osteoclast must lie within this distance of bone (µm): the counting rule (DOMAIN.md);
#: TRAP+ cells in the marrow (mononuclear precursors) are not osteoclasts
OSTEOCLAST_BONE_CONTACT_UM = 3.0


def centre_target(osteoclast_labels: np.ndarray) -> np.ndarray:
    """Centre-map training target: per-osteoclast distance to its border, 1 at its centre.

    Parameters
    ----------
    osteoclast_labels
        (H, W) integer instance labels, 0 outside osteoclasts.

    Returns
    -------
    numpy.ndarray
        (H, W) float32 in [0, 1]; 0 outside osteoclasts, rising to 1 at each cell's most
        interior pixel. Touching cells are separated because the distance is measured to the
        cell's own border (label changes count as borders).
    """
    labels = np.asarray(osteoclast_labels)
    out = np.zeros(labels.shape, np.float32)
    if not labels.any():
        return out
    # borders between different labels count as background for the distance transform
    inner = labels > 0
    edge = np.zeros_like(inner)
    edge[:-1] |= (labels[:-1] != labels[1:]) & inner[:-1] & inner[1:]
    edge[:, :-1] |= (labels[:, :-1] != labels[:, 1:]) & inner[:, :-1] & inner[:, 1:]
    dist = cv2.distanceTransform((inner & ~edge).astype(np.uint8), cv2.DIST_L2, 3)
    maxima = ndi.maximum(dist, labels, index=np.arange(labels.max() + 1))
    maxima = np.asarray(maxima, np.float32)
    maxima[maxima == 0] = 1.0
    out = dist / maxima[labels]
    out[~inner] = 0
    return np.clip(out, 0, 1).astype(np.float32)


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: (count incl. background, labels int32, stats)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n, labels, stats


def split_osteoclasts(
    class_map: np.ndarray, centre: np.ndarray, min_seed_px: int = 12
) -> np.ndarray:
    """Split class-3 regions into osteoclasts with a marker-controlled watershed.

    Markers are the connected regions where ``centre > CENTRE_SEED_LEVEL`` inside class 3;
    a class-3 region without a marker becomes one osteoclast. The result of each connected
    class-3 region depends only on that region's pixels, so a region seen whole in two windows
    is split the same way in both (this is what makes tiled labelling seam-free).

    Returns
    -------
    numpy.ndarray
        (H, W) int32 window-local labels (0 = none).
    """
    mask = class_map == OSTEOCLAST
    if not mask.any():
        return np.zeros(class_map.shape, np.int32)
    seeds = mask & (centre > CENTRE_SEED_LEVEL)
    _, markers, seed_stats = _components(seeds)
    small = seed_stats[:, cv2.CC_STAT_AREA] < min_seed_px
    small[0] = False
    if small.any():
        seeds &= ~small[markers]
        markers = np.where(seeds, markers, 0)
    n_cc, cc, _ = _components(mask)
    # a region without seeds gets its own marker (all its pixels)
    has_seed = np.zeros(n_cc, bool)
    has_seed[np.unique(cc[seeds])] = True
    unseeded = mask & ~has_seed[cc]
    if unseeded.any():
        offset = markers.max()
        markers = np.where(unseeded, cc + offset, markers)
    labels = watershed(-centre.astype(np.float32), markers=markers, mask=mask)
    return labels.astype(np.int32)


def label_band(
    class_map: np.ndarray,
    centre: np.ndarray,
    alt_class: np.ndarray,
    own_start: int,
    own_stop: int,
    pixel_size_um: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Label the objects a row band owns, inside a window of rows around it.

    An object (a connected class-3 or class-4 region) belongs to the band that holds its top
    row, so every object is labelled exactly once however the slide is cut. Objects too small to
    be a cell (see ``MIN_*_AREA_UM2``), and osteoclasts farther than
    ``OSTEOCLAST_BONE_CONTACT_UM`` from bone, are removed and their pixels take ``alt_class`` (the
    best non-cell class).

    Parameters
    ----------
    class_map, centre, alt_class
        (h, W) window arrays: class codes, centre map in [0, 1], best class among 0-2.
        ``class_map`` is modified in place for removed specks.
    own_start, own_stop
        Rows of the window (window coordinates) that this band owns.
    pixel_size_um
        µm per pixel of the window.

    Returns
    -------
    osteoclasts, osteocytes : numpy.ndarray
        (h, W) int32 band-local labels 1..n of the owned objects (0 elsewhere).
    owned_mask : numpy.ndarray
        (h, W) bool, pixels of owned objects or removed specks (to be written back).
    n_osteoclasts, n_osteocytes : int
    """
    px_area = pixel_size_um**2
    outputs = []
    counts = []
    owned_mask = np.zeros(class_map.shape, bool)
    for code, min_area in (
        (OSTEOCLAST, MIN_OSTEOCLAST_AREA_UM2),
        (OSTEOCYTE, MIN_OSTEOCYTE_AREA_UM2),
    ):
        mask = class_map == code
        n_cc, cc, stats = _components(mask)
        top = stats[:, cv2.CC_STAT_TOP]
        # a region taller than the window margin is cut at the window's bottom (once): such
        # regions are far larger than any cell (the margin is >= 256 µm)
        owned = (top >= own_start) & (top < own_stop)
        owned[0] = False
        if code == OSTEOCLAST:
            local = split_osteoclasts(class_map, centre)
        else:
            local = cc
        in_owned = owned[cc]
        local = np.where(in_owned, local, 0)
        # drop specks
        n_local = int(local.max()) + 1
        areas = np.bincount(local.ravel(), minlength=n_local) * px_area
        keep = areas >= min_area
        if code == OSTEOCLAST and OSTEOCLAST_BONE_CONTACT_UM is not None:
            r = max(1, int(round(OSTEOCLAST_BONE_CONTACT_UM / pixel_size_um)))
            bone = ((class_map == BONE) | (class_map == OSTEOCYTE)).astype(np.uint8)
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            near_bone = cv2.dilate(bone, disk) > 0
            touching = np.bincount(local[near_bone].ravel(), minlength=n_local) > 0
            keep &= touching
        keep[0] = False
        speck = in_owned & ~keep[local]
        class_map[speck] = alt_class[speck]
        lut = np.zeros(n_local, np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        outputs.append(lut[local])
        counts.append(int(keep.sum()))
        owned_mask |= in_owned
    return outputs[0], outputs[1], owned_mask, counts[0], counts[1]
