"""Histomorphometry of class maps of any size, block by block in bounded memory.

:func:`measure_by_blocks` is histo's one measurement: :func:`histo.measure.measure` calls it on
numpy arrays, the pipeline on the label store of a slide (numpy or zarr). It reads the arrays
(numpy, zarr or any array-like that supports 2-D slicing) one block at a time (the next block is
read in a thread while one is measured). Memory is bounded by a block with its margin
(``(block_px + 2 * margin_px)²`` pixels) and the arrays of the next one, never by the slide.

Decomposition (each quantity is a sum over blocks, each term counted once):

- areas: pixel counts over each block's *core* (the blocks tile the map without overlap);
- bone perimeter: :func:`histo.measure.perimeter.boundary_cells` on the core plus a margin of
  ``PERIMETER_MARGIN_PX``; a segment is kept by the block whose core holds its 2x2 cell. Marching
  squares is local to the cell and the smoothing along the contour reaches 4 vertices (at most 4
  cells) each way, so the kept segments are those of the whole map (equal to rounding);
- per-object sums (area, centroid sums, bone contact, TRAP signal, lacuna optical density and
  the matrix ring around lacunae) are partial sums over cores keyed by the object's global label
  and added with ``np.bincount``;
- Oc.S is the sum of the bone contact of the counted osteoclasts; ES adds the pit-facing surface
  (optional closing rule);
- nuclei need the whole object: each osteoclast is counted by the block whose core holds its
  first pixel (raster order), which reads a margin of ``margin_px`` around its core; objects
  larger than the margin are counted afterwards from a crop of their bounding box.

Without instance maps, each 8-connected component of class 3 (or 4) is one object, numbered as
``scipy.ndimage.label`` numbers them on the whole map (:mod:`histo.measure.labels`).

Whatever the block size, counts, areas, object tables and labels are identical, and B.Pm,
Oc.S, ES and bone contact equal to floating-point rounding (relative differences below 1e-9;
``tests/test_measure_blocks.py``).

Examples
--------
>>> import zarr                                                        # doctest: +SKIP
>>> cm = zarr.open_array("labels.ome.zarr/labels/class_map/0", mode="r")  # doctest: +SKIP
>>> m = measure_by_blocks(cm, 1.0, block_px=4096)                     # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from histo import classes
from histo.errors import ClassMapError
from histo.io.blocks import Block, Prefetch, iter_blocks, read_2d, shape_2d
from histo.io.color import od_lookup, optical_density, summed_od
from histo.measure.indices import (
    CODES_TEXT,
    CountingRules,
    Lacunae,
    Measurement,
    OsteoclastObjects,
    PixelTotals,
    count_osteoclasts,
    indices_from_totals,
    validate_class_map,
    validate_pixel_size,
)
from histo.measure.labels import ComponentLabels, GivenLabels, class_labels, grown_labels, in_core
from histo.measure.objects import count_nuclei_one
from histo.measure.perimeter import BoundaryCells, boundary_cells, corner_labels, eroded_pits
from histo.measure.region import Region
from histo.measure.sums import Sums, label_boxes, per_label
from histo.runtime import release_free_memory

__all__ = [
    "bone_and_tissue",
    "DEFAULT_BLOCK_PX",
    "MARGIN_UM",
    "PERIMETER_MARGIN_PX",
    "measure",
    "measure_by_blocks",
]

#: default block side in pixels (one block with its margin is the unit of memory)
DEFAULT_BLOCK_PX = 4096
#: default margin around a block's core for whole objects (µm): larger than any cell
MARGIN_UM = 256.0
#: margin (px) around a core for the perimeter: the contour smoothing reaches 4 cells each way
PERIMETER_MARGIN_PX = 8
#: after a block, the C heap's free pages are given back once the resident memory has grown by
#: this much (MB) since they last were: blocks allocate and free arrays of many sizes in two
#: threads, and without it the freed pages stay resident and the process creeps up over a slide
TRIM_SLACK_MB = 32

ProgressFn = Callable[[float, str], None]
ImageReader = Callable[[int, int, int, int], np.ndarray]

#: optical density (base 10) of each 8-bit value
_OD_LUT = od_lookup(10.0)


# --------------------------------------------------------------------------- accumulation


@dataclass
class _Accumulator:
    """Everything summed over the blocks of one measurement."""

    totals: PixelTotals = field(default_factory=PixelTotals)
    pit_px: float = 0.0  #: surface facing eroded pits (closing rule), pixels
    matrix_od_sum: float = 0.0  #: summed optical density of bone matrix pixels
    matrix_n: int = 0
    oc: Sums = field(
        default_factory=lambda: Sums(
            ("area", "sy", "sx", "trap", "contact", "contact_roi", "nopit")
        )
    )
    ot: Sums = field(default_factory=lambda: Sums(("area", "sy", "sx", "od", "ring_od", "ring_n")))
    oc_boxes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    nuclei: dict[int, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    """What a measurement reads and with which margins (pixels)."""

    class_map: Any
    shape: tuple[int, int]
    px: float  #: µm per pixel
    rules: CountingRules
    osteoclasts: GivenLabels | ComponentLabels
    osteocytes: GivenLabels | ComponentLabels
    region: Region | None
    read_rgb: ImageReader | None
    tol: int  #: osteoclast-to-surface tolerance
    ring_px: int  #: matrix ring around lacunae
    per_margin: int  #: perimeter margin around a core
    pit_margin: int  #: eroded-pit margin around a core

    @property
    def with_pits(self) -> bool:
        return self.rules.eroded_closing_um > 0


class _BlockArrays(NamedTuple):
    """The arrays one block reads (window coordinates unless said)."""

    class_map: np.ndarray  #: over the window
    osteoclasts: np.ndarray  #: raw labels over the window (whole cells for nuclei)
    osteocytes: np.ndarray  #: raw labels over the core grown by the lacuna ring
    region: np.ndarray | None  #: over the core grown by the perimeter margin


def _fetch(plan: _Plan, b: Block) -> _BlockArrays:
    """The arrays of one block (run in the prefetch thread)."""
    ys, xs = b.window
    gyy, gxx = b.grown(plan.ring_px)
    sy, sx = b.grown(plan.per_margin)
    reg = None
    if plan.region is not None:
        reg = plan.region.window(
            slice(b.wy0 + sy.start, b.wy0 + sy.stop), slice(b.wx0 + sx.start, b.wx0 + sx.stop)
        )
    return _BlockArrays(
        read_2d(plan.class_map, ys, xs),
        plan.osteoclasts.window(ys, xs),
        plan.osteocytes.window(
            slice(b.wy0 + gyy.start, b.wy0 + gyy.stop),
            slice(b.wx0 + gxx.start, b.wx0 + gxx.stop),
        ),
        reg,
    )


def _check_codes(core_cm: np.ndarray, b: Block) -> bool:
    """Raise on codes outside 0-6; True when the core holds long-bone codes (5, 6)."""
    if not core_cm.size:
        return False
    lo, hi = int(core_cm.min()), int(core_cm.max())
    if lo < 0 or hi >= classes.N_ALL_CLASSES:
        raise ClassMapError(
            f"class map holds codes {lo}..{hi} (block at row {b.y0}, column {b.x0}); "
            f"expected 0-{classes.N_ALL_CLASSES - 1} ({CODES_TEXT})"
        )
    return hi >= classes.CARTILAGE


# --------------------------------------------------------------------------- one block


class _Window(NamedTuple):
    """One block's class masks and labelled pixels (window coordinates)."""

    block: Block
    class_map: np.ndarray
    bone: np.ndarray
    tissue: np.ndarray
    oc_labels: np.ndarray  #: osteoclast labels on class-3 pixels, 0 elsewhere
    oc_pixels: tuple[np.ndarray, np.ndarray, np.ndarray]  #: (rows, columns, labels)
    ot_mask: np.ndarray  #: labelled lacuna pixels over the core grown by the ring
    ot_pixels: tuple[np.ndarray, np.ndarray, np.ndarray]  #: of ot_mask
    ot_core: tuple[slice, slice]  #: the core in ot_mask
    long_bone: bool = False  #: the core holds codes 5 or 6


