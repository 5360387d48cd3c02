"""Physical units shared by every module: the one check of a pixel size."""

from __future__ import annotations

import math
from typing import Any

from histo.errors import PixelSizeError

#: pixel sizes above this (µm/px) are not a microscope slide
MAX_PIXEL_SIZE_UM = 100.0


def check_pixel_size(value: Any, where: str) -> float:
    """``value`` as a float µm/px, or PixelSizeError if it is not a plausible pixel size.

    ``where`` names the source in the message (``--pixel-size``, ``OME PhysicalSizeX in a.tif``).
    """
    try:
        um = float(value)
    except (TypeError, ValueError):
        raise PixelSizeError(f"pixel size {value!r} ({where}) is not a number") from None
    if not math.isfinite(um) or um <= 0 or um > MAX_PIXEL_SIZE_UM:
        raise PixelSizeError(
            f"pixel size {um:g} µm/px ({where}) is implausible: expected 0 < size <= "
            f"{MAX_PIXEL_SIZE_UM:g} µm/px"
        )
    return um
