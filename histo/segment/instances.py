"""Instances from a class map: osteoclasts split by the centre map, osteocyte lacunae.

Used by the tiled inference (:mod:`histo.segment.tiled`) on row bands of the slide and by the
training code to build the centre-map target from ground-truth instance labels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo.classes import BONE, OSTEOCLAST, OSTEOCYTE

#: smallest osteoclast kept, µm² (a 12 µm disc; real osteoclasts are 20-100 µm)
MIN_OSTEOCLAST_AREA_UM2 = 120.0
#: smallest osteocyte lacuna kept, µm² (lacunae are ~8-12 x 4-6 µm, i.e. 25-55 µm²)
MIN_OSTEOCYTE_AREA_UM2 = 12.0
#: centre-map level above which pixels seed an osteoclast (the map is 1 at a cell's centre)
CENTRE_SEED_LEVEL = 0.25
#: an osteoclast must lie within this distance of bone (µm): the counting rule (DOMAIN.md);
#: TRAP+ cells in the marrow (mononuclear precursors) are not osteoclasts
OSTEOCLAST_BONE_CONTACT_UM = 3.0
#: run the osteoclast watershed on the class-3 boxes packed together (memory follows the
#: class-3 area) rather than on the whole window (same result; used if skimage's internals
#: differ)
PACKED_WATERSHED = True


def centre_target(osteoclast_labels: np.ndarray) -> np.ndarray:
    """Centre-map training target: per-osteoclast distance to its border, 1 at its centre.

    Parameters
    ----------
    osteoclast_labels
        (H, W) integer instance labels, 0 outside osteoclasts.

    Returns
    -------
    numpy.ndarray
        (H, W) float32 in [0, 1]; 0 outside osteoclasts, rising to 1 at each cell's most
        interior pixel. Touching cells are separated because the distance is measured to the
        cell's own border (label changes count as borders).
    """
    labels = np.asarray(osteoclast_labels)
    out = np.zeros(labels.shape, np.float32)
    if not labels.any():
        return out
    # borders between different labels count as background for the distance transform
    inner = labels > 0
    edge = np.zeros_like(inner)
    edge[:-1] |= (labels[:-1] != labels[1:]) & inner[:-1] & inner[1:]
    edge[:, :-1] |= (labels[:, :-1] != labels[:, 1:]) & inner[:, :-1] & inner[:, 1:]
    dist = cv2.distanceTransform((inner & ~edge).astype(np.uint8), cv2.DIST_L2, 3)
    maxima = ndi.maximum(dist, labels, index=np.arange(labels.max() + 1))
    maxima = np.asarray(maxima, np.float32)
    maxima[maxima == 0] = 1.0
    out = dist / maxima[labels]
    out[~inner] = 0
    return np.clip(out, 0, 1).astype(np.float32)


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: (count incl. background, labels int32, stats)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    return n, labels, stats


def _boxes(stats: np.ndarray) -> list[tuple[slice, slice]]:
    """Bounding boxes (row slice, column slice) of components 0..n-1 from cv2 stats."""
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    w, h = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    return [
        (slice(int(y[i]), int(y[i] + h[i])), slice(int(x[i]), int(x[i] + w[i])))
        for i in range(len(stats))
    ]


def _blocks(shape: tuple[int, int], rows: int = 512, cols: int = 4096):
    """Slices of blocks covering ``shape`` (bounds the temporaries of whole-band operations)."""
    for r0 in range(0, shape[0], rows):
        for c0 in range(0, shape[1], cols):
            yield slice(r0, r0 + rows), slice(c0, c0 + cols)


def _crops(cc: np.ndarray, n_cc: int, boxes: list[tuple[slice, slice]]) -> list[np.ndarray]:
    """Each component's pixels (bool) in its bounding box (index 0: background, empty)."""
    return [np.zeros((0, 0), bool)] + [cc[boxes[i]] == i for i in range(1, n_cc)]


def _emit(target: Any, box: tuple[slice, slice], values: np.ndarray) -> None:
    """Write the nonzero ``values`` (int32, the box's shape) of a window box into ``target``:
    an array (in place) or a list of sparse pieces (see :func:`label_band`)."""
    rows, cols = box
    if isinstance(target, list):
        idx = np.flatnonzero(values)
        if idx.size:
            target.append(
                (rows.start, cols.start, values.shape[1], idx.astype(np.int32), values.ravel()[idx])
            )
    else:
        np.copyto(target[rows, cols], values, where=values > 0)


