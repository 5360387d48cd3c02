"""Optical density of RGB pixels: the one conversion of light to absorbance in histo.

Beer-Lambert: a stain's absorbance is ``-log(I / I0)``. With 8-bit pixels, ``I = value + 1`` and
``I0 = 256`` keep black finite. The base only scales the result (base 10 is the
microscopist's optical density; the natural base is the absorbance in nepers).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["od_lookup", "optical_density"]


@lru_cache(maxsize=4)
def od_lookup(base: float = 10.0) -> np.ndarray:
    """(256,) float32 table: optical density of each 8-bit value in ``base`` (10 or e).

    Computed in float32 as ``-log((v + 1) / 256)``, so that indexing it gives the values of
    the same expression evaluated on a float32 image, bit for bit.
    """
    values = (np.arange(256, dtype=np.float32) + np.float32(1.0)) / np.float32(256.0)
    if base == 10.0:
        table = -np.log10(values)
    elif base == math.e:
        table = -np.log(values)
    else:
        table = -np.log(values) / np.float32(math.log(base))
    table = table.astype(np.float32)
    table.setflags(write=False)
    return table


def optical_density(rgb: np.ndarray, base: float = 10.0) -> np.ndarray:
    """Optical density ``-log_base((I + 1) / 256)`` per channel of an RGB image, float32.

    Parameters
    ----------
    rgb : array_like, shape (..., C), C >= 3
        8-bit intensities; other dtypes are clipped to 0-255 first. Channels beyond 3 are
        ignored.
    base : float
        Base of the logarithm: 10 (optical density, default) or ``math.e``.

    Returns
    -------
    ndarray of float32, shape (..., 3)
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return od_lookup(float(base))[rgb[..., :3]]


def summed_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density summed over the three channels (base 10), float32, shape (...):
    ``optical_density(rgb).sum(axis=-1)`` without its (..., 3) float temporary."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    lookup = od_lookup()
    return lookup[rgb[..., 0]] + lookup[rgb[..., 1]] + lookup[rgb[..., 2]]
