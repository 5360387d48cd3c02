"""Instances from a class map: osteoclasts split by the centre map, osteocyte lacunae.

Used by the tiled inference (:mod:`histo.segment.tiled`) on row bands of the slide and by the
training code to build the centre-map target from ground-truth instance labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo.classes import BONE, CARTILAGE, OSTEOCLAST, OSTEOCYTE
from histo.segment.cartilage import cartilage_lacunae, rim_counts

#: smallest osteoclast kept, µm² (a 12 µm disc; real osteoclasts are 20-100 µm)
MIN_OSTEOCLAST_AREA_UM2 = 120.0
#: smallest osteocyte lacuna kept, µm² (lacunae are ~8-12 x 4-6 µm, i.e. 25-55 µm²; 20 leaves
#: room for lacunae cut off-centre; higher floors would drop small real lacunae). Chosen on the
#: validation seeds: models/evaluation/validation/postprocessing.md
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


#: foreground fraction above which _components uses OpenCV's own statistics (they cost several
#: times OpenCV's labelling on sparse masks, less than sorting the foreground on dense ones)
DENSE_COMPONENTS = 0.05


class Components(NamedTuple):
    """8-connected components of a mask, as ``cv2.connectedComponentsWithStats`` gives them."""

    count: int  #: number of components, the background (0) included
    labels: np.ndarray  #: (H, W) int32
    stats: np.ndarray  #: (count, 5) int32: left, top, width, height, area (row 0: background)


class SparsePiece(NamedTuple):
    """Values of an image at some pixels of a box: a label image kept sparse.

    The box is ``width`` columns wide with its top-left pixel at (``row``, ``col``); ``index``
    are the pixels' flat indices in the box (int32, ascending), ``values`` their values.
    """

    row: int
    col: int
    width: int
    index: np.ndarray
    values: np.ndarray


class BandLabels(NamedTuple):
    """What :func:`label_band` found in a band.

    ``osteoclasts`` and ``osteocytes`` are (h, W) int32 band-local labels 1..n of the owned
    objects (0 elsewhere) and ``owned_mask`` the (h, W) bool pixels of owned objects and
    removed specks; all three are None when the labels went ``into`` given targets.
    """

    osteoclasts: np.ndarray | None
    osteocytes: np.ndarray | None
    owned_mask: np.ndarray | None
    n_osteoclasts: int
    n_osteocytes: int


def _components(mask: np.ndarray) -> Components:
    """8-connected components: (count incl. background, labels int32, stats).

    The same as ``cv2.connectedComponentsWithStats`` (labels and its stats array: left, top,
    width, height, area of each component, row 0 the background), faster on sparse masks:
    OpenCV's statistics cost several times its labelling, so the boxes and areas are taken
    from the foreground pixels only (``cv2.findNonZero``); masks denser than
    :data:`DENSE_COMPONENTS` use OpenCV's statistics.
    """
    m = mask.view(np.uint8)
    if cv2.countNonZero(m) > DENSE_COMPONENTS * m.size:
        # dense masks: OpenCV's statistics are cheaper than sorting the foreground
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        return Components(n, labels, stats)
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
    return Components(n, labels, stats)


Box = tuple[slice, slice]  #: (row slice, column slice)


def _boxes(stats: np.ndarray) -> list[Box]:
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


def _crops(cc: np.ndarray, n_cc: int, boxes: list[Box]) -> list[np.ndarray]:
    """Each component's pixels (bool) in its bounding box (index 0: background, empty)."""
    return [np.zeros((0, 0), bool)] + [cc[boxes[i]] == i for i in range(1, n_cc)]


def _emit(target: Any, box: Box, values: np.ndarray) -> None:
    """Write the nonzero ``values`` (int32, the box's shape) of a window box into ``target``:
    an array (in place) or a list of :class:`SparsePiece`."""
    rows, cols = box
    if isinstance(target, list):
        idx = np.flatnonzero(values)
        if idx.size:
            target.append(
                SparsePiece(
                    rows.start,
                    cols.start,
                    values.shape[1],
                    idx.astype(np.int32),
                    values.ravel()[idx],
                )
            )
    else:
        np.copyto(target[rows, cols], values, where=values > 0)


class Seeds(NamedTuple):
    """Osteoclast seeds of a window (see :func:`_seed_components`)."""

    labels: np.ndarray  #: (H, W) int32 seed numbers (8-connected components)
    stats: np.ndarray  #: their cv2 statistics
    small: np.ndarray  #: bool per seed number: too small to seed (and the background)
    offset: np.int32  #: largest number of a kept seed


