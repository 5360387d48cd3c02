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
    import json
    import os
    from pathlib import Path

    from histo.io.geojson import label_features

    path = Path(path)
    shape = _shape2(label_image)
    H, W = shape
    n_written = 0
    written: set[int] = set()
    skipped: set[int] = set()  # claimed by a block that did not see them whole
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        for b in iter_blocks(shape, block_px, margin_px):
            lab = _read(label_image, *b.window).astype(np.int64)
            flat = np.flatnonzero(lab > 0)
            if flat.size == 0:
                continue
            vals = lab.ravel()[flat]
            ids, first, inverse = np.unique(vals, return_index=True, return_inverse=True)
            fr, fc = np.divmod(flat[first], lab.shape[1])
            cy, cx = b.core
            owned = (fr >= cy.start) & (fr < cy.stop) & (fc >= cx.start) & (fc < cx.stop)
            if not owned.any():
                continue
            compact = np.zeros(lab.shape, np.int32)
            compact.ravel()[flat] = inverse + 1
            slices = ndi.find_objects(compact, max_label=ids.size)
            keep = np.zeros(ids.size + 1, np.int64)
            for k, sl in enumerate(slices):
                if sl is None or not owned[k]:
                    continue
                edge = (
                    (sl[0].start == 0 and b.wy0 > 0)
                    or (sl[1].start == 0 and b.wx0 > 0)
                    or (sl[0].stop == lab.shape[0] and b.wy1 < H)
                    or (sl[1].stop == lab.shape[1] and b.wx1 < W)
                )
                if edge:
                    skipped.add(int(ids[k]))
                    continue
                keep[k + 1] = ids[k]
                written.add(int(ids[k]))
            # one call on the owned objects of the window, shifted back to map coordinates
            owned_lab = keep[compact]
            features = label_features(
                owned_lab, pixel_size_um, classification, slide_pixel_size_um=slide_pixel_size_um
            )
            scale = (
                1.0 if slide_pixel_size_um is None else float(pixel_size_um) / slide_pixel_size_um
            )
            for feat in features:
                _shift(feat["geometry"], b.wx0 * scale, b.wy0 * scale)
                fh.write(("," if n_written else "") + json.dumps(feat, separators=(",", ":")))
                n_written += 1
        fh.write("]}")
    os.replace(tmp, path)
    return n_written, len(skipped - written)


def _shift(geometry: dict, dx: float, dy: float) -> None:
    def ring(points: list) -> list:
        return [[round(x + dx, 3), round(y + dy, 3)] for x, y in points]

    if geometry["type"] == "Polygon":
        geometry["coordinates"] = [ring(r) for r in geometry["coordinates"]]
    else:
        geometry["coordinates"] = [[ring(r) for r in poly] for poly in geometry["coordinates"]]


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
        return self.array[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.array[...])
        return out if dtype is None else out.astype(dtype)


def copy_labels(writer: Any, name: str, array: Any, band_px: int = 1024) -> None:
    """Copy a 2-D label array-like into ``writer`` (``write_tile``) band by band of rows."""
    h, w = _shape2(array)
    for y in range(0, h, band_px):
        writer.write_tile(name, y, 0, _read(array, slice(y, min(y + band_px, h)), slice(0, w)))
