"""Tiled inference over slides of any size: overlap, tapered blending, seam-free instances.

The slide (at the model's working resolution) is cut into tiles of ``tile_px`` with
``overlap_px`` shared between neighbours (:class:`TileSchedule`). Each tile's scores (class
probabilities and the osteoclast centre map) are multiplied by a separable cosine taper that
falls towards the tile's edges and summed (:class:`RowBlender`); a pixel's final score is the
weighted mean of every tile that saw it, so there is no seam where tiles meet.

Rows of pixels become final as soon as the next row of tiles has been added. Objects
(osteoclasts, osteocyte lacunae) are labelled on these final rows with a margin of
``MARGIN_UM`` µm of context above and below (:class:`BandLabeller`): every object belongs to
the band that holds its top row, so it is labelled exactly once, whole, with a slide-wide
label, whatever the tile size. Finished rows go to the output arrays (:class:`LabelOutputs`).
While a pixel's class is chosen, the margin between its two best blended probabilities is
counted per class and summed per block of a coarse map (:class:`histo.qc._confidence.MarginTally`;
the model-confidence check of :mod:`histo.qc`).

Slides wider than ``STRIP_COLS`` are segmented in column strips (:func:`strip_layout`), one
after the other, each top to bottom on the slide's own tile grid with a few tiles of context
either side: the class map is the one a whole-width run gives, an object belongs to the strip
that holds its leftmost column, and a strip hands the next one the labels and removed specks
of its objects that reach into the next one's columns (:class:`StripHandover`). Memory
therefore depends neither on the slide's height nor on its width. Within a strip, per column
it is small (a few kB at the default tiling): the accumulator is one tile wide (a window that
slides along the row of tiles) plus the blended sums of the ``overlap_px`` rows shared with
the next row of tiles at full width (float32, ``n_outputs`` of them; their weights are
recomputed, not kept); the final rows waiting to be labelled or written (:class:`FinalRows`:
two margins, a stride and a tile high, plus up to a sink chunk's height of rows waiting for
whole rows of chunks) are kept as one byte per pixel (the class and, in the upper bits, the
best class among 0-2 that a removed speck becomes); the centre map, read only at osteoclast
pixels, is kept as sparse pieces of those pixels' values; labels of objects not yet written
out are kept as sparse pieces; objects are labelled in column blocks, on their bounding boxes
(:func:`histo.segment.instances.label_band`).

Tiles are read and decoded ``READ_AHEAD_TILES`` ahead in one background thread and scored by
the network up to ``LOOKAHEAD_TILES`` ahead (at most ``LOOKAHEAD_MB`` of scores) in another
(:class:`TileFeed`), so that the network keeps the cores busy while the main thread blends and
labels. Bands are written to the sink on whole rows of its chunks (see :func:`_write_block`),
and the heap's freed pages are returned between rows of tiles once they add up to
``TRIM_SLACK_MB`` (:func:`histo.runtime.release_free_memory`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from histo.classes import OSTEOCLAST
from histo.errors import Cancelled
from histo.qc._confidence import MAP_BLOCK_PX, TALLY_ROWS, ConfidenceSummary, MarginTally
from histo.runtime import release_free_memory
from histo.segment.instances import ALT_SHIFT, SparsePiece, bone_contact_px, label_band

#: context kept above and below a band when labelling objects (µm); larger than any cell
MARGIN_UM = 256.0
#: resident memory the freed temporaries of rows of tiles may add before the heap is trimmed
#: (MB; trimming after every row makes the next row fault its pages in again)
TRIM_SLACK_MB = 128
#: columns blended at a time (bounds the float temporaries of a row of tiles)
BLEND_COLS = 2048
#: rows blended at a time: a few float rows of a tile's width stay in a core's cache while
#: every class is compared; the tally counts margins in blocks of as many rows (the sums of
#: its coarse map are then added in the same order whatever the tiling)
BLEND_ROWS = TALLY_ROWS
#: columns written to the sink at a time (rounded up to the sink's column alignment)
FLUSH_COLS = 2048
#: tiles whose scores are computed ahead (in a background thread) while the main thread blends
#: and labels: the network keeps both cores busy during the single-threaded labelling. Memory:
#: this many tiles of scores (n_outputs x tile² float32, 14 MB each at 768 px with 6 outputs;
#: none for a tile of glass), at most LOOKAHEAD_MB of them. 0: no thread.
LOOKAHEAD_TILES = 8
#: scores of tiles computed ahead kept at most (MB): 8 tiles of 768 px with 6 outputs, 6 with
#: a 7-class network's 8, so that a network with more outputs does not queue more bytes (a
#: bound; a shorter queue did not lower the peak of an analysis, docs/performance.md)
LOOKAHEAD_MB = 120
#: tiles read and decoded ahead of the network (in a thread of their own), 1.7 MB each
READ_AHEAD_TILES = 4
#: a sink whose chunks are larger than this (rows, columns) is written in bands of any height
#: or pieces of FLUSH_COLS (holding rows for a chunk's height costs more than rewriting chunks)
MAX_WRITE_BLOCK = (2048, 8192)
#: widest column strip segmented at a time (working px): a wider slide is cut into strips of
#: about equal width (owned columns), each segmented top to bottom with a context of
#: columns on either side, so that memory does not grow with the slide's width. Each border
#: between strips costs about 1.5 tiles of context per row of tiles (computed by both
#: strips); narrower strips trade speed for a lower peak (docs/performance.md)
STRIP_COLS = 12288
#: strips' owned columns start on multiples of this when the sink has no chunks (numpy)
STRIP_ALIGN = 1024
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
    confidence
        The network's margins (top class probability minus the second) over the slide:
        histograms per class and a coarse map (:class:`histo.qc._confidence.ConfidenceSummary`).
    """

    class_map: Any
    osteoclast_labels: Any
    osteocyte_labels: Any
    pixel_size_um: float
    n_osteoclasts: int
    n_osteocytes: int
    confidence: ConfidenceSummary | None = None

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


