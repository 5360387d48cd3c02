"""ASBMR histomorphometry from a class map: indices and per-object tables.

The class map contract (DESIGN.md): 0 background, 1 marrow, 2 bone, 3 osteoclast, 4 osteocyte
lacuna. Areas follow from the codes: T.Ar is classes 1-4, B.Ar classes 2 and 4 (lacunae are
part of bone), Ma.Ar = T.Ar - B.Ar. B.Pm is the perimeter of the bone region (2 and 4
together): lacunae add no perimeter, marrow-filled holes in bone do.

Nomenclature and units follow Dempster et al., J Bone Miner Res 2013;28:2-17
(doi:10.1002/jbmr.1805). See ``docs/measure.md`` for the estimators and their accuracy.

Examples
--------
>>> from histo.measure import measure
>>> m = measure(class_map, pixel_size_um=1.0)            # doctest: +SKIP
>>> m.indices["BV/TV"], m.indices["N.Oc/B.Pm"]            # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo import classes
from histo._measure_objects import (
    EIGHT,
    compact_labels,
    count_nuclei,
    label_geometry,
    label_mean,
    lacuna_occupancy,
    optical_density,
)
from histo._measure_perimeter import (
    CORNER_OFFSETS,
    BoundaryCells,
    boundary_cells,
    boundary_length_px,
)
from histo.errors import ClassMapError
from histo.units import check_pixel_size

__all__ = [
    "INDEX_COLUMNS",
    "INDEX_UNITS",
    "OSTEOCLAST_COLUMNS",
    "OSTEOCYTE_COLUMNS",
    "CountingRules",
    "Measurement",
    "boundary_length_px",
    "cortical_trabecular_split",
    "measure",
    "measure_compartments",
    "roi_mask",
    "validate_class_map",
    "validate_pixel_size",
]

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
        osteoclast pixel lies within this many pixels of its non-bone side. 1 (default) bridges
        a one-pixel gap between cell and bone, as segmentations leave, and extends the surface
        by up to one pixel beyond each end of the cell; 0 counts exact contact only.
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


# --------------------------------------------------------------------------- validation


def validate_class_map(class_map) -> np.ndarray:
    """Return ``class_map`` as a 2-D integer array with codes 0-4, or raise ClassMapError."""
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
    if lo < 0 or hi >= classes.N_CLASSES:
        raise ClassMapError(
            f"class map holds codes {lo}..{hi}; expected 0-{classes.N_CLASSES - 1} "
            "(0 background, 1 marrow, 2 bone, 3 osteoclast, 4 osteocyte)"
        )
    return arr


def validate_pixel_size(pixel_size_um) -> float:
    """Return the pixel size as float (µm), or raise PixelSizeError if ≤0, NaN or > 100 µm."""
    return check_pixel_size(pixel_size_um, "pixel size of the class map")


def _check_shape(name: str, arr: np.ndarray, shape: tuple[int, int]) -> None:
    if arr.shape[:2] != shape:
        raise ClassMapError(f"{name} has shape {arr.shape[:2]}, the class map {shape}")


def roi_mask(roi, shape: tuple[int, int]) -> np.ndarray:
    """A region of interest as a boolean mask of ``shape``.

    Parameters
    ----------
    roi : ndarray
        Boolean (or 0/non-zero) mask of ``shape``, or a polygon: an (N, 2) array of vertices
        (row, column) in pixels.
    shape : tuple of int
    """
    arr = np.asarray(roi)
    if arr.shape == tuple(shape) and (arr.dtype == bool or shape[1] != 2):
        return arr.astype(bool)
    if arr.ndim == 2 and arr.shape[1] == 2 and arr.shape[0] >= 3:
        from skimage.draw import polygon2mask

        return polygon2mask(shape, arr.astype(float))
    raise ClassMapError(
        f"ROI must be a mask of the class map's shape {tuple(shape)} or an (N, 2) polygon of "
        f"(row, column) vertices; got shape {arr.shape}"
    )


# --------------------------------------------------------------------------- helpers


def _divide(num: float, den: float, scale: float = 1.0) -> float:
    if den == 0 or not math.isfinite(den) or not math.isfinite(num):
        return math.nan
    return num / den * scale


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _eroded_pits(
    bone: np.ndarray, tissue: np.ndarray, rules: CountingRules, px: float
) -> np.ndarray:
    """Scalloped pits: tissue filled by a closing of bone, deeper than the minimum depth."""
    radius_px = rules.eroded_closing_um / px
    if radius_px < 1:
        return np.zeros(bone.shape, bool)
    r = int(round(radius_px))
    pad = r + 1
    padded = cv2.copyMakeBorder(bone.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _disk(radius_px))[pad:-pad, pad:-pad]
    pits = (closed > 0) & ~bone & tissue
    min_depth_px = rules.eroded_min_depth_um / px
    if min_depth_px > 0 and pits.any():
        # keep pits with a pixel at least min_depth away from the bone
        depth = cv2.distanceTransform((~bone).astype(np.uint8), cv2.DIST_L2, 5)
        lab, n = ndi.label(pits, structure=EIGHT)
        if n:
            # deepest pixel of each pit (the pits' pixels only; ndi.maximum sorts the image)
            at = np.nonzero(lab)
            deepest = np.full(n, -np.inf, depth.dtype)
            np.maximum.at(deepest, lab[at] - 1, depth[at])
            keep = np.zeros(n + 1, bool)
            keep[1:] = deepest >= min_depth_px
            pits = keep[lab]
    return pits


def _side_fraction(nb: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Per boundary segment: fraction of its cell's non-bone corners (``nb``, (4, n)) that are
    ``selected`` ((4, n) bool)."""
    sel = selected & nb
    n_nb = nb.sum(axis=0)
    out = np.zeros(n_nb.shape)
    np.divide(sel.sum(axis=0), n_nb, out=out, where=n_nb > 0)
    return out


