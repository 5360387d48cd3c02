"""Class maps and instance maps read from files, and regions of interest drawn on them.

Class maps: .tif/.tiff (tifffile), .png, .npy, .zarr (an array, or a labels.ome.zarr written by
``histo analyze``). Instance maps are found beside a class map by the synthetic naming
convention: ``NAME.classes.tif`` -> ``NAME.osteoclasts.tif`` and ``NAME.osteocytes.tif``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from histo.errors import ClassMapError, HistoError, SlideReadError
from histo.io._readers import _ome_physical_size, _tiff_resolution
from histo.io.roi import geojson_rings, polygons_mask

__all__ = ["ClassMapFile", "load_class_map", "read_label_image", "read_roi_mask", "slide_name_of"]

_CLASS_SUFFIX = ".classes"


def slide_name_of(path: Path) -> str:
    """Slide name of a class map: ``NAME.classes.tif`` -> ``NAME``; a labels.ome.zarr -> its
    folder's name; otherwise the file name without image suffixes."""
    if path.name.endswith(".ome.zarr") and path.name.startswith("labels"):
        return path.resolve().parent.name
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".npy", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(_CLASS_SUFFIX):
        name = name[: -len(_CLASS_SUFFIX)]
    return name


def _tiff_pixel_size(tf) -> float | None:
    if tf.is_ome and tf.ome_metadata:
        size, _ = _ome_physical_size(tf.ome_metadata, 0)
        if size is not None:
            return size
    if tf.is_imagej and tf.imagej_metadata:
        unit = str(tf.imagej_metadata.get("unit", "")).lower()
        page = tf.pages.first
        if unit in ("micron", "µm", "um", "\\u00b5m") and 282 in page.tags:
            num, den = page.tags.valueof(282)
            if num:
                return den / num
    return _tiff_resolution(tf.pages.first)


def read_label_image(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Read a class map or instance map: (2-D integer array, pixel size in µm or None)."""
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                array = tf.series[0].levels[0].asarray()
                pixel_size = _tiff_pixel_size(tf)
            return array, pixel_size
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if suffix == ".png":
            import cv2

            array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if array is None:
                raise SlideReadError(f"{path.name}: not a readable PNG")
            return array, None
        if suffix == ".zarr" or path.is_dir():
            import zarr

            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Array):
                return np.asarray(node[...]), None
            raise SlideReadError(f"{path.name}: a zarr group, not an array")
    except HistoError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlideReadError(f"{path.name}: cannot read ({reason[:160]})") from None
    raise SlideReadError(f"{path.name}: unsupported class map format {suffix or '(none)'}")


def _is_labels_store(path: Path) -> bool:
    return path.is_dir() and path.name.endswith(".ome.zarr")


class ClassMapFile(NamedTuple):
    """What a class map file holds: the maps and the pixel size its metadata gives."""

    class_map: np.ndarray
    osteoclasts: np.ndarray | None  #: instance labels found beside it, or None
    osteocytes: np.ndarray | None
    pixel_size_um: float | None  #: from the file's metadata, or None


def load_class_map(path: str | Path, *, instances: bool = True) -> ClassMapFile:
    """Class map, osteoclast and osteocyte instances (or None), and the file's pixel size."""
    path = Path(path)
    if _is_labels_store(path):
        from histo.io.ome_zarr import read_labels

        labels = read_labels(path)
        if "class_map" not in labels:
            raise SlideReadError(f"{path.name}: no 'class_map' label image")
        cmap, pixel_size = labels["class_map"]
        oc = labels.get("osteoclasts", (None, None))[0] if instances else None
        ot = labels.get("osteocytes", (None, None))[0] if instances else None
        return ClassMapFile(np.asarray(cmap), oc, ot, pixel_size)
    cmap, pixel_size = read_label_image(path)
    oc = ot = None
    if instances:
        name = path.name
        for suffix in (".tiff", ".tif", ".png", ".npy"):
            stem = f"{_CLASS_SUFFIX}{suffix}"
            if name.endswith(stem):
                base = name[: -len(stem)]
                oc_path = path.with_name(f"{base}.osteoclasts{suffix}")
                ot_path = path.with_name(f"{base}.osteocytes{suffix}")
                oc = read_label_image(oc_path)[0] if oc_path.exists() else None
                ot = read_label_image(ot_path)[0] if ot_path.exists() else None
                break
    return ClassMapFile(cmap, oc, ot, pixel_size)


def read_roi_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A region of interest as a mask of ``shape``: a mask image (non-zero = inside) or a
    GeoJSON file of polygons with holes in pixel coordinates (x, y) of the class map."""
    path = Path(path)
    if path.suffix.lower() in (".geojson", ".json"):
        polygons = tuple(tuple(rings) for rings in geojson_rings(path))
        return polygons_mask(polygons, shape)
    array, _ = read_label_image(path)
    if array.ndim == 3:
        array = array[..., 0]
    if array.shape != tuple(shape):
        raise ClassMapError(f"ROI mask {path.name} has shape {array.shape}, class map {shape}")
    return array != 0
