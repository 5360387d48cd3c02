"""Instance labels of osteoclasts and osteocytes for a block-wise measurement.

Given instance maps are read as they are (restricted to their class); without them each
8-connected component of the class is one object, numbered as ``scipy.ndimage.label`` numbers
them on the whole map: components are labelled per block, merged across block seams
(union-find on the seam rows and columns) and numbered in raster order of their first pixel.
The provisional labels are kept in a temporary zarr array on disk (a numpy array when the
class map is numpy).
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from histo.errors import ClassMapError
from histo.io.blocks import iter_blocks, read_2d, shape_2d
from histo.measure.objects import EIGHT, nonzero_2d

__all__ = ["ComponentLabels", "GivenLabels", "class_labels", "grown_labels", "in_core"]


class GivenLabels:
    """Instance labels given by the caller, restricted to one class (negative -> 0)."""

    def __init__(self, array: Any, shape: tuple[int, int], name: str) -> None:
        if shape_2d(array) != shape:
            raise ClassMapError(f"{name} has shape {shape_2d(array)}, the class map {shape}")
        dtype = np.dtype(getattr(array, "dtype", np.int64))
        if not np.issubdtype(dtype, np.integer):
            raise ClassMapError(f"{name} must be an integer label image, got dtype {dtype}")
        self.array = array

    def window(self, ys: slice, xs: slice) -> np.ndarray:
        # the array's own integer dtype: callers clip negative labels to 0
        return read_2d(self.array, ys, xs)


class ComponentLabels:
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
            cm = read_2d(class_map, slice(b.y0, b.y1), slice(b.x0, b.x1))
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


def class_labels(
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


def in_core(
    rcv: tuple[np.ndarray, np.ndarray, np.ndarray], ys: slice, xs: slice
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels (rows, columns, labels) inside rows ``ys`` and columns ``xs``, shifted to
    them (raster order kept)."""
    rows, cols, vals = rcv
    sel = (rows >= ys.start) & (rows < ys.stop) & (cols >= xs.start) & (cols < xs.stop)
    return rows[sel] - ys.start, cols[sel] - xs.start, vals[sel]


def grown_labels(
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