def _window(plan: _Plan, b: Block, arrays: _BlockArrays) -> _Window:
    cm = arrays.class_map
    cy, cx = b.core
    long_bone = _check_codes(cm[cy, cx], b)
    oc_w, oc_rc = class_labels(cm, classes.OSTEOCLAST, arrays.osteoclasts)
    gyy, gxx = b.grown(plan.ring_px)
    ot_mask, ot_rc = class_labels(cm[gyy, gxx], classes.OSTEOCYTE, arrays.osteocytes, image=False)
    ot_core = (
        slice(b.y0 - b.wy0 - gyy.start, b.y1 - b.wy0 - gyy.start),
        slice(b.x0 - b.wx0 - gxx.start, b.x1 - b.wx0 - gxx.start),
    )
    bone, tissue = bone_and_tissue(cm)
    return _Window(b, cm, bone, tissue, oc_w, oc_rc, ot_mask, ot_rc, ot_core, long_bone)


def bone_and_tissue(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bone (B.Ar: classes 2, 4 and 5) and tissue (T.Ar: classes 1-5) masks of a class map.

    Calcified cartilage counts with bone matrix (Parfitt et al. 1987); soft tissue outside bone
    (6) is outside T.Ar like glass. On codes 0-4 these are bone = 2 or 4, tissue = not 0.
    """
    bone = (cm == classes.BONE) | (cm == classes.OSTEOCYTE) | (cm == classes.CARTILAGE)
    tissue = (cm != classes.BACKGROUND) & (cm != classes.SOFT_TISSUE)
    return bone, tissue


def _add_areas(acc: _Accumulator, plan: _Plan, win: _Window, reg: np.ndarray | None) -> None:
    """T.Ar and B.Ar over the core (and the region)."""
    b = win.block
    cy, cx = b.core
    tissue, bone = win.tissue[cy, cx], win.bone[cy, cx]
    if reg is not None:
        sy, sx = b.grown(plan.per_margin)
        inside = reg[
            b.y0 - b.wy0 - sy.start : b.y1 - b.wy0 - sy.start,
            b.x0 - b.wx0 - sx.start : b.x1 - b.wx0 - sx.start,
        ]
        tissue, bone = tissue & inside, bone & inside
    acc.totals.tissue_px += int(np.count_nonzero(tissue))
    acc.totals.bone_px += int(np.count_nonzero(bone))
    if win.long_bone:
        acc.totals.long_bone_codes = True
        cartilage = win.class_map[cy, cx] == classes.CARTILAGE
        if reg is not None:
            cartilage &= inside
        acc.totals.cartilage_px += int(np.count_nonzero(cartilage))


def _core_cells(plan: _Plan, win: _Window) -> BoundaryCells:
    """Boundary cells of the bone whose 2x2 cell lies in the core (from core + margin)."""
    b = win.block
    H, W = plan.shape
    sy, sx = b.grown(plan.per_margin)
    sub_shape = (sy.stop - sy.start, sx.stop - sx.start)
    allc = boundary_cells(win.bone[sy, sx], plan.rules.perimeter_smoothing_passes)
    gy = np.clip(allc.y + sy.start + b.wy0, 0, H - 1)
    gx = np.clip(allc.x + sx.start + b.wx0, 0, W - 1)
    keep = (gy >= b.y0) & (gy < b.y1) & (gx >= b.x0) & (gx < b.x1)
    return BoundaryCells(allc.y[keep], allc.x[keep], allc.length_px[keep], sub_shape)


def _pit_corners(
    plan: _Plan, win: _Window, cells: BoundaryCells, non_bone: np.ndarray
) -> np.ndarray:
    """Non-bone corners of the cells that face an eroded pit (closing rule)."""
    b = win.block
    sy, sx = b.grown(plan.per_margin)
    # pits from the core plus pit_margin (a pit wider than that is cut)
    py, px_ = b.grown(plan.pit_margin)
    rules = plan.rules
    pits = eroded_pits(
        win.bone[py, px_],
        win.tissue[py, px_],
        rules.eroded_closing_um,
        rules.eroded_min_depth_um,
        plan.px,
    )
    oy, ox = sy.start - py.start, sx.start - px_.start
    pits_sub = np.ascontiguousarray(pits[oy : oy + cells.shape[0], ox : ox + cells.shape[1]])
    return cells.corners(pits_sub, fill=False) & non_bone


def _share(length: np.ndarray, n_corners: np.ndarray) -> np.ndarray:
    """Each segment's length shared among its cell's non-bone corners."""
    out = np.zeros(n_corners.shape)
    np.divide(length, n_corners, out=out, where=n_corners > 0)
    return out


def _add_surfaces(acc: _Accumulator, plan: _Plan, win: _Window, reg: np.ndarray | None) -> None:
    """B.Pm, the bone contact of each osteoclast and the pit-facing surface over the core."""
    sy, sx = win.block.grown(plan.per_margin)
    cells = _core_cells(plan, win)
    length = cells.length_px
    if reg is not None:
        length = length * cells.corners(reg).mean(axis=0)
    acc.totals.perimeter_px += float(length.sum())
    nb = ~cells.corners(win.bone[sy, sx], fill=False)
    lab_c = corner_labels(cells, win.oc_labels[sy, sx], win.bone[sy, sx], plan.tol) * nb
    n_nb = nb.sum(axis=0)
    share, share_roi = _share(cells.length_px, n_nb), _share(length, n_nb)
    pit_c = None
    if plan.with_pits:
        pit_c = _pit_corners(plan, win, cells, nb)
        acc.pit_px += float((share_roi * pit_c).sum())
    sel = lab_c > 0
    k_roi = np.broadcast_to(share_roi, lab_c.shape)[sel]
    u, s = per_label(
        lab_c[sel],
        {
            "contact": np.broadcast_to(share, lab_c.shape)[sel],
            "contact_roi": k_roi,
            "nopit": k_roi if pit_c is None else k_roi * ~pit_c[sel],
        },
    )
    acc.oc.add(u, **s)


class _Boxes(NamedTuple):
    """Objects and their bounding boxes (rows [y0, y1), columns [x0, x1))."""

    labels: np.ndarray
    y0: np.ndarray
    x0: np.ndarray
    y1: np.ndarray
    x1: np.ndarray


class _BlockImage(NamedTuple):
    """The RGB image a block reads: over the core and the osteoclasts it counts."""

    rgb: np.ndarray
    origin: tuple[int, int]  #: (row, column) of rgb[0, 0] in the window
    core_rgb: np.ndarray
    core_od: np.ndarray  #: summed optical density over the core (float32)
    targets: _Boxes  #: the osteoclasts counted here (:func:`_whole_owned`)


def _read_block_image(plan: _Plan, win: _Window) -> _BlockImage:
    b = win.block
    cy, cx = b.core
    targets = _whole_owned(b, win.oc_pixels, win.class_map.shape, plan.shape)
    ty0, tx0, ty1, tx1 = targets.y0, targets.x0, targets.y1, targets.x1
    ry0 = min(cy.start, int(ty0.min(initial=cy.start)))
    rx0 = min(cx.start, int(tx0.min(initial=cx.start)))
    ry1 = max(cy.stop, int(ty1.max(initial=cy.stop)))
    rx1 = max(cx.stop, int(tx1.max(initial=cx.stop)))
    assert plan.read_rgb is not None
    rgb = plan.read_rgb(b.wy0 + ry0, b.wx0 + rx0, ry1 - ry0, rx1 - rx0)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)  # as optical_density reads it
    core_rgb = rgb[cy.start - ry0 : cy.stop - ry0, cx.start - rx0 : cx.stop - rx0]
    return _BlockImage(rgb, (ry0, rx0), core_rgb, summed_od(core_rgb), targets)


def _add_objects(acc: _Accumulator, win: _Window, image: _BlockImage | None) -> None:
    """Area, centroid sums and image sums of the osteoclasts and lacunae over the core."""
    b = win.block
    cy, cx = b.core
    for (rows, cols, vals), sums, kind in (
        (in_core(win.oc_pixels, cy, cx), acc.oc, "oc"),
        (in_core(win.ot_pixels, *win.ot_core), acc.ot, "ot"),
    ):
        if rows.size == 0:
            continue
        weights: dict[str, np.ndarray] = {
            "sy": (rows + b.y0).astype(float),
            "sx": (cols + b.x0).astype(float),
        }
        if image is not None and kind == "oc":
            od_r = _OD_LUT[image.core_rgb[rows, cols, 0]]
            od_g = _OD_LUT[image.core_rgb[rows, cols, 1]]
            weights["trap"] = (od_g - od_r).astype(float)
        elif image is not None:
            weights["od"] = image.core_od[rows, cols].astype(float)
        u, s = per_label(vals, weights, count="area")
        sums.add(u, **s)
        if kind == "oc":
            acc.oc_boxes.append(label_boxes(vals, rows + b.y0, cols + b.x0))


def _add_matrix(acc: _Accumulator, plan: _Plan, win: _Window, image: _BlockImage) -> None:
    """Optical density of bone matrix: all of it, and the ring around each lacuna."""
    cy, cx = win.block.core
    matrix = win.class_map[cy, cx] == classes.BONE
    od_matrix = image.core_od[matrix]
    acc.matrix_od_sum += float(od_matrix.astype(np.float64).sum())
    acc.matrix_n += int(od_matrix.size)
    ring_ids, grown = grown_labels(win.ot_pixels, win.ot_mask.shape, plan.ring_px)
    if not ring_ids.size:
        return
    iy, ix = win.ot_core
    grown = grown[iy, ix]
    sel = matrix & ~win.ot_mask[iy, ix] & (grown > 0)
    if sel.any():
        u, s = per_label(
            grown[sel],
            {"ring_od": image.core_od[sel].astype(float)},
            count="ring_n",
            ids=ring_ids,
        )
        acc.ot.add(u, **s)


def _measure_block(acc: _Accumulator, plan: _Plan, b: Block, arrays: _BlockArrays) -> None:
    win = _window(plan, b, arrays)
    _add_areas(acc, plan, win, arrays.region)
    _add_surfaces(acc, plan, win, arrays.region)
    image = None if plan.read_rgb is None else _read_block_image(plan, win)
    _add_objects(acc, win, image)
    if image is not None:
        _add_matrix(acc, plan, win, image)
        acc.nuclei.update(
            _count_targets(image.targets, win.oc_labels, image.rgb, image.origin, plan)
        )


# --------------------------------------------------------------------------- nuclei


def _whole_owned(
    b: Block,
    oc_rc: tuple[np.ndarray, np.ndarray, np.ndarray],
    window_shape: tuple[int, int],
    shape: tuple[int, int],
) -> _Boxes:
    """The osteoclasts this block owns (first pixel in its core) and sees whole.

    ``oc_rc`` holds the labelled pixels (rows, columns, labels) of the window. Returns each
    one's bounding box in window coordinates.
    """
    rows, cols, vals = oc_rc
    empty = np.zeros(0, np.int64)
    if rows.size == 0:
        return _Boxes(empty, empty, empty, empty, empty)
    order = np.argsort(vals, kind="stable")
    v = vals[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    ids = v[starts]
    # first pixel (raster order) of each label: the first of its run in the stable order
    r, c = rows[order], cols[order]
    fr, fc = r[starts], c[starts]
    cy, cx = b.core
    owned = (fr >= cy.start) & (fr < cy.stop) & (fc >= cx.start) & (fc < cx.stop)
    y0 = np.minimum.reduceat(r, starts)
    x0 = np.minimum.reduceat(c, starts)
    y1 = np.maximum.reduceat(r, starts) + 1
    x1 = np.maximum.reduceat(c, starts) + 1
    # whole only if it does not touch a window edge that is not the map's edge
    H, W = shape
    h, w = window_shape
    whole = owned
    if b.wy0 > 0:
        whole &= y0 > 0
    if b.wx0 > 0:
        whole &= x0 > 0
    if b.wy1 < H:
        whole &= y1 < h
    if b.wx1 < W:
        whole &= x1 < w
    return _Boxes(ids[whole], y0[whole], x0[whole], y1[whole], x1[whole])


def _count_one(od: np.ndarray, mask: np.ndarray, plan: _Plan) -> float:
    rules = plan.rules
    return count_nuclei_one(
        od, mask, plan.px, rules.min_nucleus_area_um2, rules.typical_nucleus_area_um2
    )


def _count_targets(
    targets: _Boxes,
    oc_w: np.ndarray,
    rgb: np.ndarray,
    origin: tuple[int, int],
    plan: _Plan,
) -> dict[int, float]:
    """Nuclei of the osteoclasts of :func:`_whole_owned` (``rgb`` starts at ``origin`` of the
    window)."""
    out: dict[int, float] = {}
    oy, ox = origin
    for lab, y0, x0, y1, x1 in zip(*(t.tolist() for t in targets), strict=True):
        mask = oc_w[y0:y1, x0:x1] == lab
        od = _OD_LUT[rgb[y0 - oy : y1 - oy, x0 - ox : x1 - ox]]
        out[int(lab)] = _count_one(od, mask, plan)
    return out


def _nuclei_from_boxes(labels: list[int], acc: _Accumulator, plan: _Plan) -> dict[int, float]:
    """Nuclei of osteoclasts larger than the margin, from a crop of their bounding box."""
    all_ids = np.concatenate([ids for ids, _ in acc.oc_boxes])
    all_box = np.concatenate([box for _, box in acc.oc_boxes])
    out: dict[int, float] = {}
    assert plan.read_rgb is not None
    for lab in labels:
        mine = all_box[all_ids == lab]
        y0, x0 = int(mine[:, 0].min()), int(mine[:, 1].min())
        y1, x1 = int(mine[:, 2].max()), int(mine[:, 3].max())
        ys, xs = slice(y0, y1), slice(x0, x1)
        cm = read_2d(plan.class_map, ys, xs)
        mask = (plan.osteoclasts.window(ys, xs) == lab) & (cm == classes.OSTEOCLAST)
        rgb = plan.read_rgb(y0, x0, y1 - y0, x1 - x0)
        out[lab] = _count_one(optical_density(rgb), mask, plan)
    return out


# --------------------------------------------------------------------------- objects


def _centroids_in(plan: _Plan, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    if plan.region is None:
        return np.ones(cy.shape, bool)
    if cy.size == 0:
        return np.zeros(0, bool)
    h, w = plan.shape
    yy = np.clip(np.round(cy).astype(int), 0, h - 1)
    xx = np.clip(np.round(cx).astype(int), 0, w - 1)
    return plan.region.at(yy, xx)


def _centroids(sums: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    area = sums["area"]
    return sums["sy"] / np.where(area > 0, area, 1), sums["sx"] / np.where(area > 0, area, 1)


def _osteoclasts(acc: _Accumulator, plan: _Plan) -> tuple[OsteoclastObjects, dict]:
    """The class-3 objects from their sums (nuclei of large ones counted from their box)."""
    ids, oc = acc.oc.reduce()
    cy, cx = _centroids(oc)
    if plan.read_rgb is not None and ids.size:
        missing = [int(lab) for lab in ids if int(lab) not in acc.nuclei]
        if missing:
            acc.nuclei.update(_nuclei_from_boxes(missing, acc, plan))
        nuclei = np.array([acc.nuclei.get(int(lab), 0.0) for lab in ids])
        with np.errstate(invalid="ignore", divide="ignore"):
            trap = np.where(oc["area"] > 0, oc["trap"] / oc["area"], np.nan)
    else:
        nuclei = np.full(ids.size, np.nan)
        trap = np.full(ids.size, np.nan)
    objects = OsteoclastObjects(ids, oc["area"], oc["contact"] * plan.px, nuclei, cy, cx, trap)
    return objects, oc


def _lacunae(acc: _Accumulator, plan: _Plan) -> Lacunae:
    """The class-4 objects from their sums: occupied when darker than their matrix ring."""
    ids, ot = acc.ot.reduce()
    area = ot["area"]
    cy, cx = _centroids(ot)
    if plan.read_rgb is not None:
        matrix_od = acc.matrix_od_sum / acc.matrix_n if acc.matrix_n else 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            lacuna_od = ot["od"] / area
            ring_od = np.where(
                ot["ring_n"] > 0, ot["ring_od"] / np.maximum(ot["ring_n"], 1), np.nan
            )
        ring_od = np.where(np.isnan(ring_od), matrix_od, ring_od)
        occupied = lacuna_od >= plan.rules.lacuna_occupied_ratio * ring_od
    else:
        occupied = np.ones(ids.size, bool)
    kept = _centroids_in(plan, cy, cx) & (
        area * (plan.px * plan.px) >= plan.rules.min_osteocyte_area_um2
    )
    return Lacunae(ids, area, cy, cx, occupied, kept)


def _finish(acc: _Accumulator, plan: _Plan) -> Measurement:
    """The indices and tables from the sums over all blocks."""
    objects, oc = _osteoclasts(acc, plan)
    with_image = plan.read_rgb is not None
    nuclei_resolved = with_image and plan.rules.min_nuclei > 0
    counted, tables = count_osteoclasts(
        objects,
        _centroids_in(plan, objects.cy_px, objects.cx_px),
        plan.rules,
        plan.px,
        nuclei_resolved,
    )
    totals = acc.totals
    totals.oc_surface_px = float(oc["contact_roi"][counted].sum())
    # ES: pit-facing corners plus corners of counted osteoclasts that face no pit
    totals.eroded_px = (
        acc.pit_px + float(oc["nopit"][counted].sum()) if plan.with_pits else totals.oc_surface_px
    )
    return indices_from_totals(
        totals,
        _lacunae(acc, plan),
        tables,
        px=plan.px,
        rules=plan.rules,
        with_image=with_image,
        nuclei_resolved=nuclei_resolved,
    )


# --------------------------------------------------------------------------- measure


def _pit_margin(rules: CountingRules, px: float) -> int:
    """Margin (px) for the optional eroded-pit rule: twice the closing diameter plus depth."""
    if rules.eroded_closing_um / px < 1:
        return 0
    r = int(round(rules.eroded_closing_um / px))
    return 4 * r + 4 + int(math.ceil(rules.eroded_min_depth_um / px))


def _image_reader(image: Any, shape: tuple[int, int]) -> ImageReader | None:
    if image is None:
        return None
    if callable(image) and not hasattr(image, "shape"):

        def read_call(y: int, x: int, h: int, w: int) -> np.ndarray:
            rgb = np.asarray(image(y, x, h, w))
            if rgb.ndim != 3 or rgb.shape[:2] != (h, w) or rgb.shape[2] < 3:
                raise ClassMapError(
                    f"image reader returned shape {rgb.shape}, expected ({h}, {w}, 3)"
                )
            return rgb[..., :3]

        return read_call
    ishape = tuple(int(n) for n in image.shape)
    if len(ishape) != 3 or ishape[2] < 3:
        raise ClassMapError(f"image must be RGB (H, W, 3), got shape {ishape}")
    if ishape[:2] != tuple(shape):
        raise ClassMapError(f"image has shape {ishape[:2]}, the class map {tuple(shape)}")

    def read_array(y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.asarray(image[y : y + h, x : x + w, :3])

    return read_array


def _check_class_map(class_map: Any) -> tuple[int, int]:
    shape = shape_2d(class_map)
    dtype = np.dtype(getattr(class_map, "dtype", np.asarray(class_map[:1, :1]).dtype))
    if dtype.kind == "b" or not np.issubdtype(dtype, np.integer):
        raise ClassMapError(f"class map must hold integer codes 0-6, got dtype {dtype}")
    if shape[0] * shape[1] == 0:
        raise ClassMapError("class map is empty (0 pixels)")
    return shape


def measure_by_blocks(
    class_map: Any,
    pixel_size_um: float,
    *,
    osteoclast_labels: Any = None,
    osteocyte_labels: Any = None,
    image: Any = None,
    roi: Any = None,
    rules: CountingRules | None = None,
    block_px: int = DEFAULT_BLOCK_PX,
    margin_px: int | None = None,
    progress: ProgressFn | None = None,
) -> Measurement:
    """ASBMR indices and object tables of a class map of any size, read block by block.

    Same contract and result as :func:`histo.measure.measure` (see there for the indices and
    the arguments), with the arrays read one block (plus margin) at a time.

    Parameters
    ----------
    class_map : array_like of int, shape (H, W)
        Numpy, zarr or any array-like supporting ``a[y0:y1, x0:x1]``. Codes 0-6
        (:mod:`histo.classes`).
    pixel_size_um : float
        Pixel size in µm.
    osteoclast_labels, osteocyte_labels : array_like of int, shape (H, W), optional
        Slide-wide instance labels (restricted to class 3, resp. 4). Without them each
        8-connected component is one object, numbered as ``scipy.ndimage.label`` numbers them.
    image : array_like (H, W, 3) uint8 or callable, optional
        The RGB section at the class map's resolution, as an array-like or a function
        ``read(y, x, h, w) -> (h, w, 3) uint8`` (pixels of the class map).
    roi : optional
        Boolean mask array-like of shape (H, W), an (N, 2) polygon (row, column) in pixels, or
        a :class:`histo.io.roi.Roi` (polygons with holes in µm).
    rules : CountingRules, optional
    block_px : int
        Core side of a block in pixels. Peak memory is about 45 bytes per pixel of a block with
        its margin, with an image and the next block's arrays.
    margin_px : int, optional
        Margin read around each core (px): objects up to this size are measured in one block;
        larger ones are re-read from their bounding box. Default ``MARGIN_UM`` in pixels.
    progress : callable, optional
        ``progress(fraction, message)`` after each block.

    Returns
    -------
    Measurement

    Raises
    ------
    ClassMapError, PixelSizeError
        As :func:`histo.measure.measure`.
    """
    px = validate_pixel_size(pixel_size_um)
    rules = rules or CountingRules()
    shape = _check_class_map(class_map)
    block_px = max(int(block_px), 16)
    margin_px = int(math.ceil(MARGIN_UM / px)) if margin_px is None else int(margin_px)
    labels = (osteoclast_labels, osteocyte_labels)
    with _label_sources(class_map, shape, labels, block_px) as sources:
        region = None if roi is None else Region(roi, shape, px)
        plan = _plan(class_map, shape, px, rules, sources, region, _image_reader(image, shape))
        margin = max(margin_px, plan.per_margin, plan.ring_px + 1, _pit_margin(rules, px))
        return _measure(plan, list(iter_blocks(shape, block_px, margin)), progress)


@contextmanager
def _label_sources(
    class_map: Any, shape: tuple[int, int], given: tuple[Any, Any], block_px: int
) -> Iterator[list[GivenLabels | ComponentLabels]]:
    """The osteoclast and osteocyte instances (``given``: their labels or None, see
    :func:`_label_source`); the temporary stores of labelled components are closed on exit."""
    sources: list[GivenLabels | ComponentLabels] = []
    try:
        for labels, code, name in (
            (given[0], classes.OSTEOCLAST, "osteoclast_labels"),
            (given[1], classes.OSTEOCYTE, "osteocyte_labels"),
        ):
            sources.append(_label_source(class_map, shape, labels, code, name, block_px))
        yield sources
    finally:
        for source in sources:
            if isinstance(source, ComponentLabels):
                source.close()


def _label_source(
    class_map: Any, shape: tuple[int, int], given: Any, code: int, name: str, block_px: int
) -> GivenLabels | ComponentLabels:
    """The instances of class ``code``: the ``given`` labels, else the class's 8-connected
    components, labelled slide-wide (in a temporary zarr unless the map is in memory)."""
    if given is not None:
        return GivenLabels(given, shape, name)
    return ComponentLabels(class_map, code, shape, block_px, not isinstance(class_map, np.ndarray))


def _plan(class_map, shape, px, rules, sources, region, read_rgb) -> _Plan:
    """The plan of a measurement: the margins its rules need (pixels)."""
    tol = max(int(rules.oc_surface_tolerance_px), 0)
    ring_px = max(int(round(rules.lacuna_ring_um / px)), 1)
    per_margin = PERIMETER_MARGIN_PX + tol + 2
    pit_margin = max(_pit_margin(rules, px), per_margin)
    return _Plan(
        class_map, shape, px, rules, sources[0], sources[1], region, read_rgb,
        tol, ring_px, per_margin, pit_margin,
    )  # fmt: skip


def _measure(plan: _Plan, blocks: list[Block], progress: ProgressFn | None) -> Measurement:
    acc = _Accumulator()
    with Prefetch(blocks, lambda b: _fetch(plan, b)) as fetched:
        for i, (b, arrays) in enumerate(fetched):
            _measure_block(acc, plan, b, arrays)
            if progress is not None:
                progress((i + 1) / len(blocks), f"measuring block {i + 1}/{len(blocks)}")
            release_free_memory(slack_mb=TRIM_SLACK_MB)
    return _finish(acc, plan)


def _optional_array(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array, None kept."""
    return None if value is None else np.asarray(value)


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
    roi : optional
        Boolean mask of shape (H, W), an (N, 2) polygon of (row, column) vertices in pixels, or
        a :class:`histo.io.roi.Roi` (polygons with holes, µm). Areas count ROI pixels;
        perimeters count bone boundary inside the ROI (the ROI edge is never bone perimeter);
        objects count when their centroid lies in the ROI.
    rules : CountingRules, optional
        Counting and estimator settings; defaults to ``CountingRules()``.

    Returns
    -------
    Measurement
        ``indices`` keyed by :data:`INDEX_COLUMNS` in the units of :data:`INDEX_UNITS`.

    Raises
    ------
    ClassMapError
        The class map is not 2-D integer with codes 0-6, or a companion array has another shape.
    PixelSizeError
        The pixel size is ≤ 0, NaN or > 100 µm.

    Notes
    -----
    The map is measured by :func:`measure_by_blocks` in blocks of ``DEFAULT_BLOCK_PX``: one
    implementation for every size.

    Parallel-plate model (Parfitt et al. 1983): Tb.Th = 2·B.Ar/B.Pm, Tb.N = (B.Ar/T.Ar)/Tb.Th,
    Tb.Sp = 1/Tb.N − Tb.Th. B.Pm uses a sub-pixel estimator: marching squares on the bone
    mask with the contour polygon smoothed along its length (see :func:`boundary_length_px`).
    """
    cmap = validate_class_map(class_map)
    return measure_by_blocks(
        cmap,
        pixel_size_um,
        osteoclast_labels=_optional_array(osteoclast_labels),
        osteocyte_labels=_optional_array(osteocyte_labels),
        image=image if callable(image) else _optional_array(image),
        roi=roi,
        rules=rules,
    )
