"""Histomorphometry of class maps of any size, block by block in bounded memory.

:func:`measure_by_blocks` returns the same :class:`histo.measure.Measurement` as
:func:`histo.measure.measure` on the whole arrays, reading the arrays (numpy, zarr or any
array-like that supports 2-D slicing) one block at a time (the next block is read in a thread
while one is measured). Memory is bounded by a block with its margin
(``(block_px + 2 * margin_px)²`` pixels) and the arrays of the next one, never by the slide.

Decomposition (each quantity is a sum over blocks, each term counted once):

- areas: pixel counts over each block's *core* (the blocks tile the map without overlap);
- bone perimeter: :func:`histo._measure_perimeter.boundary_cells` on the core plus a margin of
  ``PERIMETER_MARGIN_PX``; a segment is kept by the block whose core holds its 2x2 cell. Marching
  squares is local to the cell and the smoothing along the contour reaches 4 vertices (at most 4
  cells) each way, so the kept segments are those of the whole map (equal to rounding);
- per-object sums (area, centroid sums, bone contact, TRAP signal, lacuna optical density and
  the matrix ring around lacunae) are partial sums over cores keyed by the object's global label
  and added with ``np.bincount``;
- Oc.S is the sum of the bone contact of the counted osteoclasts (the same arithmetic as
  :func:`histo.measure.measure`), ES adds the pit-facing surface (optional closing rule);
- nuclei need the whole object: each osteoclast is counted by the block whose core holds its
  first pixel (raster order), which reads a margin of ``margin_px`` around its core; objects
  larger than the margin are counted afterwards from a crop of their bounding box.

Without instance maps, each 8-connected component of class 3 (or 4) is one object, as in
:func:`histo.measure.measure`: components are labelled per core, merged across block seams
(union-find on the seam rows and columns) and numbered in raster order of their first pixel,
which is the numbering of ``scipy.ndimage.label`` on the whole map. The provisional labels are
kept in a temporary zarr array on disk (a numpy array when the class map is numpy).

Agreement with :func:`histo.measure.measure` (``tests/test_measure_blocks.py``): counts, areas,
object tables and labels identical; B.Pm, Oc.S, ES and bone contact equal to floating-point
rounding (relative differences below 1e-9), whatever the block size.

Examples
--------
>>> import zarr                                                        # doctest: +SKIP
>>> cm = zarr.open_array("labels.ome.zarr/labels/class_map/0", mode="r")  # doctest: +SKIP
>>> m = measure_by_blocks(cm, 1.0, block_px=4096)                     # doctest: +SKIP
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from histo import classes
from histo._measure_objects import EIGHT, count_nuclei_one, nonzero_2d, optical_density
from histo._measure_perimeter import BoundaryCells, boundary_cells
from histo.errors import ClassMapError
from histo.measure import (
    CountingRules,
    Measurement,
    _corner_labels,
    _eroded_pits,
    _finish,
    count_osteoclasts,
    validate_pixel_size,
)
from histo.runtime import release_free_memory

__all__ = [
    "DEFAULT_BLOCK_PX",
    "MARGIN_UM",
    "PERIMETER_MARGIN_PX",
    "Block",
    "downsample_nearest",
    "iter_blocks",
    "measure_by_blocks",
]

#: default block side in pixels (one block with its margin is the unit of memory)
DEFAULT_BLOCK_PX = 4096
#: default margin around a block's core for whole objects (µm): larger than any cell
MARGIN_UM = 256.0
#: margin (px) around a core for the perimeter: the contour smoothing reaches 4 cells each way
PERIMETER_MARGIN_PX = 8
#: after a block, the C heap's free pages are given back once the resident memory has grown
#: by this much (MB) since they last were (:func:`histo.runtime.release_free_memory`). Blocks
#: allocate and free arrays of many sizes in two threads (decoding the image, labelling):
#: without it the freed pages stay resident and the process creeps up over a slide
#: (32768² at 1 µm/px: +50 MiB over its 484 blocks of 1536 px). With it, 16384²: median
#: RSS of the phase ~600 instead of 630-650 MiB, for ~2 s more.
TRIM_SLACK_MB = 32

ProgressFn = Callable[[float, str], None]
ImageReader = Callable[[int, int, int, int], np.ndarray]


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """One block: its core (owned pixels) and its window (core plus margin, clipped).

    Attributes
    ----------
    y0, y1, x0, x1 : int
        Core rows [y0, y1) and columns [x0, x1) in pixels of the map.
    wy0, wy1, wx0, wx1 : int
        Window rows and columns (the core grown by the margin, clipped to the map).
    """

    y0: int
    y1: int
    x0: int
    x1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    @property
    def core(self) -> tuple[slice, slice]:
        """The core as slices of the window."""
        return (
            slice(self.y0 - self.wy0, self.y1 - self.wy0),
            slice(self.x0 - self.wx0, self.x1 - self.wx0),
        )

    @property
    def window(self) -> tuple[slice, slice]:
        """The window as slices of the map."""
        return slice(self.wy0, self.wy1), slice(self.wx0, self.wx1)

    def grown(self, margin: int) -> tuple[slice, slice]:
        """The core grown by ``margin`` px (clipped to the window), as slices of the window."""
        return (
            slice(
                max(self.y0 - margin, self.wy0) - self.wy0,
                min(self.y1 + margin, self.wy1) - self.wy0,
            ),
            slice(
                max(self.x0 - margin, self.wx0) - self.wx0,
                min(self.x1 + margin, self.wx1) - self.wx0,
            ),
        )


def iter_blocks(shape: tuple[int, int], block_px: int, margin_px: int = 0) -> Iterator[Block]:
    """Blocks of ``block_px`` tiling ``shape`` in raster order, each with a window of margin.

    Parameters
    ----------
    shape : (int, int)
        (H, W) in pixels.
    block_px : int
        Core side in pixels (the last row and column of blocks may be smaller).
    margin_px : int
        Margin of the window around each core, in pixels.
    """
    h, w = int(shape[0]), int(shape[1])
    b = max(int(block_px), 1)
    m = max(int(margin_px), 0)
    for y0 in range(0, h, b):
        y1 = min(y0 + b, h)
        for x0 in range(0, w, b):
            x1 = min(x0 + b, w)
            yield Block(
                y0, y1, x0, x1, max(y0 - m, 0), min(y1 + m, h), max(x0 - m, 0), min(x1 + m, w)
            )


def _read(array: Any, ys: slice, xs: slice) -> np.ndarray:
    out = np.asarray(array[ys, xs])
    if out.ndim == 3 and out.shape[-1] == 1:
        out = out[..., 0]
    return out


def _shape2(array: Any) -> tuple[int, int]:
    shape = tuple(int(n) for n in array.shape)
    if len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    if len(shape) != 2:
        raise ClassMapError(f"class map must be 2-D (H, W), got shape {shape}")
    return shape  # type: ignore[return-value]


def downsample_nearest(array: Any, shape: tuple[int, int], band_px: int = 1024) -> np.ndarray:
    """Nearest-neighbour resample of a 2-D array-like to ``shape``, read band by band.

    Output pixel i samples input pixel ``floor(i * H / h)`` (the ``cv2.INTER_NEAREST`` grid);
    only rows that are sampled are read, at most ``band_px`` rows of the input at a time.
    """
    h, w = _shape2(array)
    oh, ow = int(shape[0]), int(shape[1])
    rows = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int64), w - 1)
    out = None
    for start in range(0, oh, max(1, band_px // max(1, h // oh))):
        stop = min(oh, start + max(1, band_px // max(1, h // oh)))
        r0, r1 = int(rows[start]), int(rows[stop - 1]) + 1
        band = _read(array, slice(r0, r1), slice(0, w))
        part = band[rows[start:stop] - r0][:, cols]
        if out is None:
            out = np.zeros((oh, ow), part.dtype)
        out[start:stop] = part
    assert out is not None
    return out


# --------------------------------------------------------------------------- accumulation


@dataclass
class _Sums:
    """Per-label partial sums collected over blocks, reduced at the end."""

    names: tuple[str, ...]
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = field(default_factory=list)

    def add(self, labels: np.ndarray, **values: np.ndarray) -> None:
        if labels.size:
            self.parts.append((labels.astype(np.int64), values))

    def reduce(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Sums per label of ``ids`` (sorted unique), 0 where a label has no part."""
        out = {name: np.zeros(ids.size) for name in self.names}
        for labels, values in self.parts:
            pos = np.searchsorted(ids, labels)
            ok = (pos < ids.size) & (ids[np.minimum(pos, ids.size - 1)] == labels)
            for name, v in values.items():
                out[name] += np.bincount(pos[ok], weights=v[ok], minlength=ids.size)
        return out


