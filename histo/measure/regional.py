"""Which region the indices are for: a user's ROI, a long bone's standard region, or the whole
section.

On a long-bone section (a growth plate found by :func:`histo.regions.find_regions`) and without
a user-drawn ROI, the main indices are those of the **standard region** of the secondary
spongiosa (Parfitt et al. 1987; Dempster et al. 2013), and the whole section, the cortex and
the primary spongiosa are measured beside it (columns prefixed ``section:``, ``cortex:``,
``primary:``), with the osteoclasts at the chondro-osseous junction counted on their own
(``N.Oc.junction``). A user-drawn ROI always wins. A field without a growth plate is measured
whole and says so. The search runs on the class map downsampled to :data:`SEARCH_UM` (read
band by band: bounded memory on any slide).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from histo.io.blocks import downsample_nearest, shape_2d
from histo.io.roi import Roi
from histo.measure.indices import Measurement

__all__ = [
    "EXTRA_INDICES",
    "JUNCTION_UM",
    "REGION_STANDARD",
    "REGION_USER",
    "REGION_WHOLE",
    "SEARCH_UM",
    "MeasuredRegion",
    "RegionalMeasurement",
    "measure_by_region",
]

REGION_STANDARD = "standard"  #: the main indices are the standard region's
REGION_WHOLE = "whole section"  #: no growth plate (a field): the whole section
REGION_USER = "user ROI"  #: a region drawn by the user
#: pixel size (µm/px) of the class map the region search reads (histo.regions works at 4)
SEARCH_UM = 4.0
#: osteoclasts within this distance (µm) of the growth plate on the shaft side are counted
#: at the chondro-osseous junction (TRAP+ cells crowd within ~100-150 µm below it)
JUNCTION_UM = 150.0
#: indices reported for the whole section, the cortex and the primary spongiosa
EXTRA_INDICES = ("T.Ar", "B.Ar", "BV/TV", "N.Oc", "N.Oc/B.Pm", "Oc.S/BS", "Cg.Ar/B.Ar")

#: Measurement of a region: None (the whole map) or a Roi in µm
MeasureFn = Callable[[Roi | None], Measurement]


@dataclass
class MeasuredRegion:
    """Which region the main indices are for, and what was measured beside it.

    Attributes
    ----------
    name
        :data:`REGION_STANDARD`, :data:`REGION_WHOLE` or :data:`REGION_USER`.
    reason
        Why (e.g. "no growth plate found: measuring the whole field").
    extra
        Columns beside the main indices: ``section:``, ``cortex:``, ``primary:`` prefixed
        indices and ``N.Oc.junction``.
    rois
        The regions in µm (standard, growth_plate, cortex, primary, junction), for outlines
        and viewers.
    box_um
        The standard region's (top, bottom, left, right) in µm.
    growth_plate_side, junction_um
        Where the growth plate lies and the junction's distance from that side (µm).
    """

    name: str
    reason: str = ""
    extra: dict = field(default_factory=dict)
    rois: dict = field(default_factory=dict)
    box_um: tuple[float, float, float, float] | None = None
    growth_plate_side: str | None = None
    junction_um: float | None = None

    def as_dict(self) -> dict:
        """JSON-friendly summary (for indices.json)."""
        return {
            "name": self.name,
            "reason": self.reason,
            "standard_region_um": None if self.box_um is None else list(self.box_um),
            "growth_plate_side": self.growth_plate_side,
            "junction_um": self.junction_um,
        }


@dataclass
class RegionalMeasurement:
    """The main measurement and the region it is for."""

    measurement: Measurement
    region: MeasuredRegion


def search_grid(shape: tuple[int, int], pixel_size_um: float) -> tuple[tuple[int, int], float]:
    """Shape of the search's class map and its pixel size (µm/px, rows' scale)."""
    h, w = shape
    f = max(float(SEARCH_UM) / float(pixel_size_um), 1.0)
    small = (max(1, int(round(h / f))), max(1, int(round(w / f))))
    return small, float(pixel_size_um) * h / small[0]


def mask_roi(mask: np.ndarray, grid_um: float, pixel_size_um: float) -> Roi | None:
    """A mask on the search grid as a :class:`Roi` (µm; outer rings with their holes).

    Vertices are the boundary pixels' centres, moved to the convention of :class:`Roi`
    (a pixel of the measured map at ``pixel_size_um`` has its centre at an integer multiple).
    """
    m = np.ascontiguousarray(mask.astype(np.uint8))
    if not m.any():
        return None
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    shift = 0.5 * grid_um - 0.5 * pixel_size_um

    def ring(c: np.ndarray) -> np.ndarray:
        xy = c.reshape(-1, 2).astype(float)
        return xy[:, ::-1] * grid_um + shift

    polygons = []
    for i, c in enumerate(contours):
        if hierarchy[0][i][3] != -1 or len(c) < 3:
            continue
        holes = [
            ring(contours[j])
            for j in range(len(contours))
            if hierarchy[0][j][3] == i and len(contours[j]) >= 3
        ]
        polygons.append([ring(c), *holes])
    return Roi.from_rings(polygons) if polygons else None


def _box_roi(box, pixel_size_um: float) -> Roi:
    """The standard region's box (µm, pixel edges) as a rectangle :class:`Roi`."""
    t, b, left, right = (v - 0.5 * pixel_size_um for v in box.edges())
    return Roi.from_rings([[np.array([[t, left], [t, right], [b, right], [b, left]], float)]])


