"""The size of marrow nuclei in µm, to test the stated pixel size against the content.

Dark nuclei are blobs of stain (summed optical density). The scale-normalised Laplacian of
Gaussian ``-sigma^2 LoG`` of a disk of diameter d peaks at ``sigma = d / (2 sqrt 2)`` (Lindeberg,
IJCV 1998;30:79-116), so the scale of the strongest response at each blob gives its diameter,
independently of contrast. Only blobs whose response peaks inside the searched scales count
(a response still rising at the smallest or largest scale is pixel noise or a clipped blob, not
a measured size), and the peak is placed between the searched scales by a parabola in log
scale. The median over the strongest blobs of a slide is dominated by the dense hematopoietic
nuclei of the marrow.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from histo.io.color import summed_od
from histo.qc._tissue import matrix_mask

#: blob scales searched, as nucleus diameters in µm (geometric steps of ~17 %): the first and
#: last only bracket the peak, so sizes of 1.9-27 µm are measured (a 6-µm nucleus with the
#: pixel size stated 4x too small or 4x too large)
DIAMETERS_UM = np.geomspace(1.6, 32.0, 20)
#: the strongest blobs of a slide that are kept (the rest are texture and faint cells)
STRONGEST_FRACTION = 0.2
#: blobs closer than this (µm) are one blob
MIN_SEPARATION_UM = 2.0
#: the blurred image is halved once a blur would span more than twice this many of its pixels
#: (sigma), so that blurs on the halved image still span this many; it is blurred over 2 of
#: its pixels or more first, which leaves under 1 % of the amplitude at the halved image's
#: Nyquist frequency (no aliasing)
HALVE_ABOVE_SIGMA_PX = 2.5
#: blobs closer to a tile's edge than this many of their own sigmas are dropped (the blur
#: there mirrors the tile and the scale read is not the blob's)
EDGE_SIGMAS = 2.0
#: at least this many blobs for a diameter
MIN_BLOBS = 40
_SIGMA_PER_DIAMETER = 1.0 / (2.0 * np.sqrt(2.0))


class BlobScales(NamedTuple):
    """Blobs of one tile: their scale-normalised response and diameter (µm)."""

    response: np.ndarray
    diameter_um: np.ndarray


class NucleusSize(NamedTuple):
    """Typical marrow nucleus diameter of a slide and the blobs it was taken over."""

    diameter_um: float
    n_blobs: int


class ScaleResponse(NamedTuple):
    """``-sigma^2 LoG`` at one scale, on the full image halved ``step - 1`` times."""

    step: int
    response: np.ndarray


def scale_responses(amount: np.ndarray, pixel_size_um: float) -> list[ScaleResponse]:
    """``-sigma^2 LoG`` of ``amount`` at every diameter of :data:`DIAMETERS_UM`.

    Each blur continues the previous one (Gaussian variances add), and the blurred image is
    halved (every other pixel, so pixel ``i`` of a response at ``step`` lies at full-size
    pixel ``step * i``) once the blur spans more than :data:`HALVE_ABOVE_SIGMA_PX` of its
    pixels. The same responses as blurring the full image at every scale, to 1-5 % at the
    halved scales, for a fraction of the cost.
    """
    out = []
    image, variance, step = amount, 0.0, 1  # variance: blur (full-size px²) ``image`` carries
    for diameter in DIAMETERS_UM:
        sigma = diameter * _SIGMA_PER_DIAMETER / pixel_size_um
        while sigma > 2 * HALVE_ABOVE_SIGMA_PX * step and min(image.shape) > 32:
            if variance < (2 * step) ** 2:  # blur enough before halving: no aliasing
                image = cv2.GaussianBlur(image, (0, 0), np.sqrt((2 * step) ** 2 - variance) / step)
                variance = (2.0 * step) ** 2
            image, step = image[::2, ::2], step * 2
        increment = np.sqrt(max(sigma**2 - variance, 0.0)) / step
        if increment > 0.2:
            image = cv2.GaussianBlur(image, (0, 0), increment)
        variance = sigma**2
        scale = -((sigma / step) ** 2)
        out.append(ScaleResponse(step, cv2.Laplacian(image, cv2.CV_32F, ksize=1, scale=scale)))
    return out


def _to_full_size(response: ScaleResponse, shape: tuple[int, int]) -> np.ndarray:
    """``response`` interpolated (linearly) back to the full-size grid."""
    if response.step == 1:
        return response.response
    to_full = np.float32([[1.0 / response.step, 0, 0], [0, 1.0 / response.step, 0]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(
        response.response, to_full, shape[::-1], flags=flags, borderMode=cv2.BORDER_REPLICATE
    )


def _strongest(responses: list[ScaleResponse], shape: tuple[int, int]) -> np.ndarray:
    """The strongest response over scales at every full-size pixel."""
    best = np.full(shape, -np.inf, np.float32)
    for step in sorted({r.step for r in responses}):
        level = [r.response for r in responses if r.step == step]
        level_best = level[0].copy()
        for other in level[1:]:
            np.maximum(level_best, other, out=level_best)
        np.maximum(best, _to_full_size(ScaleResponse(step, level_best), shape), out=best)
    return best


def _responses_at(responses: list[ScaleResponse], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(scales, points) responses at full-size pixels (``ys``, ``xs``)."""
    column = np.empty((len(responses), len(ys)), np.float32)
    for k, (step, response) in enumerate(responses):
        if step == 1:
            column[k] = response[ys, xs]
            continue
        map_x = (xs / step).astype(np.float32)[None]
        map_y = (ys / step).astype(np.float32)[None]
        column[k] = cv2.remap(response, map_x, map_y, cv2.INTER_LINEAR, None, cv2.BORDER_REPLICATE)
    return column


