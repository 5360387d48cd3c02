"""Tiled inference over slides of any size: overlap, tapered blending, seam-free instances.

The slide (at the model's working resolution) is cut into tiles of ``tile_px`` with
``overlap_px`` shared between neighbours. Each tile's scores (class probabilities and the
osteoclast centre map) are multiplied by a separable cosine taper that falls towards the tile's
edges and summed into a band buffer one row of tiles high; a pixel's final score is the
weighted mean of every tile that saw it, so there is no seam where tiles meet.

Rows of pixels become final as soon as the next row of tiles has been added. Objects
(osteoclasts, osteocyte lacunae) are labelled on these final rows with a margin of
``MARGIN_UM`` µm of context above and below: every object belongs to the band that holds its
top row, so it is labelled exactly once, whole, with a slide-wide label, whatever the tile size.

Slides wider than ``STRIP_COLS`` are segmented in column strips (:func:`strip_layout`), one
after the other, each top to bottom on the slide's own tile grid with a few tiles of context
either side: the class map is the one a whole-width run gives, an object belongs to the strip
that holds its leftmost column, and a strip hands the next one the labels and removed specks
of its objects that reach into the next one's columns. Memory therefore depends neither on
the slide's height nor on its width. Within a strip, per column it is small (~6 kB at
the default tiling): the accumulator is one tile wide (a window that slides along the row of
tiles) plus the blended sums of the ``overlap_px`` rows shared with the next row of tiles at
full width (float32, ``n_outputs`` of them; their weights are recomputed, not kept); the final
rows waiting to be labelled or written (two margins, a stride and a tile high, plus up to a
sink chunk's height of rows waiting for whole rows of chunks) are kept as one byte per
pixel (the class and, in the upper bits, the best class among 0-2 that a removed speck
becomes); the centre map, read only at osteoclast pixels, is kept as sparse pieces of those
pixels' values; labels of objects not yet written out are kept as sparse pieces; objects are
labelled in column blocks, on their bounding boxes (:func:`histo.segment.instances.label_band`).
Results are written into the sink (numpy or zarr arrays) band by band.

Tiles are read and decoded ``READ_AHEAD_TILES`` ahead in one background thread and scored by
the network ``LOOKAHEAD_TILES`` ahead in another, so that the network keeps the cores busy while
the main thread blends and labels (a constant ~120 MB in flight). Bands are written to the sink
on whole rows of its chunks (see :func:`_write_block`), and the heap's freed pages are returned
between rows of tiles once they add up to ``TRIM_SLACK_MB``
(:func:`histo.runtime.release_free_memory`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from histo.classes import OSTEOCLAST
from histo.errors import Cancelled
from histo.runtime import release_free_memory
from histo.segment.instances import ALT_SHIFT, bone_contact_px, label_band

#: context kept above and below a band when labelling objects (µm); larger than any cell
MARGIN_UM = 256.0
#: resident memory the freed temporaries of rows of tiles may add before the heap is trimmed
#: (MB; trimming after every row makes the next row fault its pages in again)
TRIM_SLACK_MB = 128
#: columns blended at a time (bounds the float temporaries of a row of tiles)
BLEND_COLS = 2048
#: columns written to the sink at a time (rounded up to the sink's column alignment)
FLUSH_COLS = 2048
_CLASS_BITS = np.uint8((1 << ALT_SHIFT) - 1)


@dataclass
class SegmentationResult:
    """Class map and instance labels of a slide at the model's working resolution.

    Attributes
    ----------
    class_map
        (H, W) uint8 codes of :mod:`histo.classes` (numpy or zarr array).
    osteoclast_labels, osteocyte_labels
        (H, W) int32 slide-wide instance labels 1..n (0 = none).
    pixel_size_um
        µm per pixel of these arrays (the model's working resolution).
    n_osteoclasts, n_osteocytes
        Number of labelled objects.
    """

    class_map: Any
    osteoclast_labels: Any
    osteocyte_labels: Any
    pixel_size_um: float
    n_osteoclasts: int
    n_osteocytes: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.class_map.shape)  # type: ignore[return-value]


def taper(n: int, overlap: int, at_start: bool = True, at_end: bool = True) -> np.ndarray:
    """1-D blending weights of a tile of ``n`` px: a raised-cosine ramp over ``overlap`` px.

    Ramps are applied only on sides that have a neighbour (``at_start``/``at_end``); weights
    stay > 0 so a pixel seen by one tile keeps its value.
    """
    w = np.ones(n, np.float32)
    r = min(overlap, n // 2)
    if r > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(r, dtype=np.float32) + 0.5) / r)
        ramp = np.maximum(ramp, 1e-3)
        if at_start:
            w[:r] = ramp
        if at_end:
            w[n - r :] = np.minimum(w[n - r :], ramp[::-1])
    return w


def _reader(
    source: Any, shape: tuple[int, int] | None, model: Any
) -> tuple[Callable, tuple[int, int]]:
    """A ``read(y, x, h, w) -> (h, w, 3) uint8`` function and the slide shape (working px)."""
    if callable(source) and not hasattr(source, "shape"):
        if shape is None:
            raise ValueError("segment_slide: a tile-reading function needs shape=(H, W)")
        return source, (int(shape[0]), int(shape[1]))
    if hasattr(source, "levels") and hasattr(source, "pixel_size_um"):
        # a histo.io Slide: read at the working resolution from the nearest pyramid level
        from histo.io import read_region

        px = float(model.working_pixel_size_um)
        base = source.levels[0]
        base_px = float(source.pixel_size_um)
        h = int(round(base.shape[0] * base_px / px))
        w = int(round(base.shape[1] * base_px / px))

        def read_slide(y: int, x: int, hh: int, ww: int) -> np.ndarray:
            return np.asarray(read_region(source, y * px, x * px, hh, ww, px))

        return read_slide, (h, w)
    arr = source
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"segment_slide: expected an (H, W, 3) RGB array, got shape {arr.shape}")

    def read_array(y: int, x: int, hh: int, ww: int) -> np.ndarray:
        return np.asarray(arr[y : y + hh, x : x + ww, :3])

    return read_array, (int(arr.shape[0]), int(arr.shape[1]))


def _shift_up(a: np.ndarray, k: int, n: int) -> None:
    """Move rows ``[k, k + n)`` of ``a`` to ``[0, n)`` in place, without a temporary copy."""
    step = max(1, min(k, 64))
    for j in range(0, n, step):
        e = min(n, j + step)
        a[j:e] = a[k + j : k + e]


def _paint(pieces: list, r0: int, r1: int, c0: int, c1: int, dtype: Any = np.int32) -> np.ndarray:
    """Rows [r0, r1) and columns [c0, c1) of a label image (or any image, 0 elsewhere) from
    sparse pieces ``(row, col, w, flat_index, values)`` (slide rows and columns)."""
    out = np.zeros((r1 - r0, c1 - c0), dtype)
    for y0, x0, w, idx, vals in pieces:
        if y0 >= r1 or x0 >= c1 or x0 + w <= c0 or y0 + int(idx[-1]) // w < r0:
            continue
        rows, cols = np.divmod(idx, w)
        rows += y0 - r0
        cols += x0 - c0
        sel = (rows >= 0) & (rows < r1 - r0) & (cols >= 0) & (cols < c1 - c0)
        out[rows[sel], cols[sel]] = vals[sel]
    return out


def _prune(pieces: list, r1: int) -> None:
    """Remove the pieces that end above row ``r1``."""
    pieces[:] = [p for p in pieces if p[0] + int(p[3][-1]) // p[2] >= r1]


def _trim(pieces: list, r1: int) -> None:
    """Remove the rows above ``r1`` from sparse pieces (and the pieces left empty)."""
    out = []
    for y0, x0, w, idx, vals in pieces:
        if y0 >= r1:
            out.append((y0, x0, w, idx, vals))
            continue
        k = int(np.searchsorted(idx, (r1 - y0) * w))
        if k < idx.size:
            out.append((r1, x0, w, idx[k:] - np.int32((r1 - y0) * w), vals[k:].copy()))
    pieces[:] = out


def _as_sink_dtype(out: Any, labels: np.ndarray) -> np.ndarray:
    """``labels`` (int32, >= 0) as the sink's unsigned 32-bit type if it has one (a view: the
    sink need not check and convert the values)."""
    dtype = getattr(out, "dtype", None)
    if dtype is not None and np.dtype(dtype) == np.uint32:
        return labels.view(np.uint32)
    return labels


#: tiles whose scores are computed ahead (in a background thread) while the main thread blends
#: and labels: the network keeps both cores busy during the single-threaded labelling. Memory:
#: this many tiles of scores (n_outputs x tile² float32, 14 MB each at 768 px; none for a tile
#: of glass). 0: no thread.
LOOKAHEAD_TILES = 8
#: tiles read and decoded ahead of the network (in a thread of their own), 1.7 MB each
READ_AHEAD_TILES = 4


class _Lookahead:
    """``compute(*args)`` for each of ``jobs`` in order, up to ``depth`` jobs ahead of the
    consumer in one background thread (``depth`` 0: computed on demand in the caller)."""

    def __init__(
        self, compute: Callable[..., Any], jobs: list, depth: int, name: str = "histo-tiles"
    ) -> None:
        from collections import deque

        self.compute = compute
        self.jobs = iter(jobs)
        self.depth = int(depth)
        self.pending: deque = deque()
        self.pool = None
        if self.depth > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            for _ in range(self.depth):
                self._submit()

    def _submit(self) -> None:
        job = next(self.jobs, None)
        if job is not None:
            self.pending.append(self.pool.submit(self.compute, *job))

    def next(self) -> Any:
        if self.pool is None:
            return self.compute(*next(self.jobs))
        fut = self.pending.popleft()
        self._submit()
        return fut.result()

    def close(self) -> None:
        """Drop the jobs not started and wait for the running one (after an error or cancel)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