def _osteoclast_markers(
    class_map: np.ndarray,
    centre: np.ndarray,
    comps: list[np.ndarray],
    n_cc: int,
    boxes: list[tuple[slice, slice]],
    min_seed_px: int,
) -> list[np.ndarray]:
    """Watershed markers of every class-3 component, cropped to its bounding box.

    The values are those of the whole-window marker image: seeds (``centre >
    CENTRE_SEED_LEVEL``, at least ``min_seed_px``) are numbered as 8-connected components of
    the window, a component without a seed takes ``cc + max(seed number)``.
    """
    seeds = np.empty(class_map.shape, bool)
    for blk in _blocks(class_map.shape):
        np.logical_and(
            class_map[blk] == OSTEOCLAST, centre[blk] > CENTRE_SEED_LEVEL, out=seeds[blk]
        )
    n_s, seed_labels, seed_stats = _components(seeds)
    del seeds
    small = seed_stats[:, cv2.CC_STAT_AREA] < min_seed_px
    small[0] = True  # background and small seeds -> 0
    kept_ids = np.flatnonzero(~small)
    offset = np.int32(kept_ids.max() if kept_ids.size else 0)
    markers = [np.zeros(0, np.int32)] * n_cc
    for i in range(1, n_cc):
        rows, cols = boxes[i]
        comp = comps[i]
        mk = np.where(comp, seed_labels[rows, cols], 0)
        mk[small[mk]] = 0
        if not mk.any():
            mk = np.where(comp, np.int32(i) + offset, 0).astype(np.int32)
        markers[i] = mk
    return markers


def _watershed_components(
    centre: np.ndarray,
    comps: list[np.ndarray],
    n_cc: int,
    boxes: list[tuple[slice, slice]],
    markers: list[np.ndarray],
    width: int,
) -> list[np.ndarray]:
    """skimage's watershed of ``-centre`` from ``markers`` inside the class-3 components, run
    on the components' boxes packed side by side instead of on the whole window.

    The result is identical to ``watershed(-centre, markers, mask=cc > 0)`` on the window: the
    flooding order depends only on the values, on the order in which the marker pixels enter
    the priority queue (raster order of the window, kept here) and on the 4-neighbourhoods
    inside the mask (kept: boxes are separated by a zero gutter). All components are flooded in
    one queue, as on the window, so ties between equal priorities resolve the same way.
    """
    if not PACKED_WATERSHED:
        return _watershed_window(centre, comps, n_cc, boxes, markers, width)
    try:
        from skimage.segmentation import _watershed_cy
        from skimage.segmentation._watershed import (
            _offsets_to_raveled_neighbors,
            _validate_connectivity,
        )
    except ImportError:  # skimage internals moved: the whole-window watershed (same result)
        return _watershed_window(centre, comps, n_cc, boxes, markers, width)

    # shelf packing with a 1-px gutter around every box
    widths = [b[1].stop - b[1].start for b in boxes[1:]]
    canvas_w = max(max(widths, default=1) + 1, 1024) + 1
    places: list[tuple[int, int]] = [(0, 0)]
    y, x, shelf_h = 1, 1, 0
    for i in range(1, n_cc):
        rows, cols = boxes[i]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if x + w + 1 > canvas_w:
            y, x, shelf_h = y + shelf_h + 1, 1, 0
        places.append((y, x))
        x += w + 1
        shelf_h = max(shelf_h, h)
    canvas_h = y + shelf_h + 1
    image = np.zeros((canvas_h, canvas_w), np.float64)
    mask = np.zeros((canvas_h, canvas_w), np.int8)
    output = np.zeros((canvas_h, canvas_w), np.int32)
    loc_canvas, loc_window = [], []
    for i in range(1, n_cc):
        rows, cols = boxes[i]
        py, px_ = places[i]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        dst = (slice(py, py + h), slice(px_, px_ + w))
        comp = comps[i]
        mask[dst] = comp
        image[dst] = np.where(comp, -centre[rows, cols].astype(np.float32), 0)
        output[dst] = markers[i]
        my, mx = np.nonzero(markers[i])
        loc_canvas.append((my + py) * canvas_w + (mx + px_))
        loc_window.append((my + rows.start).astype(np.int64) * width + (mx + cols.start))
    loc_c = np.concatenate(loc_canvas).astype(np.intp)
    order = np.argsort(np.concatenate(loc_window), kind="stable")
    connectivity, offset = _validate_connectivity(2, 1, None)
    neighbours = _offsets_to_raveled_neighbors(image.shape, connectivity, center=offset)
    strides = np.array(image.strides, dtype=np.intp) // image.itemsize
    try:
        _watershed_cy.watershed_raveled(
            image.ravel(), loc_c[order], neighbours, mask.ravel(), strides, 0, output.ravel(), False
        )
    except TypeError:  # another signature of skimage's internals: whole-window watershed
        return _watershed_window(centre, comps, n_cc, boxes, markers, width)
    out = [np.zeros(0, np.int32)]
    for i in range(1, n_cc):
        rows, cols = boxes[i]
        py, px_ = places[i]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        out.append(output[py : py + h, px_ : px_ + w].copy())
    return out


