"""Regions of a long-bone section and the standard measurement region, from a class map.

On a longitudinal section of a mouse proximal tibia or distal femur, trabecular indices are
measured in a standard region of the secondary spongiosa (Parfitt et al., J Bone Miner Res
1987;2:595-610; Dempster et al., J Bone Miner Res 2013;28:2-17): it starts a fixed distance
below the chondro-osseous junction (commonly 0.25 mm in mice; 0.15-0.5 mm are reported), extends
a fixed depth (about 1-2 mm) and keeps a margin (about 0.1 mm) from the endocortical surface.
Papers state their own values, so all three are settable (:class:`RegionRules`).

:func:`find_regions` finds, on a predicted or true class map at a known pixel size:

- the growth plate: the largest thick band of cartilage (class 5), after an opening that removes
  the thin calcified-cartilage cores of the primary spongiosa;
- the section's orientation (growth plate at the top, bottom, left or right): the shaft lies on
  the side of the growth plate where the section extends further;
- the chondro-osseous junction: the median, over the plate's width, of its edge facing the shaft;
- the cortices: per row of the shaft, the run of bone inward from each periosteal surface, its
  thickness taken as a low running quantile (trabeculae joining the endocortex only lengthen a
  run);
- the standard region: a rectangle from ``offset_um`` to ``offset_um + depth_um`` below the
  junction, ``margin_um`` inside the innermost endocortical surface over those rows.

A field without a growth plate gives ``None`` with the reason (the caller measures the whole
field). The core never imports napari or Qt.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from histo import classes

__all__ = [
    "Region",
    "RegionBox",
    "RegionRules",
    "SectionRegions",
    "NoGrowthPlate",
    "find_regions",
]


class Region(IntEnum):
    """Codes of a region map (the synthetic generator's truth and :func:`region_map`)."""

    GLASS = 0  #: outside the section
    EPIPHYSIS = 1  #: beyond the growth plate, away from the shaft
    GROWTH_PLATE = 2
    PRIMARY_SPONGIOSA = 3  #: between the junction and the standard region
    SECONDARY_SPONGIOSA = 4  #: the marrow cavity below the primary spongiosa
    CORTEX = 5  #: cortical bone below the growth plate
    SOFT_TISSUE = 6  #: periosteum, muscle, tendon


@dataclass(frozen=True)
class RegionRules:
    """How the standard region is placed (µm).

    Defaults: 0.25 mm below the chondro-osseous junction, the common mouse value (DOMAIN.md;
    0.15-0.5 mm are reported); 1.0 mm deep, the lower end of the 1-2 mm used for mouse
    metaphyses, which a 3 mm section holds; 0.1 mm from the endocortical surface (Parfitt et al.
    1987; Dempster et al. 2013). ``end_margin_um`` keeps the region off the section's cut end.
    """

    offset_um: float = 250.0
    depth_um: float = 1000.0
    margin_um: float = 100.0
    end_margin_um: float = 50.0


@dataclass(frozen=True)
class RegionBox:
    """An axis-aligned rectangle in µm on the image grid: rows [top, bottom), columns [left, right).

    Coordinates are pixel edges times the pixel size (pixel ``i`` covers ``[i p, (i + 1) p)``).
    """

    top: float
    bottom: float
    left: float
    right: float

    def mask(self, shape: tuple[int, int], pixel_size_um: float) -> np.ndarray:
        """Pixels whose centres lie in the box."""
        p = float(pixel_size_um)
        yc = (np.arange(shape[0]) + 0.5) * p
        xc = (np.arange(shape[1]) + 0.5) * p
        rows = (yc >= self.top) & (yc < self.bottom)
        cols = (xc >= self.left) & (xc < self.right)
        return rows[:, None] & cols[None, :]

    def edges(self) -> tuple[float, float, float, float]:
        return (self.top, self.bottom, self.left, self.right)