#: a sink whose chunks are larger than this (rows, columns) is written in bands of any height
#: or pieces of FLUSH_COLS (holding rows for a chunk's height costs more than rewriting chunks)
MAX_WRITE_BLOCK = (2048, 8192)


def _write_block(*arrays: Any) -> tuple[int, int]:
    """(rows, columns) on whose multiples writes into ``arrays`` should start to fill whole
    chunks: a sink's ``block_px`` (:class:`histo.block_outputs.LabelsSink`) or a zarr array's
    ``chunks``; (1, 1) for numpy arrays."""
    rows = cols = 1
    for a in arrays:
        block = getattr(a, "block_px", None) or getattr(a, "chunks", None)
        if block is None or len(block) != 2 or not all(isinstance(b, int) for b in block):
            continue  # numpy (no chunks) or dask (chunks per block)
        rows, cols = math.lcm(rows, int(block[0])), math.lcm(cols, int(block[1]))
    max_rows, max_cols = MAX_WRITE_BLOCK
    return (rows if rows <= max_rows else 1), (cols if cols <= max_cols else 1)


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    return list(range(0, n - tile + stride, stride))


#: widest column strip segmented at a time (working px): a wider slide is cut into strips of
#: about equal width (owned columns), each segmented top to bottom with a context of
#: columns on either side, so that memory does not grow with the slide's width. Each border
#: between strips costs about 1.5 tiles of context per row of tiles (computed by both strips).
#: (8192 made 32768² 12-22 % slower for 17-97 MiB less peak, 2 runs; models/README.md, Memory)
STRIP_COLS = 12288
#: strips' owned columns start on multiples of this when the sink has no chunks (numpy)
STRIP_ALIGN = 1024


