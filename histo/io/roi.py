"""Regions of interest: polygons with holes in µm, read from GeoJSON or a mask image.

A :class:`Roi` is what :func:`histo.pipeline.analyze_slide` and :func:`histo.measure.measure`
take as a region drawn on a slide, independent of the resolution it is measured at.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo.errors import SlideReadError

__all__ = [
    "Roi",
    "geojson_polygons",
    "geojson_rings",
    "polygons_contain",
    "polygons_mask",
    "read_roi_geojson",
]

#: polygons with holes in pixels: each polygon its outer ring then its holes, (N, 2) (y, x)
Polygons = tuple[tuple[np.ndarray, ...], ...]


@dataclass(frozen=True)
class Roi:
    """Polygons with holes, vertices (y, x) in µm from the slide's top-left corner.

    Attributes
    ----------
    polygons : tuple of tuple of ndarray
        Each polygon is its outer ring followed by its holes, each ring an (N, 2) float array
        of (y, x) vertices in µm (N >= 3). A point is inside the region when it is inside an
        outer ring and in none of that polygon's holes.
    """

    polygons: tuple[tuple[np.ndarray, ...], ...]

    @classmethod
    def from_rings(cls, polygons: Sequence[Sequence[np.ndarray]]) -> Roi:
        """From polygons given as sequences of rings ((N, 2) of (y, x) µm, outer ring first)."""
        out = []
        for rings in polygons:
            arrays = tuple(np.asarray(r, float).reshape(-1, 2) for r in rings)
            if not arrays or len(arrays[0]) < 3:
                raise SlideReadError("ROI polygon needs an outer ring of at least 3 vertices")
            out.append(tuple(a for a in arrays if len(a) >= 3))
        if not out:
            raise SlideReadError("ROI has no polygon")
        return cls(tuple(out))

    def in_pixels(self, pixel_size_um: float) -> Polygons:
        """The polygons in pixels of ``pixel_size_um`` (pixel centres at integer coordinates)."""
        return tuple(tuple(ring / pixel_size_um for ring in rings) for rings in self.polygons)


def geojson_polygons(data: object) -> Iterator[list]:
    """The Polygon and MultiPolygon coordinate lists of a GeoJSON object, in document order."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        for feature in data.get("features", []):
            yield from geojson_polygons(feature)
    elif kind == "Feature":
        yield from geojson_polygons(data.get("geometry") or {})
    elif kind == "GeometryCollection":
        for geometry in data.get("geometries", []):
            yield from geojson_polygons(geometry)
    elif kind == "Polygon":
        yield data["coordinates"]
    elif kind == "MultiPolygon":
        yield from data["coordinates"]


def read_roi_geojson(path: str | os.PathLike, pixel_size_um: float = 1.0) -> Roi:
    """A GeoJSON region (Polygon, MultiPolygon, in features or collections) as a :class:`Roi`.

    Parameters
    ----------
    path : path-like
        GeoJSON file whose coordinates are (x, y) in pixels (QuPath's convention: level-0
        pixels of the slide, as histo's own outlines).
    pixel_size_um : float
        µm per pixel of those coordinates.

    Raises
    ------
    SlideReadError
        Not readable JSON, or no polygon in it.
    """
    polygons = geojson_rings(path)
    return Roi.from_rings([[ring * pixel_size_um for ring in rings] for rings in polygons])


def geojson_rings(path: str | os.PathLike) -> list[list[np.ndarray]]:
    """The polygons of a GeoJSON file as lists of rings, (N, 2) arrays of (y, x) as given in
    the file's (x, y) coordinates; SlideReadError if it holds none or is not JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SlideReadError(f"ROI {path.name}: not valid GeoJSON ({exc})") from None
    polygons = [
        [np.asarray(ring, float)[:, 1::-1] for ring in rings] for rings in geojson_polygons(data)
    ]
    if not polygons:
        raise SlideReadError(f"ROI {path.name}: no Polygon or MultiPolygon in the GeoJSON")
    return polygons


def polygons_mask(polygons: Polygons, shape: tuple[int, int], origin=(0, 0)) -> np.ndarray:
    """Boolean mask of ``shape`` whose pixel (i, j) is ``origin + (i, j)`` of the polygons'
    pixel grid: inside an outer ring and in none of its polygon's holes (pixel centres at
    integer coordinates, as ``skimage.draw.polygon2mask``)."""
    from skimage.draw import polygon2mask

    offset = np.array(origin, float)
    out = np.zeros(shape, bool)
    for outer, *holes in polygons:
        inside = polygon2mask(shape, outer - offset)
        for hole in holes:
            inside &= ~polygon2mask(shape, hole - offset)
        out |= inside
    return out


def polygons_contain(polygons: Polygons, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Whether the pixels (yy, xx) lie in the polygons (the test of :func:`polygons_mask`)."""
    from skimage.measure import points_in_poly

    points = np.stack([yy, xx], axis=1).astype(float)
    out = np.zeros(np.shape(yy), bool)
    for outer, *holes in polygons:
        inside = points_in_poly(points, outer)
        for hole in holes:
            inside &= ~points_in_poly(points, hole)
        out |= inside
    return out
