"""Whole-slide input: one lazy reader for many formats, regions at a physical resolution.

``open_slide`` understands a file by its content and metadata, not its name: pyramidal
OME-TIFF (levels as SubIFDs or as series levels), Aperio SVS, Hamamatsu NDPI, generic tiled or
strip TIFF, OME-Zarr (NGFF multiscales, zarr v2 and v3), and PNG/JPEG fields. Levels are lazy
(H, W, 3) uint8 RGB array-likes that read only the window they are indexed with, so a slide is
never loaded whole. ``read_region`` returns any region at any resolution (µm per pixel) from the
nearest pyramid level, and ``iter_tiles`` lays out the tiles of tiled inference.

Coordinates: (y, x) with the origin at the top-left corner of level 0; ``read_region`` takes
the origin in µm, tiles are in pixels of the working resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histo.errors import PixelSizeError, SlideReadError
from histo.io._levels import Layout, LevelArray, layout_from_axes
from histo.io._readers import Opened, open_raster, open_tiff, open_zarr, sniff
from histo.io.formats import strip_slide_suffix
from histo.units import MAX_PIXEL_SIZE_UM, check_pixel_size  # noqa: F401 (re-exported)

#: largest source window read in one piece by read_region (pixels); larger regions are read in
#: blocks so that memory stays bounded
MAX_WINDOW_PX = 4096 * 4096
#: relative tolerance when matching a pyramid level to a requested resolution
LEVEL_RTOL = 1e-3


@dataclass
class Slide:
    """A whole-slide image opened lazily.

    Attributes
    ----------
    path : Path
        The file (or OME-Zarr folder) read.
    name : str
        File name without its image suffixes (``a.ome.tif`` -> ``a``): names outputs.
    levels : list of LevelArray
        Lazy (H, W, 3) uint8 RGB array-likes, level 0 finest; indexing reads only that window.
    pixel_size_um : float or None
        Level-0 pixel size in µm per pixel (None when neither the file nor the caller gave one;
        see :func:`require_pixel_size`).
    level_pixel_sizes : list of float or None
        Pixel size of each level in µm per pixel (None entries when the scale is unknown).
    pixel_size_source : str or None
        Where ``pixel_size_um`` came from: 'argument', 'OME PhysicalSizeX', 'Aperio MPP',
        'NDPI resolution', 'TIFF resolution', 'NGFF scale', 'PNG density', 'JPEG density'.
    format : str
        'OME-TIFF', 'SVS', 'NDPI', 'TIFF', 'OME-Zarr', 'zarr', 'PNG', 'JPEG' or 'array'.
    pixel_size_problem : str or None
        Why a pixel size found in the file was rejected (implausible value), for messages.
    """

    path: Path
    name: str
    levels: list[LevelArray]
    pixel_size_um: float | None
    level_pixel_sizes: list[float | None]
    pixel_size_source: str | None
    format: str = ""
    pixel_size_problem: str | None = None
    _handle: Any = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Level-0 shape (height, width, 3) in pixels."""
        return self.levels[0].shape

    def close(self) -> None:
        """Close the underlying file (the levels cannot be read afterwards)."""
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "close"):
            handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slide_name(path: str | Path) -> str:
    """``path``'s file name without image suffixes (``S1.ome.tif`` -> ``S1``)."""
    return strip_slide_suffix(Path(path).name)


def open_slide(path: str | Path, pixel_size_um: float | None = None) -> Slide:
    """Open a whole-slide image or field lazily.

    Parameters
    ----------
    path : str or Path
        A TIFF-family file (OME-TIFF, SVS, NDPI, tiled or strip TIFF), an OME-Zarr folder, or
        a PNG/JPEG file. The format is recognised from the content, not the suffix.
    pixel_size_um : float, optional
        Level-0 pixel size in µm per pixel. Wins over the file's metadata.

    Returns
    -------
    Slide
        Lazy levels and the pixel size (``None`` if neither the file nor the argument gives
        one: call :func:`require_pixel_size` before measuring).

    Raises
    ------
    SlideReadError
        The file is missing, empty, not an image, truncated, uses an unsupported compression,
        or declares sizes it cannot hold. The message is one line.
    PixelSizeError
        ``pixel_size_um`` is not a plausible pixel size (<= 0, NaN, > 100 µm/px).
    """
    path = Path(path)
    given = None if pixel_size_um is None else check_pixel_size(pixel_size_um, "--pixel-size")
    kind = sniff(path)
    if kind == "tiff":
        opened = open_tiff(path)
    elif kind == "zarr":
        opened = open_zarr(path)
    else:
        opened = open_raster(path, kind)
    return _make_slide(path, slide_name(path), opened, given)