def _per_label(
    labels: np.ndarray,
    weights: dict[str, np.ndarray],
    count: str | None = None,
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Sum ``weights`` per distinct value of ``labels`` (1-D): (unique labels, sums).

    ``count`` names an extra sum: the number of pixels of each label. With ``ids``, ``labels``
    are indices 1..n into ``ids`` (compact labels) and the labels returned are ``ids`` values.
    Each sum adds the values in the order of ``labels`` (``np.bincount``), whatever the path.
    """
    if labels.size == 0:
        names = [*weights, *([count] if count else [])]
        return np.zeros(0, np.int64), {k: np.zeros(0) for k in names}
    labels = labels.astype(np.int64, copy=False)
    top = int(labels.max())
    if ids is not None or top <= 4 * labels.size + 65536:
        # labels small enough to index a bincount directly
        n = np.bincount(labels, minlength=top + 1)
        present = np.flatnonzero(n)
        out = {
            k: np.bincount(labels, weights=v, minlength=top + 1)[present]
            for k, v in weights.items()
        }
        if count:
            out[count] = n[present].astype(float)
        u = present.astype(np.int64) if ids is None else ids[present - 1]
        return u, out
    u, inv = np.unique(labels, return_inverse=True)
    out = {k: np.bincount(inv, weights=v, minlength=u.size) for k, v in weights.items()}
    if count:
        out[count] = np.bincount(inv, minlength=u.size).astype(float)
    return u, out


def _boxes(vals: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (n, 4) boxes y0 x0 y1 x1) of the pixels (rows, cols) of each label of ``vals``."""
    order = np.argsort(vals, kind="stable")
    v = vals[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    r, c = rows[order], cols[order]
    box = np.stack(
        [
            np.minimum.reduceat(r, starts),
            np.minimum.reduceat(c, starts),
            np.maximum.reduceat(r, starts) + 1,
            np.maximum.reduceat(c, starts) + 1,
        ],
        axis=1,
    )
    return v[starts].astype(np.int64), box


def _class_labels(
    cm: np.ndarray, code: int, labels: np.ndarray, image: bool = True
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Instance labels on the pixels of class ``code``, 0 elsewhere (negative labels -> 0).

    Returns the label image (or with ``image=False`` the mask of labelled pixels) and the
    labelled pixels (rows, columns, labels) in raster order.
    """
    mask = cm == code
    mask &= labels > 0
    rows, cols = nonzero_2d(mask)
    vals = labels[rows, cols]
    if not image:
        return mask, (rows, cols, vals)
    out = np.zeros(mask.shape, labels.dtype)
    out.ravel()[rows * mask.shape[1] + cols] = vals
    return out, (rows, cols, vals)


def _in_core(
    rcv: tuple[np.ndarray, np.ndarray, np.ndarray], ys: slice, xs: slice
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels (rows, columns, labels) inside rows ``ys`` and columns ``xs``, shifted to
    them (raster order kept)."""
    rows, cols, vals = rcv
    sel = (rows >= ys.start) & (rows < ys.stop) & (cols >= xs.start) & (cols < xs.stop)
    return rows[sel] - ys.start, cols[sel] - xs.start, vals[sel]


def _grown_labels(
    rcv: tuple[np.ndarray, np.ndarray, np.ndarray], shape: tuple[int, int], ring_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """Maximum filter of size ``2 * ring_px + 1`` of a label image, as compact labels.

    ``rcv`` holds the labelled pixels (rows, columns, labels) of an image of ``shape``.
    Returns (ids, grown): ``grown`` holds 0 or k (1..n) for label ``ids[k - 1]``; the same
    as ``ndi.maximum_filter(labels, size=2 * ring_px + 1)`` (compact numbering keeps the order
    of labels, and the filter's mirrored border adds no new value to a maximum).
    """
    rows, cols, vals = rcv
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(shape, np.uint16)
    ids, inv = np.unique(vals, return_inverse=True)
    size = 2 * int(ring_px) + 1
    if ids.size < 2**16 - 1:
        import cv2

        compact = np.zeros(shape, np.uint16)
        compact[rows, cols] = inv + 1
        grown = cv2.dilate(compact, np.ones((size, size), np.uint8))
    else:
        compact = np.zeros(shape, np.int32)
        compact[rows, cols] = inv + 1
        grown = ndi.maximum_filter(compact, size=size)
    return ids.astype(np.int64), grown


# --------------------------------------------------------------------------- labels


class _GivenLabels:
    """Instance labels given by the caller, restricted to one class (negative -> 0)."""

    def __init__(self, array: Any, shape: tuple[int, int], name: str) -> None:
        if _shape2(array) != shape:
            raise ClassMapError(f"{name} has shape {_shape2(array)}, the class map {shape}")
        dtype = np.dtype(getattr(array, "dtype", np.int64))
        if not np.issubdtype(dtype, np.integer):
            raise ClassMapError(f"{name} must be an integer label image, got dtype {dtype}")
        self.array = array

    def window(self, ys: slice, xs: slice) -> np.ndarray:
        # the array's own integer dtype: callers clip negative labels to 0
        return _read(self.array, ys, xs)


class _ComponentLabels:
    """8-connected components of one class numbered as ``ndimage.label`` numbers them.

    Built in one pass over the cores (see the module docstring); the provisional labels live
    in ``self.store`` (numpy or a temporary zarr array) and ``self.lut`` maps them to the
    global numbering.
    """

    def __init__(
        self, class_map: Any, code: int, shape: tuple[int, int], block_px: int, on_disk: bool
    ) -> None:
        h, w = shape
        self.tmp: str | None = None
        if on_disk:
            import zarr

            self.tmp = tempfile.mkdtemp(prefix="histo-labels-")
            self.store: Any = zarr.create_array(
                store=self.tmp,
                shape=(h, w),
                chunks=(min(block_px, h), min(block_px, w)),
                dtype="int64",
                fill_value=0,
            )
        else:
            self.store = np.zeros((h, w), np.int64)
        offset = 0
        firsts: list[np.ndarray] = []
        rows_above: dict[int, np.ndarray] = {}
        rows_below: dict[int, np.ndarray] = {}
        cols_left: dict[int, np.ndarray] = {}
        cols_right: dict[int, np.ndarray] = {}
        for b in iter_blocks(shape, block_px):
            cm = _read(class_map, slice(b.y0, b.y1), slice(b.x0, b.x1))
            lab, n = ndi.label(cm == code, structure=EIGHT)
            prov = np.where(lab > 0, lab.astype(np.int64) + offset, 0)
            if n:
                flat = np.flatnonzero(lab)
                _, first = np.unique(lab.ravel()[flat], return_index=True)
                r, c = np.divmod(flat[first], lab.shape[1])
                firsts.append((r + b.y0) * w + (c + b.x0))
            offset += n
            self.store[b.y0 : b.y1, b.x0 : b.x1] = prov
            # seam rows and columns (full width / height) for the union of components
            if b.y0 > 0:
                rows_below.setdefault(b.y0, np.zeros(w, np.int64))[b.x0 : b.x1] = prov[0]
            if b.y1 < h:
                rows_above.setdefault(b.y1, np.zeros(w, np.int64))[b.x0 : b.x1] = prov[-1]
            if b.x0 > 0:
                cols_right.setdefault(b.x0, np.zeros(h, np.int64))[b.y0 : b.y1] = prov[:, 0]
            if b.x1 < w:
                cols_left.setdefault(b.x1, np.zeros(h, np.int64))[b.y0 : b.y1] = prov[:, -1]
        pairs = [_touching(rows_above[k], rows_below[k]) for k in rows_above] + [
            _touching(cols_left[k], cols_right[k]) for k in cols_left
        ]
        first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        self.lut = _merge(offset, pairs, first)
        self.n = int(self.lut.max()) if self.lut.size else 0

    def window(self, ys: slice, xs: slice) -> np.ndarray:
        return self.lut[np.asarray(self.store[ys, xs])]

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(k, 2) pairs of labels 8-adjacent across a seam: ``a`` on one side, ``b`` on the other."""
    out = []
    n = a.size
    for d in (-1, 0, 1):
        lo, hi = max(0, -d), min(n, n - d)
        aa, bb = a[lo:hi], b[lo + d : hi + d]
        both = (aa > 0) & (bb > 0)
        out.append(np.stack([aa[both], bb[both]], axis=1))
    return np.concatenate(out)


def _merge(n: int, pairs: list[np.ndarray], first: np.ndarray) -> np.ndarray:
    """LUT provisional label (0..n) -> global label, numbered by first pixel (raster order)."""
    lut = np.zeros(n + 1, np.int64)
    if n == 0:
        return lut
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    graph = coo_matrix(
        (np.ones(len(edges), np.int8), (edges[:, 0] - 1, edges[:, 1] - 1)), shape=(n, n)
    )
    n_comp, comp = connected_components(graph, directed=False)
    comp_first = np.full(n_comp, np.iinfo(np.int64).max)
    np.minimum.at(comp_first, comp, first)
    rank = np.empty(n_comp, np.int64)
    rank[np.argsort(comp_first, kind="stable")] = np.arange(1, n_comp + 1)
    lut[1:] = rank[comp]
    return lut


# --------------------------------------------------------------------------- ROI and image


class _Region:
    """A region of interest read window by window: a mask array-like or a polygon."""

    def __init__(self, roi: Any, shape: tuple[int, int]) -> None:
        self.polygon = None
        self.mask = None
        rshape = tuple(int(n) for n in getattr(roi, "shape", np.shape(roi)))
        if rshape == tuple(shape) and (
            np.dtype(getattr(roi, "dtype", bool)) == bool or shape[1] != 2
        ):
            self.mask = roi
            return
        arr = np.asarray(roi)
        if arr.ndim == 2 and arr.shape[1] == 2 and arr.shape[0] >= 3:
            self.polygon = arr.astype(float)
            return
        raise ClassMapError(
            f"ROI must be a mask of the class map's shape {tuple(shape)} or an (N, 2) polygon of "
            f"(row, column) vertices; got shape {arr.shape}"
        )

    def window(self, ys: slice, xs: slice) -> np.ndarray:
        if self.mask is not None:
            return _read(self.mask, ys, xs).astype(bool)
        from skimage.draw import polygon2mask

        shape = (ys.stop - ys.start, xs.stop - xs.start)
        return polygon2mask(shape, self.polygon - np.array([ys.start, xs.start], float))

    def at(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Values at pixels (yy, xx) (integer arrays)."""
        if yy.size == 0:
            return np.zeros(0, bool)
        if self.mask is not None:
            if isinstance(self.mask, np.ndarray):
                return self.mask[yy, xx].astype(bool)
            return np.array(
                [bool(np.asarray(self.mask[y, x])) for y, x in zip(yy, xx, strict=True)], bool
            )
        from skimage.measure import points_in_poly

        # the same point-in-polygon test as polygon2mask (skimage's geometry core)
        return points_in_poly(np.stack([yy, xx], axis=1).astype(float), self.polygon)


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


_OD_LUT = optical_density(np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2))[
    0, :, 0
]


def _od_sum(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density (float32) of (..., 3) uint8 pixels, as ``od.sum(axis=-1)``.

    One look-up per channel, added in float32 in channel order: bit for bit the sum of
    :func:`optical_density` over its last axis, without the (..., 3) float array.
    """
    import cv2

    od = cv2.LUT(np.ascontiguousarray(rgb[..., :3]), _OD_LUT)
    out = od[..., 0] + od[..., 1]
    out += od[..., 2]
    return out


# --------------------------------------------------------------------------- measure


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
        Numpy, zarr or any array-like supporting ``a[y0:y1, x0:x1]``. Codes 0-4.
    pixel_size_um : float
        Pixel size in µm.
    osteoclast_labels, osteocyte_labels : array_like of int, shape (H, W), optional
        Slide-wide instance labels (restricted to class 3, resp. 4). Without them each
        8-connected component is one object, numbered as :func:`histo.measure.measure` does.
    image : array_like (H, W, 3) uint8 or callable, optional
        The RGB section at the class map's resolution, as an array-like or a function
        ``read(y, x, h, w) -> (h, w, 3) uint8`` (pixels of the class map).
    roi : array_like, optional
        Boolean mask array-like of shape (H, W) or an (N, 2) polygon (row, column) in pixels.
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
    shape = _shape2(class_map)
    dtype = np.dtype(getattr(class_map, "dtype", np.asarray(class_map[:1, :1]).dtype))
    if dtype.kind == "b" or not np.issubdtype(dtype, np.integer):
        raise ClassMapError(f"class map must hold integer codes 0-4, got dtype {dtype}")
    if shape[0] * shape[1] == 0:
        raise ClassMapError("class map is empty (0 pixels)")
    block_px = max(int(block_px), 16)
    if margin_px is None:
        margin_px = int(math.ceil(MARGIN_UM / px))
    tol = max(int(rules.oc_surface_tolerance_px), 0)
    ring_px = max(int(round(rules.lacuna_ring_um / px)), 1)
    pit_margin = _pit_margin(rules, px)
    per_margin = PERIMETER_MARGIN_PX + tol + 2
    margin = max(int(margin_px), per_margin, ring_px + 1, pit_margin)

    on_disk = not isinstance(class_map, np.ndarray)
    closers: list[_ComponentLabels] = []
    try:

        def labels_for(given: Any, code: int, name: str) -> _GivenLabels | _ComponentLabels:
            if given is not None:
                return _GivenLabels(given, shape, name)
            comp = _ComponentLabels(class_map, code, shape, block_px, on_disk)
            closers.append(comp)
            return comp

        oc_src = labels_for(osteoclast_labels, classes.OSTEOCLAST, "osteoclast_labels")
        ot_src = labels_for(osteocyte_labels, classes.OSTEOCYTE, "osteocyte_labels")
        region = None if roi is None else _Region(roi, shape)
        read_rgb = _image_reader(image, shape)
        return _measure(
            class_map,
            shape,
            px,
            rules,
            oc_src,
            ot_src,
            region,
            read_rgb,
            block_px,
            margin,
            per_margin,
            ring_px,
            progress,
        )
    finally:
        for comp in closers:
            comp.close()


def _measure(
    class_map: Any,
    shape: tuple[int, int],
    px: float,
    rules: CountingRules,
    oc_src: Any,
    ot_src: Any,
    region: _Region | None,
    read_rgb: ImageReader | None,
    block_px: int,
    margin: int,
    per_margin: int,
    ring_px: int,
    progress: ProgressFn | None,
) -> Measurement:
    H, W = shape
    px_area_um2 = px * px
    tol = max(int(rules.oc_surface_tolerance_px), 0)
    with_pits = rules.eroded_closing_um > 0
    pit_margin = max(_pit_margin(rules, px), per_margin)

    t_ar_px = b_ar_px = 0
    b_pm_px = pit_px = 0.0
    matrix_od_sum, matrix_n = 0.0, 0
    oc_sums = _Sums(("area", "sy", "sx", "trap", "contact", "contact_roi", "nopit"))
    ot_sums = _Sums(("area", "sy", "sx", "od", "ring_od", "ring_n"))
    oc_bbox: list[tuple[np.ndarray, np.ndarray]] = []  # (labels, (n, 4) y0 x0 y1 x1)
    nuclei_done: dict[int, float] = {}

    blocks = list(iter_blocks(shape, block_px, margin))

    def fetch(b: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The arrays of one block: class map and osteoclasts over the window, lacunae over
        the core and lacuna ring, the ROI over the core and perimeter margin."""
        ys, xs = b.window
        gyy, gxx = b.grown(ring_px)
        sy, sx = b.grown(per_margin)
        reg = None
        if region is not None:
            reg = region.window(
                slice(b.wy0 + sy.start, b.wy0 + sy.stop), slice(b.wx0 + sx.start, b.wx0 + sx.stop)
            )
        return (
            _read(class_map, ys, xs),
            oc_src.window(ys, xs),
            ot_src.window(
                slice(b.wy0 + gyy.start, b.wy0 + gyy.stop),
                slice(b.wx0 + gxx.start, b.wx0 + gxx.stop),
            ),
            reg,
        )

    with _Prefetch(blocks, fetch) as fetched:
        for i, (b, (cm, oc_raw, ot_raw, reg)) in enumerate(fetched):
            ys, xs = b.window
            cy, cx = b.core
            core_cm = cm[cy, cx]
            if core_cm.size and (int(core_cm.min()) < 0 or int(core_cm.max()) >= classes.N_CLASSES):
                lo, hi = int(core_cm.min()), int(core_cm.max())
                raise ClassMapError(
                    f"class map holds codes {lo}..{hi} (block at row {b.y0}, column {b.x0}); "
                    f"expected 0-{classes.N_CLASSES - 1} (0 background, 1 marrow, 2 bone, "
                    "3 osteoclast, 4 osteocyte)"
                )
            bone = (cm == classes.BONE) | (cm == classes.OSTEOCYTE)
            tissue = cm != classes.BACKGROUND
            # the ROI is needed on the core and the perimeter margin only
            sy, sx = b.grown(per_margin)
            sub_shape = (sy.stop - sy.start, sx.stop - sx.start)
            reg_core = None
            if reg is not None:
                reg_core = reg[
                    b.y0 - b.wy0 - sy.start : b.y1 - b.wy0 - sy.start,
                    b.x0 - b.wx0 - sx.start : b.x1 - b.wx0 - sx.start,
                ]

            # ---- areas over the core
            if reg_core is None:
                t_ar_px += int(np.count_nonzero(tissue[cy, cx]))
                b_ar_px += int(np.count_nonzero(bone[cy, cx]))
            else:
                t_ar_px += int(np.count_nonzero(tissue[cy, cx] & reg_core))
                b_ar_px += int(np.count_nonzero(bone[cy, cx] & reg_core))

            # osteoclasts over the window (whole cells for nuclei); lacunae over the core and the
            # ring around it only
            oc_w, oc_rc = _class_labels(cm, classes.OSTEOCLAST, oc_raw)
            gyy, gxx = b.grown(ring_px)
            ot_mask, ot_rc = _class_labels(cm[gyy, gxx], classes.OSTEOCYTE, ot_raw, image=False)
            # the core in ot_mask
            iy = slice(b.y0 - b.wy0 - gyy.start, b.y1 - b.wy0 - gyy.start)
            ix = slice(b.x0 - b.wx0 - gxx.start, b.x1 - b.wx0 - gxx.start)

            # ---- perimeter: segments whose cell lies in the core, from core + small margin
            allc = boundary_cells(bone[sy, sx], rules.perimeter_smoothing_passes)
            gy = np.clip(allc.y + sy.start + b.wy0, 0, H - 1)
            gx = np.clip(allc.x + sx.start + b.wx0, 0, W - 1)
            keep = (gy >= b.y0) & (gy < b.y1) & (gx >= b.x0) & (gx < b.x1)
            cells = BoundaryCells(allc.y[keep], allc.x[keep], allc.length_px[keep], sub_shape)
            length = cells.length_px
            if reg is not None:
                length = length * cells.corners(reg).mean(axis=0)
            b_pm_px += float(length.sum())
            nb = ~cells.corners(bone[sy, sx], fill=False)
            lab_c = _corner_labels(cells, oc_w[sy, sx], tol) * nb
            n_nb = nb.sum(axis=0)
            share = np.zeros(n_nb.shape)
            np.divide(cells.length_px, n_nb, out=share, where=n_nb > 0)
            share_roi = np.zeros(n_nb.shape)
            np.divide(length, n_nb, out=share_roi, where=n_nb > 0)
            pit_c = None
            if with_pits:
                # pits from the core plus pit_margin (a pit wider than that is cut: see notes)
                py, px_ = b.grown(pit_margin)
                pits = _eroded_pits(bone[py, px_], tissue[py, px_], rules, px)
                pits_sub = np.zeros(sub_shape, bool)
                oy, ox = sy.start - py.start, sx.start - px_.start
                pits_sub[:] = pits[oy : oy + sub_shape[0], ox : ox + sub_shape[1]]
                pit_c = cells.corners(pits_sub, fill=False) & nb
                pit_px += float((share_roi * pit_c).sum())
            sel = lab_c > 0
            corner_labels = lab_c[sel]
            k_share = np.broadcast_to(share, lab_c.shape)[sel]
            k_roi = np.broadcast_to(share_roi, lab_c.shape)[sel]
            k_nopit = k_roi if pit_c is None else k_roi * ~pit_c[sel]
            u, s = _per_label(
                corner_labels, {"contact": k_share, "contact_roi": k_roi, "nopit": k_nopit}
            )
            oc_sums.add(u, **s)

            # ---- objects: partial sums over the core
            rgb = od_core = None
            if read_rgb is not None:
                # the image over the core and the osteoclasts counted here (no further)
                targets = _whole_owned(b, oc_rc, cm.shape, (H, W))
                _, ty0, tx0, ty1, tx1 = targets
                ry0 = min(cy.start, int(ty0.min(initial=cy.start)))
                rx0 = min(cx.start, int(tx0.min(initial=cx.start)))
                ry1 = max(cy.stop, int(ty1.max(initial=cy.stop)))
                rx1 = max(cx.stop, int(tx1.max(initial=cx.stop)))
                rgb = read_rgb(b.wy0 + ry0, b.wx0 + rx0, ry1 - ry0, rx1 - rx0)
                if rgb.dtype != np.uint8:
                    # as optical_density reads it (the whole-map measure)
                    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
                # rgb in window coordinates: shift by (ry0, rx0)
                rgb_core = rgb[cy.start - ry0 : cy.stop - ry0, cx.start - rx0 : cx.stop - rx0]
                od_core = _od_sum(rgb_core)
            for (rows, cols, vals), sums, kind in (
                (_in_core(oc_rc, cy, cx), oc_sums, "oc"),
                (_in_core(ot_rc, iy, ix), ot_sums, "ot"),
            ):
                # rows, cols: pixels of the core
                if rows.size == 0:
                    continue
                weights: dict[str, np.ndarray] = {
                    "sy": (rows + b.y0).astype(float),
                    "sx": (cols + b.x0).astype(float),
                }
                if rgb is not None:
                    if kind == "oc":
                        od_r = _OD_LUT[rgb_core[rows, cols, 0]]
                        od_g = _OD_LUT[rgb_core[rows, cols, 1]]
                        weights["trap"] = (od_g - od_r).astype(float)
                    else:
                        weights["od"] = od_core[rows, cols].astype(float)
                u, s = _per_label(vals, weights, count="area")
                sums.add(u, **s)
                if kind == "oc":
                    oc_bbox.append(_boxes(vals, rows + b.y0, cols + b.x0))

            if rgb is not None:
                matrix = cm[cy, cx] == classes.BONE
                od_matrix = od_core[matrix]
                matrix_od_sum += float(od_matrix.astype(np.float64).sum())
                matrix_n += int(od_matrix.size)
                # ring of bone matrix around lacunae (compared with the lacuna: occupancy)
                ring_ids, grown = _grown_labels(ot_rc, ot_mask.shape, ring_px)
                if ring_ids.size:
                    grown = grown[iy, ix]
                    sel_r = matrix & ~ot_mask[iy, ix] & (grown > 0)
                    if sel_r.any():
                        u, s = _per_label(
                            grown[sel_r],
                            {"ring_od": od_core[sel_r].astype(float)},
                            count="ring_n",
                            ids=ring_ids,
                        )
                        ot_sums.add(u, **s)
                nuclei_done.update(_count_targets(targets, oc_w, rgb, (ry0, rx0), px, rules))
            if progress is not None:
                progress((i + 1) / len(blocks), f"measuring block {i + 1}/{len(blocks)}")
            release_free_memory(slack_mb=TRIM_SLACK_MB)

    # ---- combine per-object sums
    oc_ids = _ids(oc_sums)
    oc = oc_sums.reduce(oc_ids)
    keep_oc = oc["area"] > 0
    oc_ids = oc_ids[keep_oc]
    oc = {k: v[keep_oc] for k, v in oc.items()}
    ot_ids = _ids(ot_sums)
    ot = ot_sums.reduce(ot_ids)
    keep_ot = ot["area"] > 0
    ot_ids = ot_ids[keep_ot]
    ot = {k: v[keep_ot] for k, v in ot.items()}
    n_oc_obj = oc_ids.size
    n_ot_obj = ot_ids.size

    oc_area = oc["area"]
    oc_cy = oc["sy"] / np.where(oc_area > 0, oc_area, 1)
    oc_cx = oc["sx"] / np.where(oc_area > 0, oc_area, 1)
    contact_um = oc["contact"] * px

    with_image = read_rgb is not None
    nuclei_resolved = with_image and rules.min_nuclei > 0
    if with_image and n_oc_obj:
        missing = [int(lab) for lab in oc_ids if int(lab) not in nuclei_done]
        if missing:
            nuclei_done.update(
                _nuclei_from_bbox(missing, oc_bbox, class_map, oc_src, read_rgb, px, rules)
            )
        nuclei = np.array([nuclei_done.get(int(lab), 0.0) for lab in oc_ids])
        with np.errstate(invalid="ignore", divide="ignore"):
            trap_signal = np.where(oc_area > 0, oc["trap"] / oc_area, np.nan)
    else:
        nuclei = np.full(n_oc_obj, np.nan)
        trap_signal = np.full(n_oc_obj, np.nan)

    counted, (osteoclast_rows, off_bone_rows, rejected_rows) = count_osteoclasts(
        (oc_ids, oc_area, contact_um, nuclei, oc_cy, oc_cx, trap_signal),
        _centroids_in(region, oc_cy, oc_cx, shape),
        rules,
        px,
        nuclei_resolved,
    )
    oc_s_px = float(oc["contact_roi"][counted].sum())
    # ES: pit-facing corners (pit_px) plus corners of counted osteoclasts that face no pit
    es_px = pit_px + float(oc["nopit"][counted].sum()) if with_pits else oc_s_px

    # ---- osteocytes
    ot_area = ot["area"]
    ot_cy = ot["sy"] / np.where(ot_area > 0, ot_area, 1)
    ot_cx = ot["sx"] / np.where(ot_area > 0, ot_area, 1)
    if with_image:
        matrix_od = matrix_od_sum / matrix_n if matrix_n else 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            lacuna_od = ot["od"] / ot_area
            ring_od = np.where(
                ot["ring_n"] > 0, ot["ring_od"] / np.maximum(ot["ring_n"], 1), np.nan
            )
        ring_od = np.where(np.isnan(ring_od), matrix_od, ring_od)
        occupied = lacuna_od >= rules.lacuna_occupied_ratio * ring_od
    else:
        occupied = np.ones(n_ot_obj, bool)
    ot_keep = _centroids_in(region, ot_cy, ot_cx, shape) & (
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
        with_image=with_image,
        osteoclast_rows=osteoclast_rows,
        off_bone_rows=off_bone_rows,
        rejected_rows=rejected_rows,
        rules=rules,
        nuclei_resolved=nuclei_resolved,
    )


class _Prefetch:
    """``(block, fetch(block))`` for each block, fetching the next block in a thread while the
    caller works on this one (reads overlap computation; two blocks in memory at most).

    A context manager: leaving it (also on an error) waits for the read in flight, so no
    read outlives the arrays. One reading thread: no array is read by two threads at once.
    """

    def __init__(self, blocks: list[Block], fetch: Callable[[Block], Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.blocks = blocks
        self.fetch = fetch
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histo-measure-read")

    def __enter__(self) -> _Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[tuple[Block, Any]]:
        if not self.blocks:
            return
        pending = self.pool.submit(self.fetch, self.blocks[0])
        for k, b in enumerate(self.blocks):
            data = pending.result()
            if k + 1 < len(self.blocks):
                pending = self.pool.submit(self.fetch, self.blocks[k + 1])
            yield b, data


def _pit_margin(rules: CountingRules, px: float) -> int:
    """Margin (px) for the optional eroded-pit rule: twice the closing diameter plus depth."""
    if rules.eroded_closing_um / px < 1:
        return 0
    r = int(round(rules.eroded_closing_um / px))
    return 4 * r + 4 + int(math.ceil(rules.eroded_min_depth_um / px))


def _ids(sums: _Sums) -> np.ndarray:
    if not sums.parts:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate([labels for labels, _ in sums.parts]))


def _centroids_in(
    region: _Region | None, cy: np.ndarray, cx: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    if region is None:
        return np.ones(cy.shape, bool)
    if cy.size == 0:
        return np.zeros(0, bool)
    h, w = shape
    yy = np.clip(np.round(cy).astype(int), 0, h - 1)
    xx = np.clip(np.round(cx).astype(int), 0, w - 1)
    return region.at(yy, xx)


def _count_one(od: np.ndarray, mask: np.ndarray, px: float, rules: CountingRules) -> float:
    return count_nuclei_one(
        od, mask, px, rules.min_nucleus_area_um2, rules.typical_nucleus_area_um2
    )


def _whole_owned(
    b: Block,
    oc_rc: tuple[np.ndarray, np.ndarray, np.ndarray],
    window_shape: tuple[int, int],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The osteoclasts this block owns (first pixel in its core) and sees whole.

    ``oc_rc`` holds the labelled pixels (rows, columns, labels) of the window. Returns
    (labels, y0, x0, y1, x1): each one's bounding box in window coordinates.
    """
    rows, cols, vals = oc_rc
    empty = np.zeros(0, np.int64)
    if rows.size == 0:
        return empty, empty, empty, empty, empty
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
    return ids[whole], y0[whole], x0[whole], y1[whole], x1[whole]


def _count_targets(
    targets: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    oc_w: np.ndarray,
    rgb: np.ndarray,
    origin: tuple[int, int],
    px: float,
    rules: CountingRules,
) -> dict[int, float]:
    """Nuclei of the osteoclasts of :func:`_whole_owned` (``rgb`` starts at ``origin`` of the
    window)."""
    out: dict[int, float] = {}
    oy, ox = origin
    for lab, y0, x0, y1, x1 in zip(*(t.tolist() for t in targets), strict=True):
        mask = oc_w[y0:y1, x0:x1] == lab
        od = _OD_LUT[rgb[y0 - oy : y1 - oy, x0 - ox : x1 - ox]]
        out[int(lab)] = _count_one(od, mask, px, rules)
    return out


def _nuclei_from_bbox(
    labels: list[int],
    boxes: list[tuple[np.ndarray, np.ndarray]],
    class_map: Any,
    oc_src: Any,
    read_rgb: ImageReader,
    px: float,
    rules: CountingRules,
) -> dict[int, float]:
    """Nuclei of osteoclasts larger than the margin, from a crop of their bounding box."""
    all_ids = np.concatenate([ids for ids, _ in boxes])
    all_box = np.concatenate([box for _, box in boxes])
    out: dict[int, float] = {}
    for lab in labels:
        mine = all_box[all_ids == lab]
        y0, x0 = int(mine[:, 0].min()), int(mine[:, 1].min())
        y1, x1 = int(mine[:, 2].max()), int(mine[:, 3].max())
        ys, xs = slice(y0, y1), slice(x0, x1)
        cm = _read(class_map, ys, xs)
        mask = (oc_src.window(ys, xs) == lab) & (cm == classes.OSTEOCLAST)
        rgb = read_rgb(y0, x0, y1 - y0, x1 - x0)
        out[lab] = _count_one(optical_density(rgb), mask, px, rules)
    return out
