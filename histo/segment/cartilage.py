"""Chondrocyte lacunae that a segmentation reads as holes in cartilage.

Cartilage (class 5) includes its lacunae (the class-map contract). A network often reads a
small lacuna of growth-plate or calcified cartilage as marrow, soft tissue or glass: a hole in
the cartilage, and since cartilage counts with bone (B.Ar, B.Pm), a bone surface where there is
none. Such a hole, small, walled by hard tissue and at least a quarter by cartilage, is given
back to the cartilage. Holes walled by bone alone are left alone (an empty osteocyte lacuna or
a canal is not cartilage), and so are the marrow spaces of the primary spongiosa, which are
larger.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import cv2
import numpy as np

from histo.classes import BACKGROUND, BONE, CARTILAGE, MARROW, OSTEOCYTE, SOFT_TISSUE

#: largest hole given back to the cartilage (µm², a 14-µm disc): a lacuna of resting or
#: proliferative cartilage is ~10 µm across, a hypertrophic one larger (Hunziker 1994, Microsc
#: Res Tech 28:505); the marrow spaces of the primary spongiosa are larger still
MAX_LACUNA_UM2 = 150.0
#: share of the hole's wall (its 8-connected rim) that must be cartilage, the rest being bone
#: or osteocytes: not a majority, as a network reads part of a thin calcified-cartilage core
#: around a lacuna as bone. A gap that an osteoclast walls is the resorption front's
MIN_CARTILAGE_WALL = 0.25
#: share of a column block's pixels that must be cartilage for its lacunae to be looked for:
#: a long bone's growth plate and spongiosa hold far more; the few specks a network reads on
#: a trabecular field (0.05 % of an 8192² field) hold no lacuna worth the labelling's memory
MIN_CARTILAGE_SHARE = 0.005
#: classes a lacuna is misread as
_HOLE_LUT = np.zeros(256, np.uint8)
_HOLE_LUT[[BACKGROUND, MARROW, SOFT_TISSUE]] = 1
_HARD_LUT = np.zeros(256, bool)
_HARD_LUT[[BONE, OSTEOCYTE, CARTILAGE]] = True


def rim_counts(
    labels: np.ndarray,
    radius_px: int,
    rim: np.ndarray,
    masks: tuple[np.ndarray | None, ...],
    n: int,
) -> list[np.ndarray]:
    """Per label (below ``n``), the pixels of ``rim`` within ``radius_px`` of it (Chebyshev)
    that lie in each of ``masks`` (None: every rim pixel), as ``np.bincount`` arrays.

    A rim pixel within reach of several labels counts for the largest; labels are dilated as
    float32, exact up to 2**24.
    """
    size = 2 * radius_px + 1
    square = np.ones((size, size), np.uint8)
    near = cv2.dilate(labels.astype(np.float32), square).astype(np.int32)
    rim = rim & (near > 0)
    return [np.bincount(near[rim if m is None else rim & m], minlength=n) for m in masks]


class CartilageHoles(NamedTuple):
    """Components of the hole classes of a window and which of them are lacunae to fill."""

    labels: np.ndarray  #: (h, w) int32 component labels (0: not a hole class)
    stats: np.ndarray  #: OpenCV stats per component (left, top, width, height, area)
    fill: np.ndarray  #: bool per component: a lacuna of the cartilage


def cartilage_holes(codes: np.ndarray, pixel_size_um: float) -> CartilageHoles | None:
    """The small holes of a class-code window that are walled mostly by cartilage.

    A hole is a component of glass, marrow or soft tissue (8-connected) of at most
    :data:`MAX_LACUNA_UM2`, not touching the window's edge (it may go on outside), whose rim
    is bone, osteocytes and cartilage, at least :data:`MIN_CARTILAGE_WALL` of it cartilage.
    None when there is nothing to fill, or when under :data:`MIN_CARTILAGE_SHARE` of the
    window is cartilage (then it costs one count of its pixels).
    """
    cartilage = codes == CARTILAGE
    if cv2.countNonZero(cartilage.view(np.uint8)) < MIN_CARTILAGE_SHARE * codes.size:
        return None
    hole_px = _HOLE_LUT[codes]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(hole_px, connectivity=8)
    h, w = codes.shape
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    inside = (left > 0) & (top > 0)
    inside &= (left + stats[:, cv2.CC_STAT_WIDTH] < w) & (top + stats[:, cv2.CC_STAT_HEIGHT] < h)
    small = inside & (stats[:, cv2.CC_STAT_AREA] * pixel_size_um**2 <= MAX_LACUNA_UM2)
    small[0] = False
    if not small.any():
        return None
    own = np.where(small[labels], labels, 0)
    n_rim, n_cartilage, n_hard = rim_counts(
        own, 1, hole_px == 0, (None, cartilage, _HARD_LUT[codes]), n
    )
    del own
    fill = small & (n_rim > 0) & (n_hard == n_rim) & (n_cartilage >= MIN_CARTILAGE_WALL * n_rim)
    return CartilageHoles(labels, stats, fill)


class LacunaFill(NamedTuple):
    """Pixels of a window's columns ``cols`` that are lacunae to give back to the cartilage."""

    cols: slice
    mask: np.ndarray  #: bool, (h, cols) of the window


def cartilage_lacunae(
    class_map: np.ndarray,
    pixel_size_um: float,
    rows: tuple[int, int],
    cols: tuple[int, int] | None = None,
    block_cols: int = 512,
    class_bits: int = 0xFF,
) -> Iterator[LacunaFill]:
    """The lacunae (:func:`cartilage_holes`) whose top row lies in ``rows`` and leftmost
    column in ``cols`` (default: all) of a class-map window, column block by column block.
    The class codes are the map's ``class_bits`` (the low bits of a packed map).

    Each block is looked at with the columns a lacuna can reach to its right, so a lacuna is
    judged whole and once (as on the whole window, where the block holds enough cartilage:
    :data:`MIN_CARTILAGE_SHARE`), in memory bounded by the block's width
    (labels and rims take ~20 bytes a pixel; this runs beside the network's forward pass).
    """
    h, w = class_map.shape
    a, b = cols if cols is not None else (0, w)
    reach = int(math.ceil(MAX_LACUNA_UM2 / pixel_size_um**2)) + 2
    for c0 in range(a, b, block_cols):
        c1 = min(b, c0 + block_cols)
        x0, x1 = max(0, c0 - 1), min(w, c1 + reach)
        codes = class_map[:, x0:x1]
        if class_bits != 0xFF:
            codes = codes & np.uint8(class_bits)
        holes = cartilage_holes(codes, pixel_size_um)
        if holes is None:
            continue
        top = holes.stats[:, cv2.CC_STAT_TOP]
        left = holes.stats[:, cv2.CC_STAT_LEFT] + x0
        mine = holes.fill & (top >= rows[0]) & (top < rows[1]) & (left >= c0) & (left < c1)
        if mine.any():
            yield LacunaFill(slice(x0, x1), mine[holes.labels])
