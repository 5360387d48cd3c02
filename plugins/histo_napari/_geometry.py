"""Where rasters lie in the viewer's world, and regions of interest drawn as shapes.

The pipeline works at the model's working resolution; the image layer is shown at its own
pixel size. A :class:`Placement` maps between the world (µm when the layer has a physical
scale) and pixels of a raster, and :func:`region_mask` turns every shape of a shapes layer
into a mask of such a raster, shapes drawn inside another one cutting holes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

UNIT = "micrometer"
UNIT_DIMENSION = "[length]"
#: shape types that enclose an area (lines and paths do not)
AREA_SHAPES = ("polygon", "rectangle", "ellipse")
#: vertices of the polygon that stands for an ellipse (sub-pixel up to ~4000 px radii)
ELLIPSE_VERTICES = 512


def layer_pixel_size_um(layer: Any) -> float | None:
    """Pixel size (µm/px) of a layer: from its metadata, else from its scale if in length units."""
    if layer is None:
        return None
    value = layer.metadata.get("pixel_size_um")
    if value:
        return float(value)
    try:
        unit = layer.units[-1]
        um = float((layer.scale[-1] * unit).to(UNIT).magnitude)
    except Exception:  # noqa: BLE001 - pixel, unitless or unknown units
        return None
    return um if um > 0 else None


@dataclass(frozen=True)
class Placement:
    """Where a raster lies in the world: pixel (i, j) is centred on ``(i, j) * scale + translate``.

    ``world_per_um`` is how many world units make a µm (1 when the image is scaled in µm);
    ``in_length_units`` says whether the world is in lengths at all (an image shown in
    pixels is not, even when its pixel size is known).
    """

    scale: tuple[float, float]
    translate: tuple[float, float]
    world_per_um: float = 1.0
    in_length_units: bool = True

    @property
    def units(self) -> tuple[str, str] | None:
        """Layer units: µm when the world is in µm, else napari's default (as the image)."""
        in_um = self.in_length_units and math.isclose(self.world_per_um, 1.0)
        return (UNIT, UNIT) if in_um else None

    def world_to_px(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) world (y, x) -> (N, 2) pixel coordinates of this raster (centres at integers)."""
        pts = np.asarray(points, float)[:, -2:]
        return (pts - np.asarray(self.translate)) / np.asarray(self.scale)

    @classmethod
    def of_layer(cls, layer: Any) -> Placement:
        """The placement of an existing layer (its last two axes)."""
        scale = tuple(float(s) for s in layer.scale[-2:])
        px = layer_pixel_size_um(layer)
        translate = tuple(float(t) for t in layer.translate[-2:])
        return cls(scale, translate, scale[-1] / px if px else 1.0, _has_length_units(layer))


def placement(image_layer: Any, source_px: float, working_px: float) -> Placement:
    """Placement of a raster at ``working_px`` µm/px over an image layer at ``source_px``.

    Pixel centres: working pixel j covers [j, j+1) * working_px µm from the slide's corner,
    whereas image pixel i is centred on i * scale; hence the half-pixel shift.
    """
    if image_layer is None:
        return Placement((working_px, working_px), (0.0, 0.0), 1.0)
    f = float(image_layer.scale[-1]) / source_px
    t0 = np.asarray(image_layer.translate[-2:], float)
    shift = (working_px - source_px) / 2 * f
    length = getattr(image_layer, "in_length_units", None)
    if length is None:
        length = _has_length_units(image_layer)
    return Placement((working_px * f,) * 2, tuple(float(t) for t in t0 + shift), f, length)


def _has_length_units(layer: Any) -> bool:
    """Whether a layer's world is in units of length (not napari's default pixels)."""
    try:
        return layer.units[-1].dimensionality == UNIT_DIMENSION
    except Exception:  # noqa: BLE001 - no or unknown units
        return False


def working_shape(level0_shape: Sequence[int], source_px: float, working_px: float) -> tuple:
    """(H, W) of a slide at the working resolution, rounded as the pipeline rounds it."""
    f = float(source_px) / float(working_px)
    return int(round(level0_shape[0] * f)), int(round(level0_shape[1] * f))


# --------------------------------------------------------------------------- regions


def _ellipse_polygon(corners: np.ndarray) -> np.ndarray:
    """The polygon of an ellipse given by the four corners of its (maybe rotated) box."""
    centre = corners.mean(axis=0)
    half_a = (corners[0] + corners[1]) / 2 - centre
    half_b = (corners[1] + corners[2]) / 2 - centre
    t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)[:, None]
    return centre + np.cos(t) * half_a + np.sin(t) * half_b


def region_polygons(shapes_layer: Any) -> list[np.ndarray]:
    """Every area shape of a shapes layer as an (N, 2) polygon of world (y, x) coordinates.

    Polygons and rectangles keep their vertices; ellipses become fine polygons; lines and
    paths enclose nothing and are left out.
    """
    if shapes_layer is None:
        return []
    polygons = []
    for data, kind in zip(shapes_layer.data, shapes_layer.shape_type, strict=True):
        if kind not in AREA_SHAPES or len(data) < 3:
            continue
        world = np.array([shapes_layer.data_to_world(v) for v in np.asarray(data, float)])
        world = world[:, -2:]
        polygons.append(_ellipse_polygon(world) if kind == "ellipse" else world)
    return polygons


def _area(polygon: np.ndarray) -> float:
    y, x = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def nesting_depths(polygons: Sequence[np.ndarray]) -> list[int]:
    """How many other polygons wholly enclose each polygon (odd depth: a hole)."""
    from skimage.measure import points_in_poly

    areas = [_area(p) for p in polygons]
    depths = []
    for i, inner in enumerate(polygons):
        depths.append(
            sum(
                1
                for j, outer in enumerate(polygons)
                if j != i and areas[j] > areas[i] and points_in_poly(inner, outer).all()
            )
        )
    return depths


def region_mask(polygons_px: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray | None:
    """Mask of ``shape`` covering the union of the polygons, minus the holes.

    Parameters
    ----------
    polygons_px
        (N, 2) polygons in pixel coordinates of the raster (row, column; centres at integers).
        A polygon wholly inside another cuts a hole in it; one inside a hole is an island
        again (even-odd by nesting depth). Overlapping polygons that do not nest add up.
    shape
        (H, W) of the raster.

    Returns
    -------
    ndarray of bool or None
        None when there is no polygon (the whole raster is the region).
    """
    from skimage.draw import polygon as fill_polygon

    if not polygons_px:
        return None
    mask = np.zeros(shape, bool)
    depths = nesting_depths(polygons_px)
    for depth, poly in sorted(zip(depths, polygons_px, strict=True), key=lambda dp: dp[0]):
        rr, cc = fill_polygon(poly[:, 0], poly[:, 1], shape)
        mask[rr, cc] = depth % 2 == 0
    return mask
