"""Outputs of huge label maps written block by block: GeoJSON outlines and OME-Zarr labels.

The streaming path of :func:`histo.pipeline.analyze_slide` writes its label images through
:class:`LabelsSink` (row bands or tiles into a :class:`histo.io.ome_zarr.LabelsWriter`) and its
QuPath outlines with :func:`write_label_geojson_by_blocks`, in memory bounded by one block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from histo.measure_blocks import DEFAULT_BLOCK_PX, _read, _shape2, iter_blocks

__all__ = ["LabelsSink", "copy_labels", "write_label_geojson_by_blocks"]


# --------------------------------------------------------------------------- GeoJSON


def write_label_geojson_by_blocks(
    path: Any,
    label_image: Any,
    pixel_size_um: float,
    classification: str,
    *,
    slide_pixel_size_um: float | None = None,
    block_px: int = DEFAULT_BLOCK_PX,
    margin_px: int = 256,
) -> tuple[int, int]:
    """GeoJSON outlines of the instances of a large label image, block by block.

    Each object is outlined by the block whose core holds its first pixel (raster order), from
    the block's window (core plus ``margin_px``). Objects that touch the window's edge (larger
    than the margin) are **skipped**: outlining them would need more than one window. Features
    are those of :func:`histo.io.geojson.label_features` (same properties), in block order.

    Parameters
    ----------
    path : str or Path
        Output ``.geojson`` file, written under a temporary name and renamed.
    label_image : array_like of int, shape (H, W)
        Instance labels (0 = none), numpy or zarr.
    pixel_size_um, classification, slide_pixel_size_um
        As for :func:`histo.io.geojson.write_geojson`.
    block_px, margin_px : int
        Block core side and window margin in pixels.

    Returns
    -------
    (int, int)
        Features written and objects skipped.
    """
    import os
    from pathlib import Path

    from histo.io.geojson import _color, _feature_json, mask_polygons

    path = Path(path)
    shape = _shape2(label_image)
    H, W = shape
    scale = 1.0 if slide_pixel_size_um is None else float(pixel_size_um) / slide_pixel_size_um
    pixel_area_um2 = float(pixel_size_um) ** 2
    color = _color(classification)
    n_written = 0
    # claimed by the block that owns them but not seen whole there (rare). An object is claimed
    # by one block only (the one whose core holds its first pixel; a window that cuts an
    # object above or left of it sees a false first pixel in its margin, never in its core),
    # so no set of the objects written is needed (~60 B an object: ~20 MB for the ~350,000
    # osteocytes of a 32768² slide)
    skipped: set[int] = set()
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        lab = None
        for b in iter_blocks(shape, block_px, margin_px):
            # the previous window is dropped before the next is read: one window in memory
            # (~85 MB of uint32 at the default 4096-px blocks), not two
            del lab
            lab, ids, slices = _window_objects(_read(label_image, *b.window))
            if not slices:
                continue
            (cy, cx), (h, w) = b.core, lab.shape
            chunk = []
            for k, sl in enumerate(slices):
                if sl is None:
                    continue
                rows, cols = sl
                if not cy.start <= rows.start < cy.stop:
                    continue  # the first pixel (raster order) is in the top row of the box
                code = k + 1  # its value in lab
                value = int(ids[k]) if ids is not None else code  # its label
                if not (cx.start <= cols.start and cols.stop <= cx.stop):
                    first = cols.start + int(np.argmax(lab[rows.start, cols] == code))
                    if not cx.start <= first < cx.stop:
                        continue  # owned by the block on the left or on the right
                if (
                    (rows.start == 0 and b.wy0 > 0)
                    or (cols.start == 0 and b.wx0 > 0)
                    or (rows.stop == h and b.wy1 < H)
                    or (cols.stop == w and b.wx1 < W)
                ):
                    skipped.add(value)  # touches the window's edge: maybe not seen whole
                    continue
                crop = lab[sl] == code
                polygons = mask_polygons(crop, scale, (b.wy0 + rows.start, b.wx0 + cols.start))
                if not polygons:
                    continue
                area = float(np.count_nonzero(crop)) * pixel_area_um2
                chunk.append(
                    _feature_json(polygons, classification, value, area, color, "detection")
                )
            if chunk:
                fh.write(("," if n_written else "") + ",".join(chunk))
                n_written += len(chunk)
        fh.write("]}")
    os.replace(tmp, path)
    return n_written, len(skipped)


def _window_objects(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list]:
    """A window of labels, and the bounding boxes of its objects (``ndimage.find_objects``).

    Returns ``(labels, ids, slices)``: ``slices[k]`` is the box of label ``ids[k]`` in
    ``labels``, or of label ``k + 1`` when ``ids`` is None (labels used as they are, when their
    values are small enough for a list indexed by value; otherwise they are renumbered
    1..n and ``ids`` holds the original values in increasing order). Values <= 0 are none.
    """
    if lab.dtype.kind not in "iu":
        lab = lab.astype(np.int64)
    if lab.size == 0:
        return lab, None, []
    if lab.dtype.kind == "i" and int(lab.min()) < 0:
        lab = np.where(lab > 0, lab, 0)
    top = int(lab.max())
    if top <= 0:
        return lab, None, []
    if top <= max(lab.size, 1 << 20):
        return lab, None, ndi.find_objects(lab, max_label=top)
    flat = np.flatnonzero(lab)
    ids, inverse = np.unique(lab.ravel()[flat], return_inverse=True)
    compact = np.zeros(lab.shape, np.int32 if ids.size < 2**31 else np.int64)
    compact.ravel()[flat] = inverse + 1
    return compact, ids, ndi.find_objects(compact, max_label=ids.size)


# --------------------------------------------------------------------------- streaming sink


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
    h, w = _shape2(array)
    for y in range(0, h, band_px):
        writer.write_tile(name, y, 0, _read(array, slice(y, min(y + band_px, h)), slice(0, w)))
