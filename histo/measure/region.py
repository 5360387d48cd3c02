"""The region of interest of a measurement, read window by window."""

from __future__ import annotations

from typing import Any

import numpy as np

from histo.errors import ClassMapError
from histo.io.blocks import read_2d
from histo.io.roi import Roi, polygons_contain, polygons_mask

__all__ = ["Region", "roi_mask"]

_ROI_TYPES = (
    "a boolean mask of the class map's shape, an (N, 2) polygon of (row, column) vertices in "
    "pixels, or a histo.io.roi.Roi (polygons with holes in µm)"
)


def roi_mask(roi: Any, shape: tuple[int, int], pixel_size_um: float = 1.0) -> np.ndarray:
    """A region of interest as a boolean mask of ``shape``.

    Parameters
    ----------
    roi
        Boolean (or 0/non-zero) mask of ``shape``; a polygon: an (N, 2) array of vertices
        (row, column) in pixels; or a :class:`histo.io.roi.Roi` (µm).
    shape : tuple of int
    pixel_size_um : float
        µm per pixel of ``shape`` (used for a :class:`~histo.io.roi.Roi` only).
    """
    region = Region(roi, shape, pixel_size_um)
    return region.window(slice(0, shape[0]), slice(0, shape[1]))


class Region:
    """A region of interest over a map of ``shape``: a mask array-like, a polygon in pixels
    or polygons with holes (:class:`histo.io.roi.Roi`, in µm), read one window at a time."""

    def __init__(self, roi: Any, shape: tuple[int, int], pixel_size_um: float = 1.0) -> None:
        self.polygons: tuple[tuple[np.ndarray, ...], ...] | None = None
        self.mask = None
        if isinstance(roi, Roi):
            self.polygons = roi.in_pixels(float(pixel_size_um))
            return
        rshape = tuple(int(n) for n in getattr(roi, "shape", np.shape(roi)))
        if rshape == tuple(shape) and (
            np.dtype(getattr(roi, "dtype", bool)) == bool or shape[1] != 2
        ):
            self.mask = roi
            return
        arr = np.asarray(roi)
        if arr.ndim == 2 and arr.shape[1] == 2 and arr.shape[0] >= 3:
            self.polygons = ((arr.astype(float),),)
            return
        raise ClassMapError(
            f"ROI must be {_ROI_TYPES}; got shape {arr.shape} for a class map {tuple(shape)}"
        )

    def window(self, ys: slice, xs: slice) -> np.ndarray:
        """The region over rows ``ys`` and columns ``xs`` (boolean array)."""
        if self.mask is not None:
            return read_2d(self.mask, ys, xs).astype(bool)
        assert self.polygons is not None
        shape = (ys.stop - ys.start, xs.stop - xs.start)
        return polygons_mask(self.polygons, shape, (ys.start, xs.start))

    def at(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Values at pixels (yy, xx) (integer arrays)."""
        if yy.size == 0:
            return np.zeros(0, bool)
        if self.mask is not None:
            if isinstance(self.mask, np.ndarray):
                return self.mask[yy, xx].astype(bool)
            return np.array(
                [bool(np.asarray(self.mask[y, x])) for y, x in zip(yy, xx, strict=True)], bool
            )
        assert self.polygons is not None
        return polygons_contain(self.polygons, yy, xx)
