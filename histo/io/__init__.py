"""Slide input (lazy pyramids with a pixel size), tissue detection and output writers.

Public surface::

    open_slide(path, pixel_size_um=None) -> Slide
    require_pixel_size(slide) -> float
    read_region(slide, y0_um, x0_um, h_px, w_px, pixel_size_um) -> (h, w, 3) uint8
    working_shape(slide, pixel_size_um) -> (h, w)
    iter_tiles(slide, pixel_size_um, tile_px, overlap_px, tissue=None) -> Iterator[Tile]
    detect_tissue(slide, pixel_size_um=16.0) -> TissueMask
    LabelsWriter, read_labels     OME-Zarr (NGFF) labels
    write_geojson                 QuPath-compatible outlines
"""

from histo.io.geojson import write_geojson
from histo.io.ome_zarr import LabelsWriter, read_labels
from histo.io.slide import (
    Slide,
    Tile,
    check_pixel_size,
    choose_level,
    iter_tiles,
    open_slide,
    read_region,
    read_thumbnail,
    read_tile,
    require_pixel_size,
    slide_from_array,
    slide_name,
    working_shape,
)
from histo.io.tissue import TissueMask, detect_tissue

__all__ = [
    "LabelsWriter",
    "Slide",
    "Tile",
    "TissueMask",
    "check_pixel_size",
    "choose_level",
    "detect_tissue",
    "iter_tiles",
    "open_slide",
    "read_labels",
    "read_region",
    "read_thumbnail",
    "read_tile",
    "require_pixel_size",
    "slide_from_array",
    "slide_name",
    "working_shape",
    "write_geojson",
]
