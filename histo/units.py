"""Physical units shared by every module: the one check of a pixel size, the units of the
indices (DESIGN.md: areas mm², lengths mm, fractions %, densities /mm or /mm²)."""

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


#: index name -> unit (DESIGN.md units: areas mm², lengths mm, fractions %, densities /mm, /mm²)
INDEX_UNITS: dict[str, str] = {
    "T.Ar": "mm²",
    "B.Ar": "mm²",
    "Ma.Ar": "mm²",
    "BV/TV": "%",
    "Ma.Ar/T.Ar": "%",
    "B.Pm": "mm",
    "N.Oc": "count",
    "N.Oc/B.Pm": "/mm",
    "N.Oc/T.Ar": "/mm²",
    "Oc.S/BS": "%",
    "ES/BS": "%",
    "N.Ot": "count",
    "N.Ot/B.Ar": "/mm²",
    "Tb.Th": "µm",
    "Tb.Sp": "µm",
    "Tb.N": "/mm",
    "Empty lacunae (non-standard)": "count",
    "N.TRAP+ off bone": "count",
}

#: column order of the indices (callers put ``slide`` and ``phenotype`` first)
INDEX_COLUMNS: tuple[str, ...] = tuple(INDEX_UNITS)
