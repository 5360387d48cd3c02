"""Regions drawn as shapes become masks of known area; rasters line up with their image."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def square(y0: float, x0: float, side: float) -> np.ndarray:
    return np.array([[y0, x0], [y0, x0 + side], [y0 + side, x0 + side], [y0 + side, x0]])


def test_nested_shapes_cut_holes_and_islands_fill_them_again():
    from histo_napari._geometry import region_mask

    outer, hole, island = square(10, 10, 100), square(30, 30, 60), square(50, 50, 20)
    apart = square(150, 150, 30)  # neither nests nor overlaps: adds its area
    mask = region_mask([island, apart, outer, hole], (200, 200))
    expected = 100**2 - 60**2 + 20**2 + 30**2
    rim = 4 * (100 + 60 + 20 + 30)  # a pixel row along every edge may fall either way
    assert mask.sum() == pytest.approx(expected, abs=rim)
    assert mask[20, 20] and not mask[40, 40] and mask[60, 60] and mask[160, 160]
    assert region_mask([], (8, 8)) is None


def test_overlapping_shapes_add_up_as_a_union():
    from histo_napari._geometry import region_mask

    mask = region_mask([square(0, 0, 50), square(25, 25, 50)], (100, 100))
    assert mask.sum() == pytest.approx(2 * 50**2 - 25**2, abs=4 * 2 * 50)
    assert mask[30, 30]  # the overlap is inside, not a hole


def test_ellipses_rectangles_and_lines_of_a_shapes_layer():
    from histo_napari._geometry import region_mask, region_polygons
    from napari.layers import Shapes

    layer = Shapes(scale=(2.0, 2.0))  # world = 2 x data
    layer.add_ellipses(np.array([[100.0, 100.0], [40.0, 70.0]]))  # centre, radii (data)
    layer.add_rectangles(np.array([[10.0, 10.0], [30.0, 50.0]]))
    layer.add_lines(np.array([[0.0, 0.0], [90.0, 90.0]]))
    polygons = region_polygons(layer)
    assert len(polygons) == 2  # a line encloses nothing
    mask = region_mask(polygons, (400, 400))  # a raster of the world at 1 unit a pixel
    ellipse = math.pi * 80 * 140
    rectangle = 40 * 80
    rim = 2 * math.pi * 110 + 2 * (40 + 80)
    assert mask.sum() == pytest.approx(ellipse + rectangle, abs=rim)
    assert mask[200, 200] and mask[200, 330] and not mask[200, 350]


def test_working_raster_lies_over_its_image():
    from histo_napari._geometry import Placement, placement, working_shape

    image = Placement((0.5, 0.5), (10.0, 20.0))  # an image at 0.5 µm/px, shifted
    place = placement(image, 0.5, 1.0)
    assert working_shape((768, 1000), 0.5, 1.0) == (384, 500)
    # working pixel (0, 0) spans image pixels 0 and 1: its centre is half-way between them
    assert place.scale == (1.0, 1.0)
    assert place.world_to_px(np.array([[10.25, 20.25]])) == pytest.approx(np.zeros((1, 2)))