def _junction_zone(regions, grid_um: float) -> np.ndarray:
    """Within JUNCTION_UM of the growth plate, on the shaft side (near the primary spongiosa)."""
    r = max(int(round(JUNCTION_UM / grid_um)), 1)
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    plate = regions.growth_plate.astype(np.uint8)
    near_plate = cv2.dilate(plate, disk) > 0
    near_primary = cv2.dilate(regions.primary_spongiosa.astype(np.uint8), disk) > 0
    return near_plate & near_primary & ~regions.growth_plate


def _count_in(rows: list[dict], zone: np.ndarray, grid_um: float, pixel_size_um: float) -> int:
    """Osteoclast rows (centroids in µm) whose centroid lies in ``zone`` (search grid)."""
    n = 0
    h, w = zone.shape
    for row in rows:
        y = int((row["centroid_y_um"] + 0.5 * pixel_size_um) // grid_um)
        x = int((row["centroid_x_um"] + 0.5 * pixel_size_um) // grid_um)
        n += bool(0 <= y < h and 0 <= x < w and zone[y, x])
    return n


def _prefixed(prefix: str, indices: dict) -> dict:
    return {f"{prefix}:{k}": indices[k] for k in EXTRA_INDICES if k in indices}


def _long_bone_rois(regions, grid: float, px: float) -> dict[str, Roi | None]:
    """The ROIs (µm) of a long bone's zones: the standard region's box, then the growth plate,
    cortex, primary spongiosa and junction zone (None where a zone was not found)."""
    rois = {"standard": _box_roi(regions.box, px)}
    for key, mask in (
        ("growth_plate", regions.growth_plate),
        ("cortex", regions.cortex),
        ("primary", regions.primary_spongiosa),
        ("junction", _junction_zone(regions, grid)),
    ):
        rois[key] = mask_roi(mask, grid, px)
    return rois


def _zone_indices(measure_roi: MeasureFn, rois: dict[str, Roi | None], whole: Measurement) -> dict:
    """The whole section's indices and those of the cortex and primary spongiosa (where
    found), their names prefixed with the zone's."""
    extra = _prefixed("section", whole.indices)
    for key in ("cortex", "primary"):
        if rois[key] is not None:
            extra.update(_prefixed(key, measure_roi(rois[key]).indices))
    return extra


def measure_by_region(
    class_map,
    pixel_size_um: float,
    measure_roi: MeasureFn,
    roi=None,
    rules=None,
) -> RegionalMeasurement:
    """The main indices of a section and the region they are for.

    Parameters
    ----------
    class_map
        (H, W) class map, numpy or zarr (read band by band at :data:`SEARCH_UM`).
    pixel_size_um
        µm per pixel of the class map.
    measure_roi
        ``measure_roi(roi) -> Measurement``: the measurement of the map in a :class:`Roi`
        (µm; None for the whole map). Called once for a user ROI or a field, four times on a
        long bone (standard region, whole section, cortex, primary spongiosa).
    roi
        A user-drawn ROI (anything ``measure_roi`` takes): it always wins.
    rules
        :class:`histo.regions.RegionRules` (offset, depth, margins of the standard region).
    """
    from histo.regions import find_regions

    if roi is not None:
        return RegionalMeasurement(
            measure_roi(roi), MeasuredRegion(REGION_USER, "drawn by the user")
        )
    px = float(pixel_size_um)
    small_shape, grid = search_grid(shape_2d(class_map), px)
    small = downsample_nearest(class_map, small_shape)
    search = find_regions(small, grid, rules)
    if search.regions is None:
        return RegionalMeasurement(measure_roi(None), MeasuredRegion(REGION_WHOLE, search.reason))
    regions = search.regions
    rois = _long_bone_rois(regions, grid, px)
    main = measure_roi(rois["standard"])
    whole = measure_roi(None)
    extra = _zone_indices(measure_roi, rois, whole)
    extra["N.Oc.junction"] = _count_in(whole.osteoclasts, _junction_zone(regions, grid), grid, px)
    region = MeasuredRegion(
        REGION_STANDARD,
        "growth plate found: the standard region of the secondary spongiosa",
        extra,
        {k: v for k, v in rois.items() if v is not None},
        regions.box.edges(),
        regions.growth_plate_side,
        regions.junction_um,
    )
    return RegionalMeasurement(main, region)
