"""Label stores: where a slide's label images live while it is analysed.

:class:`LabelsSink` is an array-like view of one label image of a
:class:`histo.io.ome_zarr.LabelsWriter` (segmentation writes into it, the measurement reads
from it); :func:`copy_labels` copies a label array into a writer band by band.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from histo.io.blocks import read_2d, shape_2d

__all__ = ["LabelsSink", "copy_labels"]


class LabelsSink:
    """Array-like view of one label image of a :class:`histo.io.ome_zarr.LabelsWriter`.

    ``sink[y0:y1] = rows`` (full-width row bands, as :func:`histo.segment.segment_slide`
    writes them) or ``sink[y0:y1, x0:x1] = tile`` goes through ``writer.write_tile`` (so the
    coarser levels are filled too); reading ``sink[ys, xs]`` reads the level-0 zarr array.

    Parameters
    ----------
    writer : LabelsWriter
        An open writer (its ``partial`` store holds the arrays until ``finalize``).
    name : str
        ``class_map``, ``osteoclasts`` or ``osteocytes``.
    """

    def __init__(self, writer: Any, name: str) -> None:
        import zarr

        self.writer = writer
        self.name = name
        self.array = zarr.open_array(str(writer.partial / "labels" / name / "0"), mode="r")
        self.shape = tuple(int(n) for n in self.array.shape)
        self.dtype = self.array.dtype
        self.ndim = 2
        self.block_px = writer.block_px  # writes aligned to it are never held nor read back

    @staticmethod
    def _origin(key: Any) -> tuple[int, int]:
        if not isinstance(key, tuple):
            key = (key,)
        starts = []
        for k in key[:2]:
            if not isinstance(k, slice) or k.step not in (None, 1):
                raise TypeError("LabelsSink supports writes of contiguous slices only")
            starts.append(int(k.start or 0))
        return (starts + [0])[0], (starts + [0, 0])[1]

    def __setitem__(self, key: Any, value: Any) -> None:
        y, x = self._origin(key)
        self.writer.write_tile(self.name, y, x, np.asarray(value))

    def __getitem__(self, key: Any) -> np.ndarray:
        self.writer.flush()  # rows the writer holds back until they fill a row of chunks
        return self.array[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        self.writer.flush()
        out = np.asarray(self.array[...])
        return out if dtype is None else out.astype(dtype)


def copy_labels(writer: Any, name: str, array: Any, band_px: int = 1024) -> None:
    """Copy a 2-D label array-like into ``writer`` (``write_tile``) band by band of rows."""
    h, w = shape_2d(array)
    for y in range(0, h, band_px):
        writer.write_tile(name, y, 0, read_2d(array, slice(y, min(y + band_px, h)), slice(0, w)))
