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

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo.classes import BACKGROUND, COLORS, NAMES
from histo.io.atomic import write_atomic
from histo.io.blocks import iter_blocks, read_2d, shape_2d

_GREY = (160, 160, 160)
#: block side (px) of :func:`write_label_geojson_by_blocks`: one window of labels in memory
GEOJSON_BLOCK_PX = 4096


def _color(name: str) -> list[int]:
    for code, cname in NAMES.items():
        if cname == name:
            return list(COLORS[code])
    return list(_GREY)


def _closed_ring_points(contour: np.ndarray) -> np.ndarray:
    """Points (x, y) of a cv2 contour, or the outline of its pixel squares when degenerate.

    A contour of fewer than three distinct points (a single pixel or a straight line one pixel
    wide) is replaced by the corners of the pixel squares it covers, shifted by -0.5 so that the
    centre convention of the other rings applies to it too.
    """
    pts = contour.reshape(-1, 2)
    if len(pts) >= 3:
        a, b, c = pts[:3].tolist()
        if a != b and b != c and a != c:
            return pts  # three distinct points: not degenerate (the common case)
    if len(np.unique(pts, axis=0)) >= 3:
        return pts
    # a line or a single pixel: the outline of its pixel squares
    x0, y0 = pts.min(axis=0).tolist()
    x1, y1 = (pts.max(axis=0) + 1).tolist()
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64) - 0.5


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

    Returns
    -------
    list
        One entry per outer contour: its rings (outer first, then its holes), each a closed
        list of [x, y] rounded to 3 decimals, with mask pixel (r, c) at
        ``((c + offset[1] + 0.5) * scale, (r + offset[0] + 0.5) * scale)``.
    """
    m = np.asarray(mask)
    m = m.view(np.uint8) if m.dtype == np.bool_ else (m != 0).view(np.uint8)
    contours, hierarchy = cv2.findContours(
        np.ascontiguousarray(m), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return []
    rings = _mask_rings(contours, hierarchy[0].tolist())
    pts = np.concatenate(rings.parts).astype(np.float64)
    pts += (float(offset[1]) + 0.5, float(offset[0]) + 0.5)
    if scale != 1.0:
        pts *= float(scale)
    return _nest_rings(np.round(pts, 3).tolist(), rings)


class _Rings(NamedTuple):
    """All rings of a mask, each followed by its first point (closing it), so that they can be
    scaled at once; ``rings_per_polygon`` counts an outer ring and its holes."""

    parts: list[np.ndarray]
    rings_per_polygon: list[int]


def _mask_rings(contours, links: list[list[int]]) -> _Rings:
    """The rings of ``cv2.findContours`` (``RETR_CCOMP``) polygon by polygon: each outer ring
    then its holes of at least 3 points (``links``: the hierarchy's rows)."""
    parts: list[np.ndarray] = []
    structure: list[int] = []
    for i, (_, _, child, parent) in enumerate(links):
        if parent != -1:
            continue  # a hole: added to its parent below
        n_rings = 1
        ring = _closed_ring_points(contours[i])
        parts += (ring, ring[:1])
        while child != -1:
            if len(contours[child]) >= 3:
                ring = _closed_ring_points(contours[child])
                parts += (ring, ring[:1])
                n_rings += 1
            child = links[child][0]
        structure.append(n_rings)
    return _Rings(parts, structure)


def _nest_rings(flat: list[list[float]], rings: _Rings) -> list[list[list[list[float]]]]:
    """Cut the points ``flat`` of all ``rings`` (closed, in order) back into polygons."""
    polygons = []
    k = at = 0
    for n_rings in rings.rings_per_polygon:
        polygon = []
        for _ in range(n_rings):
            n = len(rings.parts[k]) + 1
            polygon.append(flat[at : at + n])
            at += n
            k += 2
        polygons.append(polygon)
    return polygons


def _feature_json(
    polygons: list,
    name: str,
    value: int,
    area_um2: float,
    color: list[int],
    object_type: str,
) -> str:
    """The compact JSON text of one Feature, as ``json.dumps(feature, separators=(",", ":"))``
    writes the dicts of :func:`label_features` (same keys, same order, same numbers)."""
    if len(polygons) == 1:
        kind, coordinates = "Polygon", polygons[0]
    else:
        kind, coordinates = "MultiPolygon", polygons
    head, tail = _property_texts(name, tuple(color), object_type)
    return (
        f'{{"type":"Feature","geometry":{{"type":"{kind}","coordinates":{_dumps(coordinates)}}},'
        f'{head} {int(value)}{tail}{int(value)},"area_um2":{_dumps(float(area_um2))}}}}}}}'
    )


@functools.lru_cache(maxsize=64)
def _property_texts(name: str, color: tuple[int, ...], object_type: str) -> tuple[str, str]:
    """The JSON text of a Feature's properties around its label (the parts common to a class)."""
    quoted = _dumps(name)  # the name as a JSON string; "name label" is that with " label"
    head = f'"properties":{{"objectType":{_dumps(object_type)},"name":{quoted[:-1]}'
    tail = (
        f'","classification":{{"name":{quoted},"color":{_dumps(list(color))}}},'
        f'"measurements":{{"label":'
    )
    return head, tail


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _check_labels(label_image: np.ndarray) -> None:
    labels = np.asarray(label_image)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise ValueError(
            f"label image must be a 2-D integer array, got {labels.shape} {labels.dtype}"
        )


def _label_objects(
    label_image: np.ndarray, pixel_size_um: float, classification: str | None, scale: float
) -> Iterator[tuple[str, list[int], int, list, float]]:
    """(class name, colour, label, polygons, area in µm²) of each object, in label order."""
    labels = np.asarray(label_image)
    if classification is None:
        # a class map: each connected region of a class is one object of that class
        objects = []
        for code in np.unique(labels):
            if code == BACKGROUND:
                continue
            comp, n = ndi.label(labels == code)
            objects.append((NAMES.get(int(code), f"class {code}"), comp, n))
    else:
        comp = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)
        objects = [(classification, comp, int(comp.max()) if comp.size else 0)]
    pixel_area_um2 = float(pixel_size_um) ** 2
    for name, comp, n in objects:
        if n <= 0:
            continue
        color = _color(name)
        for value, sl in enumerate(ndi.find_objects(comp, max_label=n), start=1):
            if sl is None:
                continue
            crop = comp[sl] == value
            polygons = mask_polygons(crop, scale, (sl[0].start, sl[1].start))
            if polygons:
                area = float(np.count_nonzero(crop)) * pixel_area_um2
                yield name, color, value, polygons, area