def slide_from_array(
    image: np.ndarray, pixel_size_um: float | None = None, name: str = "image"
) -> Slide:
    """Wrap an in-memory image (gray, RGB or RGBA, any integer or 0-1 float type) as a Slide.

    Parameters
    ----------
    image : ndarray
        (H, W), (H, W, 3) or (H, W, 4) array.
    pixel_size_um : float, optional
        Pixel size in µm per pixel.
    name : str
        Slide name used for outputs.
    """
    image = np.asarray(image)
    given = None if pixel_size_um is None else check_pixel_size(pixel_size_um, "argument")
    axes = {2: "YX", 3: "YXS"}.get(image.ndim)
    if axes is None:
        raise SlideReadError(f"{name}: array of shape {image.shape} is not an image")
    layout = layout_from_axes(axes, image.shape, image.dtype, None, name)
    if image.dtype != np.uint8 or layout != Layout():
        level = LevelArray(LevelArray(image, layout, name)[:, :], Layout(), name)
    else:
        level = LevelArray(image, layout, name)
    opened = Opened(levels=[level], fmt="array")
    return _make_slide(Path(name), name, opened, given)


def _make_slide(path: Path, name: str, opened: Opened, given: float | None) -> Slide:
    levels = opened.levels
    h0, w0 = levels[0].shape[:2]
    if h0 < 1 or w0 < 1:
        raise SlideReadError(f"{path.name}: image has zero size")
    problem = None
    if given is not None:
        ps, source = given, "argument"
    else:
        ps, source = opened.pixel_size_um, opened.pixel_size_source
        if ps is not None:
            try:
                ps = check_pixel_size(ps, f"{source} in {path.name}")
            except PixelSizeError as exc:
                problem, ps, source = str(exc), None, None
    return Slide(
        path=path,
        name=name,
        levels=levels,
        pixel_size_um=ps,
        level_pixel_sizes=_level_pixel_sizes(opened, ps, given),
        pixel_size_source=source,
        format=opened.fmt,
        pixel_size_problem=problem,
        _handle=opened.handle,
    )


def _level_pixel_sizes(opened: Opened, ps: float | None, given: float | None) -> list[float | None]:
    """µm/px of each pyramid level when level 0's is ``ps`` (None: unknown), ``given`` being
    the one asked for: the file's own level sizes are scaled to it."""
    levels, stated = opened.levels, opened.level_pixel_sizes_um
    if ps is None:
        return [None] * len(levels)
    if stated is not None:
        return list(stated) if given is None else [ps * s / stated[0] for s in stated]
    # level k's pixel size from its width relative to level 0 (square pixels)
    w0 = levels[0].shape[1]
    return [ps * w0 / lvl.shape[1] for lvl in levels]


def require_pixel_size(slide: Slide) -> float:
    """The slide's level-0 pixel size (µm/px), or PixelSizeError saying how to give one."""
    if slide.pixel_size_um is None:
        if slide.pixel_size_problem:
            raise PixelSizeError(f"{slide.pixel_size_problem}: pass --pixel-size UM")
        raise PixelSizeError(
            f"no pixel size in {slide.path.name} and none given: pass --pixel-size UM"
        )
    return slide.pixel_size_um


def choose_level(slide: Slide, pixel_size_um: float) -> int:
    """Index of the coarsest level at least as fine as ``pixel_size_um`` (else level 0)."""
    require_pixel_size(slide)
    best = 0
    for k, size in enumerate(slide.level_pixel_sizes):
        if size is not None and size <= pixel_size_um * (1 + LEVEL_RTOL):
            if size >= slide.level_pixel_sizes[best]:
                best = k
    return best


