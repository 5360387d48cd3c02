"""A bounded sample of a slide at the working resolution of the checks."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from histo.io import Slide, TissueMask, read_region, read_thumbnail, require_pixel_size
from histo.io.tissue import tissue_mask_from_rgb

#: resolution the checks read at (µm/px, by the stated pixel size): fine enough for marrow
#: nuclei of 3 µm (a slide stated 2x too small) to span 6 pixels
WORKING_UM = 0.5
#: side of one sampled tile in pixels at WORKING_UM (256 µm: several trabeculae and marrow)
TILE_PX = 512
#: at most this many tiles are read (2 Mpx): bounded time and memory whatever the slide size
MAX_TILES = 8
#: a tile is sampled only where the tissue mask covers at least this fraction of it
MIN_TILE_TISSUE = 0.5
#: resolution of the tissue mask (µm/px): that of the analysis (histo.io.detect_tissue)
TISSUE_MASK_UM = 16.0
#: the glass is at least this share of the thumbnail for its colour to be the white point
MIN_GLASS_FRACTION = 0.01


@dataclass
class SlideSample:
    """Tiles read from tissue, and the slide's tissue mask.

    Attributes
    ----------
    tiles : list of ndarray
        (TILE_PX, TILE_PX, 3) uint8 RGB at ``pixel_size_um`` (smaller when the slide is),
        white-balanced so that the glass is 255 (optical density 0).
    pixel_size_um : float
        Pixel size of the tiles, µm/px (by the stated pixel size).
    tissue : TissueMask
        The whole slide's tissue mask at low resolution.
    """

    tiles: list[np.ndarray]
    pixel_size_um: float
    tissue: TissueMask
    white: np.ndarray


def slide_tissue(slide: Slide) -> tuple[TissueMask, np.ndarray]:
    """The slide's tissue mask as the analysis finds it, and the thumbnail it was made from.

    The same mask as :func:`histo.io.detect_tissue` (16 µm/px, specks under 0.02 mm²
    dropped): a small field's mask is coarse, but pale marrow and bone average into tissue at
    this resolution where finer masks lose them.
    """
    thumb = read_thumbnail(slide, TISSUE_MASK_UM)
    return tissue_mask_from_rgb(thumb, TISSUE_MASK_UM), thumb


def _white_point(thumb: np.ndarray, tissue: TissueMask) -> np.ndarray:
    """Colour of the glass (R, G, B): the median outside the tissue, else the brightest 1 %."""
    h = min(thumb.shape[0], tissue.mask.shape[0])
    w = min(thumb.shape[1], tissue.mask.shape[1])
    thumb = thumb[:h, :w]
    glass = thumb[~tissue.mask[:h, :w]]
    if len(glass) >= MIN_GLASS_FRACTION * tissue.mask.size and len(glass) > 0:
        white = np.median(glass, axis=0)
    else:
        white = np.percentile(thumb.reshape(-1, 3), 99, axis=0)
    return np.clip(white.astype(np.float32), 128.0, 255.0)


def _balance(tile: np.ndarray, white: np.ndarray) -> np.ndarray:
    """``tile`` scaled so that ``white`` becomes 255 (Beer-Lambert OD relative to the glass).

    Each channel's 256 values are scaled once (float32, as the whole tile would be) and the
    tile is looked up in that table.
    """
    values = np.arange(256, dtype=np.uint8)[:, None] * (255.0 / white)
    table = np.clip(values + 0.5, 0, 255).astype(np.uint8)
    tile = np.asarray(tile)
    if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
        return np.clip(tile * (255.0 / white) + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(tile), table.reshape(256, 1, 3))


def _tile_origins(tissue: TissueMask, tile_um: float, max_tiles: int) -> list[tuple[float, float]]:
    """Top-left corners (µm) of up to ``max_tiles`` tiles mostly on tissue, spread evenly."""
    mask, mps = tissue.mask, tissue.pixel_size_um
    h_um, w_um = mask.shape[0] * mps, mask.shape[1] * mps
    ny = max(1, int(h_um // tile_um))
    nx = max(1, int(w_um // tile_um))
    candidates = []
    for iy in range(ny):
        for ix in range(nx):
            y0, x0 = iy * tile_um, ix * tile_um
            ys = slice(int(y0 / mps), max(int((y0 + tile_um) / mps), int(y0 / mps) + 1))
            xs = slice(int(x0 / mps), max(int((x0 + tile_um) / mps), int(x0 / mps) + 1))
            cover = float(mask[ys, xs].mean()) if mask[ys, xs].size else 0.0
            if cover > 0:
                candidates.append((cover, y0, x0))
    if not candidates:
        return []
    mostly = [c for c in candidates if c[0] >= MIN_TILE_TISSUE]
    if mostly:
        candidates = mostly
    else:  # sparse tissue (a culture, a fragment): the best-covered tiles
        candidates = sorted(candidates, reverse=True)[:max_tiles]
    # evenly spaced picks over the raster order: spread over the section, deterministic
    picks = np.linspace(0, len(candidates) - 1, min(max_tiles, len(candidates))).round()
    return [candidates[int(k)][1:] for k in np.unique(picks)]


def sample_slide(
    slide: Slide,
    working_um: float = WORKING_UM,
    tile_px: int = TILE_PX,
    max_tiles: int = MAX_TILES,
    *,
    tissue: TissueMask | None = None,
    thumbnail: np.ndarray | None = None,
) -> SlideSample:
    """Read up to ``max_tiles`` tiles of tissue at ``working_um`` µm/px.

    Parameters
    ----------
    slide : Slide
        An opened slide with a pixel size (the stated one: the checks judge it).
    working_um : float
        Resolution of the tiles in µm/px.
    tile_px : int
        Tile side in pixels.
    max_tiles : int
        Upper bound on the tiles read, so time and memory do not grow with the slide.
    tissue : TissueMask, optional
        The slide's tissue mask when the caller has it (the analysis does); found with
        :func:`slide_tissue` otherwise.
    thumbnail : ndarray, optional
        The RGB thumbnail ``tissue`` was made from (its glass gives the white point); read
        at the mask's resolution when not given.

    Returns
    -------
    SlideSample
        No tiles when the slide holds no tissue.
    """
    ps0 = require_pixel_size(slide)
    if tissue is None:
        tissue, thumbnail = slide_tissue(slide)
    elif thumbnail is None:
        thumbnail = read_thumbnail(slide, tissue.pixel_size_um)
    white = _white_point(thumbnail, tissue)
    h_um, w_um = slide.shape[0] * ps0, slide.shape[1] * ps0
    tile_um = tile_px * working_um
    if h_um <= tile_um and w_um <= tile_um:  # a small field: read it whole
        origins = [(0.0, 0.0)] if not tissue.is_empty else []
        shape = (max(1, round(h_um / working_um)), max(1, round(w_um / working_um)))
    else:
        tile_um = min(tile_um, h_um, w_um)
        origins = _tile_origins(tissue, tile_um, max_tiles)
        side = max(1, round(tile_um / working_um))
        shape = (side, side)
    tiles = [
        _balance(read_region(slide, y0, x0, shape[0], shape[1], working_um), white)
        for y0, x0 in origins
    ]
    return SlideSample(tiles=tiles, pixel_size_um=float(working_um), tissue=tissue, white=white)