def label_features(
    label_image: np.ndarray,
    pixel_size_um: float,
    classification: str | None,
    *,
    slide_pixel_size_um: float | None = None,
    object_type: str = "detection",
) -> list[dict[str, Any]]:
    """GeoJSON Features for the objects of a label image (see :func:`write_geojson`)."""
    scale = 1.0 if slide_pixel_size_um is None else float(pixel_size_um) / slide_pixel_size_um
    _check_labels(label_image)
    features = []
    for name, color, value, polygons, area in _label_objects(
        label_image, pixel_size_um, classification, scale
    ):
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
                    "measurements": {"label": value, "area_um2": area},
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
    scale = 1.0 if slide_pixel_size_um is None else float(pixel_size_um) / slide_pixel_size_um
    _check_labels(label_image)
    objects = _label_objects(label_image, pixel_size_um, classification, scale)
    features = (
        _feature_json(polygons, name, value, area, color, object_type)
        for name, color, value, polygons, area in objects
    )
    return _write_features(path, features)


def _write_features(path: str | os.PathLike, features: Iterator[str]) -> int:
    """Write a FeatureCollection of the JSON ``features`` to ``path`` atomically; their count."""
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "w") as fh:
            fh.write('{"type":"FeatureCollection","features":[')
            for feature in features:
                fh.write(("," if written else "") + feature)
                written += 1
            fh.write("]}")

    write_atomic(path, write)
    return written


# --------------------------------------------------------------------------- by blocks


def write_label_geojson_by_blocks(
    path: Any,
    label_image: Any,
    pixel_size_um: float,
    classification: str,
    *,
    slide_pixel_size_um: float | None = None,
    block_px: int = GEOJSON_BLOCK_PX,
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
    shape = shape_2d(label_image)
    scale = 1.0 if slide_pixel_size_um is None else float(pixel_size_um) / slide_pixel_size_um
    style = _BlockStyle(classification, _color(classification), scale, float(pixel_size_um) ** 2)
    # claimed by the block that owns them but not seen whole there (rare). An object is claimed
    # by one block only (the one whose core holds its first pixel; a window that cuts an
    # object above or left of it sees a false first pixel in its margin, never in its core),
    # so no set of the objects written is needed
    skipped: set[int] = set()

    def features() -> Iterator[str]:
        for b in iter_blocks(shape, block_px, margin_px):
            window = _window_objects(read_2d(label_image, *b.window))
            yield from _block_features(b, window, shape, style, skipped)
            del window  # one window in memory at a time

    n_written = _write_features(path, features())
    return n_written, len(skipped)


class _BlockStyle(NamedTuple):
    classification: str
    color: list[int]
    scale: float  #: label pixels -> level-0 pixels
    pixel_area_um2: float


def _block_features(
    b: Any, window: tuple, shape: tuple[int, int], style: _BlockStyle, skipped: set[int]
) -> Iterator[str]:
    """Features of the objects a block owns (first pixel in its core) and sees whole."""
    lab, ids, slices = window
    if not slices:
        return
    H, W = shape
    (cy, cx), (h, w) = b.core, lab.shape
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
        polygons = mask_polygons(crop, style.scale, (b.wy0 + rows.start, b.wx0 + cols.start))
        if polygons:
            area = float(np.count_nonzero(crop)) * style.pixel_area_um2
            yield _feature_json(
                polygons, style.classification, value, area, style.color, "detection"
            )


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