def _peak_scale(column: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best scale index, its offset in steps, interpolated response) of each column.

    ``column`` is (scales, blobs); the offset (-0.5..0.5) is the vertex of the parabola
    through the best scale and its two neighbours, in steps of log diameter.
    """
    k = column.argmax(axis=0)
    j = np.arange(column.shape[1])
    inner = np.clip(k, 1, len(column) - 2)
    below, at, above = column[inner - 1, j], column[inner, j], column[inner + 1, j]
    curvature = np.minimum(below - 2 * at + above, -1e-9)
    offset = np.clip(0.5 * (below - above) / curvature, -0.5, 0.5)
    return k, offset, at - 0.25 * (below - above) * offset


def blob_scales(amount: np.ndarray, pixel_size_um: float, outside: np.ndarray) -> BlobScales:
    """Blobs of one tile in ``outside``, each at the scale where its response peaks.

    A blob is a local maximum (within :data:`MIN_SEPARATION_UM`) of the strongest response
    over scales; it is kept when that response peaks strictly inside the searched scales and
    the blob lies :data:`EDGE_SIGMAS` of its sigma or more from the tile's edge.
    """
    responses = scale_responses(amount, pixel_size_um)
    best = _strongest(responses, amount.shape)
    sep = max(1, int(round(MIN_SEPARATION_UM / pixel_size_um)))
    window = np.ones((2 * sep + 1, 2 * sep + 1), np.uint8)
    ys, xs = np.nonzero((best >= cv2.dilate(best, window)) & (best > 1e-3) & outside)
    if len(ys) == 0:
        return BlobScales(np.zeros(0, np.float32), np.zeros(0))
    k, offset, response = _peak_scale(_responses_at(responses, ys, xs))
    log_d = np.log(DIAMETERS_UM)
    diameter = np.exp(log_d[k] + offset * (log_d[1] - log_d[0]))
    h, w = amount.shape
    edge = np.minimum(np.minimum(ys, h - 1 - ys), np.minimum(xs, w - 1 - xs))
    sigma_px = diameter * _SIGMA_PER_DIAMETER / pixel_size_um
    keep = (k > 0) & (k < len(DIAMETERS_UM) - 1) & (edge >= EDGE_SIGMAS * sigma_px)
    return BlobScales(response[keep], diameter[keep])


def sampling_blur_um(native_um: float | None, working_um: float) -> float:
    """Blur (Gaussian sigma, µm) that the pixel grid adds to a blob read at ``working_um``.

    A pixel integrates a box of its width (variance ``p^2 / 12``); a slide coarser than the
    working resolution is also interpolated linearly up to it (a triangle of the slide's
    pixel, variance ``p^2 / 6``).
    """
    native = working_um if native_um is None else native_um
    coarse = max(native, working_um)
    variance = coarse**2 / 12.0 + (native**2 / 6.0 if native > working_um else 0.0)
    return float(np.sqrt(variance))


def deblurred_disk_sigma(sigma_um: float, blur_um: float) -> float:
    """Scale (µm) of a disk whose blurred image selects ``sigma_um``, the blur being known.

    With ``t = sigma^2 / 2``, a disk of radius r blurred by ``t_b`` has the normalised
    response ``t / T^2 exp(-r^2 / 4T)`` at its centre (``T = t + t_b``), which peaks where
    ``r^2 = 4 T (2 - T / t)``; in sigmas, ``sigma_disk = sigma * sqrt(1 - (blur / sigma)^4)``.
    Blur thus enlarges a disk far less than a Gaussian blob (``sqrt(1 - (blur / sigma)^2)``):
    6-µm nuclei read 2-3 % large at 2 µm/px. Held at half ``sigma_um`` at most.
    """
    ratio = min(blur_um / sigma_um, 1.0) if sigma_um > 0 else 1.0
    return float(sigma_um * max(np.sqrt(1.0 - ratio**4), 0.5))


def nucleus_diameter_um(
    tiles: list[np.ndarray],
    pixel_size_um: float,
    native_um: float | None = None,
    od_sums: list[np.ndarray] | None = None,
) -> NucleusSize:
    """Typical diameter (µm, by the stated scale) of the strongest dark blobs.

    Blobs on bone matrix (lamellae, osteocytes) are left out: the marrow's nuclei remain.
    The median over the strongest :data:`STRONGEST_FRACTION` is taken, and the blur of the
    pixel grid (:func:`sampling_blur_um`) is taken out of it as out of a disk's
    (:func:`deblurred_disk_sigma`).

    Parameters
    ----------
    tiles : list of ndarray
        RGB tiles at ``pixel_size_um``, white-balanced.
    pixel_size_um : float
        The tiles' pixel size, µm/px by the stated scale.
    native_um : float, optional
        The slide's own pixel size (µm/px, stated) the tiles were resampled from.
    od_sums : list of ndarray, optional
        The tiles' summed optical density (:func:`histo.io.color.summed_od`) when the caller
        has them. Nuclei are the darkest small blobs of that sum, not of the counterstain's
        own channel: fast green colours matrix and cytoplasm more than nuclei (there nuclei
        measured 2.4 µm at their true scale), and a stain vector a few degrees off mixes the
        TRAP red in.

    Returns
    -------
    NucleusSize
        ``diameter_um`` is NaN when fewer than :data:`MIN_BLOBS` blobs are found.
    """
    found = []
    if od_sums is None:
        od_sums = [summed_od(tile) for tile in tiles]
    for tile, amount in zip(tiles, od_sums, strict=True):
        outside = ~matrix_mask(tile, pixel_size_um, amount)[0]
        found.append(blob_scales(amount, pixel_size_um, outside))
    response = np.concatenate([b.response for b in found]) if found else np.zeros(0)
    diameter = np.concatenate([b.diameter_um for b in found]) if found else np.zeros(0)
    if len(response) < MIN_BLOBS:
        return NucleusSize(float("nan"), int(len(response)))
    keep = response >= np.quantile(response, 1.0 - STRONGEST_FRACTION)
    sigma = float(np.median(diameter[keep])) * _SIGMA_PER_DIAMETER
    sigma = deblurred_disk_sigma(sigma, sampling_blur_um(native_um, pixel_size_um))
    return NucleusSize(sigma / _SIGMA_PER_DIAMETER, int(keep.sum()))
