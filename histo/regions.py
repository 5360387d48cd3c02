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
  thickness taken as a low running quantile (trabeculae joining the endocortex lengthen a
  run);
- the standard region: a rectangle from ``offset_um`` to ``offset_um + depth_um`` below the
  junction, ``margin_um`` inside the innermost endocortical surface over those rows.

A field without a growth plate gives ``None`` with the reason (the caller measures the whole
field). The core never imports napari or Qt.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo import classes

__all__ = [
    "Region",
    "RegionBox",
    "RegionRules",
    "SectionRegions",
    "RegionSearch",
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


@dataclass
class SectionRegions:
    """Regions of a long-bone section, on the class map's grid and in its orientation."""

    standard: np.ndarray  #: bool, the standard measurement region
    primary_spongiosa: np.ndarray  #: bool, marrow cavity between the junction and the region
    cortex: np.ndarray  #: bool, both cortices below the growth plate
    growth_plate: np.ndarray  #: bool
    box: RegionBox  #: the standard region's edges (µm on the class map's grid)
    growth_plate_side: str  #: where the growth plate lies: top, bottom, left or right
    junction_um: float  #: junction's distance from that side of the image (µm)
    rules: RegionRules


@dataclass
class RegionSearch:
    """What :func:`find_regions` found: the regions, or None and the reason."""

    regions: SectionRegions | None
    reason: str = ""


#: growth plate side -> quarter turns (np.rot90's k) that bring it to the top
_TURNS = {"top": 0, "bottom": 2, "left": -1, "right": 1}
#: working resolution of the search (µm/px): fine enough for 50 µm edges, fast on 3 mm sections
_WORK_UM = 4.0
#: thinnest cartilage band taken for a growth plate (µm): calcified cores are thinner
_PLATE_MIN_UM = 40.0
#: shortest growth plate (µm, longest side): a plate spans the metaphysis, about 1 mm wide in
#: a mouse tibia or femur (Kilborn et al., Contemp Top Lab Anim Sci 2002;41:21); a patch of
#: cartilage a network reads on a trabecular field is a speck of 50-100 µm
_PLATE_MIN_LENGTH_UM = 300.0
_NO_PLATE = "no growth plate found: measuring the whole field"
#: cartilage pieces shorter than this (µm, longest side) do not stop a cortical run
_CORE_MIN_UM = 100.0


def _coarse(mask: np.ndarray, factor: int, any_pixel: bool = False) -> np.ndarray:
    """``mask`` at 1/factor resolution: pixels mostly in it (or touching it, ``any_pixel``)."""
    if factor == 1:
        return mask
    h, w = mask.shape
    size = (max(w // factor, 1), max(h // factor, 1))
    frac = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return frac > 0 if any_pixel else frac > 0.5


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _largest(mask: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, bool)
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _growth_plate(cartilage: np.ndarray, q: float) -> np.ndarray:
    """The largest cartilage band at least _PLATE_MIN_UM thick (lacunae closed first), if it
    is at least _PLATE_MIN_LENGTH_UM long; else an empty mask."""
    m = cv2.morphologyEx(cartilage.astype(np.uint8), cv2.MORPH_CLOSE, _disk(6.0 / q))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(_PLATE_MIN_UM / 2 / q))
    plate = _largest(m > 0)
    ys, xs = np.nonzero(plate)
    if ys.size == 0 or max(np.ptp(ys), np.ptp(xs)) + 1 < _PLATE_MIN_LENGTH_UM / q:
        return np.zeros_like(plate)
    return plate


def _plate_side(plate: np.ndarray, envelope: np.ndarray) -> str:
    """The side the growth plate lies on: away from the longer reach of the section."""
    ys, xs = np.nonzero(plate)
    cy, cx = ys.mean(), xs.mean()
    ey, ex = np.nonzero(envelope)
    if np.ptp(xs) >= np.ptp(ys):  # a horizontal band: the shaft is above or below
        return "top" if (ey > cy).sum() >= (ey < cy).sum() else "bottom"
    return "left" if (ex > cx).sum() >= (ex < cx).sum() else "right"


def _bone_run(row: np.ndarray, start: int, step: int) -> int:
    """Pixels of bone from ``start`` walking by ``step`` (the cortex seen from its surface)."""
    seg = row[start::step] if step > 0 else row[start::-1]
    stop = np.flatnonzero(~seg)
    return int(stop[0]) if len(stop) else len(seg)


@dataclass
class _Cortices:
    """Per row of the canonical section: periosteal and endocortical columns (pixels)."""

    rows: np.ndarray  #: row indices with bone envelope
    outer_left: np.ndarray
    outer_right: np.ndarray  #: last envelope column + 1
    inner_left: np.ndarray
    inner_right: np.ndarray


def _cortices(envelope, bone, first_row: int, q: float) -> _Cortices:
    """Cortical runs from the outermost bone on both sides, thickness a running low quantile.

    A run starts at the row's first bone inside the envelope rather than at the envelope's
    edge, so soft tissue outside the periosteum taken for marrow does not empty the cortex.
    Trabeculae joining the endocortex lengthen a run and pits shorten it; the 10th percentile
    over +-200 µm of rows follows the cortex and ignores most of both; a running median of the
    periosteal column bridges short gaps in the cortex.
    """
    rows = np.array([r for r in range(first_row, envelope.shape[0]) if envelope[r].any()], int)
    if len(rows) == 0:
        return _Cortices(rows, rows, rows, rows, rows)
    left = np.array([np.flatnonzero(envelope[r])[0] for r in rows])
    right = np.array([np.flatnonzero(envelope[r])[-1] + 1 for r in rows])
    window = max(int(round(400.0 / q)), 3)
    outer_l = np.array([_first_bone(bone[r], c, 1) for r, c in zip(rows, left, strict=True)])
    outer_r = np.array([_first_bone(bone[r], c - 1, -1) for r, c in zip(rows, right, strict=True)])
    run_l = np.array([_bone_run(bone[r], c, 1) for r, c in zip(rows, outer_l, strict=True)])
    run_r = np.array([_bone_run(bone[r], c, -1) for r, c in zip(rows, outer_r, strict=True)])
    th_l = ndi.percentile_filter(run_l, 10, size=window, mode="nearest")
    th_r = ndi.percentile_filter(run_r, 10, size=window, mode="nearest")
    peri_l = ndi.median_filter(outer_l, size=window, mode="nearest")
    peri_r = ndi.median_filter(outer_r, size=window, mode="nearest")
    return _Cortices(rows, left, right, peri_l + th_l, peri_r + 1 - th_r)


def _first_bone(row: np.ndarray, start: int, step: int) -> int:
    """Column of the first bone pixel from ``start`` walking by ``step`` (``start`` if none)."""
    seg = row[start::step] if step > 0 else row[start::-1]
    hit = np.flatnonzero(seg)
    return start + step * int(hit[0]) if len(hit) else start


@dataclass
class _Placed:
    box: RegionBox  #: µm, canonical orientation
    junction_um: float
    cortices: _Cortices


def _box_in_section(
    plate: np.ndarray, envelope: np.ndarray, bone: np.ndarray, q: float, rules: RegionRules
) -> _Placed | str:
    """The standard region in the canonical section (growth plate at the top), µm."""
    cols = np.flatnonzero(plate.any(axis=0))
    bottoms = [np.flatnonzero(plate[:, c])[-1] + 1 for c in cols]
    junction = float(np.median(bottoms)) * q
    cort = _cortices(envelope, bone, int(junction / q), q)
    if len(cort.rows) == 0:
        return "no bone below the growth plate: measuring the whole field"
    top = junction + rules.offset_um
    end = (cort.rows[-1] + 1) * q - rules.end_margin_um
    bottom = min(top + rules.depth_um, end)
    if bottom - top < 100.0:
        return (
            f"the section ends {end - junction:.0f} µm below the growth plate, too short for a "
            f"standard region {rules.offset_um:.0f} µm below it: measuring the whole field"
        )
    yc = (cort.rows + 0.5) * q
    inside = (yc >= top) & (yc < bottom)
    if not inside.any():  # cartilage apart from the section, e.g. a field's misread specks
        return "no bone section below the growth plate found: measuring the whole field"
    left = float(cort.inner_left[inside].max()) * q + rules.margin_um
    right = float(cort.inner_right[inside].min()) * q - rules.margin_um
    if right - left < 100.0:
        return "the marrow cavity is too narrow for a standard region: measuring the whole field"
    return _Placed(RegionBox(top, bottom, left, right), junction, cort)


def _box_to_image(box: RegionBox, side: str, canon_um: tuple[float, float]) -> RegionBox:
    """A canonical box (growth plate at the top) on the original image's grid (µm)."""
    h, w = canon_um  # canonical extent
    t, b, l, r = box.edges()
    if side == "top":
        return box
    if side == "bottom":  # turned 180°
        return RegionBox(h - b, h - t, w - r, w - l)
    if side == "left":  # canonical = image turned clockwise: rows <- columns
        return RegionBox(w - r, w - l, t, b)
    return RegionBox(l, r, h - b, h - t)  # right: canonical = image turned anticlockwise


def _section_masks(placed: _Placed, plate, envelope, shape) -> dict[str, np.ndarray]:
    """Coarse canonical masks: primary spongiosa, cortex, growth plate."""
    cort = placed.cortices
    h, w = shape
    cols = np.arange(w)[None, :]
    inner = np.zeros(shape, bool)
    cortex = np.zeros(shape, bool)
    r = cort.rows
    in_cavity = (cols >= cort.inner_left[:, None]) & (cols < cort.inner_right[:, None])
    inner[r] = in_cavity & envelope[r]
    cortex[r] = ~in_cavity & envelope[r]
    return {"cortex": cortex, "growth_plate": plate, "inner": inner}


def find_regions(
    class_map: np.ndarray, pixel_size_um: float, rules: RegionRules | None = None
) -> RegionSearch:
    """Growth plate, cortices and the standard region of a long-bone section's class map.

    Parameters
    ----------
    class_map : ndarray of int, shape (H, W)
        Codes of :mod:`histo.classes` (5 cartilage and 6 soft tissue make a long bone).
    pixel_size_um : float
        µm per pixel of the class map.
    rules : RegionRules, optional
        Offset, depth and margins of the standard region (defaults sourced in
        :class:`RegionRules`).

    Returns
    -------
    RegionSearch
        ``regions`` None with the reason when there is no growth plate (a field: measure it
        whole) or no room for the region.
    """
    rules = rules or RegionRules()
    p = float(pixel_size_um)
    cm = np.ascontiguousarray(class_map)  # a turned view is read many times: copy it once
    factor = max(int(round(_WORK_UM / p)), 1)
    q = p * factor
    cartilage = _coarse(cm == classes.CARTILAGE, factor)
    if cartilage.sum() * q * q < 0.01e6:  # under 0.01 mm² of cartilage
        return RegionSearch(None, _NO_PLATE)
    plate = _growth_plate(cartilage, q)
    if not plate.any():
        return RegionSearch(None, _NO_PLATE)
    tissue = (cm > 0) & (cm != classes.SOFT_TISSUE) & (cm <= classes.CARTILAGE)
    envelope = _largest(ndi.binary_fill_holes(_coarse(tissue, factor)))
    bone = _cortical_bone(cm, factor, q)
    side = _plate_side(plate, envelope)
    k = _TURNS[side]
    canon = [np.rot90(a, k) for a in (plate, envelope, bone)]
    placed = _box_in_section(*canon, q, rules)
    if isinstance(placed, str):
        return RegionSearch(None, placed)
    return RegionSearch(_full_regions(placed, canon, cm.shape, p, q, side, rules))


def _cortical_bone(cm: np.ndarray, factor: int, q: float) -> np.ndarray:
    """Bone a cortical run crosses, at the search's resolution.

    Calcified-cartilage cores lie only in the spongiosa, so a run of bone from the periosteum
    stops at the first core even where trabeculae fill the cavity. Cores are septa running
    from the junction down the shaft; cartilage pieces shorter than _CORE_MIN_UM (specks a
    segmenter leaves inside the cortex) count as bone, so they do not cut the cortex short.
    """
    bone = _coarse(np.isin(cm, (classes.BONE, classes.OSTEOCYTE)), factor)
    cartilage = _coarse(cm == classes.CARTILAGE, factor, any_pixel=True)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cartilage.astype(np.uint8), connectivity=8)
    extent = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]) * q
    speck = extent < _CORE_MIN_UM
    speck[0] = False
    return (bone & ~cartilage) | speck[lab]