# ----------------------------------------------------------------------------- sparse pieces


def _shift_up(a: np.ndarray, k: int, n: int) -> None:
    """Move rows ``[k, k + n)`` of ``a`` to ``[0, n)`` in place, without a temporary copy."""
    step = max(1, min(k, 64))
    for j in range(0, n, step):
        e = min(n, j + step)
        a[j:e] = a[k + j : k + e]


def _last_row(piece: SparsePiece) -> int:
    return piece.row + int(piece.index[-1]) // piece.width


def _paint(
    pieces: list[SparsePiece], r0: int, r1: int, c0: int, c1: int, dtype: Any = np.int32
) -> np.ndarray:
    """Rows [r0, r1) and columns [c0, c1) of a label image (or any image, 0 elsewhere) from
    sparse pieces (slide rows and columns)."""
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


def _prune(pieces: list[SparsePiece], r1: int) -> None:
    """Remove the pieces that end above row ``r1``."""
    pieces[:] = [p for p in pieces if _last_row(p) >= r1]


def _trim(pieces: list[SparsePiece], r1: int) -> None:
    """Remove the rows above ``r1`` from sparse pieces (and the pieces left empty)."""
    out = []
    for p in pieces:
        if p.row >= r1:
            out.append(p)
            continue
        k = int(np.searchsorted(p.index, (r1 - p.row) * p.width))
        if k < p.index.size:
            index = p.index[k:] - np.int32((r1 - p.row) * p.width)
            out.append(SparsePiece(r1, p.col, p.width, index, p.values[k:].copy()))
    pieces[:] = out


def _shift_cols(piece: SparsePiece, dx: int) -> SparsePiece:
    """A sparse piece moved ``dx`` columns."""
    return piece._replace(col=piece.col + int(dx))


def _crop_cols(piece: SparsePiece, c0: int) -> SparsePiece | None:
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
    return SparsePiece(y0, c0, nw, nidx, vals[sel].copy())


# ----------------------------------------------------------------------------- tile schedule


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    return list(range(0, n - tile + stride, stride))


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


def _strip_bounds(width: int, n: int, align: int, min_width: int) -> list[int]:
    """Owned-column borders of ``n`` strips of about equal width on multiples of ``align``,
    dropping a border that would leave a strip narrower than ``min_width``."""
    bounds = [0]
    for k in range(1, n):
        b = int(round(k * width / n / align)) * align
        if min(b - bounds[-1], width - b) >= min_width:
            bounds.append(b)
    bounds.append(width)
    return bounds


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
    bounds = _strip_bounds(width, n, max(1, int(align)), left_ctx + right_ctx)
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


class TileJob(NamedTuple):
    """One tile: top row, left column, height and width (slide px at the working resolution)."""

    y: int
    x: int
    height: int
    width: int


