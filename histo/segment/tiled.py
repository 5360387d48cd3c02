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

Memory is bounded by one row of tiles (``O(tile_px * width)``), never by the slide's height;
results are written into the sink (numpy or zarr arrays) band by band.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from histo.errors import Cancelled
from histo.segment.instances import label_band

#: context kept above and below a band when labelling objects (µm); larger than any cell
MARGIN_UM = 256.0
#: columns blended at a time (bounds the float temporaries of a row of tiles)
BLEND_COLS = 2048


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


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    return list(range(0, n - tile + stride, stride))


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
        Tile side in px at the working resolution (memory grows with ``tile_px * width``).
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
    xs = _starts(W, tile_px, stride)
    n_tiles = len(ys) * len(xs)
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

    # blending accumulator: rows [acc_y0, acc_y0 + tile_px)
    acc = np.zeros((n_out, min(tile_px, H), W), np.float32)
    wsum = np.zeros((min(tile_px, H), W), np.float32)
    acc_y0 = 0
    # final rows not yet written: rows [buf_y0, buf_y0 + len)
    buf_cm = np.zeros((0, W), np.uint8)
    buf_alt = np.zeros((0, W), np.uint8)
    buf_ce = np.zeros((0, W), np.float32)
    buf_oc = np.zeros((0, W), np.int32)
    buf_ot = np.zeros((0, W), np.int32)
    buf_y0 = 0
    owned_to = 0  # rows [0, owned_to) have had their objects labelled
    flushed_to = 0  # rows [0, flushed_to) have been written to the sink
    n_oc = n_ot = 0
    done = 0

    def label_and_flush(final_to: int, at_end: bool) -> None:
        """Label objects of bands whose margin is available, then flush finished rows."""
        nonlocal buf_cm, buf_alt, buf_ce, buf_oc, buf_ot, buf_y0, owned_to, flushed_to, n_oc, n_ot
        while owned_to < final_to and (at_end or final_to - owned_to >= stride + margin):
            own_stop = final_to if at_end else owned_to + stride
            w0 = max(buf_y0, owned_to - margin)
            w1 = min(final_to, own_stop + margin)
            a, b = w0 - buf_y0, w1 - buf_y0
            cm = buf_cm[a:b]
            oc, ot, owned, k_oc, k_ot = label_band(
                cm, buf_ce[a:b], buf_alt[a:b], owned_to - w0, own_stop - w0, px
            )
            buf_oc[a:b] = np.where(oc > 0, oc + n_oc, buf_oc[a:b])
            buf_ot[a:b] = np.where(ot > 0, ot + n_ot, buf_ot[a:b])
            n_oc += k_oc
            n_ot += k_ot
            owned_to = own_stop
            # rows above owned_to are now final in every output: write them out
            flush_to = owned_to if not at_end else final_to
            if flush_to > flushed_to:
                a, b = flushed_to - buf_y0, flush_to - buf_y0
                out_cm[flushed_to:flush_to] = buf_cm[a:b]
                out_oc[flushed_to:flush_to] = buf_oc[a:b]
                out_ot[flushed_to:flush_to] = buf_ot[a:b]
                flushed_to = flush_to
            keep_from = max(0, owned_to - margin - buf_y0)
            # keep the margin rows (context for the next band), drop the rest
            buf_cm, buf_alt, buf_ce = buf_cm[keep_from:], buf_alt[keep_from:], buf_ce[keep_from:]
            buf_oc, buf_ot = buf_oc[keep_from:], buf_ot[keep_from:]
            buf_y0 += keep_from

    for iy, y in enumerate(ys):
        th = min(tile_px, H - y)
        wy = taper(th, overlap_px, at_start=iy > 0, at_end=iy < len(ys) - 1)
        for ix, x in enumerate(xs):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            tw = min(tile_px, W - x)
            if has_tissue(y, x, th, tw):
                scores = model.predict_scores(read(y, x, th, tw))  # (n_out, th, tw)
            else:
                scores = np.zeros((n_out, th, tw), np.float32)
                scores[0] = 1.0  # glass
            wx = taper(tw, overlap_px, at_start=ix > 0, at_end=ix < len(xs) - 1)
            wt = wy[:, None] * wx[None, :]
            r0 = y - acc_y0
            acc[:, r0 : r0 + th, x : x + tw] += scores * wt
            wsum[r0 : r0 + th, x : x + tw] += wt
            done += 1
            if progress is not None:
                progress(done / n_tiles, f"segmenting tile {done}/{n_tiles}")
        last = iy == len(ys) - 1
        n_final = (H - acc_y0) if last else (ys[iy + 1] - acc_y0)
        # blend and decide column chunk by column chunk (no full-width float temporaries)
        cls = np.empty((n_final, W), np.uint8)
        alt = np.empty((n_final, W), np.uint8)
        ce = np.empty((n_final, W), np.float32)
        for c0 in range(0, W, BLEND_COLS):
            c1 = min(W, c0 + BLEND_COLS)
            blended = acc[:, :n_final, c0:c1] / np.maximum(wsum[:n_final, c0:c1], 1e-6)
            cls[:, c0:c1] = np.argmax(blended[:n_cls], axis=0)
            alt[:, c0:c1] = np.argmax(blended[: min(3, n_cls)], axis=0)
            ce[:, c0:c1] = blended[n_cls]
        del blended
        buf_cm = np.concatenate([buf_cm, cls])
        buf_alt = np.concatenate([buf_alt, alt])
        buf_ce = np.concatenate([buf_ce, ce])
        buf_oc = np.concatenate([buf_oc, np.zeros((n_final, W), np.int32)])
        buf_ot = np.concatenate([buf_ot, np.zeros((n_final, W), np.int32)])
        # shift the accumulator by the rows just finalised
        # (in place: only the rows kept, about overlap_px, are copied)
        rest = acc.shape[1] - n_final
        if rest > 0:
            acc[:, :rest] = acc[:, n_final:].copy()
            wsum[:rest] = wsum[n_final:].copy()
        acc[:, max(rest, 0) :] = 0
        wsum[max(rest, 0) :] = 0
        acc_y0 += n_final
        label_and_flush(acc_y0, at_end=last)

    return SegmentationResult(out_cm, out_oc, out_ot, px, n_oc, n_ot)