@dataclass(frozen=True)
class Strip:
    """A column strip of a slide: the columns it segments and the columns it owns.

    Attributes
    ----------
    x0, x1
        Columns ``[x0, x1)`` segmented (the owned ones and their context), slide px.
    own0, own1
        Columns ``[own0, own1)`` owned: written by this strip, with the objects whose leftmost
        column lies there.
    xs
        Tile starts (slide columns), a run of the whole slide's tile grid.
    """

    x0: int
    x1: int
    own0: int
    own1: int
    xs: tuple[int, ...]


def strip_layout(
    width: int,
    tile_px: int,
    overlap_px: int,
    margin_px: int,
    strip_cols: int = STRIP_COLS,
    align: int = STRIP_ALIGN,
    contact_px: int = 3,
) -> list[Strip]:
    """Column strips of a slide ``width`` px wide, each owning at most about ``strip_cols``.

    The owned columns start on multiples of ``align`` (the sink's chunk columns, so that no
    chunk is written by two strips). A strip segments the tiles of the slide's own tile grid
    (:func:`_starts`) from the last one that starts at least ``overlap_px + contact_px`` left
    of its owned columns to the first whose scores reach ``margin_px + contact_px`` past
    them: a pixel's blended scores are the same as in a whole-width run wherever every
    tile that covers it is in the strip with its tapers (all but the ``overlap_px`` columns at
    either side), so the class map is identical over the owned columns, the objects they own
    (which reach at most ``margin_px`` to the right) and the bone the contact rule looks at.
    One strip (the whole width, no context) when ``width <= strip_cols``.
    """
    stride = tile_px - overlap_px
    xs = _starts(width, tile_px, stride)
    n = max(1, math.ceil(width / max(1, int(strip_cols))))
    # the first and last overlap_px columns of a strip differ from a whole-width run
    left_ctx = overlap_px + contact_px + 2
    right_ctx = margin_px + contact_px + 2
    align = max(1, int(align))
    bounds = [0]
    for k in range(1, n):
        b = int(round(k * width / n / align)) * align
        # every strip wider than the context its neighbours reach into it
        if min(b - bounds[-1], width - b) >= left_ctx + right_ctx:
            bounds.append(b)
    bounds.append(width)
    strips = []
    for own0, own1 in zip(bounds[:-1], bounds[1:], strict=True):
        # (the first strip starts at the slide's edge: no tile starts left of it)
        i0 = max((i for i, x in enumerate(xs) if x <= own0 - left_ctx), default=0)
        if own1 == width:
            i1 = len(xs) - 1
        else:
            cands = [i for i, x in enumerate(xs) if x + stride >= own1 + right_ctx]
            i1 = cands[0] if cands else len(xs) - 1
        x1 = min(width, xs[i1] + tile_px)
        strips.append(Strip(xs[i0], x1, own0, own1, tuple(xs[i0 : i1 + 1])))
    return strips


