"""The indices and the rules: counting rules, the Measurement record, pixel totals -> indices.

The class map contract (DESIGN.md): 0 background, 1 marrow, 2 bone, 3 osteoclast, 4 osteocyte
lacuna, and on long-bone sections 5 cartilage and 6 soft tissue outside bone. Areas follow from
the codes: T.Ar is classes 1-5, B.Ar classes 2, 4 and 5 (lacunae are part of bone; calcified
cartilage counts with bone matrix, Parfitt et al. 1987), Ma.Ar = T.Ar - B.Ar. Soft tissue (6)
is outside T.Ar, as glass is. B.Pm is the perimeter of the bone region (2, 4 and 5 together):
lacunae add no perimeter, marrow-filled holes in bone do. A map holding codes 5 or 6 also
reports Cg.Ar/B.Ar, the cartilage share of B.Ar (%); a map of codes 0-4 measures as it always
did.

Nomenclature and units follow Dempster et al., J Bone Miner Res 2013;28:2-17
(doi:10.1002/jbmr.1805). See ``docs/measure.md`` for the estimators and their accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from histo import classes
from histo.errors import ClassMapError
from histo.units import INDEX_COLUMNS, INDEX_UNITS, check_pixel_size

__all__ = [
    "INDEX_COLUMNS",
    "INDEX_UNITS",
    "OSTEOCLAST_COLUMNS",
    "OSTEOCYTE_COLUMNS",
    "CountingRules",
    "Lacunae",
    "Measurement",
    "OsteoclastObjects",
    "OsteoclastTables",
    "PixelTotals",
    "count_osteoclasts",
    "indices_from_totals",
    "osteoclast_tables",
    "validate_class_map",
    "validate_pixel_size",
]

#: columns of the per-osteoclast table (also used for TRAP+ objects that are not counted)
OSTEOCLAST_COLUMNS: tuple[str, ...] = (
    "label",
    "area_um2",
    "bone_contact_um",
    "nuclei",
    "centroid_y_um",
    "centroid_x_um",
    "trap_signal",
)

#: columns of the per-osteocyte (lacuna) table
OSTEOCYTE_COLUMNS: tuple[str, ...] = (
    "label",
    "area_um2",
    "centroid_y_um",
    "centroid_x_um",
    "occupied",
)


class OsteoclastObjects(NamedTuple):
    """The class-3 objects of a map, one entry per object (arrays of equal length)."""

    labels: np.ndarray  #: instance label
    area_px: np.ndarray  #: area, pixels
    contact_um: np.ndarray  #: bone perimeter the object covers, µm
    nuclei: np.ndarray  #: nuclei counted from the image (NaN without one)
    cy_px: np.ndarray  #: centroid row, pixels
    cx_px: np.ndarray  #: centroid column, pixels
    trap_signal: np.ndarray  #: mean green minus red optical density (NaN without an image)


class OsteoclastTables(NamedTuple):
    """Rows of the class-3 objects in the region: counted, off bone, rejected by a rule."""

    counted: list[dict]
    off_bone: list[dict]
    rejected: list[dict]


class Lacunae(NamedTuple):
    """The class-4 objects of a map, one entry per lacuna (arrays of equal length)."""

    labels: np.ndarray  #: instance label
    area_px: np.ndarray  #: area, pixels
    cy_px: np.ndarray  #: centroid row, pixels
    cx_px: np.ndarray  #: centroid column, pixels
    occupied: np.ndarray  #: holds a cell (all True without an image)
    kept: np.ndarray  #: in the region and large enough to count


@dataclass
class PixelTotals:
    """Sums over the map (or its region) in pixels, from which the indices follow."""

    tissue_px: int = 0  #: T.Ar
    bone_px: int = 0  #: B.Ar
    perimeter_px: float = 0.0  #: B.Pm
    oc_surface_px: float = 0.0  #: Oc.S
    eroded_px: float = 0.0  #: ES
    cartilage_px: int = 0  #: cartilage (class 5), part of B.Ar
    #: the map held long-bone codes (5 cartilage, 6 soft tissue): Cg.Ar/B.Ar is reported
    long_bone_codes: bool = False


@dataclass(frozen=True)
class CountingRules:
    """Explicit, configurable rules for counting cells and estimating surfaces.

    Attributes
    ----------
    min_bone_contact_um : float or None
        A class-3 object is an osteoclast only if the bone perimeter it covers is at least this
        long (µm). ``None`` means one pixel.
    min_nuclei : int
        Minimum number of nuclei of an osteoclast (the usual rule is 2 or 3). Applied only where
        nuclei are resolved: when an image is given and ``min_nuclei > 0``. Default 0: class 3
        already means "multinucleated TRAP+ cell" (the segmenter's decision) and the RGB nuclei
        counter is approximate (it undercounts touching nuclei; docs/measure.md); the count is
        still reported per osteoclast whenever an image is given.
    min_osteoclast_area_um2 : float
        Smaller class-3 objects are not osteoclasts (µm²).
    min_osteocyte_area_um2 : float
        Smaller class-4 objects are not counted as lacunae (µm²).
    min_nucleus_area_um2, typical_nucleus_area_um2 : float
        Nucleus detection inside osteoclasts (µm²): smaller dark blobs are ignored, a blob of
        k times the typical area counts as k touching nuclei.
    eroded_closing_um : float
        ES is the osteoclast-covered surface (osteoclasts lie in Howship's lacunae). With a
        positive radius (µm), the surface facing pits that a morphological closing of bone with
        a disk of this radius fills is added (empty scallops). Off by default: on synthetic
        truth the closing finds as much "pit" on smooth oc-poor bone as on resorbing bone
        (docs/measure.md).
    eroded_min_depth_um : float
        With ``eroded_closing_um > 0``: filled pits shallower than this (µm) are ignored.
    oc_surface_tolerance_px : int
        The bone surface counts as osteoclast surface (Oc.S, and bone contact) where an
        osteoclast is met within this many pixels walking straight away from the bone from its
        non-bone side. 1 (default) bridges a one-pixel gap between cell and bone, as
        segmentations leave, without claiming the surface beside the cell; 0 counts exact
        contact only.
    lacuna_ring_um : float
        Width (µm) of the bone-matrix ring around a lacuna compared with it to decide whether
        the lacuna holds a cell.
    lacuna_occupied_ratio : float
        A lacuna holds a cell when its mean summed optical density is at least this fraction of
        the ring's (empty lacunae are holes, far lighter than matrix).
    perimeter_smoothing_passes : int
        Passes of vertex smoothing along the bone contour in the sub-pixel perimeter estimator
        (3 is calibrated; see :func:`boundary_length_px`).
    """

    min_bone_contact_um: float | None = None
    min_nuclei: int = 0
    min_osteoclast_area_um2: float = 0.0
    min_osteocyte_area_um2: float = 0.0
    min_nucleus_area_um2: float = 6.0
    typical_nucleus_area_um2: float = 30.0
    eroded_closing_um: float = 0.0
    eroded_min_depth_um: float = 1.5
    oc_surface_tolerance_px: int = 1
    lacuna_ring_um: float = 3.0
    lacuna_occupied_ratio: float = 0.75
    perimeter_smoothing_passes: int = 3


@dataclass
class Measurement:
    """Histomorphometry of one class map (or of its region of interest).

    Attributes
    ----------
    indices : dict
        Index name (:data:`INDEX_COLUMNS`) -> value in the unit of :data:`INDEX_UNITS`.
        Counts are ``int``; undefined ratios (no bone, no tissue) are NaN.
    osteoclasts : list of dict
        Counted osteoclasts, one row per object (:data:`OSTEOCLAST_COLUMNS`).
    osteocytes : list of dict
        Every lacuna (occupied or empty), one row each (:data:`OSTEOCYTE_COLUMNS`).
    trap_off_bone : list of dict
        Class-3 objects without bone contact (precursors, mis-segmentation): not counted.
    trap_rejected : list of dict
        Class-3 objects on bone that fail another rule (area, nuclei), with a ``reason``.
    pixel_size_um : float
    rules : CountingRules
    nuclei_resolved : bool
        Whether nuclei were counted from an image (and the nuclei rule applied).
    """

    indices: dict[str, float]
    osteoclasts: list[dict] = field(default_factory=list)
    osteocytes: list[dict] = field(default_factory=list)
    trap_off_bone: list[dict] = field(default_factory=list)
    trap_rejected: list[dict] = field(default_factory=list)
    pixel_size_um: float = 1.0
    rules: CountingRules = field(default_factory=CountingRules)
    nuclei_resolved: bool = False

    def as_dict(self) -> dict:
        """Plain-data form (JSON-friendly apart from NaN)."""
        out = asdict(self)
        out["rules"] = asdict(self.rules)
        return out


#: cartilage share of B.Ar (%, non-standard), reported when the map holds long-bone codes
CARTILAGE_SHARE = "Cg.Ar/B.Ar"
#: what the codes of a class map mean, for error messages
CODES_TEXT = "0 background, 1 marrow, 2 bone, 3 osteoclast, 4 osteocyte, 5 cartilage, 6 soft tissue"


def validate_class_map(class_map) -> np.ndarray:
    """Return ``class_map`` as a 2-D integer array with codes 0-6, or raise ClassMapError."""
    arr = np.asarray(class_map)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ClassMapError(f"class map must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ClassMapError(f"class map must hold integer codes 0-4, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ClassMapError("class map is empty (0 pixels)")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= classes.N_ALL_CLASSES:
        raise ClassMapError(
            f"class map holds codes {lo}..{hi}; expected 0-{classes.N_ALL_CLASSES - 1} "
            f"({CODES_TEXT})"
        )
    return arr


def validate_pixel_size(pixel_size_um) -> float:
    """Return the pixel size as float (µm), or raise PixelSizeError if ≤0, NaN or > 100 µm."""
    return check_pixel_size(pixel_size_um, "pixel size of the class map")


def _divide(num: float, den: float, scale: float = 1.0) -> float:
    if den == 0 or not math.isfinite(den) or not math.isfinite(num):
        return math.nan
    return num / den * scale


def count_osteoclasts(
    objects: OsteoclastObjects,
    in_region: np.ndarray,
    rules: CountingRules,
    px: float,
    nuclei_resolved: bool,
) -> tuple[np.ndarray, OsteoclastTables]:
    """The counting rules on the class-3 objects: which are osteoclasts (a mask over the
    objects), and the tables of the objects in the region (``in_region``, a mask over them)."""
    min_contact_um = px if rules.min_bone_contact_um is None else rules.min_bone_contact_um
    on_bone = objects.contact_um >= min_contact_um - 1e-9
    big_enough = objects.area_px * (px * px) >= rules.min_osteoclast_area_um2
    enough_nuclei = (
        objects.nuclei >= rules.min_nuclei
        if nuclei_resolved
        else np.ones(len(objects.labels), bool)
    )
    counted = on_bone & big_enough & enough_nuclei
    tables = osteoclast_tables(
        objects, np.flatnonzero(in_region), counted, on_bone, big_enough, rules, px
    )
    return counted, tables


def osteoclast_tables(
    objects: OsteoclastObjects,
    indices: np.ndarray,
    counted: np.ndarray,
    on_bone: np.ndarray,
    big_enough: np.ndarray,
    rules: CountingRules,
    px: float,
) -> OsteoclastTables:
    """Rows of counted osteoclasts, TRAP+ objects off bone, and objects rejected by a rule.

    ``indices`` are the objects to report (those in the ROI).
    """
    ids, area, contact_um, nuclei, cy, cx, trap_signal = objects
    counted_rows, off_bone_rows, rejected_rows = [], [], []
    for k in indices:
        row = {
            "label": int(ids[k]),
            "area_um2": float(area[k] * px * px),
            "bone_contact_um": float(contact_um[k]),
            "nuclei": float(nuclei[k]),
            "centroid_y_um": float(cy[k] * px),
            "centroid_x_um": float(cx[k] * px),
            "trap_signal": float(trap_signal[k]),
        }
        if counted[k]:
            counted_rows.append(row)
        elif not on_bone[k]:
            off_bone_rows.append(row)
        else:
            row["reason"] = (
                "smaller than min_osteoclast_area_um2"
                if not big_enough[k]
                else f"fewer than {rules.min_nuclei} nuclei"
            )
            rejected_rows.append(row)
    return OsteoclastTables(counted_rows, off_bone_rows, rejected_rows)


def indices_from_totals(
    totals: PixelTotals,
    lacunae: Lacunae,
    osteoclasts: OsteoclastTables,
    *,
    px: float,
    rules: CountingRules,
    with_image: bool,
    nuclei_resolved: bool,
) -> Measurement:
    """The indices and the osteocyte table from the pixel totals and the objects."""
    px_mm = px / 1000.0
    px_area_mm2 = px_mm * px_mm
    t_ar = totals.tissue_px * px_area_mm2
    b_ar = totals.bone_px * px_area_mm2
    b_pm = totals.perimeter_px * px_mm
    n_oc = len(osteoclasts.counted)
    kept = lacunae.kept
    n_ot = int(np.count_nonzero(lacunae.occupied & kept))
    n_empty = int(np.count_nonzero(~lacunae.occupied & kept)) if with_image else math.nan
    tb_th_mm = _divide(2.0 * b_ar, b_pm)
    tb_n = _divide(_divide(b_ar, t_ar), tb_th_mm)
    tb_sp_mm = (1.0 / tb_n - tb_th_mm) if tb_n and math.isfinite(tb_n) else math.nan
    indices = {
        "T.Ar": t_ar,
        "B.Ar": b_ar,
        "Ma.Ar": t_ar - b_ar,
        "BV/TV": _divide(b_ar, t_ar, 100.0),
        "Ma.Ar/T.Ar": _divide(t_ar - b_ar, t_ar, 100.0),
        "B.Pm": b_pm,
        "N.Oc": n_oc,
        "N.Oc/B.Pm": _divide(n_oc, b_pm),
        "N.Oc/T.Ar": _divide(n_oc, t_ar),
        "Oc.S/BS": _divide(totals.oc_surface_px, totals.perimeter_px, 100.0),
        "ES/BS": _divide(totals.eroded_px, totals.perimeter_px, 100.0),
        "N.Ot": n_ot,
        "N.Ot/B.Ar": _divide(n_ot, b_ar),
        "Tb.Th": tb_th_mm * 1000.0,
        "Tb.Sp": tb_sp_mm * 1000.0,
        "Tb.N": tb_n,
        "Empty lacunae (non-standard)": n_empty,
        "N.TRAP+ off bone": len(osteoclasts.off_bone),
    }
    if totals.long_bone_codes:
        indices[CARTILAGE_SHARE] = _divide(totals.cartilage_px * px_area_mm2, b_ar, 100.0)
    return Measurement(
        indices=indices,
        osteoclasts=osteoclasts.counted,
        osteocytes=_lacuna_rows(lacunae, px, with_image),
        trap_off_bone=osteoclasts.off_bone,
        trap_rejected=osteoclasts.rejected,
        pixel_size_um=px,
        rules=rules,
        nuclei_resolved=nuclei_resolved,
    )


def _lacuna_rows(lacunae: Lacunae, px: float, with_image: bool) -> list[dict]:
    """Rows of osteocytes.csv: every kept lacuna, occupied or empty."""
    return [
        {
            "label": int(lacunae.labels[k]),
            "area_um2": float(lacunae.area_px[k] * (px * px)),
            "centroid_y_um": float(lacunae.cy_px[k] * px),
            "centroid_x_um": float(lacunae.cx_px[k] * px),
            "occupied": bool(lacunae.occupied[k]) if with_image else None,
        }
        for k in np.flatnonzero(lacunae.kept)
    ]
