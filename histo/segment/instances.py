"""Instances from a class map: osteoclasts split by the centre map, osteocyte lacunae.

Used by the tiled inference (:mod:`histo.segment.tiled`) on row bands of the slide and by the
training code to build the centre-map target from ground-truth instance labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo.classes import BONE, OSTEOCLAST, OSTEOCYTE

#: smallest osteoclast kept, µm² (a 12 µm disc; real osteoclasts are 20-100 µm)
MIN_OSTEOCLAST_AREA_UM2 = 120.0
#: smallest osteocyte lacuna kept, µm² (lacunae are ~8-12 x 4-6 µm, i.e. 25-55 µm²; 20 leaves
#: room for lacunae cut off-centre). Chosen on the validation seeds (osteocyte F1 0.928 at 12,
#: 0.938 at 20; higher floors score better still on synthetic slides but would drop small real
#: lacunae): models/evaluation/validation/postprocessing.md
MIN_OSTEOCYTE_AREA_UM2 = 20.0
#: centre-map level above which pixels seed an osteoclast (the map is 1 at a cell's centre)
CENTRE_SEED_LEVEL = 0.25
#: an osteoclast must lie within this distance of bone (µm): the counting rule (DOMAIN.md);
#: TRAP+ cells in the marrow (mononuclear precursors) are not osteoclasts
OSTEOCLAST_BONE_CONTACT_UM = 3.0
#: run the osteoclast watershed on the class-3 boxes packed together (memory follows the
#: class-3 area) rather than on the whole window (same result; used if skimage's internals
#: differ)
PACKED_WATERSHED = True


def bone_contact_px(pixel_size_um: float) -> int:
    """Pixels around an osteoclast within which it must meet bone
    (``OSTEOCLAST_BONE_CONTACT_UM`` at ``pixel_size_um`` µm/px, at least 1)."""
    return max(1, int(round((OSTEOCLAST_BONE_CONTACT_UM or 0.0) / pixel_size_um)))


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


#: foreground fraction above which _components uses OpenCV's own statistics (4096² random
#: masks: ours 0.06 s vs 0.09 s at 1 %, 0.43 s vs 0.19 s at 30 %)
DENSE_COMPONENTS = 0.05


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: (count incl. background, labels int32, stats).

    The same as ``cv2.connectedComponentsWithStats`` (labels and its stats array: left, top,
    width, height, area of each component, row 0 the background), ~4x faster on sparse masks:
    OpenCV's statistics cost several times its labelling, so the boxes and areas are taken
    from the foreground pixels only (``cv2.findNonZero``); masks denser than
    :data:`DENSE_COMPONENTS` use OpenCV's statistics.
    """
    m = mask.view(np.uint8)
    if cv2.countNonZero(m) > DENSE_COMPONENTS * m.size:
        # dense masks: OpenCV's statistics are cheaper than sorting the foreground
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        return n, labels, stats
    n, labels = cv2.connectedComponents(m, connectivity=8, ltype=cv2.CV_32S)
    h, w = m.shape
    stats = np.zeros((n, 5), np.int32)
    stats[0] = (0, 0, w, h, h * w)
    if n > 1:
        pts = cv2.findNonZero(m).reshape(-1, 2)  # (x, y) of every foreground pixel, in raster order
        xs, ys = pts[:, 0], pts[:, 1]
        lab = labels[ys, xs]
        order = np.argsort(lab, kind="stable")
        lab, xs, ys = lab[order], xs[order], ys[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        left = np.minimum.reduceat(xs, starts)
        top = ys[starts]  # raster order: a component's first pixel is on its top row
        stats[1:, cv2.CC_STAT_LEFT] = left
        stats[1:, cv2.CC_STAT_TOP] = top
        stats[1:, cv2.CC_STAT_WIDTH] = np.maximum.reduceat(xs, starts) - left + 1
        stats[1:, cv2.CC_STAT_HEIGHT] = ys[np.r_[starts[1:], lab.size] - 1] - top + 1
        stats[1:, cv2.CC_STAT_AREA] = np.diff(np.r_[starts, lab.size])
        stats[0, cv2.CC_STAT_AREA] -= lab.size
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


def _seed_components(
    class_map: np.ndarray, centre: np.ndarray, min_seed_px: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.int32]:
    """Osteoclast seeds of a window: ``(labels, stats, small, offset)``.

    Seeds (``centre > CENTRE_SEED_LEVEL`` inside class 3) are numbered as 8-connected
    components of the window; ``small[k]`` is True for seeds of fewer than ``min_seed_px``
    pixels (and for the background); ``offset`` is the largest number of a kept seed.
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
    return seed_labels, seed_stats, small, offset


def _osteoclast_markers(
    class_map: np.ndarray,
    centre: np.ndarray,
    comps: list[np.ndarray],
    n_cc: int,
    boxes: list[tuple[slice, slice]],
    min_seed_px: int,
    ids: Any = None,
    seeds: tuple | None = None,
) -> list[np.ndarray]:
    """Watershed markers of the class-3 components ``ids`` (default: all), cropped to their
    bounding boxes.

    The values are those of the whole-window marker image: seeds (``centre >
    CENTRE_SEED_LEVEL``, at least ``min_seed_px``) are numbered as 8-connected components of
    the window, a component without a seed takes ``cc + max(seed number)``.
    """
    seed_labels, _, small, offset = (
        seeds if seeds is not None else _seed_components(class_map, centre, min_seed_px)
    )
    markers = [np.zeros(0, np.int32)] * n_cc
    for i in range(1, n_cc) if ids is None else ids:
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
    ids: Any = None,
) -> list[np.ndarray]:
    """skimage's watershed of ``-centre`` from ``markers`` inside the class-3 components, run
    on the components' boxes packed side by side instead of on the whole window.

    The result is identical to ``watershed(-centre, markers, mask=cc > 0)`` on the window: the
    flooding order depends only on the values, on the order in which the marker pixels enter
    the priority queue (raster order of the window, kept here) and on the 4-neighbourhoods
    inside the mask (kept: boxes are separated by a zero gutter). All components are flooded in
    one queue, as on the window, so ties between equal priorities resolve the same way (and
    the flooding of one component does not depend on the others: only components ``ids``
    (default: all) are flooded; the others' entries are empty).
    """
    ids = list(range(1, n_cc)) if ids is None else [int(i) for i in ids]

    def centre_of(i: int) -> np.ndarray:  # the component's box of the centre map
        return centre[i] if isinstance(centre, list) else centre[boxes[i]]

    if not PACKED_WATERSHED or not ids:
        return _watershed_window(centre, comps, n_cc, boxes, markers, width, ids)
    try:
        from skimage.segmentation import _watershed_cy
        from skimage.segmentation._watershed import (
            _offsets_to_raveled_neighbors,
            _validate_connectivity,
        )
    except ImportError:  # skimage internals moved: the whole-window watershed (same result)
        return _watershed_window(centre, comps, n_cc, boxes, markers, width, ids)

    # shelf packing with a 1-px gutter around every box
    widths = [boxes[i][1].stop - boxes[i][1].start for i in ids]
    canvas_w = max(max(widths, default=1) + 1, 1024) + 1
    places: dict[int, tuple[int, int]] = {}
    y, x, shelf_h = 1, 1, 0
    for i in ids:
        rows, cols = boxes[i]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if x + w + 1 > canvas_w:
            y, x, shelf_h = y + shelf_h + 1, 1, 0
        places[i] = (y, x)
        x += w + 1
        shelf_h = max(shelf_h, h)
    canvas_h = y + shelf_h + 1
    image = np.zeros((canvas_h, canvas_w), np.float64)
    mask = np.zeros((canvas_h, canvas_w), np.int8)
    output = np.zeros((canvas_h, canvas_w), np.int32)
    loc_canvas, loc_window = [], []
    for i in ids:
        rows, cols = boxes[i]
        py, px_ = places[i]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        dst = (slice(py, py + h), slice(px_, px_ + w))
        comp = comps[i]
        mask[dst] = comp
        image[dst] = np.where(comp, -np.asarray(centre_of(i), np.float32), 0)
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
        return _watershed_window(centre, comps, n_cc, boxes, markers, width, ids)
    out = [np.zeros(0, np.int32)] * n_cc
    for i in ids:
        rows, cols = boxes[i]
        py, px_ = places[i]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        out[i] = output[py : py + h, px_ : px_ + w].copy()
    return out


def _watershed_window(
    centre: np.ndarray,
    comps: list[np.ndarray],
    n_cc: int,
    boxes: list[tuple[slice, slice]],
    markers: list[np.ndarray],
    width: int,
    ids: Any = None,
) -> list[np.ndarray]:
    """``_watershed_components`` with skimage's public watershed on the whole window (the
    reference result; costs several bytes per window pixel)."""
    from skimage.segmentation import watershed

    ids = range(1, n_cc) if ids is None else ids
    height = max((boxes[i][0].stop for i in ids), default=0)
    shape = (height, width)
    mask = np.zeros(shape, bool)
    mk = np.zeros(shape, np.int32)
    image = np.zeros(shape, np.float32)
    for i in ids:
        np.copyto(mask[boxes[i]], True, where=comps[i])
        np.copyto(mk[boxes[i]], markers[i], where=comps[i])
        cen = centre[i] if isinstance(centre, list) else centre[boxes[i]]
        np.copyto(image[boxes[i]], -np.asarray(cen, np.float32), where=comps[i])
    labels = watershed(image, markers=mk, mask=mask).astype(np.int32)
    out = [np.zeros(0, np.int32)] * n_cc
    for i in ids:
        out[i] = labels[boxes[i]].copy()
    return out


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


#: columns of a band labelled at a time (each with ``CONTEXT_UM`` of context either side).
#: The temporaries of a block (labels, masks, centre map of ~1216 rows at the default tiling)
#: sit on top of the network's forward pass in the peak: 2048 columns instead of 4096 lowered
#: a 32768² slide's peak by ~20 MiB at no measured cost in speed (models/README.md, Memory)
LABEL_COLS = 2048
#: context around a column block (µm); an object reaching the block window's side is labelled
#: again from a wider window, so this only bounds the usual cost
CONTEXT_UM = 256.0
#: key of an object seen by no seed: after every seeded one (see ``_first_block_keys``)
_UNSEEDED = np.int64(1) << 50
#: a packed class map (``alt_class=None`` in :func:`label_band`) holds the class in its low
#: bits and the best class among 0-2 from bit ``ALT_SHIFT`` on
ALT_SHIFT = 3
_CLASS_BITS = np.uint8((1 << ALT_SHIFT) - 1)


def _classes(class_map: np.ndarray, packed: bool) -> np.ndarray:
    """The class codes of (a window of) a class map, packed or not (a copy if packed)."""
    return class_map & _CLASS_BITS if packed else class_map


def _first_block_keys(
    labels: np.ndarray, stats: np.ndarray, ids: np.ndarray, x0: int
) -> tuple[np.ndarray, np.ndarray]:
    """Order keys of components ``ids`` of a window whose column 0 is slide column ``x0``.

    OpenCV numbers the components of an image in the raster order of their first 2 x 2 block
    (rows paired from the window's top, columns from column 0): the key is ``strip * 2**25 +
    column // 2`` with ``strip = top // 2`` and ``column`` the leftmost slide column of the
    component in that strip. Keys of a column block of a window therefore sort its components
    exactly as OpenCV numbers them on the whole-width window. Returns ``(keys, column)``.
    """
    ids = np.asarray(ids, np.intp)
    if ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    h, w = labels.shape
    top = stats[ids, cv2.CC_STAT_TOP].astype(np.int64)
    left = stats[ids, cv2.CC_STAT_LEFT].astype(np.int64)
    width = stats[ids, cv2.CC_STAT_WIDTH].astype(np.int64)
    strip = top // 2
    n = ids.size
    seg = np.repeat(np.arange(n), width)
    col = np.arange(seg.size, dtype=np.int64) - np.repeat(np.cumsum(width) - width - left, width)
    starts = np.concatenate(([0], np.cumsum(width)[:-1]))
    big = np.int64(1) << 40
    first = np.full(n, big, np.int64)
    flat_labels = labels.reshape(-1)
    want = ids[seg]
    for dr in (0, 1):
        rows = 2 * strip + dr
        valid = rows < h
        rr = np.where(valid, rows, 0)[seg]
        hit = (flat_labels[rr * w + col] == want) & valid[seg]
        first = np.minimum(first, np.minimum.reduceat(np.where(hit, col, big), starts))
    column = first + x0
    return strip * (np.int64(1) << 25) + column // 2, column


def _label_block(
    class_map: np.ndarray,
    centre: np.ndarray,
    own_start: int,
    own_stop: int,
    pixel_size_um: float,
    x0: int,
    x1: int,
    c0: int,
    c1: int,
    width: int,
    next_id: int,
    packed: bool = False,
    want_owned: bool = True,
    own_cols: tuple[int, int] | None = None,
) -> dict | None:
    """Objects of a band window held by columns ``[c0, c1)``, from window columns [x0, x1).

    A component is held by the block holding the column of its key (``_first_block_keys``).
    Returns None if a held component (or ``r`` px around it) reaches a side of the window that
    is not the slide's: the window must be widened. Otherwise a dict with ``oc``: every held
    class-3 component (all are flooded together, see ``_watershed_components``) as ``(box,
    comp, marker, centre, key)`` with markers numbered from ``next_id`` and ``keys`` (the
    OpenCV order of the whole-window marker numbers), ``oc_owned`` (whether the band owns it),
    and the owned osteocytes: ``ot_keys``, ``ot_pieces`` (sparse pieces numbered 1..n in the
    order of ``ot_keys``), ``specks`` (box, flat indices of the removed pixels in it) and, if
    ``want_owned``, ``owned`` (box, mask). With ``own_cols`` ``(a, b)``, the band owns only
    the objects whose leftmost column (of the band window) lies in ``[a, b)``.
    """
    cmw = _classes(class_map[:, x0:x1], packed)
    cew = centre(x0, x1) if callable(centre) else centre[:, x0:x1]
    h, w = cmw.shape
    px_area = pixel_size_um**2
    r = bone_contact_px(pixel_size_um)
    open_left, open_right = x0 > 0, x1 < width

    def in_own_cols(stats_left: np.ndarray) -> np.ndarray:
        if own_cols is None:
            return np.ones(np.shape(stats_left), bool)
        left = np.asarray(stats_left) + x0
        return (left >= own_cols[0]) & (left < own_cols[1])

    def held_ids(cc, stats, rows_owned: bool, row0: int = 0):
        top = stats[:, cv2.CC_STAT_TOP] + row0
        if rows_owned:
            cand = np.flatnonzero((top >= own_start) & (top < own_stop))
        else:
            cand = np.arange(stats.shape[0])
        cand = cand[cand > 0]
        keys, column = _first_block_keys(cc, stats, cand, x0)
        sel = (column >= c0) & (column < c1)
        ids, keys = cand[sel], keys[sel]
        left = stats[ids, cv2.CC_STAT_LEFT]
        right = left + stats[ids, cv2.CC_STAT_WIDTH]
        if (open_left and (left < r).any()) or (open_right and (right > w - r).any()):
            return None
        return ids, keys

    res: dict = {"oc": [], "ot_keys": np.zeros(0, np.int64), "ot_pieces": [], "specks": []}
    res["owned"] = []
    res["next_id"] = next_id

    # osteoclasts: every held component (owned or not) with its markers
    mask = cmw == OSTEOCLAST
    n_cc, cc, stats = _components(mask)
    del mask
    got = held_ids(cc, stats, rows_owned=False)
    if got is None:
        return None
    ids, comp_keys = got
    if ids.size:
        boxes = _boxes(stats)
        tops = stats[:, cv2.CC_STAT_TOP]
        seed_labels, seed_stats, small, _ = _seed_components(cmw, cew, 12)
        items = []
        seeded_ids = []
        for i, ckey in zip(ids, comp_keys, strict=True):
            rows, cols = boxes[i]
            comp = cc[rows, cols] == i
            mk = np.where(comp, seed_labels[rows, cols], 0)
            mk[small[mk]] = 0
            gbox = (rows, slice(cols.start + x0, cols.stop + x0))
            own = own_start <= tops[i] < own_stop
            own = own and bool(in_own_cols(stats[i, cv2.CC_STAT_LEFT]))
            if mk.any():
                items.append([gbox, comp, mk, cew[rows, cols].copy(), None, own])
                seeded_ids.append(np.unique(mk[mk > 0]))
            else:
                items.append([gbox, comp, None, cew[rows, cols].copy(), _UNSEEDED + ckey, own])
        del cc
        seeded = np.concatenate(seeded_ids) if seeded_ids else np.zeros(0, np.int32)
        skeys, _ = _first_block_keys(seed_labels, seed_stats, seeded, x0)
        del seed_labels
        # seed numbers -> ids from next_id on, in the order of ``seeded``
        lut = np.zeros(int(seeded.max(initial=0)) + 1, np.int32)
        lut[seeded] = np.arange(next_id, next_id + seeded.size, dtype=np.int32)
        keys_of = list(skeys)
        nid = next_id + seeded.size
        for it in items:
            if it[2] is None:
                it[2] = np.where(it[1], np.int32(nid), 0).astype(np.int32)
                keys_of.append(it[4])
                nid += 1
            else:
                it[2] = lut[it[2]]
        res["oc"] = items
        res["oc_keys"] = np.asarray(keys_of, np.int64)
        res["next_id"] = nid
    else:
        del cc

    # osteocyte lacunae: one per component, labelled from the row above the owned rows down
    # (a component whose top is above the owned rows reaches that row; rows are taken from an
    # even row so that the 2-row strips of the keys, hence their order, are the window's)
    s0 = max(0, (own_start - 1) // 2 * 2)
    mask = cmw[s0:] == OSTEOCYTE
    n_cc, cc, stats = _components(mask)
    del mask
    got = held_ids(cc, stats, rows_owned=True, row0=s0)
    if got is None:
        return None
    ids, keys = got
    if own_cols is not None:
        mine = in_own_cols(stats[ids, cv2.CC_STAT_LEFT])
        ids, keys = ids[mine], keys[mine]
    owned = np.zeros(n_cc, bool)
    owned[ids] = True
    keep = np.zeros(n_cc, bool)
    keep[ids] = stats[ids, cv2.CC_STAT_AREA] * px_area >= MIN_OSTEOCYTE_AREA_UM2
    res["ot_keys"] = keys[keep[ids]]
    lut = np.zeros(n_cc, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    speck_lut = owned & ~keep
    if ids.size:
        # only the rows holding owned objects
        tops = stats[ids, cv2.CC_STAT_TOP]
        r0 = int(tops.min())
        r1 = int((tops + stats[ids, cv2.CC_STAT_HEIGHT]).max())
        for blk_r, blk_c in _blocks((r1 - r0, w)):
            rows = slice(blk_r.start + r0, min(blk_r.stop + r0, r1))
            c = cc[rows, blk_c]
            gbox = (
                slice(rows.start + s0, rows.stop + s0),
                slice(blk_c.start + x0, blk_c.start + x0 + c.shape[1]),
            )
            _emit(res["ot_pieces"], gbox, lut[c])
            if speck_lut.any():
                # sparse: a block's mask would cost a byte per pixel until the band is done
                idx = np.flatnonzero(speck_lut[c])
                if idx.size:
                    res["specks"].append((gbox, idx.astype(np.int32)))
            if want_owned:
                res["owned"].append((gbox, owned[c]))
    return res


def label_band(
    class_map: np.ndarray,
    centre: np.ndarray | Callable[[int, int], np.ndarray],
    alt_class: np.ndarray | None,
    own_start: int,
    own_stop: int,
    pixel_size_um: float,
    *,
    into: tuple[Any, Any] | None = None,
    offsets: tuple[int, int] = (0, 0),
    block_cols: int = LABEL_COLS,
    own_cols: tuple[int, int] | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, int, int]:
    """Label the objects a row band owns, inside a window of rows around it.

    An object (a connected class-3 or class-4 region) belongs to the band that holds its top
    row, so every object is labelled exactly once however the slide is cut. Objects too small to
    be a cell (see ``MIN_*_AREA_UM2``), and osteoclasts farther than
    ``OSTEOCLAST_BONE_CONTACT_UM`` from bone, are removed and their pixels take ``alt_class`` (the
    best non-cell class).

    The window is worked on in column blocks of ``block_cols`` with ``CONTEXT_UM`` of context
    either side (an object is owned by the block of its first 2 x 2 pixel block; one that
    reaches a block window's side is done again from a wider window), and objects are numbered
    in the order OpenCV numbers them on the whole window, so the result is that of the whole
    window, in memory that does not depend on its width (besides the sparse outputs).

    Parameters
    ----------
    class_map, centre, alt_class
        (h, W) window arrays: class codes, centre map in [0, 1], best class among 0-2.
        ``class_map`` is modified in place for removed specks. The centre map is read only at
        class-3 pixels: it may be a function ``centre(x0, x1)`` giving its columns [x0, x1) as
        an (h, x1 - x0) float32 array (e.g. from a sparse store; other pixels may be 0).
        ``alt_class`` is read only at class-3 and class-4 pixels; if None, ``class_map`` is
        packed: the class in its low ``ALT_SHIFT`` bits, the best class among 0-2 above (a
        removed speck keeps its packing: the low bits take the upper ones).
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
    block_cols
        Columns labelled at a time (even).
    own_cols
        Optional columns ``(a, b)`` of the window: the band then owns only the objects whose
        leftmost column lies in ``[a, b)`` (a column strip of a slide, see
        :func:`histo.segment.tiled.segment_slide`); others are neither labelled nor removed.

    Returns
    -------
    osteoclasts, osteocytes : numpy.ndarray or None
        (h, W) int32 band-local labels 1..n of the owned objects (0 elsewhere).
    owned_mask : numpy.ndarray or None
        (h, W) bool, pixels of owned objects or removed specks (to be written back).
    n_osteoclasts, n_osteocytes : int
    """
    h, width = class_map.shape
    packed = alt_class is None
    ret = into is None
    if into is None:
        into = (np.zeros(class_map.shape, np.int32), np.zeros(class_map.shape, np.int32))
    owned_mask = np.zeros(class_map.shape, bool) if ret else None
    block_cols = max(2, int(block_cols) // 2 * 2)
    context = 2 * int(math.ceil(CONTEXT_UM / pixel_size_um / 2))
    oc_items: list = []  # (box, comp, markers, centre, key, owned) of class-3 components
    oc_keys: list[np.ndarray] = [np.zeros(1, np.int64)]  # marker id -> order key (id 0: none)
    next_id = 1
    ot_keys: list[np.ndarray] = []
    ot_pieces: list = []
    specks: list = []
    for c0 in range(0, width, block_cols):
        c1 = min(width, c0 + block_cols)
        grow = context
        while True:
            x0, x1 = max(0, c0 - grow), min(width, c1 + grow)
            res = _label_block(
                class_map,
                centre,
                own_start,
                own_stop,
                pixel_size_um,
                x0,
                x1,
                c0,
                c1,
                width,
                next_id,
                packed,
                owned_mask is not None,
                own_cols,
            )
            if res is not None:
                break
            grow *= 2  # an object reaches the window's side: widen it
        oc_items.extend(res["oc"])
        if res["oc"]:
            oc_keys.append(res["oc_keys"])
        next_id = res["next_id"]
        n_before = sum(k.size for k in ot_keys)
        for piece in res["ot_pieces"]:
            if n_before:
                piece[4][...] += np.int32(n_before)
            ot_pieces.append(piece)
        ot_keys.append(res["ot_keys"])
        specks.extend(res["specks"])
        if owned_mask is not None:
            for (rows, cols), m in res["owned"]:
                owned_mask[rows, cols] |= m

    # osteoclasts: one watershed over every class-3 component of the window (as on the whole
    # window), then decisions per marker of the owned ones, numbered in key order
    n = len(oc_items)
    keys = np.concatenate(oc_keys)
    kept_ids: list[np.ndarray] = []
    kept_items = []
    if any(it[5] for it in oc_items):
        boxes = [(slice(0, 0), slice(0, 0))] + [it[0] for it in oc_items]
        comps = [np.zeros((0, 0), bool)] + [it[1] for it in oc_items]
        markers = [np.zeros(0, np.int32)] + [it[2] for it in oc_items]
        crops = [np.zeros(0, np.float32)] + [it[3] for it in oc_items]
        local = _watershed_components(crops, comps, n + 1, boxes, markers, width)
        del markers, crops
        px_area = pixel_size_um**2
        r = bone_contact_px(pixel_size_um)
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        for j, it in enumerate(oc_items, start=1):
            if not it[5]:
                continue
            (rows, cols), comp = it[0], it[1]
            lab = np.where(comp, local[j], 0)
            ids, areas = np.unique(lab[comp], return_counts=True)
            keep = areas * px_area >= MIN_OSTEOCLAST_AREA_UM2
            if OSTEOCLAST_BONE_CONTACT_UM is not None:
                # bone within r px: dilate the box grown by r (same as dilating the window)
                y0, y1 = max(0, rows.start - r), min(h, rows.stop + r)
                x0, x1 = max(0, cols.start - r), min(width, cols.stop + r)
                cmc = _classes(class_map[y0:y1, x0:x1], packed)
                bone = ((cmc == BONE) | (cmc == OSTEOCYTE)).astype(np.uint8)
                near = cv2.dilate(bone, disk) > 0
                near = near[rows.start - y0 : rows.stop - y0, cols.start - x0 : cols.stop - x0]
                keep &= np.isin(ids, lab[near & comp])
            keep &= ids > 0
            if not keep.all():
                speck = comp & ~np.isin(lab, ids[keep])
                if speck.any():
                    specks.append((it[0], speck))
            if owned_mask is not None:
                owned_mask[rows, cols] |= comp
            if keep.any():
                kept_ids.append(ids[keep])
                kept_items.append((it[0], lab, ids[keep]))
    all_ids = np.concatenate(kept_ids) if kept_ids else np.zeros(0, np.int32)
    order = np.argsort(keys[all_ids], kind="stable")
    rank = np.empty(all_ids.size, np.int32)
    rank[order] = np.arange(1, all_ids.size + 1, dtype=np.int32)
    k = 0
    for gbox, lab, ids in kept_items:
        lut_v = np.zeros(int(lab.max()) + 1, np.int32)
        lut_v[ids] = rank[k : k + ids.size] + np.int32(offsets[0])
        k += ids.size
        _emit(into[0], gbox, lut_v[lab])
    n_oc = int(all_ids.size)
    del oc_items

    # osteocytes: numbered in key order
    keys = np.concatenate(ot_keys) if ot_keys else np.zeros(0, np.int64)
    final = np.zeros(keys.size + 1, np.int32)
    final[1:][np.argsort(keys, kind="stable")] = np.arange(1, keys.size + 1, dtype=np.int32)
    final[1:] += np.int32(offsets[1])
    target = into[1]
    for y0, x0, w, idx, vals in ot_pieces:
        vals = final[vals]
        if isinstance(target, list):
            target.append((y0, x0, w, idx, vals))
        else:
            rows, cols = np.divmod(idx, w)
            target[rows + y0, cols + x0] = vals
    n_ot = int(keys.size)

    # specks last: every decision was made on the unmodified class map
    for (rows, cols), speck in specks:
        box = class_map[rows, cols]
        if speck.dtype != bool:  # flat indices of the speck's pixels in the box
            where = np.divmod(speck, box.shape[1])
            val = box[where]
            if packed:
                box[where] = (val & ~_CLASS_BITS) | (val >> ALT_SHIFT)
            else:
                box[where] = alt_class[rows, cols][where]
            continue
        if packed:
            alt = (box & ~_CLASS_BITS) | (box >> ALT_SHIFT)
        else:
            alt = alt_class[rows, cols]
        np.copyto(box, alt, where=speck)
    if ret:
        return into[0], into[1], owned_mask, n_oc, n_ot
    return None, None, None, n_oc, n_ot
