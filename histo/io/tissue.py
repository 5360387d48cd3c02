"""Tissue detection on a low-resolution thumbnail, so that glass is never segmented.

The thumbnail is converted to optical density (OD = -log10(I / 255) per channel, the largest
channel kept), thresholded with Otsu's method held between a floor and a ceiling (glass is
OD ~0, the palest counterstained tissue OD > 0.1), closed, and cleaned: connected specks
smaller than ``min_tissue_um2`` (dust, dirt) are removed and holes smaller than
``max_hole_um2`` (adipocyte ghosts, small tears) are filled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from histo.io.color import optical_density
from histo.io.slide import Slide, read_thumbnail, require_pixel_size, slide_from_array

#: OD threshold bounds: Otsu's threshold is clipped to [OD_FLOOR, OD_CEILING]
OD_FLOOR = 0.06
OD_CEILING = 0.2


@dataclass
class TissueMask:
    """Where the tissue is, at low resolution.

    Unpacks as ``mask, pixel_size_um``.

    Attributes
    ----------
    mask : ndarray of bool
        (h, w), True on tissue.
    pixel_size_um : float
        Pixel size of ``mask`` in µm per pixel.
    threshold_od : float
        The optical-density threshold used.
    """

    mask: np.ndarray
    pixel_size_um: float
    threshold_od: float = float("nan")

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide (0-1) covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def tissue_area_mm2(self) -> float:
        """Tissue area in mm² (at the mask's resolution)."""
        return float(self.mask.sum()) * (self.pixel_size_um / 1000.0) ** 2

    @property
    def is_empty(self) -> bool:
        """True when no tissue was found (callers raise EmptyTissueError)."""
        return not bool(self.mask.any())

    def __iter__(self) -> Iterator:
        """Unpack as ``mask, pixel_size_um``."""
        return iter((self.mask, self.pixel_size_um))


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    pixel_size_um: float,
    *,
    min_tissue_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
    od_floor: float = OD_FLOOR,
    od_ceiling: float = OD_CEILING,
) -> TissueMask:
    """Tissue mask of an RGB thumbnail (see :func:`detect_tissue` for the parameters)."""
    od = optical_density(rgb).max(axis=-1)  # the darkest channel
    if float(od.max()) - float(od.min()) < 1e-6:
        threshold = od_floor
    else:
        threshold = float(np.clip(threshold_otsu(od), od_floor, od_ceiling))
    px_area = pixel_size_um**2
    min_px, max_hole_px = min_tissue_um2 / px_area, max_hole_um2 / px_area
    mask = _cleaned(od > threshold, min_px, max_hole_px)
    if not mask.any() and threshold > od_floor:
        # a field taken inside pale tissue has no glass for Otsu to split off: its threshold
        # fell within the tissue, on specks too small to keep; all darker than glass is tissue
        threshold = float(od_floor)
        mask = _cleaned(od > threshold, min_px, max_hole_px)
    return TissueMask(mask=mask, pixel_size_um=float(pixel_size_um), threshold_od=threshold)


def _cleaned(mask: np.ndarray, min_px: float, max_hole_px: float) -> np.ndarray:
    """Small gaps closed (about 2 pixels at 16 µm/px), specks dropped and holes filled."""
    structure = ndi.generate_binary_structure(2, 1)
    mask = ndi.binary_closing(mask, structure, iterations=2, border_value=0)
    mask = _remove_small(mask, min_px)
    return ~_remove_small(~mask, max_hole_px, keep_border=True)


def _remove_small(mask: np.ndarray, min_px: float, keep_border: bool = False) -> np.ndarray:
    """``mask`` without connected components smaller than ``min_px`` pixels.

    With ``keep_border``, components touching the image border are kept whatever their size
    (the glass around a section is not a hole).
    """
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[border] = True
    keep[0] = False
    return keep[labels]


def detect_tissue(
    slide: Slide | np.ndarray,
    pixel_size_um: float = 16.0,
    *,
    image_pixel_size_um: float | None = None,
    min_tissue_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
) -> TissueMask:
    """Find the tissue on a slide at low resolution.

    The slide's thumbnail at ``pixel_size_um`` is thresholded on its optical density (see the
    module's description).

    Parameters
    ----------
    slide : Slide or ndarray
        An opened slide with a pixel size, or an RGB array (then give
        ``image_pixel_size_um``).
    pixel_size_um : float
        Resolution of the mask in µm per pixel (16 by default: a 10 mm section is 625 px).
    image_pixel_size_um : float, optional
        Pixel size of ``slide`` when it is an array.
    min_tissue_um2 : float
        Connected regions smaller than this (µm²) are dust or debris and are removed.
    max_hole_um2 : float
        Holes smaller than this (µm²) inside tissue are filled.

    Returns
    -------
    TissueMask
        Empty (``is_empty``) on a blank slide: callers raise EmptyTissueError.
    """
    if isinstance(slide, np.ndarray):
        slide = slide_from_array(slide, image_pixel_size_um)
    require_pixel_size(slide)
    thumb = read_thumbnail(slide, pixel_size_um)
    return tissue_mask_from_rgb(
        thumb, pixel_size_um, min_tissue_um2=min_tissue_um2, max_hole_um2=max_hole_um2
    )
