"""The size of marrow nuclei in µm, to test the stated pixel size against the content.

Dark nuclei are blobs of stain (summed optical density). The scale-normalised Laplacian of
Gaussian ``-sigma^2 LoG`` of a disk of diameter d peaks at ``sigma = d / (2 sqrt 2)`` (Lindeberg,
IJCV 1998;30:79-116), so the scale of the strongest response at each blob gives its diameter,
independently of contrast. The median over the strongest blobs of a slide is dominated by the
dense hematopoietic nuclei of the marrow.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.feature import peak_local_max

from histo.qc._stain import optical_density
from histo.qc._tissue import matrix_mask

#: blob scales searched, as nucleus diameters in µm (geometric steps of ~12 %)
DIAMETERS_UM = np.geomspace(2.0, 24.0, 16)
#: the strongest blobs of a slide that are kept (the rest are texture and faint cells)
STRONGEST_FRACTION = 0.2
#: blobs closer than this (µm) are one blob
MIN_SEPARATION_UM = 2.0


def stain_amount(tile: np.ndarray) -> np.ndarray:
    """Summed optical density per pixel: nuclei are the darkest small blobs of the marrow.

    Not the counterstain's own channel: fast green colours matrix and cytoplasm more than
    nuclei, and there its channel holds mostly the fine texture of the cytoplasm (nuclei
    then measured 2.4 µm at their true scale); and a stain vector estimated a few degrees
    off mixes the TRAP red into it.
    """
    return optical_density(tile).sum(axis=-1)


def _blob_peaks(
    amount: np.ndarray, pixel_size_um: float, outside: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(responses, diameters µm) of the local maxima of the scale-normalised -LoG in ``outside``."""
    best = np.full(amount.shape, -np.inf, np.float32)
    best_k = np.zeros(amount.shape, np.int16)
    for k, d_um in enumerate(DIAMETERS_UM):
        sigma = d_um / (2.0 * np.sqrt(2.0)) / pixel_size_um
        smooth = cv2.GaussianBlur(amount, (0, 0), sigma)
        response = -(sigma**2) * cv2.Laplacian(smooth, cv2.CV_32F, ksize=1)
        best_k = np.where(response > best, np.int16(k), best_k)
        best = np.maximum(best, response)
    sep = max(1, int(round(MIN_SEPARATION_UM / pixel_size_um)))
    border = int(np.ceil(DIAMETERS_UM[-1] / 2 / pixel_size_um)) if min(amount.shape) > 64 else 0
    peaks = peak_local_max(best, min_distance=sep, threshold_abs=1e-3, exclude_border=border)
    if len(peaks) == 0:
        return np.zeros(0, np.float32), np.zeros(0)
    peaks = peaks[outside[peaks[:, 0], peaks[:, 1]]]
    ys, xs = peaks[:, 0], peaks[:, 1]
    return best[ys, xs], DIAMETERS_UM[best_k[ys, xs]]


def nucleus_diameter_um(tiles: list[np.ndarray], pixel_size_um: float) -> tuple[float, int]:
    """Typical diameter (µm, by the stated scale) of the strongest dark blobs.

    Blobs on bone matrix (lamellae, osteocytes) are left out: the marrow's nuclei remain.
    The geometric mean over the strongest :data:`STRONGEST_FRACTION` is returned.

    Returns
    -------
    diameter_um : float
        NaN when fewer than 20 blobs are found.
    n_blobs : int
        Blobs the median was taken over.
    """
    responses, diameters = [], []
    for tile in tiles:
        outside = ~matrix_mask(tile, pixel_size_um)[0]
        r, d = _blob_peaks(stain_amount(tile), pixel_size_um, outside)
        responses.append(r)
        diameters.append(d)
    r = np.concatenate(responses) if responses else np.zeros(0)
    d = np.concatenate(diameters) if diameters else np.zeros(0)
    if len(r) < 40:
        return float("nan"), int(len(r))
    keep = r >= np.quantile(r, 1.0 - STRONGEST_FRACTION)
    return float(np.exp(np.mean(np.log(d[keep])))), int(keep.sum())
