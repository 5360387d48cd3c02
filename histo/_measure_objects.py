"""Per-object statistics for :mod:`histo.measure` (private).

Vectorised over all objects with ``np.bincount`` on label images; the only Python loops run
over objects (nuclei counting in osteoclast crops), never over pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: 8-connectivity for connected components of a class
EIGHT = np.ones((3, 3), bool)


def optical_density(image: np.ndarray) -> np.ndarray:
    """Optical density ``-log10((I + 1) / 256)`` of an RGB uint8 image, float32 (H, W, 3)."""
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    lut = (-np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
    return lut[rgb[..., :3]]


def nonzero_2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D boolean mask (rows, columns in raster order), several times
    faster (``cv2.findNonZero``)."""
    import cv2

    m = np.asarray(mask, bool).view(np.uint8)
    if m.ndim != 2 or m.size == 0 or max(m.shape) >= 2**31:
        return np.nonzero(m)
    if m.strides[1] != 1:
        m = np.ascontiguousarray(m)
    points = cv2.findNonZero(m)
    if points is None:
        empty = np.zeros(0, np.intp)
        return empty, empty.copy()
    points = points.reshape(-1, 2)
    return points[:, 1].astype(np.intp), points[:, 0].astype(np.intp)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel to 1..n (0 stays background). Returns (compact labels, original id of 1..n).

    ``original[k - 1]`` is the input label of compact label ``k``.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(labels.shape, np.int32), np.zeros(0, np.int64)
    top = int(labels.max())
    if top <= 0:
        return np.zeros(labels.shape, np.int32), np.zeros(0, np.int64)
    if labels.min() < 0:
        labels = np.where(labels < 0, 0, labels)
    if top < 4 * 2**20:
        present = np.bincount(labels.ravel(), minlength=top + 1) > 0
        present[0] = False
        original = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.int32)
        lut[original] = np.arange(1, original.size + 1, dtype=np.int32)
        return lut[labels], original.astype(np.int64)
    original, inverse = np.unique(labels, return_inverse=True)
    compact = inverse.reshape(labels.shape).astype(np.int32)
    if original[0] == 0:
        return compact, original[1:].astype(np.int64)
    return compact + 1, original.astype(np.int64)