def _full_regions(placed: _Placed, canon, shape, p: float, q: float, side: str, rules):
    """Masks on the class map's grid and orientation, from the coarse canonical search."""
    plate, envelope, _ = canon
    k = _TURNS[side]
    canon_shape = np.rot90(np.zeros(shape, bool), k).shape
    canon_um = (canon_shape[0] * p, canon_shape[1] * p)
    coarse = _section_masks(placed, plate, envelope, plate.shape)
    box_canon = placed.box

    def full(mask: np.ndarray) -> np.ndarray:
        up = cv2.resize(
            mask.astype(np.uint8), canon_shape[::-1], interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        return np.ascontiguousarray(np.rot90(up, -k))

    inner = full(coarse["inner"])
    yc = (np.arange(canon_shape[0]) + 0.5) * p
    primary_rows = (yc >= placed.junction_um) & (yc < box_canon.top)
    primary = np.rot90(np.broadcast_to(primary_rows[:, None], canon_shape), -k) & inner
    box = _box_to_image(box_canon, side, canon_um)
    standard = box.mask(shape, p) & full(envelope)
    return SectionRegions(
        standard=standard,
        primary_spongiosa=np.ascontiguousarray(primary),
        cortex=full(coarse["cortex"]),
        growth_plate=full(plate),
        box=box,
        growth_plate_side=side,
        junction_um=placed.junction_um,
        rules=rules,
    )
