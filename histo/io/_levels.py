"""Lazy pyramid levels: a view that presents any stored layout as (H, W, 3) uint8 RGB.

A :class:`LevelArray` wraps one stored array (a zarr array backed by a TIFF or an OME-Zarr
store, or a numpy array) and reads only the rows and columns it is indexed with. Each read is
normalised on the fly:

- grayscale -> RGB (the gray value repeated),
- RGBA / gray+alpha -> RGB composited on white (``rgb * a + 255 * (1 - a)``),
- more than 8 bits -> 8 bits by linear scaling, ``round(v * 255 / max_value)`` where
  ``max_value`` is ``2**BitsPerSample - 1`` (65535 for 16-bit data),
- float data are taken as 0-1 and scaled by 255,
- planar (C, Y, X) storage -> interleaved (Y, X, 3).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from histo.errors import SlideReadError

#: decoded tiles kept per level (bytes of RGB uint8)
CHUNK_CACHE_BYTES = 32 * 2**20
#: tiles or strips larger than this (pixels) are not cached but read window by window
CACHED_CHUNK_MAX_PX = 2048 * 2048


def one_line(text: object, limit: int = 200) -> str:
    """``text`` as one line of at most ``limit`` characters (for error messages)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class Layout:
    """Where the image axes are in a stored array.

    Attributes
    ----------
    lead : tuple of int
        Indices taken on the leading axes that are neither Y, X nor channel (T, Z, ...).
    channel_axis : {None, 'first', 'last'}
        None for a grayscale array; 'first' for planar (C, Y, X); 'last' for (Y, X, S).
    n_channels : int
        1 gray, 2 gray+alpha, 3 RGB, 4 RGBA.
    max_value : float
        Stored value that maps to 255 (only used for non-uint8 integers).
    """

    lead: tuple[int, ...] = ()
    channel_axis: str | None = "last"
    n_channels: int = 3
    max_value: float = 255.0


def layout_from_axes(
    axes: str, shape: tuple[int, ...], dtype: np.dtype, bits: int | None, where: str
) -> Layout:
    """Work out a :class:`Layout` from tifffile/NGFF axis letters (e.g. 'YXS', 'CYX', 'TCZYX').

    Y and X must be present; 'S' (samples) or 'C' (channels) is the channel axis; any other
    axis is a leading axis of which the first plane is used.
    """
    axes = axes.upper()
    if len(axes) != len(shape) or "Y" not in axes or "X" not in axes:
        raise SlideReadError(f"{where}: no 2-D image (axes {axes!r}, shape {tuple(shape)})")
    iy, ix = axes.index("Y"), axes.index("X")
    if ix != iy + 1:
        raise SlideReadError(f"{where}: unsupported axis order {axes!r}")
    if ix == len(axes) - 2 and axes[-1] in "SC":
        ic, channel_axis = len(axes) - 1, "last"
    else:
        before = [i for i in range(iy) if axes[i] in "SC" and shape[i] > 1]
        if len(before) > 1:
            raise SlideReadError(f"{where}: more than one channel axis ({axes!r}, {shape})")
        ic, channel_axis = (before[0], "first") if before else (None, None)
    if ix != len(axes) - 1 and channel_axis != "last":
        raise SlideReadError(f"{where}: unsupported axis order {axes!r}")
    n = 1 if ic is None else int(shape[ic])
    if n > 4:
        raise SlideReadError(f"{where}: {n} channels; histo reads brightfield RGB (1-4 channels)")
    if channel_axis == "first" and ic != iy - 1:
        # move nothing: the channel axis must directly precede Y for planar storage
        raise SlideReadError(f"{where}: unsupported axis order {axes!r}")
    lead_axes = [i for i in range(iy) if i != ic]
    lead = tuple(0 for _ in lead_axes)
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or dtype.kind == "b":
        max_value = 255.0
    elif dtype.kind == "u" or dtype.kind == "i":
        nbits = bits if bits and bits <= dtype.itemsize * 8 else dtype.itemsize * 8
        if dtype.kind == "i":
            nbits = min(nbits, dtype.itemsize * 8 - 1)
        max_value = float(2**nbits - 1)
    elif dtype.kind == "f":
        max_value = 1.0
    else:
        raise SlideReadError(f"{where}: unsupported pixel type {dtype}")
    return Layout(lead=lead, channel_axis=channel_axis, n_channels=n, max_value=max_value)