def label_geometry(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area (px) and centroid (row, column; px) of compact labels 1..n, each of length n."""
    flat = np.flatnonzero(labels)
    if n == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    lab = labels.ravel()[flat]
    rows, cols = np.divmod(flat, labels.shape[1])
    area = np.bincount(lab, minlength=n + 1)[1:].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(lab, weights=rows, minlength=n + 1)[1:] / area
        cx = np.bincount(lab, weights=cols, minlength=n + 1)[1:] / area
    return area, cy, cx


def label_mean(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``values`` over each compact label 1..n (NaN where a label is empty)."""
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    total = np.bincount(lab, weights=values.ravel()[flat], minlength=n + 1)[1:]
    count = np.bincount(lab, minlength=n + 1)[1:]
    out = np.full(n, np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def lacuna_occupancy(
    od_sum: np.ndarray,
    labels: np.ndarray,
    n: int,
    bone_matrix: np.ndarray,
    ring_px: int,
    occupied_ratio: float = 0.75,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide which osteocyte lacunae hold a cell.

    A lacuna is occupied when its mean summed optical density is at least ``occupied_ratio``
    times that of the bone matrix in a ring of ``ring_px`` pixels around it. An empty lacuna is
    a hole in the section, much lighter than matrix (ratio about 0.5-0.7 on synthetic slides);
    a nucleus brings it to the matrix level or darker (about 0.8-2.5). The ratio is below 1
    because some counterstains (fast green) stain bone matrix more than nuclei. Lacunae
    without matrix around them are compared with the mean of all matrix.

    Returns
    -------
    occupied : ndarray of bool (n,)
    lacuna_od, ring_od : ndarray of float (n,)
    """
    if n == 0:
        empty = np.zeros(0)
        return np.zeros(0, bool), empty, empty
    size = 2 * ring_px + 1
    grown = ndi.maximum_filter(labels, size=size)
    ring = np.where(bone_matrix & (labels == 0), grown, 0)
    lacuna_od = label_mean(od_sum, labels, n)
    ring_od = label_mean(od_sum, ring, n)
    matrix_od = float(od_sum[bone_matrix].mean()) if bone_matrix.any() else 0.0
    ring_od = np.where(np.isnan(ring_od), matrix_od, ring_od)
    return lacuna_od >= occupied_ratio * ring_od, lacuna_od, ring_od


def count_nuclei(
    od: np.ndarray,
    labels: np.ndarray,
    n: int,
    pixel_size_um: float,
    min_nucleus_area_um2: float,
    typical_nucleus_area_um2: float,
) -> np.ndarray:
    """Count nuclei in each osteoclast from the image (float array, length n).

    Nuclei are counterstained (hematoxylin, methyl green, ...) inside TRAP+ cytoplasm, so they
    differ from the cytoplasm in the *direction* of their optical density, not only its amount.
    In each object the cytoplasm colour is the median optical-density vector; a pixel belongs to
    a nucleus when the part of its optical density orthogonal to that colour exceeds the
    object's median by a margin (robust z > 3 and > 0.08 OD). Connected nuclear pixels with at
    least ``min_nucleus_area_um2`` are nuclei; a blob much larger than
    ``typical_nucleus_area_um2`` counts as several touching nuclei (area / typical, rounded).
    """
    counts = np.zeros(n)
    if n == 0:
        return counts
    for k, sl in enumerate(ndi.find_objects(labels, max_label=n)):
        if sl is None:
            continue
        counts[k] = count_nuclei_one(
            od[sl],
            labels[sl] == k + 1,
            pixel_size_um,
            min_nucleus_area_um2,
            typical_nucleus_area_um2,
        )
    return counts


def count_nuclei_one(
    od: np.ndarray,
    inside: np.ndarray,
    pixel_size_um: float,
    min_nucleus_area_um2: float,
    typical_nucleus_area_um2: float,
) -> float:
    """Nuclei of one osteoclast: ``od`` (h, w, 3) is a crop, ``inside`` (h, w) its pixels.

    The rule of :func:`count_nuclei` (which calls this for each object of a label image).
    """
    px_area = pixel_size_um**2
    min_px = max(min_nucleus_area_um2 / px_area, 2.0)
    typical_px = max(typical_nucleus_area_um2 / px_area, min_px)
    vectors = od[inside]
    if vectors.shape[0] < min_px:
        return 0.0
    colour = _median(vectors)
    norm = float(np.linalg.norm(colour))
    if norm < 1e-6:
        return 0.0
    colour /= norm
    along = vectors @ colour
    residual = np.linalg.norm(vectors - along[:, None] * colour[None, :], axis=1)
    med = float(_median(residual))
    mad = float(_median(np.abs(residual - med))) * 1.4826 + 1e-3
    nuclear_px = residual > max(med + 3.0 * mad, med + 0.08)
    mask = np.zeros(inside.shape, np.uint8)
    mask[inside] = nuclear_px
    areas = _blob_areas(mask)
    if areas.size == 0:
        return 0.0
    areas = areas[areas >= min_px]
    return float(np.sum(np.maximum(1, np.round(areas / typical_px))))


def _blob_areas(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the 8-connected components of a uint8 mask (any order)."""
    if max(mask.shape) < 2**15:
        import cv2

        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        return stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    blobs, _ = ndi.label(mask, structure=EIGHT)
    return np.bincount(blobs.ravel())[1:]


def _median(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=0)`` of a float array without NaN, bit for bit (faster).

    The middle element of a partition (odd count) or the mean of the two middle ones, computed
    in the array's dtype as ``np.median`` does.
    """
    n = values.shape[0]
    half = n // 2
    if n % 2:
        return np.partition(values, half, axis=0)[half]
    part = np.partition(values, (half - 1, half), axis=0)
    return (part[half - 1] + part[half]) / 2