def _watershed_window(
    centre: np.ndarray,
    comps: list[np.ndarray],
    n_cc: int,
    boxes: list[tuple[slice, slice]],
    markers: list[np.ndarray],
    width: int,
) -> list[np.ndarray]:
    """``_watershed_components`` with skimage's public watershed on the whole window (the
    reference result; costs several bytes per window pixel)."""
    from skimage.segmentation import watershed

    shape = (centre.shape[0], width)
    mask = np.zeros(shape, bool)
    mk = np.zeros(shape, np.int32)
    for i in range(1, n_cc):
        np.copyto(mask[boxes[i]], True, where=comps[i])
        np.copyto(mk[boxes[i]], markers[i], where=comps[i])
    labels = watershed(-centre.astype(np.float32), markers=mk, mask=mask).astype(np.int32)
    return [np.zeros(0, np.int32)] + [labels[boxes[i]].copy() for i in range(1, n_cc)]


def split_osteoclasts(
    class_map: np.ndarray, centre: np.ndarray, min_seed_px: int = 12
) -> np.ndarray:
    """Split class-3 regions into osteoclasts with a marker-controlled watershed.

    Markers are the connected regions where ``centre > CENTRE_SEED_LEVEL`` inside class 3;
    a class-3 region without a marker becomes one osteoclast. The result of each connected
    class-3 region depends only on that region's pixels, so a region seen whole in two windows
    is split the same way in both (this is what makes tiled labelling seam-free).

    The watershed runs on the regions' bounding boxes only (see ``_watershed_components``):
    memory follows the class-3 area, not the window's.

    Returns
    -------
    numpy.ndarray
        (H, W) int32 window-local labels (0 = none).
    """
    out = np.zeros(class_map.shape, np.int32)
    mask = class_map == OSTEOCLAST
    n_cc, cc, stats = _components(mask)
    del mask
    if n_cc <= 1:
        return out
    boxes = _boxes(stats)
    comps = _crops(cc, n_cc, boxes)
    del cc
    markers = _osteoclast_markers(class_map, centre, comps, n_cc, boxes, min_seed_px)
    local = _watershed_components(centre, comps, n_cc, boxes, markers, class_map.shape[1])
    for i in range(1, n_cc):
        rows, cols = boxes[i]
        np.copyto(out[rows, cols], local[i], where=comps[i])
    return out