def _seed_components(class_map: np.ndarray, centre: np.ndarray, min_seed_px: int) -> Seeds:
    """Osteoclast seeds of a window: ``centre > CENTRE_SEED_LEVEL`` inside class 3, numbered
    as 8-connected components of the window; seeds of fewer than ``min_seed_px`` pixels are
    marked ``small``."""
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
    return Seeds(seed_labels, seed_stats, small, offset)


def _osteoclast_markers(
    class_map: np.ndarray,
    centre: np.ndarray,
    comps: list[np.ndarray],
    n_cc: int,
    boxes: list[Box],
    min_seed_px: int,
) -> list[np.ndarray]:
    """Watershed markers of the class-3 components, cropped to their bounding boxes.

    The values are those of the whole-window marker image: seeds (``centre >
    CENTRE_SEED_LEVEL``, at least ``min_seed_px``) are numbered as 8-connected components of
    the window, a component without a seed takes ``cc + max(seed number)``.
    """
    seed_labels, _, small, offset = _seed_components(class_map, centre, min_seed_px)
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


def _shelf_pack(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners of boxes of ``sizes`` (height, width) packed on shelves with a 1-px
    gutter around every box, and the canvas's (height, width)."""
    canvas_w = max(max((w for _, w in sizes), default=1) + 1, 1024) + 1
    places = []
    y, x, shelf_h = 1, 1, 0
    for h, w in sizes:
        if x + w + 1 > canvas_w:
            y, x, shelf_h = y + shelf_h + 1, 1, 0
        places.append((y, x))
        x += w + 1
        shelf_h = max(shelf_h, h)
    return places, (y + shelf_h + 1, canvas_w)


def _flood(
    image: np.ndarray, marker_pixels: np.ndarray, mask: np.ndarray, output: np.ndarray
) -> bool:
    """skimage's watershed kernel (8-connected) on ``image`` from the flat ``marker_pixels``
    (in the order they enter the queue), into ``output`` in place. False if skimage's
    internals are not the expected ones."""
    try:
        from skimage.segmentation import _watershed_cy
        from skimage.segmentation._watershed import (
            _offsets_to_raveled_neighbors,
            _validate_connectivity,
        )
    except ImportError:
        return False
    connectivity, offset = _validate_connectivity(2, 1, None)
    neighbours = _offsets_to_raveled_neighbors(image.shape, connectivity, center=offset)
    strides = np.array(image.strides, dtype=np.intp) // image.itemsize
    try:
        _watershed_cy.watershed_raveled(
            image.ravel(),
            marker_pixels,
            neighbours,
            mask.ravel(),
            strides,
            0,
            output.ravel(),
            False,
        )
    except TypeError:
        return False
    return True


class _FloodJob(NamedTuple):
    """Class-3 components to flood, each in its box of a window ``width`` pixels wide.

    ``centre`` is the window's centre map or a list of each component's box of it; index 0 of
    the lists is the background and is never flooded.
    """

    centre: np.ndarray | list[np.ndarray]
    comps: list[np.ndarray]
    n_cc: int
    boxes: list[Box]
    markers: list[np.ndarray]
    width: int


def _watershed_components(job: _FloodJob) -> list[np.ndarray]:
    """skimage's watershed of ``-centre`` from ``markers`` inside the class-3 components, run
    on the components' boxes packed side by side instead of on the whole window.

    The result is identical to ``watershed(-centre, markers, mask=cc > 0)`` on the window: the
    flooding order depends only on the values, on the order in which the marker pixels enter
    the priority queue (raster order of the window, kept here) and on the 4-neighbourhoods
    inside the mask (kept: boxes are separated by a zero gutter). All components are flooded in
    one queue, as on the window, so ties between equal priorities resolve the same way.
    """
    centre, comps, n_cc, boxes, markers, width = job
    ids = list(range(1, n_cc))
    if not PACKED_WATERSHED or not ids:
        return _watershed_window(job)
    sizes = [
        (boxes[i][0].stop - boxes[i][0].start, boxes[i][1].stop - boxes[i][1].start) for i in ids
    ]
    places, canvas = _shelf_pack(sizes)
    image = np.zeros(canvas, np.float64)
    mask = np.zeros(canvas, np.int8)
    output = np.zeros(canvas, np.int32)
    loc_canvas, loc_window = [], []
    for i, (py, px_), (h, w) in zip(ids, places, sizes, strict=True):
        rows, cols = boxes[i]
        dst = (slice(py, py + h), slice(px_, px_ + w))
        comp = comps[i]
        cen = centre[i] if isinstance(centre, list) else centre[boxes[i]]
        mask[dst] = comp
        image[dst] = np.where(comp, -np.asarray(cen, np.float32), 0)
        output[dst] = markers[i]
        my, mx = np.nonzero(markers[i])
        loc_canvas.append((my + py) * canvas[1] + (mx + px_))
        loc_window.append((my + rows.start).astype(np.int64) * width + (mx + cols.start))
    loc_c = np.concatenate(loc_canvas).astype(np.intp)
    order = np.argsort(np.concatenate(loc_window), kind="stable")
    if not _flood(image, loc_c[order], mask, output):
        return _watershed_window(job)
    out = [np.zeros(0, np.int32)] * n_cc
    for i, (py, px_), (h, w) in zip(ids, places, sizes, strict=True):
        out[i] = output[py : py + h, px_ : px_ + w].copy()
    return out


def _watershed_window(job: _FloodJob) -> list[np.ndarray]:
    """``_watershed_components`` with skimage's public watershed on the whole window (the
    reference result; costs several bytes per window pixel)."""
    from skimage.segmentation import watershed

    centre, comps, n_cc, boxes, markers, width = job
    ids = range(1, n_cc)
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
    local = _watershed_components(
        _FloodJob(centre, comps, n_cc, boxes, markers, class_map.shape[1])
    )
    for i in range(1, n_cc):
        rows, cols = boxes[i]
        np.copyto(out[rows, cols], local[i], where=comps[i])
    return out


#: columns of a band labelled at a time (each with ``CONTEXT_UM`` of context either side).
#: The temporaries of a block (labels, masks, centre map of ~1216 rows at the default tiling)
#: sit on top of the network's forward pass in the peak memory: narrower blocks lower it, and
#: 2048 columns cost no measurable speed
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


# ----------------------------------------------------------------------------- band labelling


@dataclass(frozen=True)
class _Band:
    """A band's labelling settings, shared by its column blocks (see :func:`label_band`)."""

    own_start: int  #: first owned row (window rows)
    own_stop: int  #: end of the owned rows
    pixel_size_um: float
    width: int  #: columns of the band window
    packed: bool  #: class map packed with the best class among 0-2
    want_owned: bool  #: collect the owned-pixel mask
    own_cols: tuple[int, int] | None  #: owned columns (a strip of a slide), None: all


@dataclass(frozen=True)
class _BlockWindow:
    """Band columns ``[x0, x1)`` looked at for the objects held by columns ``[c0, c1)``."""

    x0: int
    x1: int
    c0: int
    c1: int


class _Speck(NamedTuple):
    """Pixels of a removed object in a box of the band: a bool mask of the box, or the flat
    indices of its pixels in the box."""

    box: Box
    pixels: np.ndarray


@dataclass
class _OsteoclastRegion:
    """A class-3 component held by a column block, cropped to its box (band columns)."""

    box: Box
    comp: np.ndarray  #: bool pixels of the component in its box
    markers: np.ndarray | None  #: watershed markers (band-wide marker ids); None: no seed yet
    centre: np.ndarray  #: the centre map in the box
    key: np.int64 | None  #: order key of an unseeded component
    owned: bool  #: the band owns it (labels it); others are flooded alongside only


class _BlockOsteoclasts(NamedTuple):
    """Every class-3 component a column block holds, with band-wide marker ids."""

    regions: list[_OsteoclastRegion]
    keys: np.ndarray  #: order keys of the marker ids the block numbered
    next_id: int  #: first marker id free after this block


class _BlockOsteocytes(NamedTuple):
    """The owned lacunae a column block holds."""

    keys: np.ndarray  #: order keys of the kept ones
    pieces: list[SparsePiece]  #: their labels 1..n in the order of the keys
    specks: list[_Speck]  #: the removed ones
    owned: list[tuple[Box, np.ndarray]]  #: owned pixels (bool) by box, if asked for


class _KeptCells(NamedTuple):
    """The kept osteoclasts of a class-3 region: its box, watershed labels and kept ids."""

    box: Box
    labels: np.ndarray
    ids: np.ndarray


@dataclass
class _BlockObjects:
    """The objects a column block holds (see :func:`_label_block`)."""

    osteoclasts: list[_OsteoclastRegion]
    osteoclast_keys: np.ndarray  #: order keys of the marker ids the block numbered
    next_id: int  #: first marker id free after this block
    osteocyte_keys: np.ndarray  #: order keys of the owned, kept lacunae
    osteocyte_pieces: list[SparsePiece]  #: their labels 1..n in the order of the keys
    specks: list[_Speck]
    owned: list[tuple[Box, np.ndarray]]  #: owned pixels (bool) by box, if asked for


def _in_own_cols(band: _Band, left: Any, x0: int) -> np.ndarray:
    """Whether components whose leftmost window column is ``left`` are owned."""
    if band.own_cols is None:
        return np.ones(np.shape(left), bool)
    left = np.asarray(left) + x0
    return (left >= band.own_cols[0]) & (left < band.own_cols[1])


def _held_ids(
    cc: np.ndarray,
    stats: np.ndarray,
    band: _Band,
    win: _BlockWindow,
    rows_owned: bool,
    row0: int = 0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Components held by the block (ids and order keys), those with their top row in the
    owned rows only if ``rows_owned``; None if one (or ``r`` px around it) reaches a side of
    the window that is not the band's (the window must be widened)."""
    top = stats[:, cv2.CC_STAT_TOP] + row0
    if rows_owned:
        cand = np.flatnonzero((top >= band.own_start) & (top < band.own_stop))
    else:
        cand = np.arange(stats.shape[0])
    cand = cand[cand > 0]
    keys, column = _first_block_keys(cc, stats, cand, win.x0)
    sel = (column >= win.c0) & (column < win.c1)
    ids, keys = cand[sel], keys[sel]
    left = stats[ids, cv2.CC_STAT_LEFT]
    right = left + stats[ids, cv2.CC_STAT_WIDTH]
    r = bone_contact_px(band.pixel_size_um)
    w = win.x1 - win.x0
    if (win.x0 > 0 and (left < r).any()) or (win.x1 < band.width and (right > w - r).any()):
        return None
    return ids, keys


def _osteoclast_regions(
    cc: np.ndarray,
    stats: np.ndarray,
    ids: np.ndarray,
    comp_keys: np.ndarray,
    cew: np.ndarray,
    seeds: Seeds,
    band: _Band,
    x0: int,
) -> tuple[list[_OsteoclastRegion], np.ndarray]:
    """The held class-3 components with their seeds (window seed numbers) and the seed
    numbers met."""
    boxes = _boxes(stats)
    tops = stats[:, cv2.CC_STAT_TOP]
    regions = []
    seeded_ids = []
    for i, ckey in zip(ids, comp_keys, strict=True):
        rows, cols = boxes[i]
        comp = cc[rows, cols] == i
        mk = np.where(comp, seeds.labels[rows, cols], 0)
        mk[seeds.small[mk]] = 0
        box = (rows, slice(cols.start + x0, cols.stop + x0))
        own = band.own_start <= tops[i] < band.own_stop
        own = own and bool(_in_own_cols(band, stats[i, cv2.CC_STAT_LEFT], x0))
        centre = cew[rows, cols].copy()
        if mk.any():
            regions.append(_OsteoclastRegion(box, comp, mk, centre, None, own))
            seeded_ids.append(np.unique(mk[mk > 0]))
        else:
            regions.append(_OsteoclastRegion(box, comp, None, centre, _UNSEEDED + ckey, own))
    seeded = np.concatenate(seeded_ids) if seeded_ids else np.zeros(0, np.int32)
    return regions, seeded


def _number_markers(
    regions: list[_OsteoclastRegion], seeds: Seeds, seeded: np.ndarray, x0: int, next_id: int
) -> tuple[np.ndarray, int]:
    """Give the regions' markers band-wide ids from ``next_id`` on (seeds in the order of
    ``seeded``, then one per unseeded region); returns the ids' order keys and the next id."""
    skeys, _ = _first_block_keys(seeds.labels, seeds.stats, seeded, x0)
    lut = np.zeros(int(seeded.max(initial=0)) + 1, np.int32)
    lut[seeded] = np.arange(next_id, next_id + seeded.size, dtype=np.int32)
    keys_of = list(skeys)
    nid = next_id + seeded.size
    for region in regions:
        if region.markers is None:
            region.markers = np.where(region.comp, np.int32(nid), 0).astype(np.int32)
            keys_of.append(region.key)
            nid += 1
        else:
            region.markers = lut[region.markers]
    return np.asarray(keys_of, np.int64), nid


def _block_osteoclasts(
    cmw: np.ndarray, cew: np.ndarray, band: _Band, win: _BlockWindow, next_id: int
) -> _BlockOsteoclasts | None:
    """Every class-3 component the block holds (owned or not) with its markers, their order
    keys and the next free marker id; None if the window must be widened."""
    n_cc, cc, stats = _components(cmw == OSTEOCLAST)
    held = _held_ids(cc, stats, band, win, rows_owned=False)
    if held is None:
        return None
    ids, comp_keys = held
    if not ids.size:
        return _BlockOsteoclasts([], np.zeros(0, np.int64), next_id)
    seeds = _seed_components(cmw, cew, 12)
    regions, seeded = _osteoclast_regions(cc, stats, ids, comp_keys, cew, seeds, band, win.x0)
    del cc
    keys, next_id = _number_markers(regions, seeds, seeded, win.x0, next_id)
    return _BlockOsteoclasts(regions, keys, next_id)


#: a lacuna's rim: the pixels within this many px of it (Chebyshev distance)
_RIM_PX = 2


def _in_cartilage(
    cc: np.ndarray, stats: np.ndarray, classes_w: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    """Per component of ``cc`` (``stats`` its boxes): True for those of ``ids`` whose rim
    (``_RIM_PX`` around it) holds more cartilage than bone. A lacuna in cartilage is a
    chondrocyte's, not an osteocyte's (Parfitt 1987: osteocytes are cells in bone matrix), so
    it is removed like a speck.

    A rim pixel counts for the largest label within ``_RIM_PX`` of it. Only the lacunae with a
    pixel within ``_RIM_PX`` of cartilage can have any on their rim: the rims are counted on
    the box around those alone (a few specks of cartilage on a field, the cartilage's lacunae
    on a long bone), so a field pays a comparison and a byte-wide dilation per window.
    """
    out = np.zeros(stats.shape[0], bool)
    ids = np.asarray(ids, np.intp)
    cartilage = classes_w == CARTILAGE
    if ids.size == 0 or not cv2.countNonZero(cartilage.view(np.uint8)):
        return out  # a field without cartilage: nothing to do
    size = 2 * _RIM_PX + 1
    # the lacunae with a pixel within the rim's reach of cartilage (a byte a pixel)
    near_cartilage = cv2.dilate(cartilage.view(np.uint8), np.ones((size, size), np.uint8))
    reached = np.zeros(stats.shape[0], bool)
    reached[cc[near_cartilage.view(bool)]] = True
    ids = ids[reached[ids]]
    if ids.size == 0:
        return out
    h, w = cc.shape
    # a rim pixel's label looks _RIM_PX further out: the union of those boxes holds every rim
    # pixel of these lacunae with all it looks at (or the window's edge, as on the window)
    box = _rim_boxes(stats[ids], 2 * _RIM_PX, h, w)
    rows = slice(int(box.y0.min()), int(box.y1.max()))
    cols = slice(int(box.x0.min()), int(box.x1.max()))
    sub = cc[rows, cols]
    masks = (cartilage[rows, cols], classes_w[rows, cols] == BONE)
    n_cart, n_bone = rim_counts(sub, _RIM_PX, sub == 0, masks, out.size)
    out[ids] = n_cart[ids] > n_bone[ids]
    return out


class _Boxes(NamedTuple):
    """Boxes of components, rows ``[y0, y1)`` and columns ``[x0, x1)`` (arrays)."""

    y0: np.ndarray
    y1: np.ndarray
    x0: np.ndarray
    x1: np.ndarray


def _rim_boxes(stats: np.ndarray, pad: int, h: int, w: int) -> _Boxes:
    """Boxes of components (cv2 ``stats`` rows) widened by ``pad`` px, clipped to (h, w)."""
    top, left = stats[:, cv2.CC_STAT_TOP], stats[:, cv2.CC_STAT_LEFT]
    bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
    right = left + stats[:, cv2.CC_STAT_WIDTH]
    return _Boxes(
        np.maximum(top - pad, 0),
        np.minimum(bottom + pad, h),
        np.maximum(left - pad, 0),
        np.minimum(right + pad, w),
    )


def _block_osteocytes(cmw: np.ndarray, band: _Band, win: _BlockWindow) -> _BlockOsteocytes | None:
    """The owned lacunae the block holds: order keys of the kept ones, their labels (sparse,
    1..n in key order), the removed specks and the owned pixels; None if the window must be
    widened.

    Labelled from the row above the owned rows down (a component whose top is above the owned
    rows reaches that row); rows are taken from an even row so that the 2-row strips of the
    keys, hence their order, are the window's.
    """
    s0 = max(0, (band.own_start - 1) // 2 * 2)
    n_cc, cc, stats = _components(cmw[s0:] == OSTEOCYTE)
    held = _held_ids(cc, stats, band, win, rows_owned=True, row0=s0)
    if held is None:
        return None
    ids, keys = held
    if band.own_cols is not None:
        mine = _in_own_cols(band, stats[ids, cv2.CC_STAT_LEFT], win.x0)
        ids, keys = ids[mine], keys[mine]
    owned = np.zeros(n_cc, bool)
    owned[ids] = True
    keep = np.zeros(n_cc, bool)
    keep[ids] = stats[ids, cv2.CC_STAT_AREA] * band.pixel_size_um**2 >= MIN_OSTEOCYTE_AREA_UM2
    # (cmw holds class codes already)
    keep &= ~_in_cartilage(cc, stats, cmw[s0:], np.flatnonzero(keep))
    lut = np.zeros(n_cc, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    speck_lut = owned & ~keep
    pieces: list[SparsePiece] = []
    specks: list[_Speck] = []
    owned_boxes: list = []
    if ids.size:
        # only the rows holding owned objects
        tops = stats[ids, cv2.CC_STAT_TOP]
        r0 = int(tops.min())
        r1 = int((tops + stats[ids, cv2.CC_STAT_HEIGHT]).max())
        for blk_r, blk_c in _blocks((r1 - r0, win.x1 - win.x0)):
            rows = slice(blk_r.start + r0, min(blk_r.stop + r0, r1))
            c = cc[rows, blk_c]
            cols = slice(blk_c.start + win.x0, blk_c.start + win.x0 + c.shape[1])
            box = (slice(rows.start + s0, rows.stop + s0), cols)
            _emit(pieces, box, lut[c])
            if speck_lut.any():
                # sparse: a block's mask would cost a byte per pixel until the band is done
                idx = np.flatnonzero(speck_lut[c])
                if idx.size:
                    specks.append(_Speck(box, idx.astype(np.int32)))
            if band.want_owned:
                owned_boxes.append((box, owned[c]))
    return _BlockOsteocytes(keys[keep[ids]], pieces, specks, owned_boxes)


def _label_block(
    class_map: np.ndarray, centre: Any, band: _Band, win: _BlockWindow, next_id: int
) -> _BlockObjects | None:
    """Objects of a band held by columns ``[c0, c1)``, seen through band columns [x0, x1).

    A component is held by the block holding the column of its key (``_first_block_keys``).
    Every held class-3 component is returned (all are flooded together, see
    ``_watershed_components``), with markers numbered from ``next_id``; of the osteocytes only
    the owned ones. With ``own_cols`` ``(a, b)``, the band owns only the objects whose
    leftmost column lies in ``[a, b)``. None if a held object reaches a side of the window
    that is not the band's.
    """
    cmw = _classes(class_map[:, win.x0 : win.x1], band.packed)
    cew = centre(win.x0, win.x1) if callable(centre) else centre[:, win.x0 : win.x1]
    osteoclasts = _block_osteoclasts(cmw, cew, band, win, next_id)
    if osteoclasts is None:
        return None
    osteocytes = _block_osteocytes(cmw, band, win)
    if osteocytes is None:
        return None
    return _BlockObjects(
        osteoclasts.regions,
        osteoclasts.keys,
        osteoclasts.next_id,
        osteocytes.keys,
        osteocytes.pieces,
        osteocytes.specks,
        osteocytes.owned,
    )


@dataclass
class _BandObjects:
    """The objects of a band's column blocks, gathered."""

    osteoclasts: list[_OsteoclastRegion] = field(default_factory=list)
    #: order key of every marker id (id 0: none)
    osteoclast_keys: list[np.ndarray] = field(default_factory=lambda: [np.zeros(1, np.int64)])
    osteocyte_keys: list[np.ndarray] = field(default_factory=list)
    osteocyte_pieces: list[SparsePiece] = field(default_factory=list)
    specks: list[_Speck] = field(default_factory=list)

    def add(self, block: _BlockObjects, owned_mask: np.ndarray | None) -> None:
        self.osteoclasts.extend(block.osteoclasts)
        if block.osteoclasts:
            self.osteoclast_keys.append(block.osteoclast_keys)
        n_before = sum(k.size for k in self.osteocyte_keys)
        for piece in block.osteocyte_pieces:
            if n_before:
                piece.values[...] += np.int32(n_before)
            self.osteocyte_pieces.append(piece)
        self.osteocyte_keys.append(block.osteocyte_keys)
        self.specks.extend(block.specks)
        if owned_mask is not None:
            for (rows, cols), m in block.owned:
                owned_mask[rows, cols] |= m


def _band_objects(
    class_map: np.ndarray,
    centre: Any,
    band: _Band,
    block_cols: int,
    owned_mask: np.ndarray | None,
) -> _BandObjects:
    """The objects of every column block of ``block_cols`` (a block's window is widened
    until no object it holds reaches its sides)."""
    block_cols = max(2, int(block_cols) // 2 * 2)
    context = 2 * int(math.ceil(CONTEXT_UM / band.pixel_size_um / 2))
    found = _BandObjects()
    next_id = 1
    for c0 in range(0, band.width, block_cols):
        c1 = min(band.width, c0 + block_cols)
        grow = context
        while True:
            win = _BlockWindow(max(0, c0 - grow), min(band.width, c1 + grow), c0, c1)
            block = _label_block(class_map, centre, band, win, next_id)
            if block is not None:
                break
            grow *= 2  # an object reaches the window's side: widen it
        found.add(block, owned_mask)
        next_id = block.next_id
    return found


def _kept_osteoclast_ids(
    class_map: np.ndarray, region: _OsteoclastRegion, lab: np.ndarray, band: _Band
) -> tuple[np.ndarray, np.ndarray]:
    """The watershed labels in a region and which of them are kept: large enough and, with
    ``OSTEOCLAST_BONE_CONTACT_UM``, within that distance of bone."""
    (rows, cols), comp = region.box, region.comp
    ids, areas = np.unique(lab[comp], return_counts=True)
    keep = areas * band.pixel_size_um**2 >= MIN_OSTEOCLAST_AREA_UM2
    if OSTEOCLAST_BONE_CONTACT_UM is not None:
        # bone within r px: dilate the box grown by r (same as dilating the window)
        r = bone_contact_px(band.pixel_size_um)
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        y0, y1 = max(0, rows.start - r), min(class_map.shape[0], rows.stop + r)
        x0, x1 = max(0, cols.start - r), min(band.width, cols.stop + r)
        cmc = _classes(class_map[y0:y1, x0:x1], band.packed)
        # calcified cartilage is a resorbed surface too (TRAP+ cells at the junction sit on it)
        bone = ((cmc == BONE) | (cmc == OSTEOCYTE) | (cmc == CARTILAGE)).astype(np.uint8)
        near = cv2.dilate(bone, disk) > 0
        near = near[rows.start - y0 : rows.stop - y0, cols.start - x0 : cols.stop - x0]
        keep &= np.isin(ids, lab[near & comp])
    keep &= ids > 0
    return ids, keep


def _decide_osteoclasts(
    class_map: np.ndarray,
    found: _BandObjects,
    band: _Band,
    owned_mask: np.ndarray | None,
) -> list[_KeptCells]:
    """One watershed over every class-3 component of the band (as on the whole window), then
    the decisions on the owned ones: their kept cells; the removed ones are added to
    ``found.specks``."""
    regions = found.osteoclasts
    if not any(region.owned for region in regions):
        return []
    boxes = [(slice(0, 0), slice(0, 0))] + [region.box for region in regions]
    comps = [np.zeros((0, 0), bool)] + [region.comp for region in regions]
    markers = [np.zeros(0, np.int32)] + [region.markers for region in regions]
    crops = [np.zeros(0, np.float32)] + [region.centre for region in regions]
    local = _watershed_components(
        _FloodJob(crops, comps, len(regions) + 1, boxes, markers, band.width)
    )
    del markers, crops
    kept = []
    for j, region in enumerate(regions, start=1):
        if not region.owned:
            continue
        (rows, cols), comp = region.box, region.comp
        lab = np.where(comp, local[j], 0)
        ids, keep = _kept_osteoclast_ids(class_map, region, lab, band)
        if not keep.all():
            speck = comp & ~np.isin(lab, ids[keep])
            if speck.any():
                found.specks.append(_Speck(region.box, speck))
        if owned_mask is not None:
            owned_mask[rows, cols] |= comp
        if keep.any():
            kept.append(_KeptCells(region.box, lab, ids[keep]))
    return kept


def _number_osteoclasts(kept: list[_KeptCells], keys: np.ndarray, offset: int, target: Any) -> int:
    """Write the kept osteoclasts into ``target`` numbered in the order of their markers'
    keys from ``offset + 1``; returns how many."""
    all_ids = np.concatenate([k.ids for k in kept]) if kept else np.zeros(0, np.int32)
    order = np.argsort(keys[all_ids], kind="stable")
    rank = np.empty(all_ids.size, np.int32)
    rank[order] = np.arange(1, all_ids.size + 1, dtype=np.int32)
    k = 0
    for box, lab, ids in kept:
        lut = np.zeros(int(lab.max()) + 1, np.int32)
        lut[ids] = rank[k : k + ids.size] + np.int32(offset)
        k += ids.size
        _emit(target, box, lut[lab])
    return int(all_ids.size)


def _number_osteocytes(found: _BandObjects, offset: int, target: Any) -> int:
    """Write the owned lacunae into ``target`` numbered in key order from ``offset + 1``;
    returns how many."""
    keys = found.osteocyte_keys
    keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    final = np.zeros(keys.size + 1, np.int32)
    final[1:][np.argsort(keys, kind="stable")] = np.arange(1, keys.size + 1, dtype=np.int32)
    final[1:] += np.int32(offset)
    for piece in found.osteocyte_pieces:
        vals = final[piece.values]
        if isinstance(target, list):
            target.append(piece._replace(values=vals))
        else:
            rows, cols = np.divmod(piece.index, piece.width)
            target[rows + piece.row, cols + piece.col] = vals
    return int(keys.size)


def _remove_specks(
    class_map: np.ndarray, specks: list[_Speck], alt_class: np.ndarray | None
) -> None:
    """Give the pixels of removed objects their best class among 0-2 (from ``alt_class``, or
    from the upper bits of a packed class map when it is None)."""
    packed = alt_class is None
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


def _fill_cartilage_lacunae(class_map: np.ndarray, band: _Band) -> None:
    """Give the band's chondrocyte lacunae read as holes back to the cartilage, in place
    (:func:`histo.segment.cartilage.cartilage_lacunae`).

    A hole is the band's when its top row is owned (and its leftmost column, in a strip), so
    each is filled once; its rows below the band are not written out before the next band.
    """
    rows = (band.own_start, band.own_stop)
    bits = int(_CLASS_BITS) if band.packed else 0xFF
    for fill in cartilage_lacunae(
        class_map, band.pixel_size_um, rows, band.own_cols, class_bits=bits
    ):
        box = class_map[:, fill.cols]
        if band.packed:
            box[fill.mask] = (box[fill.mask] & ~_CLASS_BITS) | np.uint8(CARTILAGE)
        else:
            box[fill.mask] = CARTILAGE


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
) -> BandLabels:
    """Label the objects a row band owns, inside a window of rows around it.

    An object (a connected class-3 or class-4 region) belongs to the band that holds its top
    row, so every object is labelled exactly once however the slide is cut. Objects too small to
    be a cell (see ``MIN_*_AREA_UM2``), and osteoclasts farther than
    ``OSTEOCLAST_BONE_CONTACT_UM`` from bone, are removed and their pixels take ``alt_class`` (the
    best non-cell class). Small holes in cartilage become cartilage first (:mod:`.cartilage`).

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
        which :class:`SparsePiece` are appended (window rows and columns).
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
    BandLabels
        Label images and owned mask (None with ``into``), and the numbers of objects.
    """
    ret = into is None
    if into is None:
        into = (np.zeros(class_map.shape, np.int32), np.zeros(class_map.shape, np.int32))
    owned_mask = np.zeros(class_map.shape, bool) if ret else None
    band = _Band(
        own_start, own_stop, pixel_size_um, class_map.shape[1], alt_class is None, ret, own_cols
    )
    _fill_cartilage_lacunae(class_map, band)
    found = _band_objects(class_map, centre, band, block_cols, owned_mask)
    kept = _decide_osteoclasts(class_map, found, band, owned_mask)
    keys = np.concatenate(found.osteoclast_keys)
    n_oc = _number_osteoclasts(kept, keys, offsets[0], into[0])
    del found.osteoclasts[:], kept
    n_ot = _number_osteocytes(found, offsets[1], into[1])
    # specks last: every decision was made on the unmodified class map
    _remove_specks(class_map, found.specks, alt_class)
    if ret:
        return BandLabels(into[0], into[1], owned_mask, n_oc, n_ot)
    return BandLabels(None, None, None, n_oc, n_ot)