def working_shape(slide: Slide, pixel_size_um: float) -> tuple[int, int]:
    """(height, width) in pixels of the whole slide resampled to ``pixel_size_um`` µm/px."""
    ps0 = require_pixel_size(slide)
    ps = check_pixel_size(pixel_size_um, "requested resolution")
    h0, w0 = slide.shape[:2]
    return max(1, round(h0 * ps0 / ps)), max(1, round(w0 * ps0 / ps))


def _read_window(level: LevelArray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Rows y0:y1, columns x0:x1 of ``level``, white (255) where outside the level."""
    out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
    h, w = level.shape[:2]
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if cy1 > cy0 and cx1 > cx0:
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = level.read(cy0, cy1, cx0, cx1)
    return out


def read_region(
    slide: Slide, y0_um: float, x0_um: float, h_px: int, w_px: int, pixel_size_um: float
) -> np.ndarray:
    """Read a region at a given resolution.

    Parameters
    ----------
    slide : Slide
        An opened slide with a pixel size.
    y0_um, x0_um : float
        Top-left corner of the region in µm from the top-left corner of the slide.
    h_px, w_px : int
        Size of the returned region in pixels at ``pixel_size_um``.
    pixel_size_um : float
        Requested resolution in µm per pixel.

    Returns
    -------
    ndarray
        (h_px, w_px, 3) uint8 RGB. Parts outside the slide are white (255).

    Notes
    -----
    The region is read from the coarsest pyramid level at least as fine as requested (or the
    finest level) and resampled with ``cv2.resize``: INTER_AREA when downsampling, INTER_LINEAR
    when upsampling. The source window is rounded to whole pixels of that level, so a region
    is exact when its corners fall on level pixels (integer ratios, aligned origins) and off by
    at most half a source pixel otherwise. Large regions are read in blocks of at most
    ``MAX_WINDOW_PX`` source pixels.
    """
    ps = check_pixel_size(pixel_size_um, "requested resolution")
    h_px, w_px = int(h_px), int(w_px)
    if h_px < 1 or w_px < 1:
        raise ValueError(f"region size must be positive, got {h_px}x{w_px}")
    k = choose_level(slide, ps)
    level = slide.levels[k]
    size = slide.level_pixel_sizes[k]
    scale = ps / size  # level pixels per output pixel
    if (h_px * scale) * (w_px * scale) > MAX_WINDOW_PX and max(h_px, w_px) > 1:
        out = np.empty((h_px, w_px, 3), np.uint8)
        if h_px >= w_px:
            h1 = h_px // 2
            out[:h1] = read_region(slide, y0_um, x0_um, h1, w_px, ps)
            out[h1:] = read_region(slide, y0_um + h1 * ps, x0_um, h_px - h1, w_px, ps)
        else:
            w1 = w_px // 2
            out[:, :w1] = read_region(slide, y0_um, x0_um, h_px, w1, ps)
            out[:, w1:] = read_region(slide, y0_um, x0_um + w1 * ps, h_px, w_px - w1, ps)
        return out
    fy0, fx0 = y0_um / size, x0_um / size
    sy0, sx0 = math.floor(fy0 + 0.5), math.floor(fx0 + 0.5)
    sy1 = max(sy0 + 1, math.floor(fy0 + h_px * scale + 0.5))
    sx1 = max(sx0 + 1, math.floor(fx0 + w_px * scale + 0.5))
    window = _read_window(level, sy0, sy1, sx0, sx1)
    if window.shape[:2] == (h_px, w_px):
        return window
    shrink = window.shape[0] >= h_px and window.shape[1] >= w_px
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(window, (w_px, h_px), interpolation=interpolation)


def read_thumbnail(slide: Slide, pixel_size_um: float) -> np.ndarray:
    """The whole slide at ``pixel_size_um`` µm/px (bounded memory, see :func:`read_region`)."""
    h, w = working_shape(slide, pixel_size_um)
    return read_region(slide, 0.0, 0.0, h, w, pixel_size_um)


@dataclass(frozen=True)
class Tile:
    """One tile of tiled inference, in pixels of the working resolution.

    Attributes
    ----------
    row, col : int
        Position in the tile grid.
    y, x : int
        Top-left corner of the tile (may be negative or run past the slide: read as white).
    h, w : int
        Tile size (``tile_px``).
    core : tuple of slice
        (rows, cols) of the slide this tile owns, in working-resolution pixels: the cores of
        all tiles partition the slide, so each pixel (and each object, by its centre) belongs
        to exactly one tile. Overlaps are split at their middle.
    pixel_size_um : float
        The working resolution.
    """

    row: int
    col: int
    y: int
    x: int
    h: int
    w: int
    core: tuple[slice, slice]
    pixel_size_um: float

    @property
    def core_in_tile(self) -> tuple[slice, slice]:
        """``core`` relative to the tile's own top-left corner."""
        ys, xs = self.core
        return (
            slice(ys.start - self.y, ys.stop - self.y),
            slice(xs.start - self.x, xs.stop - self.x),
        )


def _tile_starts(n: int, tile_px: int, overlap_px: int) -> list[int]:
    if n <= tile_px:
        return [0]
    stride = tile_px - overlap_px
    starts = list(range(0, n - tile_px, stride)) + [n - tile_px]
    return starts


def _cores(starts: list[int], tile_px: int, n: int) -> list[slice]:
    bounds = [0]
    for prev, start in zip(starts[:-1], starts[1:], strict=True):
        bounds.append((start + prev + tile_px) // 2)
    bounds.append(n)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def iter_tiles(
    slide: Slide, pixel_size_um: float, tile_px: int, overlap_px: int, tissue: Any = None
) -> Iterator[Tile]:
    """Lay out overlapping tiles over the slide at a working resolution.

    Parameters
    ----------
    slide : Slide
        An opened slide with a pixel size.
    pixel_size_um : float
        Working resolution in µm per pixel.
    tile_px : int
        Tile side in pixels at the working resolution.
    overlap_px : int
        Overlap between neighbouring tiles in pixels (``0 <= overlap_px < tile_px``).
    tissue : TissueMask, optional
        If given, tiles whose core holds no tissue are skipped.

    Yields
    ------
    Tile
        Row by row. Tiles are ``tile_px`` square; the last row and column are shifted back to
        end at the slide's edge (unless the slide is smaller than a tile).
    """
    tile_px, overlap_px = int(tile_px), int(overlap_px)
    if tile_px < 1 or not 0 <= overlap_px < tile_px:
        raise ValueError(
            f"need tile_px >= 1 and 0 <= overlap_px < tile_px, got {tile_px}, {overlap_px}"
        )
    h, w = working_shape(slide, pixel_size_um)
    ys, xs = _tile_starts(h, tile_px, overlap_px), _tile_starts(w, tile_px, overlap_px)
    ycores, xcores = _cores(ys, tile_px, h), _cores(xs, tile_px, w)
    for row, (y, yc) in enumerate(zip(ys, ycores, strict=True)):
        for col, (x, xc) in enumerate(zip(xs, xcores, strict=True)):
            if tissue is not None and not _has_tissue(tissue, yc, xc, pixel_size_um):
                continue
            yield Tile(row, col, y, x, tile_px, tile_px, (yc, xc), float(pixel_size_um))


def _has_tissue(tissue: Any, ys: slice, xs: slice, pixel_size_um: float) -> bool:
    f = pixel_size_um / tissue.pixel_size_um
    mh, mw = tissue.mask.shape
    y0, y1 = math.floor(ys.start * f), math.ceil(ys.stop * f)
    x0, x1 = math.floor(xs.start * f), math.ceil(xs.stop * f)
    return bool(tissue.mask[max(0, y0) : min(mh, y1), max(0, x0) : min(mw, x1)].any())


def read_tile(slide: Slide, tile: Tile) -> np.ndarray:
    """The RGB pixels of ``tile`` ((tile.h, tile.w, 3) uint8, white outside the slide)."""
    ps = tile.pixel_size_um
    return read_region(slide, tile.y * ps, tile.x * ps, tile.h, tile.w, ps)