def to_rgb8(block: np.ndarray, layout: Layout) -> np.ndarray:
    """Convert a read block (already reduced to (Y, X), (Y, X, C) or (C, Y, X)) to RGB uint8."""
    if layout.channel_axis == "first":
        block = np.moveaxis(block, 0, -1)
    if block.ndim == 2:
        block = block[..., None]
    if block.dtype != np.uint8:
        if block.dtype.kind == "f":  # clip first: huge floats overflow float32 and * 255
            block = np.clip(np.nan_to_num(block, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        values = block.astype(np.float32)
        values *= 255.0 / layout.max_value
        np.clip(values, 0, 255, out=values)
        block = np.rint(values).astype(np.uint8)
    n = block.shape[-1]
    if n in (2, 4):
        color = block[..., : n - 1].astype(np.float32)
        alpha = block[..., n - 1 :].astype(np.float32) / 255.0
        block = np.rint(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        n -= 1
    if n == 1:
        block = np.repeat(block, 3, axis=-1)
    return np.ascontiguousarray(block)


class LevelArray:
    """One pyramid level as a lazy (H, W, 3) uint8 RGB array-like.

    Index it like a numpy array (``level[y0:y1, x0:x1]``): only the indexed window is read
    from the file and normalised. ``np.asarray(level)`` reads the whole level.

    Parameters
    ----------
    source : array-like
        The stored array (zarr array or numpy array) with the axes described by ``layout``.
    layout : Layout
        Where Y, X and the channels are in ``source``.
    where : str
        Name used in error messages (file name and level).
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, source: Any, layout: Layout, where: str) -> None:
        self.source = source
        self.layout = layout
        self.where = where
        shape = tuple(int(s) for s in source.shape)
        n_lead = len(layout.lead)
        if layout.channel_axis == "first":
            self._h, self._w = shape[-2], shape[-1]
        else:
            self._h, self._w = shape[n_lead], shape[n_lead + 1]
        self._ndim_source = len(shape)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, 3) in pixels of this level."""
        return (self._h, self._w, 3)

    @property
    def size(self) -> int:
        return self._h * self._w * 3

    @property
    def nbytes(self) -> int:
        return self.size

    def __len__(self) -> int:
        return self._h

    def __repr__(self) -> str:
        return f"LevelArray(shape={self.shape}, dtype=uint8, source={self.where!r})"

    def _source_key(self, ys: slice, xs: slice) -> tuple:
        lay = self.layout
        key: list[Any] = list(lay.lead)
        if lay.channel_axis == "first":
            key.append(slice(None))
            key.extend([ys, xs])
        else:
            key.extend([ys, xs])
            if self._ndim_source == len(lay.lead) + 3:
                key.append(slice(None))
        return tuple(key)

    def _chunk_shape(self) -> tuple[int, int] | None:
        """(rows, cols) of the stored chunks (tiles or strips), or None if not chunked."""
        chunks = getattr(self.source, "chunks", None)
        if not chunks or len(chunks) != self._ndim_source:
            return None
        if self.layout.channel_axis == "first":
            ch, cw = int(chunks[-2]), int(chunks[-1])
        else:
            n_lead = len(self.layout.lead)
            ch, cw = int(chunks[n_lead]), int(chunks[n_lead + 1])
        if (ch, cw) == (self._h, self._w) or ch * cw > CACHED_CHUNK_MAX_PX:
            return None
        return ch, cw

    def _cached_chunk(self, cy: int, cx: int, ch: int, cw: int) -> np.ndarray:
        key = (cy, cx)
        with self._lock:
            block = self._cache.get(key)
            if block is not None:
                self._cache.move_to_end(key)
                return block
        block = self._read_direct(
            cy * ch, min((cy + 1) * ch, self._h), cx * cw, min((cx + 1) * cw, self._w)
        )
        with self._lock:
            self._cache[key] = block
            self._cache_bytes += block.nbytes
            while self._cache_bytes > CHUNK_CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return block

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read rows ``y0:y1`` and columns ``x0:x1`` (clipped to the level) as RGB uint8.

        Stored tiles are decoded once and kept in a small LRU cache (``CHUNK_CACHE_BYTES``
        per level), so overlapping or unaligned reads do not decode the same tile again.
        """
        y0, y1 = max(0, y0), min(self._h, y1)
        x0, x1 = max(0, x0), min(self._w, x1)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        chunk = self._chunk_shape()
        if chunk is None:
            return self._read_direct(y0, y1, x0, x1)
        ch, cw = chunk
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                block = self._cached_chunk(cy, cx, ch, cw)
                by0, bx0 = cy * ch, cx * cw
                iy0, iy1 = max(y0, by0), min(y1, by0 + block.shape[0])
                ix0, ix1 = max(x0, bx0), min(x1, bx0 + block.shape[1])
                out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = block[
                    iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0
                ]
        return out

    def _read_direct(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            block = np.asarray(self.source[self._source_key(slice(y0, y1), slice(x0, x1))])
        except SlideReadError:
            raise
        except MemoryError as exc:
            raise SlideReadError(f"{self.where}: out of memory decoding a region") from exc
        except Exception as exc:
            raise SlideReadError(
                f"{self.where}: cannot decode image data ({one_line(exc, 120)})"
            ) from exc
        if (
            self.layout.channel_axis == "last"
            and block.ndim == 3
            and block.shape[-1] != self.layout.n_channels
        ):
            block = block[..., : self.layout.n_channels]
        return to_rgb8(block, self.layout)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (3 - (len(key) - 1))
            key = key[:i] + fill + key[i + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        if len(key) > 3:
            raise IndexError(f"too many indices for a (H, W, 3) level: {key!r}")
        squeeze = []
        windows = []
        post: list[Any] = []
        for axis, (k, n) in enumerate(zip(key[:2], (self._h, self._w), strict=True)):
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
                windows.append((i, i + 1))
                post.append(0)
                squeeze.append(axis)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    lo, hi = stop + 1, start + 1
                    windows.append((lo, max(lo, hi)))
                    post.append(slice(None, None, step))
                else:
                    windows.append((start, max(start, stop)))
                    post.append(slice(None, None, step))
            else:
                raise TypeError(f"LevelArray supports integer and slice indices, not {k!r}")
        (y0, y1), (x0, x1) = windows
        block = self.read(y0, y1, x0, x1)
        return block[tuple(post) + (key[2],)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        block = self.read(0, self._h, 0, self._w)
        return block if dtype is None else block.astype(dtype)