def label_band(
    class_map: np.ndarray,
    centre: np.ndarray,
    alt_class: np.ndarray,
    own_start: int,
    own_stop: int,
    pixel_size_um: float,
    *,
    into: tuple[Any, Any] | None = None,
    offsets: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, int, int]:
    """Label the objects a row band owns, inside a window of rows around it.

    An object (a connected class-3 or class-4 region) belongs to the band that holds its top
    row, so every object is labelled exactly once however the slide is cut. Objects too small to
    be a cell (see ``MIN_*_AREA_UM2``), and osteoclasts farther than
    ``OSTEOCLAST_BONE_CONTACT_UM`` from bone, are removed and their pixels take ``alt_class`` (the
    best non-cell class).

    Work is done per object on its bounding box; besides its inputs the window costs one int32
    label image and a few bool masks at a time, so memory grows with the window's area by a
    small factor only (no float64/int64 window temporaries).

    Parameters
    ----------
    class_map, centre, alt_class
        (h, W) window arrays: class codes, centre map in [0, 1], best class among 0-2.
        ``class_map`` is modified in place for removed specks.
    own_start, own_stop
        Rows of the window (window coordinates) that this band owns.
    pixel_size_um
        µm per pixel of the window.
    into
        Optional (osteoclasts, osteocytes) targets for the owned objects' labels plus
        ``offsets``, then no label images nor mask are returned (``None``). Each is either an
        (h, W) int32 array (labels are written, other pixels are left alone) or a list, to
        which sparse pieces ``(row, col, width, flat_index, labels)`` are appended: the labels
        of a box of ``width`` columns at (row, col) of the window, at ``flat_index`` (int32,
        ascending) in it.
    offsets
        Added to the labels written ``into``.

    Returns
    -------
    osteoclasts, osteocytes : numpy.ndarray or None
        (h, W) int32 band-local labels 1..n of the owned objects (0 elsewhere).
    owned_mask : numpy.ndarray or None
        (h, W) bool, pixels of owned objects or removed specks (to be written back).
    n_osteoclasts, n_osteocytes : int
    """
    px_area = pixel_size_um**2
    ret = into is None
    if into is None:
        into = (np.zeros(class_map.shape, np.int32), np.zeros(class_map.shape, np.int32))
    owned_mask = np.zeros(class_map.shape, bool) if ret else None
    counts = []
    specks: list[tuple[tuple[slice, slice], np.ndarray]] = []

    # osteoclasts: watershed per component, decisions per marker label
    mask = class_map == OSTEOCLAST
    n_cc, cc, stats = _components(mask)
    del mask
    boxes = _boxes(stats)
    top = stats[:, cv2.CC_STAT_TOP]
    # a region taller than the window margin is cut at the window's bottom (once): such
    # regions are far larger than any cell (the margin is >= 256 µm)
    owned = (top >= own_start) & (top < own_stop)
    owned[0] = False
    kept: list[tuple[int, int]] = []  # (marker label, component) of kept osteoclasts
    parts: dict[int, np.ndarray] = {}
    comps = _crops(cc, n_cc, boxes)
    del cc
    if owned.any():
        markers = _osteoclast_markers(class_map, centre, comps, n_cc, boxes, 12)
        local = _watershed_components(centre, comps, n_cc, boxes, markers, class_map.shape[1])
        del markers
        r = max(1, int(round(OSTEOCLAST_BONE_CONTACT_UM / pixel_size_um)))
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        h_win, w_win = class_map.shape
        for i in np.flatnonzero(owned):
            rows, cols = boxes[i]
            comp = comps[i]
            lab = np.where(comp, local[i], 0)
            ids, areas = np.unique(lab[comp], return_counts=True)
            keep = areas * px_area >= MIN_OSTEOCLAST_AREA_UM2
            if OSTEOCLAST_BONE_CONTACT_UM is not None:
                # bone within r px: dilate the box grown by r (same as dilating the window)
                y0, y1 = max(0, rows.start - r), min(h_win, rows.stop + r)
                x0, x1 = max(0, cols.start - r), min(w_win, cols.stop + r)
                cmc = class_map[y0:y1, x0:x1]
                bone = ((cmc == BONE) | (cmc == OSTEOCYTE)).astype(np.uint8)
                near = cv2.dilate(bone, disk) > 0
                near = near[rows.start - y0 : rows.stop - y0, cols.start - x0 : cols.stop - x0]
                touching = np.isin(ids, lab[near & comp])
                keep &= touching
            keep &= ids > 0
            kept.extend((int(v), int(i)) for v in ids[keep])
            speck = comp & ~np.isin(lab, ids[keep])
            if speck.any():
                specks.append(((rows, cols), speck))
            parts[int(i)] = lab
            if owned_mask is not None:
                owned_mask[rows, cols] |= comp
    kept.sort()
    by_comp: dict[int, list[tuple[int, int]]] = {}
    for rank, (v, i) in enumerate(kept, start=1):
        by_comp.setdefault(i, []).append((v, rank + offsets[0]))
    for i, pairs in by_comp.items():
        lab = parts[i]
        vals = np.zeros(lab.shape, np.int32)
        for v, new in pairs:
            vals[lab == v] = new
        _emit(into[0], boxes[i], vals)
    counts.append(len(kept))
    del comps, parts

    # osteocyte lacunae: one per component
    mask = class_map == OSTEOCYTE
    n_cc, cc, stats = _components(mask)
    del mask
    top = stats[:, cv2.CC_STAT_TOP]
    owned = (top >= own_start) & (top < own_stop)
    owned[0] = False
    keep = owned & (stats[:, cv2.CC_STAT_AREA] * px_area >= MIN_OSTEOCYTE_AREA_UM2)
    lut = np.zeros(n_cc, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32) + np.int32(offsets[1])
    speck_lut = owned & ~keep
    for blk in _blocks(cc.shape):
        c = cc[blk]
        _emit(into[1], blk, lut[c])
        s = speck_lut[c]
        if s.any():
            np.copyto(class_map[blk], alt_class[blk], where=s)
        if owned_mask is not None:
            owned_mask[blk] |= owned[c]
    counts.append(int(keep.sum()))
    del cc

    # osteoclast specks last: bone contact was judged on the unmodified class map
    for (rows, cols), speck in specks:
        np.copyto(class_map[rows, cols], alt_class[rows, cols], where=speck)
    if ret:
        return into[0], into[1], owned_mask, counts[0], counts[1]
    return None, None, None, counts[0], counts[1]
