"""GeoJSON outlines of labelled objects, in QuPath's conventions.

QuPath imports a GeoJSON ``FeatureCollection`` (File > Import objects, or drag and drop) whose
coordinates are in pixels of the full-resolution image (level 0), x to the right and y down,
with the pixel (0, 0) covering the square [0, 1) x [0, 1). Outlines here follow the centres of
the boundary pixels (cv2.findContours, shifted by half a pixel), scaled from the label image's
resolution to level 0: a point at label pixel (r, c) becomes
``((c + 0.5) * f, (r + 0.5) * f)`` with ``f = pixel_size_um / slide_pixel_size_um``.

Each object is a Feature with ``properties.objectType`` ('detection' for cells, 'annotation'
for regions) and ``properties.classification = {name, color}`` (color as [r, g, b]).
Instances with holes become Polygons with inner rings; instances in several pieces become
MultiPolygons.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo.classes import BACKGROUND, COLORS, NAMES
from histo.errors import OutputError

_GREY = (160, 160, 160)


def _color(name: str) -> list[int]:
    for code, cname in NAMES.items():
        if cname == name:
            return list(COLORS[code])
    return list(_GREY)


def _ring(points: np.ndarray, scale: float, offset: tuple[float, float]) -> list[list[float]]:
    """A closed ring of [x, y] in level-0 pixels from cv2 contour points (x, y) in the crop."""
    pts = points.reshape(-1, 2).astype(np.float64)
    if len(np.unique(pts, axis=0)) < 3:
        # a line or a single pixel: the outline of its pixel squares
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0) + 1.0
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) - 0.5
    pts[:, 0] = (pts[:, 0] + offset[1] + 0.5) * scale
    pts[:, 1] = (pts[:, 1] + offset[0] + 0.5) * scale
    ring = [[round(float(x), 3), round(float(y), 3)] for x, y in pts]
    ring.append(ring[0])
    return ring


def mask_polygons(
    mask: np.ndarray, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> list[list[list[list[float]]]]:
    """Polygons (outer ring then holes) of a binary mask, in level-0 pixel coordinates.

    Parameters
    ----------
    mask : ndarray of bool
        The object.
    scale : float
        Level-0 pixels per mask pixel.
    offset : (float, float)
        (row, col) of the mask's top-left pixel in the label image.
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue  # a hole: added to its parent below
        rings = [_ring(contour, scale, offset)]
        child = hierarchy[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(_ring(contours[child], scale, offset))
            child = hierarchy[child][0]
        polygons.append(rings)
    return polygons


def label_features(
    label_image: np.ndarray,
    pixel_size_um: float,
    classification: str | None,
    *,
    slide_pixel_size_um: float | None = None,
    object_type: str = "detection",
) -> list[dict[str, Any]]:
    """GeoJSON Features for the objects of a label image (see :func:`write_geojson`)."""
    labels = np.asarray(label_image)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise ValueError(
            f"label image must be a 2-D integer array, got {labels.shape} {labels.dtype}"
        )
    scale = 1.0 if slide_pixel_size_um is None else float(pixel_size_um) / slide_pixel_size_um
    if classification is None:
        # a class map: each connected region of a class is one object of that class
        objects = []
        for code in np.unique(labels):
            if code == BACKGROUND:
                continue
            comp, n = ndi.label(labels == code)
            objects.append((NAMES.get(int(code), f"class {code}"), comp, n))
    else:
        comp = labels.astype(np.int64, copy=False)
        objects = [(classification, comp, int(comp.max()) if comp.size else 0)]
    features = []
    for name, comp, n in objects:
        if n == 0:
            continue
        color = _color(name)
        slices = ndi.find_objects(comp)
        for value, sl in enumerate(slices, start=1):
            if sl is None:
                continue
            crop = comp[sl] == value
            polygons = mask_polygons(crop, scale, (sl[0].start, sl[1].start))
            if not polygons:
                continue
            geometry: dict[str, Any]
            if len(polygons) == 1:
                geometry = {"type": "Polygon", "coordinates": polygons[0]}
            else:
                geometry = {"type": "MultiPolygon", "coordinates": polygons}
            features.append(
                {
                    "type": "Feature",
                    "geometry": geometry,
                    "properties": {
                        "objectType": object_type,
                        "name": f"{name} {value}",
                        "classification": {"name": name, "color": color},
                        "measurements": {
                            "label": value,
                            "area_um2": float(crop.sum()) * float(pixel_size_um) ** 2,
                        },
                    },
                }
            )
    return features


def write_geojson(
    path: str | os.PathLike,
    label_image: np.ndarray,
    pixel_size_um: float,
    classification: str | None,
    *,
    slide_pixel_size_um: float | None = None,
    object_type: str = "detection",
) -> int:
    """Write the outlines of labelled objects as a QuPath-readable GeoJSON FeatureCollection.

    Parameters
    ----------
    path : str or Path
        Output file (``.geojson``), written atomically.
    label_image : ndarray
        2-D integer array: instance labels (0 = none) when ``classification`` is a name, or a
        class map (codes of :mod:`histo.classes`) when ``classification`` is None.
    pixel_size_um : float
        Pixel size of ``label_image`` in µm per pixel.
    classification : str or None
        Class name given to every instance (e.g. 'osteoclast'; the colour comes from
        :data:`histo.classes.COLORS` when the name is a class name), or None for a class map.
    slide_pixel_size_um : float, optional
        Level-0 pixel size of the slide in µm per pixel; coordinates are scaled to level-0
        pixels. If None, the label image's pixels are taken as level-0 pixels.
    object_type : {'detection', 'annotation'}
        QuPath object type: detections for cells, annotations for regions.

    Returns
    -------
    int
        Number of features written.
    """
    if object_type not in ("detection", "annotation"):
        raise ValueError(f"object_type must be 'detection' or 'annotation', not {object_type!r}")
    features = label_features(
        label_image,
        pixel_size_um,
        classification,
        slide_pixel_size_um=slide_pixel_size_um,
        object_type=object_type,
    )
    collection = {"type": "FeatureCollection", "features": features}
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".partial", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(collection, fh, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return len(features)