def _objects(
    class_map: np.ndarray, code: int, labels: np.ndarray | None, name: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Compact instance labels of one class: given labels (restricted to the class) or CCs."""
    member = class_map == code
    if labels is None:
        lab, n = ndi.label(member, structure=EIGHT)
        return lab.astype(np.int32), np.arange(1, n + 1, dtype=np.int64), n
    labels = np.asarray(labels)
    _check_shape(name, labels, class_map.shape)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ClassMapError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    compact, original = compact_labels(np.where(member, labels, 0))
    return compact, original, int(original.size)


# --------------------------------------------------------------------------- measure


def measure(
    class_map,
    pixel_size_um: float,
    *,
    osteoclast_labels=None,
    osteocyte_labels=None,
    image=None,
    roi=None,
    rules: CountingRules | None = None,
) -> Measurement:
    """Compute ASBMR 2-D histomorphometry indices and per-object tables.

    Parameters
    ----------
    class_map : array_like of int, shape (H, W)
        Codes 0 background, 1 marrow, 2 bone, 3 osteoclast, 4 osteocyte lacuna.
    pixel_size_um : float
        Pixel size in µm (0 < size <= 100).
    osteoclast_labels, osteocyte_labels : array_like of int, shape (H, W), optional
        Instance labels; restricted to class 3 (resp. 4) pixels. Without them each 8-connected
        component of the class is one object.
    image : array_like of uint8, shape (H, W, 3), optional
        The RGB section at the class map's resolution. Enables nuclei counting in osteoclasts,
        the TRAP signal per osteoclast and the occupied/empty decision of lacunae.
    roi : array_like, optional
        Boolean mask of shape (H, W) or an (N, 2) polygon of (row, column) vertices in pixels.
        Areas count ROI pixels; perimeters count bone boundary inside the ROI (the ROI edge is
        never bone perimeter); objects count when their centroid lies in the ROI.
    rules : CountingRules, optional
        Counting and estimator settings; defaults to ``CountingRules()``.

    Returns
    -------
    Measurement
        ``indices`` keyed by :data:`INDEX_COLUMNS` in the units of :data:`INDEX_UNITS`.

    Raises
    ------
    ClassMapError
        The class map is not 2-D integer with codes 0-4, or a companion array has another shape.
    PixelSizeError
        The pixel size is ≤ 0, NaN or > 100 µm.

    Notes
    -----
    Parallel-plate model (Parfitt et al. 1983): Tb.Th = 2·B.Ar/B.Pm, Tb.N = (B.Ar/T.Ar)/Tb.Th,
    Tb.Sp = 1/Tb.N − Tb.Th. B.Pm uses a sub-pixel estimator: marching squares on the bone
    mask with the contour polygon smoothed along its length (see :func:`boundary_length_px`).
    """
    cmap = validate_class_map(class_map)
    px = validate_pixel_size(pixel_size_um)
    rules = rules or CountingRules()
    shape = cmap.shape
    px_area_um2 = px * px

    region = None if roi is None else roi_mask(roi, shape)
    rgb = None
    if image is not None:
        rgb = np.asarray(image)
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise ClassMapError(f"image must be RGB (H, W, 3), got shape {rgb.shape}")
        _check_shape("image", rgb, shape)

    bone = (cmap == classes.BONE) | (cmap == classes.OSTEOCYTE)
    tissue = cmap != classes.BACKGROUND

    # ---- areas
    if region is None:
        t_ar_px = int(np.count_nonzero(tissue))
        b_ar_px = int(np.count_nonzero(bone))
    else:
        t_ar_px = int(np.count_nonzero(tissue & region))
        b_ar_px = int(np.count_nonzero(bone & region))

    # ---- bone perimeter (sub-pixel), weighted by the ROI share of each cell
    cells = boundary_cells(bone, rules.perimeter_smoothing_passes)
    length = cells.length_px
    if region is not None:
        length = length * cells.corners(region).mean(axis=0)
    b_pm_px = float(length.sum())
    non_bone = ~bone

    # ---- osteoclasts
    oc_lab, oc_ids, n_oc_obj = _objects(
        cmap, classes.OSTEOCLAST, osteoclast_labels, "osteoclast_labels"
    )
    oc_area, oc_cy, oc_cx = label_geometry(oc_lab, n_oc_obj)
    # the non-bone side of the bone boundary belongs to an osteoclast when an osteoclast pixel
    # lies within rules.oc_surface_tolerance_px (square neighbourhood); an osteoclast's own
    # pixels always belong to it
    nb = cells.corners(non_bone, fill=True)
    lab_c = _corner_labels(cells, oc_lab, rules.oc_surface_tolerance_px) * nb
    # bone contact per object: each segment's length shared among its cell's non-bone corners
    contact_px = np.zeros(n_oc_obj + 1)
    if n_oc_obj:
        n_nb = nb.sum(axis=0)
        share = np.zeros(n_nb.shape)
        np.divide(cells.length_px, n_nb, out=share, where=n_nb > 0)
        for corner in lab_c:
            contact_px += np.bincount(corner, weights=share * (corner > 0), minlength=n_oc_obj + 1)
    contact_um = contact_px[1:] * px

    nuclei_resolved = rgb is not None and rules.min_nuclei > 0
    od = optical_density(rgb) if rgb is not None else None
    if od is not None and n_oc_obj:
        nuclei = count_nuclei(
            od, oc_lab, n_oc_obj, px, rules.min_nucleus_area_um2, rules.typical_nucleus_area_um2
        )
        trap_signal = label_mean(od[..., 1] - od[..., 0], oc_lab, n_oc_obj)
    else:
        nuclei = np.full(n_oc_obj, np.nan)
        trap_signal = np.full(n_oc_obj, np.nan)

    counted, (osteoclast_rows, off_bone_rows, rejected_rows) = count_osteoclasts(
        (oc_ids, oc_area, contact_um, nuclei, oc_cy, oc_cx, trap_signal),
        _centroids_in(region, oc_cy, oc_cx),
        rules,
        px,
        nuclei_resolved,
    )

    # ---- osteoclast surface: bone boundary whose non-bone side is a counted osteoclast
    counted_lut = np.zeros(n_oc_obj + 1, bool)
    counted_lut[1:] = counted
    oc_surface = counted_lut[lab_c]
    oc_s_px = float((length * _side_fraction(nb, oc_surface)).sum())

    # ---- eroded surface: osteoclast-covered surface (Howship's lacunae under osteoclasts), plus
    # optionally the surface facing pits filled by a closing of bone (see CountingRules)
    eroded_side = oc_surface
    if rules.eroded_closing_um > 0:
        pits = _eroded_pits(bone, tissue, rules, px)
        eroded_side = eroded_side | cells.corners(pits, fill=False)
    es_px = float((length * _side_fraction(nb, eroded_side)).sum())

    # ---- osteocytes (lacunae)
    ot_lab, ot_ids, n_ot_obj = _objects(
        cmap, classes.OSTEOCYTE, osteocyte_labels, "osteocyte_labels"
    )
    ot_area, ot_cy, ot_cx = label_geometry(ot_lab, n_ot_obj)
    if od is not None:
        ring_px = max(int(round(rules.lacuna_ring_um / px)), 1)
        occupied, _, _ = lacuna_occupancy(
            od.sum(axis=2),
            ot_lab,
            n_ot_obj,
            cmap == classes.BONE,
            ring_px,
            rules.lacuna_occupied_ratio,
        )
    else:
        occupied = np.ones(n_ot_obj, bool)
    ot_keep = _centroids_in(region, ot_cy, ot_cx) & (
        ot_area * px_area_um2 >= rules.min_osteocyte_area_um2
    )
    return _finish(
        px=px,
        t_ar_px=t_ar_px,
        b_ar_px=b_ar_px,
        b_pm_px=b_pm_px,
        oc_s_px=oc_s_px,
        es_px=es_px,
        ot=(ot_ids, ot_area, ot_cy, ot_cx, occupied, ot_keep),
        with_image=od is not None,
        osteoclast_rows=osteoclast_rows,
        off_bone_rows=off_bone_rows,
        rejected_rows=rejected_rows,
        rules=rules,
        nuclei_resolved=nuclei_resolved,
    )


def count_osteoclasts(
    objects: tuple,
    in_region: np.ndarray,
    rules: CountingRules,
    px: float,
    nuclei_resolved: bool,
) -> tuple[np.ndarray, tuple[list[dict], list[dict], list[dict]]]:
    """The counting rules on the class-3 objects (``objects`` as for
    :func:`osteoclast_tables`): which are osteoclasts, and the tables of the objects in the
    region (``in_region``, a mask over the objects). Shared by :func:`measure` and
    :func:`histo.measure_blocks.measure_by_blocks`."""
    ids, area, contact_um, nuclei = objects[:4]
    min_contact_um = px if rules.min_bone_contact_um is None else rules.min_bone_contact_um
    on_bone = contact_um >= min_contact_um - 1e-9
    big_enough = area * (px * px) >= rules.min_osteoclast_area_um2
    enough_nuclei = nuclei >= rules.min_nuclei if nuclei_resolved else np.ones(len(ids), bool)
    counted = on_bone & big_enough & enough_nuclei
    tables = osteoclast_tables(
        objects, np.flatnonzero(in_region), counted, on_bone, big_enough, rules, px
    )
    return counted, tables


def osteoclast_tables(
    objects: tuple,
    indices: np.ndarray,
    counted: np.ndarray,
    on_bone: np.ndarray,
    big_enough: np.ndarray,
    rules: CountingRules,
    px: float,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Rows of counted osteoclasts, TRAP+ objects off bone, and objects rejected by a rule.

    ``objects`` is (labels, areas px, bone contact µm, nuclei, centroid y px, centroid x px,
    TRAP signal) per class-3 object; ``indices`` the objects to report (those in the ROI).
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
    return counted_rows, off_bone_rows, rejected_rows


def _finish(
    *,
    px: float,
    t_ar_px: float,
    b_ar_px: float,
    b_pm_px: float,
    oc_s_px: float,
    es_px: float,
    ot: tuple,
    with_image: bool,
    osteoclast_rows: list[dict],
    off_bone_rows: list[dict],
    rejected_rows: list[dict],
    rules: CountingRules,
    nuclei_resolved: bool,
) -> Measurement:
    """The indices and the osteocyte table from pixel totals (shared by :func:`measure` and
    :func:`histo.measure_blocks.measure_by_blocks`, which add their totals up differently).

    ``ot`` is (labels, areas px, centroid y px, centroid x px, occupied, kept) per lacuna.
    """
    ot_ids, ot_area, ot_cy, ot_cx, occupied, ot_keep = ot
    px_mm = px / 1000.0
    px_area_mm2 = px_mm * px_mm
    px_area_um2 = px * px
    t_ar = t_ar_px * px_area_mm2
    b_ar = b_ar_px * px_area_mm2
    b_pm = b_pm_px * px_mm
    n_oc = len(osteoclast_rows)
    osteocyte_rows = [
        {
            "label": int(ot_ids[k]),
            "area_um2": float(ot_area[k] * px_area_um2),
            "centroid_y_um": float(ot_cy[k] * px),
            "centroid_x_um": float(ot_cx[k] * px),
            "occupied": bool(occupied[k]) if with_image else None,
        }
        for k in np.flatnonzero(ot_keep)
    ]
    n_ot = int(np.count_nonzero(occupied & ot_keep))
    n_empty = int(np.count_nonzero(~occupied & ot_keep)) if with_image else math.nan

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
        "Oc.S/BS": _divide(oc_s_px, b_pm_px, 100.0),
        "ES/BS": _divide(es_px, b_pm_px, 100.0),
        "N.Ot": n_ot,
        "N.Ot/B.Ar": _divide(n_ot, b_ar),
        "Tb.Th": tb_th_mm * 1000.0,
        "Tb.Sp": tb_sp_mm * 1000.0,
        "Tb.N": tb_n,
        "Empty lacunae (non-standard)": n_empty,
        "N.TRAP+ off bone": len(off_bone_rows),
    }
    return Measurement(
        indices=indices,
        osteoclasts=osteoclast_rows,
        osteocytes=osteocyte_rows,
        trap_off_bone=off_bone_rows,
        trap_rejected=rejected_rows,
        pixel_size_um=px,
        rules=rules,
        nuclei_resolved=nuclei_resolved,
    )


def _corner_labels(cells: BoundaryCells, labels: np.ndarray, tolerance_px: int) -> np.ndarray:
    """Object label on the corners of the boundary cells, shape (4, n).

    A corner's own label, else the largest label within ``tolerance_px`` pixels (square
    neighbourhood); evaluated only at the corners, never over the whole image. Labels must be
    non-negative (pixels outside the image count as 0).
    """
    own = cells.corners(labels, fill=0)
    t = int(tolerance_px)
    if t <= 0 or cells.y.size == 0:
        return own
    h, w = cells.shape
    # the four corners' neighbourhoods cover offsets -t..t+1 of the cell's top-left pixel:
    # read each of those (2t + 2)² pixels once, take maxima along rows, then along columns
    offsets = range(-t, t + 2)
    ys = [cells.y + o for o in offsets]
    xs = [cells.x + o for o in offsets]
    y_in = [(y >= 0) & (y < h) for y in ys]
    x_in = [(x >= 0) & (x < w) for x in xs]
    ys = [np.clip(y, 0, h - 1) for y in ys]
    xs = [np.clip(x, 0, w - 1) for x in xs]
    zero = np.zeros((), labels.dtype)
    # row maxima over columns -t..t (left corners) and -t+1..t+1 (right corners)
    left, right = [], []
    for yi, yv in zip(ys, y_in, strict=True):
        vals = [np.where(yv & xv, labels[yi, xi], zero) for xi, xv in zip(xs, x_in, strict=True)]
        middle = np.maximum.reduce(vals[1:-1]) if len(vals) > 2 else np.zeros_like(vals[0])
        left.append(np.maximum(middle, vals[0]))
        right.append(np.maximum(middle, vals[-1]))
    near = np.zeros_like(own)
    for k, (dy, dx) in enumerate(CORNER_OFFSETS):
        rows = right if dx else left
        near[k] = np.maximum.reduce(rows[dy : dy + 2 * t + 1])
    return np.where(own > 0, own, near)


def _centroids_in(region: np.ndarray | None, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    if region is None:
        return np.ones(cy.shape, bool)
    if cy.size == 0:
        return np.zeros(0, bool)
    h, w = region.shape
    yy = np.clip(np.round(cy).astype(int), 0, h - 1)
    xx = np.clip(np.round(cx).astype(int), 0, w - 1)
    return region[yy, xx]


# --------------------------------------------------------------------------- compartments


def cortical_trabecular_split(
    class_map, pixel_size_um: float, *, min_cortex_um: float = 80.0
) -> tuple[np.ndarray, np.ndarray]:
    """Split the tissue into cortical and trabecular compartments.

    The cortex is thick bone on the periosteal (outer) tissue edge: the bone is opened with a
    disk of diameter ``min_cortex_um`` (trabeculae, thinner than that, vanish), the opened
    pieces that come within ``min_cortex_um`` of the background (class 0) are kept, and they
    are closed with the same disk so that lacunae, canals and small pores count as cortex.
    The trabecular compartment is the rest of the tissue.

    Parameters
    ----------
    class_map : array_like of int, shape (H, W)
    pixel_size_um : float
    min_cortex_um : float
        Bone thinner than this (µm) is never cortex. Mouse trabeculae are about 40-60 µm thick.

    Returns
    -------
    cortical, trabecular : ndarray of bool, shape (H, W)
        Disjoint masks covering the tissue (classes 1-4). Without background pixels (a field
        inside the section) there is no periosteal edge and the cortex is empty.
    """
    cmap = validate_class_map(class_map)
    px = validate_pixel_size(pixel_size_um)
    tissue = cmap != classes.BACKGROUND
    bone = ((cmap == classes.BONE) | (cmap == classes.OSTEOCYTE)).astype(np.uint8)
    background = ~tissue
    if not background.any() or not bone.any():
        return np.zeros(cmap.shape, bool), tissue.copy()
    radius_px = min_cortex_um / 2.0 / px
    kernel = _disk(radius_px)
    pad = kernel.shape[0]
    # fill lacunae and small pores before opening so they do not break the cortex
    closed_bone = cv2.morphologyEx(
        cv2.copyMakeBorder(bone, pad, pad, pad, pad, cv2.BORDER_REPLICATE),
        cv2.MORPH_CLOSE,
        _disk(max(radius_px / 4.0, 1.0)),
    )
    thick = cv2.morphologyEx(closed_bone, cv2.MORPH_OPEN, kernel)[pad:-pad, pad:-pad] > 0
    if not thick.any():
        return np.zeros(cmap.shape, bool), tissue.copy()
    dist_bg = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 5)
    near_edge = dist_bg * px <= min_cortex_um
    lab, n = ndi.label(thick, structure=EIGHT)
    touching = np.unique(lab[near_edge & thick])
    keep = np.zeros(n + 1, bool)
    keep[touching[touching > 0]] = True
    cortex = keep[lab].astype(np.uint8)
    cortex = (
        cv2.morphologyEx(
            cv2.copyMakeBorder(cortex, pad, pad, pad, pad, cv2.BORDER_REPLICATE),
            cv2.MORPH_CLOSE,
            kernel,
        )[pad:-pad, pad:-pad]
        > 0
    )
    cortex &= tissue
    return cortex, tissue & ~cortex


def measure_compartments(
    class_map,
    pixel_size_um: float,
    *,
    min_cortex_um: float = 80.0,
    roi=None,
    **kwargs,
) -> dict[str, Measurement]:
    """Indices of the whole tissue and of its cortical and trabecular compartments.

    Parameters
    ----------
    class_map, pixel_size_um
        As for :func:`measure`.
    min_cortex_um : float
        Passed to :func:`cortical_trabecular_split`.
    roi : array_like, optional
        Restricts all three compartments (intersected with each).
    **kwargs
        ``osteoclast_labels``, ``osteocyte_labels``, ``image``, ``rules`` for :func:`measure`.

    Returns
    -------
    dict
        ``{"whole": Measurement, "cortical": Measurement, "trabecular": Measurement}``.
    """
    cmap = validate_class_map(class_map)
    cortical, trabecular = cortical_trabecular_split(
        cmap, pixel_size_um, min_cortex_um=min_cortex_um
    )
    base = None if roi is None else roi_mask(roi, cmap.shape)
    out = {"whole": measure(cmap, pixel_size_um, roi=base, **kwargs)}
    for name, mask in (("cortical", cortical), ("trabecular", trabecular)):
        region = mask if base is None else (mask & base)
        out[name] = measure(cmap, pixel_size_um, roi=region, **kwargs)
    return out