@dataclass(frozen=True)
class TileSchedule:
    """Where the tiles of a slide lie and in which order they are segmented.

    Attributes
    ----------
    height, width
        The slide at the working resolution (px).
    tile_px, overlap_px
        Tile side and the pixels shared by neighbouring tiles.
    margin_px
        Context above and below a band of rows when labelling objects.
    ys
        Tile starts (rows), the same for every strip.
    strips
        Column strips (:func:`strip_layout`), segmented one after the other.
    """

    height: int
    width: int
    tile_px: int
    overlap_px: int
    margin_px: int
    ys: tuple[int, ...]
    strips: tuple[Strip, ...]

    @classmethod
    def plan(
        cls,
        shape: tuple[int, int],
        tile_px: int,
        overlap_px: int,
        pixel_size_um: float,
        strip_cols: int,
        align: int,
    ) -> TileSchedule:
        """The schedule of a slide of ``shape`` (px at ``pixel_size_um`` µm/px)."""
        height, width = shape
        margin = int(math.ceil(MARGIN_UM / pixel_size_um))
        contact = bone_contact_px(pixel_size_um)
        strips = strip_layout(width, tile_px, overlap_px, margin, strip_cols, align, contact)
        ys = _starts(height, tile_px, tile_px - overlap_px)
        return cls(height, width, tile_px, overlap_px, margin, tuple(ys), tuple(strips))

    @property
    def stride(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * sum(len(st.xs) for st in self.strips)

    def jobs(self) -> list[TileJob]:
        """Every strip's tiles, strip after strip, row after row (slide columns)."""
        t, h, w = self.tile_px, self.height, self.width
        return [
            TileJob(y, x, min(t, h - y), min(t, w - x))
            for st in self.strips
            for y in self.ys
            for x in st.xs
        ]

    def row_taper(self, iy: int) -> np.ndarray:
        """Blending weights along the rows of the tiles of row ``iy``."""
        th = min(self.tile_px, self.height - self.ys[iy])
        return taper(th, self.overlap_px, at_start=iy > 0, at_end=iy < len(self.ys) - 1)


# ----------------------------------------------------------------------------- tile feed


class _Lookahead:
    """``compute(*args)`` for each of ``jobs`` in order, up to ``depth`` jobs ahead of the
    consumer in one background thread (``depth`` 0: computed on demand in the caller)."""

    def __init__(
        self, compute: Callable[..., Any], jobs: list, depth: int, name: str = "histo-tiles"
    ) -> None:
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


def lookahead_tiles(schedule: TileSchedule, n_outputs: int) -> int:
    """Tiles whose scores are computed ahead: :data:`LOOKAHEAD_TILES`, fewer if their scores
    (``n_outputs`` float32 planes of a tile) would exceed :data:`LOOKAHEAD_MB` (at least 1)."""
    if LOOKAHEAD_TILES <= 0:
        return 0
    tile_bytes = n_outputs * schedule.tile_px**2 * 4
    return max(1, min(LOOKAHEAD_TILES, int(LOOKAHEAD_MB * 2**20 // tile_bytes)))


class TileFeed:
    """The scores of a schedule's tiles, in its order: ``(n_outputs, h, w)`` float32, or None
    for a tile of glass (no tissue within ``overlap_px`` on the tissue mask; not read).

    Tiles are read (and decoded) in one thread and scored in another while the caller blends:
    the three stages overlap, and reading and decoding release the GIL while the network runs.
    """

    def __init__(
        self, read: Callable, model: Any, schedule: TileSchedule, tissue: Any = None
    ) -> None:
        self._read = read
        self._model = model
        self._tissue = tissue
        self._overlap = schedule.overlap_px
        self._px = float(model.working_pixel_size_um)
        jobs = schedule.jobs()
        self._reads = _Lookahead(self._read_tile, jobs, READ_AHEAD_TILES, "histo-read")
        n_outputs = int(getattr(model, "n_outputs", 6))
        self._scores = _Lookahead(self._score_tile, jobs, lookahead_tiles(schedule, n_outputs))

    def _has_tissue(self, y: int, x: int, th: int, tw: int) -> bool:
        if self._tissue is None:
            return True
        f = self._px / float(self._tissue.pixel_size_um)  # working px -> mask px
        m = np.asarray(self._tissue.mask)
        ov = self._overlap
        y0, x0 = max(0, int((y - ov) * f) - 1), max(0, int((x - ov) * f) - 1)
        y1 = int(math.ceil((y + th + ov) * f)) + 1
        x1 = int(math.ceil((x + tw + ov) * f)) + 1
        return bool(m[y0:y1, x0:x1].any())

    def _read_tile(self, y: int, x: int, th: int, tw: int) -> np.ndarray | None:
        return self._read(y, x, th, tw) if self._has_tissue(y, x, th, tw) else None

    def _score_tile(self, y: int, x: int, th: int, tw: int) -> np.ndarray | None:
        rgb = self._reads.next()
        if rgb is None:
            # glass: no scores kept (a queue of glass tiles, filled at once, would hold
            # LOOKAHEAD_TILES x 14 MB of zeros); blended as background
            return None
        return self._model.predict_scores(rgb)  # (n_out, th, tw)

    def next(self) -> np.ndarray | None:
        """The next tile's scores."""
        return self._scores.next()

    def close(self) -> None:
        """Stop the threads (first the scorer: its running job may wait for a tile's read)."""
        self._scores.close()
        self._reads.close()


# ----------------------------------------------------------------------------- sink


def _write_block(*arrays: Any) -> tuple[int, int]:
    """(rows, columns) on whose multiples writes into ``arrays`` should start to fill whole
    chunks: a sink's ``block_px`` (:class:`histo.io.label_store.LabelsSink`) or a zarr array's
    ``chunks``; (1, 1) for numpy arrays."""
    rows = cols = 1
    for a in arrays:
        block = getattr(a, "block_px", None) or getattr(a, "chunks", None)
        if block is None or len(block) != 2 or not all(isinstance(b, int) for b in block):
            continue  # numpy (no chunks) or dask (chunks per block)
        rows, cols = math.lcm(rows, int(block[0])), math.lcm(cols, int(block[1]))
    max_rows, max_cols = MAX_WRITE_BLOCK
    return (rows if rows <= max_rows else 1), (cols if cols <= max_cols else 1)


def _as_sink_dtype(out: Any, labels: np.ndarray) -> np.ndarray:
    """``labels`` (int32, >= 0) as the sink's unsigned 32-bit type if it has one (a view: the
    sink need not check and convert the values)."""
    dtype = getattr(out, "dtype", None)
    if dtype is not None and np.dtype(dtype) == np.uint32:
        return labels.view(np.uint32)
    return labels


class LabelOutputs:
    """The class map and the two instance-label images a segmentation writes, and how.

    Rows are written in bands that start on multiples of ``row_align`` and pieces of
    ``flush_cols`` columns on multiples of ``col_align``: the sink's chunks are then written
    whole, once (a zarr chunk written in two parts is decoded and compressed twice).
    """

    def __init__(self, sink: Mapping[str, Any] | None, shape: tuple[int, int]) -> None:
        sink = dict(sink or {})
        self.class_map = sink.get("class_map")
        self.osteoclasts = sink.get("osteoclasts")
        self.osteocytes = sink.get("osteocytes")
        if self.class_map is None:
            self.class_map = np.zeros(shape, np.uint8)
        if self.osteoclasts is None:
            self.osteoclasts = np.zeros(shape, np.int32)
        if self.osteocytes is None:
            self.osteocytes = np.zeros(shape, np.int32)
        self.row_align, self.col_align = _write_block(
            self.class_map, self.osteoclasts, self.osteocytes
        )
        self.flush_cols = -(-FLUSH_COLS // self.col_align) * self.col_align

    def result(
        self, pixel_size_um: float, counts: ObjectCounts, confidence: ConfidenceSummary | None
    ) -> SegmentationResult:
        """The written maps as a segmentation's result, with the numbers of objects labelled."""
        return SegmentationResult(
            self.class_map,
            self.osteoclasts,
            self.osteocytes,
            pixel_size_um,
            counts.osteoclasts,
            counts.osteocytes,
            confidence,
        )

    def write(
        self,
        rows: slice,
        x0: int,
        cols: tuple[int, int],
        classes: np.ndarray,
        osteoclasts: list[SparsePiece],
        osteocytes: list[SparsePiece],
    ) -> None:
        """Write slide ``rows`` at strip columns ``[cols[0], cols[1])`` (the strip's column
        0 is slide column ``x0``) in tile-shaped pieces (memory does not grow with width).

        ``classes`` holds those rows of the strip (packed class bytes); the labels come from
        sparse pieces (slide rows, strip columns)."""
        r0, r1 = rows.start, rows.stop
        for c0 in range(cols[0], cols[1], self.flush_cols):
            c1 = min(cols[1], c0 + self.flush_cols)
            cols_out = slice(x0 + c0, x0 + c1)
            self.class_map[rows, cols_out] = classes[:, c0:c1] & _CLASS_BITS
            for out, pending in ((self.osteoclasts, osteoclasts), (self.osteocytes, osteocytes)):
                labels = _paint(pending, r0, r1, c0, c1)
                out[rows, cols_out] = _as_sink_dtype(out, labels)
                del labels


# ----------------------------------------------------------------------------- blending


class FinalRows:
    """Final rows of a strip not yet written out: slide rows ``[y0, y0 + n)``.

    ``classes`` is allocated once (``capacity`` rows): one byte per pixel, the class in the
    low bits and the best class among 0-2 (what a removed speck becomes) from bit
    ``ALT_SHIFT`` (see :func:`histo.segment.instances.label_band`). The centre map is read only
    at class-3 pixels: it is kept as sparse pieces (slide rows, strip columns) of those
    pixels' values.
    """

    def __init__(self, capacity: int, width: int) -> None:
        self.classes = np.zeros((capacity, width), np.uint8)
        self.centre: list[SparsePiece] = []
        self.y0 = 0
        self.n = 0

    def drop_before(self, row: int) -> None:
        """Forget the rows above slide row ``row``."""
        k = max(0, row - self.y0)
        if k > 0:
            n_keep = self.n - k
            _shift_up(self.classes, k, n_keep)
            self.classes[n_keep : self.n] = 0
            self.n = n_keep
            self.y0 += k
            _trim(self.centre, self.y0)


def _ones_span(weights: np.ndarray) -> tuple[int, int]:
    """The run ``[i0, i1)`` of a taper where every weight is exactly 1 ((0, 0) if none)."""
    ones = np.flatnonzero(weights == 1)
    if ones.size == 0 or ones.size != ones[-1] + 1 - ones[0]:
        return 0, 0
    return int(ones[0]), int(ones[-1]) + 1


def _weighted_into(
    out: np.ndarray, scores: np.ndarray, wy: np.ndarray, wx: np.ndarray, add: bool
) -> None:
    """``out += scores * (wy x wx)`` (``add``) or ``out = scores * (wy x wx)``, float32 as that
    expression gives it; where both weights are exactly 1 the scores are added or copied
    without the product (``s * 1 == s``), which is most of a tile."""
    if out.size == 0:
        return
    y0, y1 = _ones_span(wy)
    x0, x1 = _ones_span(wx)
    if y1 <= y0 or x1 <= x0:
        y0 = y1 = x0 = x1 = 0
    tapered = [(slice(0, y0), slice(None)), (slice(y1, None), slice(None))]
    tapered += [(slice(y0, y1), slice(0, x0)), (slice(y0, y1), slice(x1, None))]
    if y1 <= y0:
        tapered = [(slice(None), slice(None))]
    for rows, cols in tapered:
        weight = wy[rows, None] * wx[None, cols]
        if weight.size == 0:
            continue
        if add:
            out[:, rows, cols] += scores[:, rows, cols] * weight
        else:
            np.multiply(scores[:, rows, cols], weight, out=out[:, rows, cols])
    if y1 > y0:
        interior = (slice(None), slice(y0, y1), slice(x0, x1))
        if add:
            out[interior] += scores[interior]
        else:
            out[interior] = scores[interior]


class _BlendBuffers(NamedTuple):
    """Float and bool buffers of :data:`BLEND_ROWS` rows reused while columns are blended."""

    weight: np.ndarray
    best: np.ndarray
    score: np.ndarray
    gt: np.ndarray
    code: np.ndarray  #: uint8
    second: np.ndarray | None  #: only when margins are tallied


class RowBlender:
    """Blends the tiles of one strip, a row of tiles at a time, into :class:`FinalRows`.

    The accumulator of a row of tiles holds one tile's columns (a window that slides along
    the row; a column leaves it, blended, once no later tile of the row covers it). The rows
    shared with the next row of tiles (the overlap) are carried over at the strip's width;
    their blending weights are not carried but summed again in the same order (they depend
    only on the tiling). Every pixel sums the same terms in the same order as a full-width
    accumulator would, so the result is identical.

    A ``tally`` (:class:`histo.qc._confidence.MarginTally`) is given each final pixel of the
    strip's owned columns with its class and margin (top probability minus the second).
    """

    def __init__(
        self,
        schedule: TileSchedule,
        strip: Strip,
        n_outputs: int,
        rows: FinalRows,
        tally: MarginTally | None = None,
    ) -> None:
        self.schedule = schedule
        self.rows = rows
        self.tally = tally
        self.x0, self.own = strip.x0, (strip.own0 - strip.x0, strip.own1 - strip.x0)
        self.n_cls = n_outputs - 1
        self.width = strip.x1 - strip.x0
        self.xs = [x - strip.x0 for x in strip.xs]
        tile_px = schedule.tile_px
        n_rows = min(tile_px, schedule.height)
        self.win = np.zeros((n_outputs, n_rows, min(tile_px, self.width)), np.float32)
        self.win_w = np.zeros((n_rows, min(tile_px, self.width)), np.float32)
        self.n_carry = max(0, n_rows - schedule.stride) if len(schedule.ys) > 1 else 0
        self.carry = np.zeros((n_outputs, self.n_carry, self.width), np.float32)
        self.wy_prev = np.zeros(0, np.float32)  # row taper of the previous row of tiles
        self.fresh = (0, 0)  # window columns the current tile brought in (open_tile)
        self.acc_y0 = 0  # slide row of the current row of tiles' first final row

    def start_row(self, iy: int) -> None:
        """Begin row of tiles ``iy``."""
        s = self.schedule
        self.wy = s.row_taper(iy)
        last = iy == len(s.ys) - 1
        self.n_final = (s.height - self.acc_y0) if last else (s.ys[iy + 1] - self.acc_y0)
        self.rows_in = self.n_carry if iy > 0 else 0  # rows carried into this row of tiles
        self.rows_out = self.n_carry if not last else 0  # rows carried to the next one
        self.r0 = self.rows.n  # buffer row of this row's first final pixel
        self.win_x0 = self.win_x1 = 0  # window columns holding data: [win_x0, win_x1)

    def _col_taper(self, ix: int) -> np.ndarray:
        tw = min(self.schedule.tile_px, self.width - self.xs[ix])
        return taper(tw, self.schedule.overlap_px, at_start=ix > 0, at_end=ix < len(self.xs) - 1)

    def open_tile(self, ix: int) -> None:
        """Slide the window to tile ``ix``: blend the columns left of it (final)."""
        x = self.xs[ix]
        tw = min(self.schedule.tile_px, self.width - x)
        win_x0, win_x1 = self.win_x0, self.win_x1
        if x > win_x0:
            self._finish(win_x0, min(x, win_x1))
            keep = max(0, win_x1 - x)
            if keep:
                self.win[:, :, :keep] = self.win[:, :, x - win_x0 : win_x1 - win_x0].copy()
                self.win_w[:, :keep] = self.win_w[:, x - win_x0 : win_x1 - win_x0].copy()
            win_x0, win_x1 = x, max(x, win_x1)
        self.fresh = (x + tw - win_x0, x + tw - win_x0)
        if x + tw > win_x1:
            # columns entering the window start from the rows carried over; their other rows
            # are written (not added) by add_tile
            a, b = win_x1 - win_x0, x + tw - win_x0
            self.fresh = (a, b)
            self.win_w[:, a:b] = 0
            if self.rows_in:
                self.win[:, : self.rows_in, a:b] = self.carry[:, : self.rows_in, win_x1 : x + tw]
                self.win_w[: self.rows_in, a:b] = self._carried_weight(win_x1, x + tw)
            win_x1 = x + tw
        self.win_x0, self.win_x1 = win_x0, win_x1

    def add_tile(self, ix: int, scores: np.ndarray | None) -> None:
        """Add tile ``ix``'s scores (None: glass, a score of 1 for background) with its taper.

        Called after :meth:`open_tile` of the same tile: the window's columns that entered
        with it (``fresh``) hold only the carried rows, and their other rows are written here.
        """
        x = self.xs[ix]
        wy, wx = self.wy, self._col_taper(ix)
        th, tw = wy.size, wx.size
        a = x - self.win_x0
        f0, f1 = self.fresh  # window columns [f0, a + tw), f0 >= a
        rows_in = min(self.rows_in, th)
        self.win_w[:th, a : a + tw] += wy[:, None] * wx[None, :]
        if f1 > f0:
            # rows below a last, shorter row of tiles, and (glass) the rows to add to
            self.win[:, max(th, self.rows_in) :, f0:f1] = 0
            if scores is None:
                self.win[:, rows_in:th, f0:f1] = 0
        if scores is None:
            self.win[0, :th, a : a + tw] += wy[:, None] * wx[None, :]
            return
        k = f0 - a  # the tile's first fresh column
        _weighted_into(self.win[:, :th, a:f0], scores[:, :, :k], wy, wx[:k], add=True)
        fresh = self.win[:, :, f0:f1]
        _weighted_into(fresh[:, :rows_in], scores[:, :rows_in, k:], wy[:rows_in], wx[k:], add=True)
        _weighted_into(
            fresh[:, rows_in:th], scores[:, rows_in:, k:], wy[rows_in:], wx[k:], add=False
        )

    def finish_row(self) -> int:
        """Blend the rest of the row of tiles; returns the slide row up to which rows are final."""
        self._finish(self.win_x0, self.win_x1)
        self.wy_prev = self.wy
        self.rows.n = self.r0 + self.n_final
        self.acc_y0 += self.n_final
        return self.acc_y0

    def _carried_weight(self, c0: int, c1: int) -> np.ndarray:
        """Blending weights of the carried rows at columns [c0, c1): the sums the previous
        row of tiles made, redone in the same order."""
        out = np.zeros((self.n_carry, c1 - c0), np.float32)
        rows = self.wy_prev[self.wy_prev.size - self.n_carry :]
        for ix, x in enumerate(self.xs):
            tw = min(self.schedule.tile_px, self.width - x)
            lo, hi = max(c0, x), min(c1, x + tw)
            if lo < hi:
                wx = self._col_taper(ix)
                out[:, lo - c0 : hi - c0] += rows[:, None] * wx[None, lo - x : hi - x]
        return out

    def _finish(self, c0: int, c1: int) -> None:
        """Blend window columns [c0, c1) (strip columns; final for this row of tiles) into the
        final rows and carry their lower ``rows_out`` rows over."""
        for d0 in range(c0, c1, BLEND_COLS):
            d1 = min(c1, d0 + BLEND_COLS)
            a, b = d0 - self.win_x0, d1 - self.win_x0
            self._blend_columns(a, b, d0)
            if self.rows_out:
                rows = slice(self.n_final, self.n_final + self.rows_out)
                self.carry[:, : self.rows_out, d0:d1] = self.win[:, rows, a:b]

    def _blend_columns(self, a: int, b: int, d0: int) -> None:
        """Window columns [a, b) (strip columns from ``d0``) to class bytes and the centre map
        at class-3 pixels, :data:`BLEND_ROWS` rows at a time (their temporaries stay in the
        core's cache; the margins reach the tally in the rows it counts at a time)."""
        n = self.n_final
        shape = (min(n, BLEND_ROWS), b - a)
        buffers = _BlendBuffers(
            np.empty(shape, np.float32),
            np.empty(shape, np.float32),
            np.empty(shape, np.float32),
            np.empty(shape, bool),
            np.empty(shape, np.uint8),
            np.empty(shape, np.float32) if self.tally is not None else None,
        )
        centre_idx, centre_vals = [], []
        for r0 in range(0, n, BLEND_ROWS):
            r1 = min(n, r0 + BLEND_ROWS)
            idx, vals = self._blend_rows(r0, r1, a, b, d0, buffers)
            if idx.size:
                centre_idx.append(idx + np.int32(r0 * (b - a)))
                centre_vals.append(vals)
        if centre_idx:
            idx, vals = np.concatenate(centre_idx), np.concatenate(centre_vals)
            self.rows.centre.append(SparsePiece(self.acc_y0, d0, b - a, idx, vals))

    def _blend_rows(
        self, r0: int, r1: int, a: int, b: int, d0: int, buffers: _BlendBuffers
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [r0, r1) of window columns [a, b) to class bytes (margins to the tally);
        returns the flat indices (int32, in these rows) of their class-3 pixels and the
        centre map there."""
        win = self.win
        rows = slice(r0, r1)
        h = r1 - r0
        weight = self.win_w[rows, a:b]
        # where one tile alone covers these pixels every weight is 1 and the blended scores
        # are the sums themselves (x / 1 == x): no division
        undivided = bool(np.equal(weight, 1, out=buffers.gt[:h]).all())
        wsum = None if undivided else np.maximum(weight, 1e-6, out=buffers.weight[:h])

        def blended(k: int, out: np.ndarray) -> np.ndarray:
            return win[k, rows, a:b] if undivided else np.divide(win[k, rows, a:b], wsum, out=out)

        # argmax over the blended classes (the first of equal maxima, as np.argmax), one
        # class at a time: the best of classes 0-2 first (alt), then of all
        best = buffers.best[:h]
        np.copyto(best, blended(0, best))
        score, gt, code = buffers.score[:h], buffers.gt[:h], buffers.code[:h]
        # the second-best score, for the margin (only when it is tallied)
        second = None if buffers.second is None else buffers.second[:h]
        if second is not None:
            second[...] = 0
        y = self.r0 + r0
        cm = self.rows.classes[y : y + h, d0 : d0 + b - a]
        cm[...] = 0
        alt = None
        for k in range(1, self.n_cls):
            if k == min(3, self.n_cls):
                alt = cm << np.uint8(ALT_SHIFT)
            score = blended(k, buffers.score[:h])
            np.greater(score, best, out=gt)
            # cm = k where gt: cm holds classes below k, so max(cm, k * gt) (np.copyto
            # with where= costs several times these two passes)
            np.multiply(gt.view(np.uint8), np.uint8(k), out=code)
            np.maximum(cm, code, out=cm)
            if second is not None:
                # max(second, min(best, score)) in place: second <= best, so it equals
                # min(best, max(second, score)) (no temporary array)
                np.maximum(second, score, out=second)
                np.minimum(second, best, out=second)
            np.maximum(best, score, out=best)
        if alt is None:
            alt = cm << np.uint8(ALT_SHIFT)
        if second is not None:
            self._tally(cm, np.subtract(best, second, out=second), d0, r0)
        # the centre map at the class-3 pixels only (the only ones label_band reads)
        ce = blended(self.n_cls, buffers.score[:h])
        np.equal(cm, np.uint8(OSTEOCLAST), out=gt)
        idx = np.flatnonzero(gt)
        cm |= alt
        return idx.astype(np.int32), ce[np.divmod(idx, b - a)]

    def _tally(self, classes: np.ndarray, margin: np.ndarray, d0: int, r0: int) -> None:
        """Give the tally the owned columns of blended columns from strip column ``d0``, row
        ``r0`` of this row of tiles' final rows."""
        lo, hi = max(d0, self.own[0]), min(d0 + classes.shape[1], self.own[1])
        if lo < hi:
            cols = slice(lo - d0, hi - d0)
            self.tally.add(classes[:, cols], margin[:, cols], self.acc_y0 + r0, self.x0 + lo)


# ----------------------------------------------------------------------------- labelling


class SpeckPixels(NamedTuple):
    """Class-map pixels a strip changed in the next strip's columns (slide px)."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


@dataclass
class StripHandover:
    """What a strip found in the next strip's owned columns: labels of its objects (sparse
    pieces, slide rows and columns) and the class-map pixels of its removed specks, by the
    band (its last owned row) whose labelling removed them."""

    osteoclasts: list[SparsePiece] = field(default_factory=list)
    osteocytes: list[SparsePiece] = field(default_factory=list)
    specks: dict[int, SpeckPixels] = field(default_factory=dict)


@dataclass
class ObjectCounts:
    """Objects labelled so far in a slide (the next labels start after them)."""

    osteoclasts: int = 0
    osteocytes: int = 0


class BandLabeller:
    """Labels the objects of a strip's final rows band by band and writes finished rows out.

    A band is ``stride`` rows (the rest of the strip at its end), labelled once ``margin``
    rows below it are final (:func:`histo.segment.instances.label_band`). Labels wait as sparse
    pieces until their rows are written (on whole rows of the sink's chunks).
    """

    def __init__(
        self,
        rows: FinalRows,
        strip: Strip,
        schedule: TileSchedule,
        pixel_size_um: float,
        outputs: LabelOutputs,
        counts: ObjectCounts,
        handover: StripHandover,
        export: bool,
    ) -> None:
        self.rows, self.outputs, self.counts = rows, outputs, counts
        self.px = pixel_size_um
        self.stride, self.margin = schedule.stride, schedule.margin_px
        self.x0 = strip.x0
        width = strip.x1 - strip.x0
        self.own0, self.own1 = strip.own0 - strip.x0, strip.own1 - strip.x0
        self.own_cols = None if (self.own0, self.own1) == (0, width) else (self.own0, self.own1)
        # labels of objects not yet written out (slide rows, strip columns); the left strip's
        # objects that reach into this one first
        self.pending_oc = [_shift_cols(p, -strip.x0) for p in handover.osteoclasts]
        self.pending_ot = [_shift_cols(p, -strip.x0) for p in handover.osteocytes]
        self.specks_in = handover.specks
        self.handover = StripHandover() if export else None
        self.owned_to = 0  # rows [0, owned_to) have had their objects labelled
        self.flushed_to = 0  # rows [0, flushed_to) have been written to the sink

    def advance(self, final_to: int, at_end: bool) -> None:
        """Label the bands whose margin is final (rows < ``final_to``), then write the
        finished rows out and drop the rows no longer needed."""
        rows, margin = self.rows, self.margin
        while self.owned_to < final_to and (
            at_end or final_to - self.owned_to >= self.stride + margin
        ):
            own_stop = final_to if at_end else self.owned_to + self.stride
            self._label(own_stop, final_to)
            self.owned_to = own_stop
            # rows above owned_to are now final in every output: write them out, in bands
            # that end on a multiple of row_align (but for the last)
            row_align = self.outputs.row_align
            flush_to = final_to if at_end else own_stop // row_align * row_align
            if flush_to > self.flushed_to:
                self._flush(flush_to)
            # keep the margin rows (context for the next band) and the rows not written out
            rows.drop_before(min(self.owned_to - margin, self.flushed_to))

    def _label(self, own_stop: int, final_to: int) -> None:
        """Label the objects of rows [owned_to, own_stop) with context up to ``final_to``."""
        rows = self.rows
        w0 = max(rows.y0, self.owned_to - self.margin)
        w1 = min(final_to, own_stop + self.margin)
        cm = rows.classes[w0 - rows.y0 : w1 - rows.y0]
        right = cm[:, self.own1 :].copy() if self.handover is not None else None
        new_oc: list[SparsePiece] = []
        new_ot: list[SparsePiece] = []
        found = label_band(
            cm,
            lambda x0, x1: _paint(rows.centre, w0, w1, x0, x1, np.float32),
            None,
            self.owned_to - w0,
            own_stop - w0,
            self.px,
            into=(new_oc, new_ot),
            offsets=(self.counts.osteoclasts, self.counts.osteocytes),
            own_cols=self.own_cols,
        )
        new_oc = [p._replace(row=p.row + w0) for p in new_oc]
        new_ot = [p._replace(row=p.row + w0) for p in new_ot]
        self.pending_oc.extend(new_oc)
        self.pending_ot.extend(new_ot)
        if self.handover is not None:
            self._export(new_oc, new_ot, cm, right, w0, own_stop)
        if own_stop in self.specks_in:
            # the left strip's specks of this band, removed at the same step as there
            speck = self.specks_in.pop(own_stop)
            rows.classes[speck.rows - rows.y0, speck.cols - self.x0] = speck.values
        self.counts.osteoclasts += found.n_osteoclasts
        self.counts.osteocytes += found.n_osteocytes

    def _export(
        self,
        new_oc: list[SparsePiece],
        new_ot: list[SparsePiece],
        cm: np.ndarray,
        before: np.ndarray,
        w0: int,
        own_stop: int,
    ) -> None:
        """Hand what this band's objects left in the next strip's columns over (slide px)."""
        own1, handover = self.own1, self.handover
        for target, pieces in ((handover.osteoclasts, new_oc), (handover.osteocytes, new_ot)):
            for p in pieces:
                p = _crop_cols(p, own1)
                if p is not None:
                    target.append(_shift_cols(p, self.x0))
        rows, cols = np.nonzero(cm[:, own1:] != before)
        if rows.size:
            vals = cm[rows, cols + own1]
            handover.specks[own_stop] = SpeckPixels(rows + w0, cols + own1 + self.x0, vals)

    def _flush(self, flush_to: int) -> None:
        """Write rows [flushed_to, flush_to) of the owned columns out."""
        a, b = self.flushed_to - self.rows.y0, flush_to - self.rows.y0
        self.outputs.write(
            slice(self.flushed_to, flush_to),
            self.x0,
            (self.own0, self.own1),
            self.rows.classes[a:b],
            self.pending_oc,
            self.pending_ot,
        )
        _prune(self.pending_oc, flush_to)
        _prune(self.pending_ot, flush_to)
        self.flushed_to = flush_to


# ----------------------------------------------------------------------------- slide


class _TileTicker:
    """Cancellation before and progress after every tile."""

    def __init__(self, progress: Callable | None, cancel: Callable | None, n_tiles: int) -> None:
        self.progress, self.cancel, self.n_tiles = progress, cancel, n_tiles
        self.done = 0

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("segmentation cancelled")

    def tile_done(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done / self.n_tiles, f"segmenting tile {self.done}/{self.n_tiles}")


def _segment_strip(
    strip: Strip,
    schedule: TileSchedule,
    feed: TileFeed,
    labeller: BandLabeller,
    n_outputs: int,
    ticker: _TileTicker,
    tally: MarginTally | None = None,
) -> None:
    """Blend the strip's tiles row of tiles by row of tiles; label and write as rows finish."""
    blender = RowBlender(schedule, strip, n_outputs, labeller.rows, tally)
    for iy in range(len(schedule.ys)):
        blender.start_row(iy)
        for ix in range(len(strip.xs)):
            ticker.check()
            blender.open_tile(ix)
            blender.add_tile(ix, feed.next())
            ticker.tile_done()
        final_to = blender.finish_row()
        labeller.advance(final_to, at_end=iy == len(schedule.ys) - 1)
        # this row's temporaries, freed in the middle of the heap, once they add up
        release_free_memory(slack_mb=TRIM_SLACK_MB)


def _segment_strips(
    schedule: TileSchedule,
    feed: TileFeed,
    outputs: LabelOutputs,
    pixel_size_um: float,
    n_outputs: int,
    ticker: _TileTicker,
    tally: MarginTally | None = None,
) -> ObjectCounts:
    """Segment the schedule's strips one after the other, each handing the next what its
    objects left in the next one's columns; returns the numbers of objects labelled."""
    counts = ObjectCounts()
    handover = StripHandover()
    for k, strip in enumerate(schedule.strips):
        s = schedule
        # final rows: at most a stride and a margin below the labelled rows, a margin or the
        # rows awaiting a whole band of row_align above them, plus one row of tiles
        margin, row_align = s.margin_px, outputs.row_align
        capacity = min(s.height, s.stride + margin + max(margin, row_align - 1) + s.tile_px)
        rows = FinalRows(capacity, strip.x1 - strip.x0)
        export = k + 1 < len(s.strips)
        labeller = BandLabeller(rows, strip, s, pixel_size_um, outputs, counts, handover, export)
        _segment_strip(strip, s, feed, labeller, n_outputs, ticker, tally)
        handover = labeller.handover or StripHandover()
        del rows, labeller
        release_free_memory()  # the strip's buffers
    return counts


def _tiling(tile_px: int, overlap_px: int) -> tuple[int, int]:
    """Tile side and overlap as segment_slide uses them (the overlap at most half a tile)."""
    tile_px = int(tile_px)
    overlap_px = int(max(0, min(overlap_px, tile_px // 2)))
    if tile_px - overlap_px <= 0:
        raise ValueError("segment_slide: overlap_px must be smaller than tile_px")
    return tile_px, overlap_px


def _as_segmenter(model: Any) -> Any:
    """``model`` itself, or the segmenter loaded by that name or path when it is a string."""
    if isinstance(model, str):
        from histo.segment import load_model

        return load_model(model)
    return model


def _schedule(
    shape: tuple[int, int],
    tile_px: int,
    overlap_px: int,
    pixel_size_um: float,
    strip_cols: int | None,
    col_align: int,
) -> TileSchedule:
    """The tile schedule of :func:`segment_slide`: strips of at most ``strip_cols`` (default
    :data:`STRIP_COLS`) that start on the sink's chunk columns, or on :data:`STRIP_ALIGN`."""
    align = col_align if col_align > 1 else STRIP_ALIGN
    strip_cols = STRIP_COLS if strip_cols is None else int(strip_cols)
    return TileSchedule.plan(shape, tile_px, overlap_px, pixel_size_um, strip_cols, align)


def _segment_scheduled(
    read: Callable[[int, int, int, int], np.ndarray],
    model: Any,
    pixel_size_um: float,
    schedule: TileSchedule,
    outputs: LabelOutputs,
    ticker: _TileTicker,
    tissue: Any,
    margin_map: bool,
) -> SegmentationResult:
    """Run the model over the schedule's tiles (those with tissue) into ``outputs``."""
    feed = TileFeed(read, model, schedule, tissue)
    n_outputs = int(getattr(model, "n_outputs", 6))
    block_px = MAP_BLOCK_PX if margin_map else 0
    tally = MarginTally(n_outputs - 1, schedule.shape, pixel_size_um, block_px=block_px)
    try:
        counts = _segment_strips(schedule, feed, outputs, pixel_size_um, n_outputs, ticker, tally)
    finally:
        feed.close()
    return outputs.result(pixel_size_um, counts, tally.summary())


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
    margin_map: bool = False,
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
        Optional low-resolution tissue mask (:func:`histo.io.detect_tissue`). Tiles with no
        tissue within ``overlap_px`` are neither read nor run: they are background.
    strip_cols
        Widest column strip segmented at a time (px, default :data:`STRIP_COLS`), so memory
        does not grow with the slide's width (:func:`strip_layout`); objects are numbered
        strip by strip.
    margin_map
        Also keep the mean margin (top class probability minus the second) per 8 x 8 px
        block in ``result.confidence.margin_map``: 4 bytes per block while summed (the
        margin histograms are always kept, in constant memory).

    Returns
    -------
    SegmentationResult
    """
    model = _as_segmenter(model)
    read, slide_shape = _reader(source, shape, model)
    px = float(model.working_pixel_size_um)
    tile_px, overlap_px = _tiling(tile_px, overlap_px)
    outputs = LabelOutputs(sink, slide_shape)
    schedule = _schedule(slide_shape, tile_px, overlap_px, px, strip_cols, outputs.col_align)
    ticker = _TileTicker(progress, cancel, schedule.n_tiles)
    return _segment_scheduled(read, model, px, schedule, outputs, ticker, tissue, margin_map)