def _shift_cols(piece: tuple, dx: int) -> tuple:
    """A sparse piece ``(row, col, w, flat_index, values)`` moved ``dx`` columns."""
    y0, x0, w, idx, vals = piece
    return (y0, x0 + int(dx), w, idx, vals)


def _crop_cols(piece: tuple, c0: int) -> tuple | None:
    """The part of a sparse piece at columns >= ``c0`` (None if there is none)."""
    y0, x0, w, idx, vals = piece
    if x0 + w <= c0:
        return None
    if x0 >= c0:
        return piece
    rows, cols = np.divmod(idx, w)
    sel = cols >= c0 - x0
    if not sel.any():
        return None
    nw = x0 + w - c0
    nidx = (rows[sel] * nw + (cols[sel] - (c0 - x0))).astype(np.int32)
    return (y0, c0, nw, nidx, vals[sel].copy())


def segment_slide(
    source: Any,
    model: Any = "default",
    tile_px: int = 768,
    overlap_px: int = 64,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    sink: Mapping[str, Any] | None = None,
    *,
    shape: tuple[int, int] | None = None,
    tissue: Any = None,
    strip_cols: int | None = None,
) -> SegmentationResult:
    """Segment a whole slide tile by tile at the model's working resolution.

    Parameters
    ----------
    source
        One of: an (H, W, 3) uint8 RGB array-like (numpy, zarr, dask) already at the working
        resolution; a function ``read(y, x, h, w) -> (h, w, 3) uint8`` (then give ``shape``);
        or a :class:`histo.io` slide (read at the working resolution with ``read_region``).
    model
        A segmenter (:func:`histo.segment.load_model`) or a model name/path.
    tile_px
        Tile side in px at the working resolution (memory grows with ``tile_px * strip_cols``).
    overlap_px
        Pixels shared by neighbouring tiles, blended with a cosine taper (>= 32 recommended).
    progress
        ``progress(fraction, message)`` after every tile.
    cancel
        ``cancel()`` returning True stops the run with :class:`histo.errors.Cancelled`.
    sink
        Optional mapping with array-likes ``"class_map"`` (uint8), ``"osteoclasts"`` and
        ``"osteocytes"`` (int32), each (H, W) (e.g. a zarr group), written band by band.
        Missing entries are allocated as numpy arrays.
    shape
        (H, W) of the slide at the working resolution when ``source`` is a function.
    tissue
        Optional low-resolution tissue mask (an object with ``mask`` (bool array) and
        ``pixel_size_um``, as :func:`histo.io.detect_tissue` returns). Tiles with no tissue
        within ``overlap_px`` are not read nor run through the model: they are background.
    strip_cols
        Widest column strip segmented at a time (px, default :data:`STRIP_COLS`): a wider
        slide is cut into strips of about equal width, so memory does not grow with the
        slide's width (see :func:`strip_layout`). The result is the same, but for the
        numbering of the objects (strip by strip).

    Returns
    -------
    SegmentationResult
    """
    if isinstance(model, str):
        from histo.segment import load_model

        model = load_model(model)
    read, (H, W) = _reader(source, shape, model)
    px = float(model.working_pixel_size_um)
    tile_px = int(tile_px)
    overlap_px = int(max(0, min(overlap_px, tile_px // 2)))
    stride = tile_px - overlap_px
    if stride <= 0:
        raise ValueError("segment_slide: overlap_px must be smaller than tile_px")
    sink = dict(sink or {})
    out_cm = sink.get("class_map")
    out_oc = sink.get("osteoclasts")
    out_ot = sink.get("osteocytes")
    if out_cm is None:
        out_cm = np.zeros((H, W), np.uint8)
    if out_oc is None:
        out_oc = np.zeros((H, W), np.int32)
    if out_ot is None:
        out_ot = np.zeros((H, W), np.int32)

    ys = _starts(H, tile_px, stride)
    margin = int(math.ceil(MARGIN_UM / px))
    n_out = int(getattr(model, "n_outputs", 6))
    n_cls = n_out - 1

    def has_tissue(y: int, x: int, th: int, tw: int) -> bool:
        if tissue is None:
            return True
        f = px / float(tissue.pixel_size_um)  # working px -> mask px
        m = np.asarray(tissue.mask)
        y0, x0 = max(0, int((y - overlap_px) * f) - 1), max(0, int((x - overlap_px) * f) - 1)
        y1, x1 = (
            int(math.ceil((y + th + overlap_px) * f)) + 1,
            int(math.ceil((x + tw + overlap_px) * f)) + 1,
        )
        return bool(m[y0:y1, x0:x1].any())

    # rows are written out in bands that start on multiples of row_align and pieces of
    # flush_cols columns on multiples of col_align: the sink's chunks are then written whole,
    # once (a zarr chunk written in two parts is decoded and compressed twice)
    row_align, col_align = _write_block(out_cm, out_oc, out_ot)
    flush_cols = -(-FLUSH_COLS // col_align) * col_align
    strips = strip_layout(
        W,
        tile_px,
        overlap_px,
        margin,
        STRIP_COLS if strip_cols is None else int(strip_cols),
        col_align if col_align > 1 else STRIP_ALIGN,
        contact_px=bone_contact_px(px),
    )
    n_tiles = len(ys) * sum(len(st.xs) for st in strips)
    n_oc = n_ot = 0
    done = 0

    def run_strip(st: Strip, imports: dict, exports: dict | None) -> None:
        """Segment the columns of strip ``st``; label the objects it owns and write its owned
        columns. ``imports``: what the strip on the left found in this one's owned columns
        (labels of its objects, class-map pixels of its removed specks, slide coordinates);
        ``exports`` receives the same for the strip on the right."""
        nonlocal n_oc, n_ot, done
        X0, Wk = st.x0, st.x1 - st.x0
        xs = [x - X0 for x in st.xs]
        own0, own1 = st.own0 - X0, st.own1 - X0  # owned columns of the strip
        own_cols = None if (own0, own1) == (0, Wk) else (own0, own1)

        # blending accumulator of one row of tiles, rows [acc_y0, acc_y0 + R): a window of one
        # tile's columns [win_x0, win_x0 + tile_px) slides along the row; a column leaves it
        # (is blended) once no later tile of the row covers it. The rows shared with the next
        # row of tiles (R - stride, the overlap) are carried over at the strip's width. Every
        # pixel sums the same terms in the same order as a full-width accumulator would, so the
        # result is identical.
        R = min(tile_px, H)
        win = np.zeros((n_out, R, min(tile_px, Wk)), np.float32)
        win_w = np.zeros((R, min(tile_px, Wk)), np.float32)
        n_carry = max(0, R - stride) if len(ys) > 1 else 0
        carry = np.zeros((n_out, n_carry, Wk), np.float32)
        # (their blending weights are not carried: they depend only on the tiling, and are
        # summed again in the same order, see carried_weight)
        acc_y0 = 0
        # final rows not yet written: rows [buf_y0, buf_y0 + buf_n), in a buffer allocated
        # once (kept between rows of tiles: at most a stride and a margin below the labelled
        # rows, a margin or the rows awaiting a whole band of row_align above them; plus one
        # row of tiles). One byte per pixel: the class in the low bits, the best class among
        # 0-2 (what a removed speck becomes) from bit ALT_SHIFT (see label_band). The centre
        # map is read only at class-3 pixels: it is kept as sparse pieces (slide rows) of
        # those pixels' values.
        cap = min(H, stride + margin + max(margin, row_align - 1) + tile_px)
        buf_cm = np.zeros((cap, Wk), np.uint8)
        centre_pieces: list = []
        # labels of objects not yet written out, as sparse pieces (see label_band) in slide
        # rows and strip columns; the left strip's objects that reach into this one first
        pend_oc: list = [_shift_cols(p, -X0) for p in imports.get("oc", ())]
        pend_ot: list = [_shift_cols(p, -X0) for p in imports.get("ot", ())]
        specks_in: dict = imports.get("specks", {})
        buf_y0 = 0
        buf_n = 0
        owned_to = 0  # rows [0, owned_to) have had their objects labelled
        flushed_to = 0  # rows [0, flushed_to) have been written to the sink

        def label_and_flush(final_to: int, at_end: bool) -> None:
            """Label objects of bands whose margin is available, then flush finished rows."""
            nonlocal buf_y0, buf_n, owned_to, flushed_to, n_oc, n_ot
            while owned_to < final_to and (at_end or final_to - owned_to >= stride + margin):
                own_stop = final_to if at_end else owned_to + stride
                w0 = max(buf_y0, owned_to - margin)
                w1 = min(final_to, own_stop + margin)
                a, b = w0 - buf_y0, w1 - buf_y0
                cm = buf_cm[a:b]
                new_oc: list = []
                new_ot: list = []

                def centre(x0: int, x1: int, w0: int = w0, w1: int = w1) -> np.ndarray:
                    return _paint(centre_pieces, w0, w1, x0, x1, np.float32)

                right = cm[:, own1:].copy() if exports is not None else None
                _, _, _, k_oc, k_ot = label_band(
                    cm,
                    centre,
                    None,
                    owned_to - w0,
                    own_stop - w0,
                    px,
                    into=(new_oc, new_ot),
                    offsets=(n_oc, n_ot),
                    own_cols=own_cols,
                )
                new_oc = [(y0 + w0, *rest) for y0, *rest in new_oc]
                new_ot = [(y0 + w0, *rest) for y0, *rest in new_ot]
                pend_oc.extend(new_oc)
                pend_ot.extend(new_ot)
                if exports is not None:
                    # what this band's objects left in the next strip's columns
                    for key, pieces in (("oc", new_oc), ("ot", new_ot)):
                        for p in pieces:
                            p = _crop_cols(p, own1)
                            if p is not None:
                                exports[key].append(_shift_cols(p, X0))
                    rows, cols = np.nonzero(cm[:, own1:] != right)
                    if rows.size:
                        vals = cm[rows, cols + own1]
                        exports["specks"][own_stop] = (rows + w0, cols + own1 + X0, vals)
                    del right
                if own_stop in specks_in:
                    # the left strip's specks of this band, removed at the same step as there
                    rows, cols, vals = specks_in.pop(own_stop)
                    buf_cm[rows - buf_y0, cols - X0] = vals
                n_oc += k_oc
                n_ot += k_ot
                owned_to = own_stop
                # rows above owned_to are now final in every output: write them out, in bands
                # that end on a multiple of row_align (but for the last)
                flush_to = final_to if at_end else owned_to // row_align * row_align
                if flush_to > flushed_to:
                    a, b = flushed_to - buf_y0, flush_to - buf_y0
                    # tile-shaped writes of FLUSH_COLS columns (memory does not grow with width)
                    for c0 in range(own0, own1, flush_cols):
                        c1 = min(own1, c0 + flush_cols)
                        rows_out = slice(flushed_to, flush_to)
                        cols_out = slice(X0 + c0, X0 + c1)
                        out_cm[rows_out, cols_out] = buf_cm[a:b, c0:c1] & _CLASS_BITS
                        for out, pend in ((out_oc, pend_oc), (out_ot, pend_ot)):
                            labels = _paint(pend, flushed_to, flush_to, c0, c1)
                            out[rows_out, cols_out] = _as_sink_dtype(out, labels)
                            del labels
                    _prune(pend_oc, flush_to)
                    _prune(pend_ot, flush_to)
                    flushed_to = flush_to
                keep_from = max(0, min(owned_to - margin, flushed_to) - buf_y0)
                # keep the margin rows (context for the next band) and the rows not written out
                # yet, drop the rest
                if keep_from > 0:
                    n_keep = buf_n - keep_from
                    _shift_up(buf_cm, keep_from, n_keep)
                    buf_cm[n_keep:buf_n] = 0
                    buf_n = n_keep
                    buf_y0 += keep_from
                    _trim(centre_pieces, buf_y0)

        def carried_weight(wy_prev: np.ndarray, c0: int, c1: int) -> np.ndarray:
            """Blending weights of the carried rows at columns [c0, c1): the sums the previous
            row of tiles made (``wy_prev``: its row taper), redone in the same order."""
            out = np.zeros((n_carry, c1 - c0), np.float32)
            rows = wy_prev[wy_prev.size - n_carry :]
            for ix, x in enumerate(xs):
                tw = min(tile_px, Wk - x)
                lo, hi = max(c0, x), min(c1, x + tw)
                if lo < hi:
                    wx = taper(tw, overlap_px, at_start=ix > 0, at_end=ix < len(xs) - 1)
                    out[:, lo - c0 : hi - c0] += rows[:, None] * wx[None, lo - x : hi - x]
            return out

        def finish(c0: int, c1: int, win_x0: int, n_final: int, rows_out: int, r0: int) -> None:
            """Blend window columns [c0, c1) (strip columns; final for this row of tiles) into
            buffer rows [r0, r0 + n_final) and carry their lower ``rows_out`` rows over."""
            r1 = r0 + n_final
            for d0 in range(c0, c1, BLEND_COLS):
                d1 = min(c1, d0 + BLEND_COLS)
                a, b = d0 - win_x0, d1 - win_x0
                wsum = np.maximum(win_w[:n_final, a:b], 1e-6)
                # argmax over the blended classes (the first of equal maxima, as np.argmax),
                # one class at a time: the best of classes 0-2 first (alt), then of all
                best = np.divide(win[0, :n_final, a:b], wsum)
                score = np.empty_like(best)
                gt = np.empty(best.shape, bool)
                cm = buf_cm[r0:r1, d0:d1]
                cm[...] = 0
                alt = None
                for k in range(1, n_cls):
                    if k == min(3, n_cls):
                        alt = cm << np.uint8(ALT_SHIFT)
                    np.divide(win[k, :n_final, a:b], wsum, out=score)
                    np.greater(score, best, out=gt)
                    np.copyto(cm, np.uint8(k), where=gt)
                    np.maximum(best, score, out=best)
                if alt is None:
                    alt = cm << np.uint8(ALT_SHIFT)
                # the centre map at the class-3 pixels only (the only ones label_band reads)
                ce = np.divide(win[n_cls, :n_final, a:b], wsum, out=score)
                np.equal(cm, np.uint8(OSTEOCLAST), out=gt)
                idx = np.flatnonzero(gt)
                if idx.size:
                    centre_pieces.append(
                        (acc_y0, d0, d1 - d0, idx.astype(np.int32), ce.ravel()[idx])
                    )
                cm |= alt
                del best, score, gt, wsum, alt, idx
                if rows_out:
                    carry[:, :rows_out, d0:d1] = win[:, n_final : n_final + rows_out, a:b]

        wy_prev = np.zeros(0, np.float32)  # row taper of the previous row of tiles
        for iy, y in enumerate(ys):
            th = min(tile_px, H - y)
            wy = taper(th, overlap_px, at_start=iy > 0, at_end=iy < len(ys) - 1)
            last = iy == len(ys) - 1
            n_final = (H - acc_y0) if last else (ys[iy + 1] - acc_y0)
            rows_in = n_carry if iy > 0 else 0  # rows carried into this row of tiles
            rows_out = n_carry if not last else 0  # rows carried to the next one
            r0, r1 = buf_n, buf_n + n_final  # buffer rows of this row's final pixels
            win_x0 = win_x1 = 0  # window columns holding data: [win_x0, win_x1)

            for ix, x in enumerate(xs):
                if cancel is not None and cancel():
                    raise Cancelled("segmentation cancelled")
                tw = min(tile_px, Wk - x)
                # columns left of x are final; slide the window to start at x
                if x > win_x0:
                    finish(win_x0, min(x, win_x1), win_x0, n_final, rows_out, r0)
                    keep = max(0, win_x1 - x)
                    if keep:
                        win[:, :, :keep] = win[:, :, x - win_x0 : win_x1 - win_x0].copy()
                        win_w[:, :keep] = win_w[:, x - win_x0 : win_x1 - win_x0].copy()
                    win_x0, win_x1 = x, max(x, win_x1)
                if x + tw > win_x1:
                    # columns entering the window start from the rows carried over
                    a, b = win_x1 - win_x0, x + tw - win_x0
                    win[:, :, a:b] = 0
                    win_w[:, a:b] = 0
                    if rows_in:
                        win[:, :rows_in, a:b] = carry[:, :rows_in, win_x1 : x + tw]
                        win_w[:rows_in, a:b] = carried_weight(wy_prev, win_x1, x + tw)
                    win_x1 = x + tw
                scores = ahead.next()
                wx = taper(tw, overlap_px, at_start=ix > 0, at_end=ix < len(xs) - 1)
                wt = wy[:, None] * wx[None, :]
                a = x - win_x0
                if scores is None:  # glass: score 1 for background, 0 for the rest
                    win[0, :th, a : a + tw] += wt
                else:
                    win[:, :th, a : a + tw] += scores * wt
                win_w[:th, a : a + tw] += wt
                done += 1
                if progress is not None:
                    progress(done / n_tiles, f"segmenting tile {done}/{n_tiles}")
            finish(win_x0, win_x1, win_x0, n_final, rows_out, r0)
            wy_prev = wy
            buf_n = r1
            acc_y0 += n_final
            label_and_flush(acc_y0, at_end=last)
            # this row's temporaries, freed in the middle of the heap, once they add up
            release_free_memory(slack_mb=TRIM_SLACK_MB)

    def read_tile(y: int, x: int, th: int, tw: int) -> np.ndarray | None:
        return read(y, x, th, tw) if has_tissue(y, x, th, tw) else None

    def tile_scores(y: int, x: int, th: int, tw: int) -> np.ndarray | None:
        rgb = reads.next()
        if rgb is None:
            # glass: no scores kept (a queue of glass tiles, filled at once, would hold
            # LOOKAHEAD_TILES x 14 MB of zeros); blended as background
            return None
        return model.predict_scores(rgb)  # (n_out, th, tw)

    # every strip's tiles, strip after strip, row after row (slide columns)
    jobs = [
        (y, x, min(tile_px, H - y), min(tile_px, W - x)) for st in strips for y in ys for x in st.xs
    ]
    # tiles are read (and decoded) in one thread, scored in another, blended here: the three
    # stages overlap, and reading and decoding release the GIL while the network runs
    reads = _Lookahead(read_tile, jobs, READ_AHEAD_TILES, "histo-read")
    ahead = _Lookahead(tile_scores, jobs, LOOKAHEAD_TILES)
    try:
        imports: dict = {}
        for k, st in enumerate(strips):
            exports = {"oc": [], "ot": [], "specks": {}} if k + 1 < len(strips) else None
            run_strip(st, imports, exports)
            imports = exports or {}
            release_free_memory()  # the strip's buffers
    finally:
        ahead.close()  # first: its running job may be waiting for a tile being read
        reads.close()

    return SegmentationResult(out_cm, out_oc, out_ot, px, n_oc, n_ot)
