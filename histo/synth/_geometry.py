"""Geometry of one synthetic section field: tissue, bone, cells, with exact ground truth.

All sizes are drawn in micrometres and converted with the field's pixel size, so one seed gives
the same anatomy at any pixel size (up to sampling). Bone is the zero level set of a smooth signed
field (positive inside, roughly in µm), which gives a sub-pixel bone perimeter for the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage as ndi

PHENOTYPES = ("normal", "oc-rich", "oc-poor")


@dataclass
class PhenotypeParams:
    """Ranges sampled per slide for one phenotype (µm, fractions, per mm)."""

    bv_tv: tuple[float, float]  #: target bone fraction of tissue
    oc_per_mm: tuple[float, float]  #: osteoclasts per mm of bone perimeter
    oc_length_um: tuple[float, float]  #: osteoclast length along the surface
    oc_nuclei: tuple[int, int]  #: nuclei per osteoclast (inclusive)
    pit_depth_um: tuple[float, float]  #: Howship's lacuna depth under an osteoclast
    empty_pits_per_mm: tuple[float, float]  #: eroded surface left without an osteoclast
    trap_mono_per_mm2: tuple[float, float]  #: mononuclear TRAP+ precursors in marrow
    adipocyte_fraction: tuple[float, float]  #: marrow fraction of adipocyte ghosts
    cortex_um: tuple[float, float]  #: cortical thickness
    trab_scale_um: tuple[float, float]  #: spatial scale of the trabecular network


#: each parameter's range in normal, oc-rich and oc-poor fields; the osteoclasts of oc-rich
#: fields are there but do not resorb (shallow pits)
_RANGES_BY_PHENOTYPE = {
    "bv_tv": ((0.11, 0.22), (0.42, 0.68), (0.42, 0.68)),
    "oc_per_mm": ((1.5, 4.5), (8.0, 15.0), (0.0, 0.0)),
    "oc_length_um": ((20.0, 50.0), (30.0, 70.0), (30.0, 60.0)),
    "oc_nuclei": ((2, 5), (4, 12), (2, 4)),
    "pit_depth_um": ((3.0, 7.0), (0.0, 1.5), (0.0, 0.0)),
    "empty_pits_per_mm": ((0.5, 2.0), (0.0, 0.2), (0.0, 0.0)),
    "trap_mono_per_mm2": ((5.0, 25.0), (10.0, 40.0), (0.0, 4.0)),
    "adipocyte_fraction": ((0.05, 0.20), (0.0, 0.06), (0.0, 0.06)),
    "cortex_um": ((50.0, 110.0), (90.0, 180.0), (90.0, 180.0)),
    "trab_scale_um": ((140.0, 220.0), (60.0, 100.0), (60.0, 100.0)),
}
PHENOTYPE_PARAMS = {
    phenotype: PhenotypeParams(**{name: r[k] for name, r in _RANGES_BY_PHENOTYPE.items()})
    for k, phenotype in enumerate(PHENOTYPES)
}


@dataclass
class Ellipse:
    """An ellipse in pixel coordinates: centre (y, x), semi-axes (a along angle, b across)."""

    cy: float
    cx: float
    a: float
    b: float
    angle: float  # radians, direction of the a axis (dy, dx) = (sin, cos)

    def bbox(self, shape: tuple[int, int], pad: int = 1) -> tuple[slice, slice]:
        r = max(self.a, self.b) + pad
        y0 = max(int(np.floor(self.cy - r)), 0)
        y1 = min(int(np.ceil(self.cy + r)) + 1, shape[0])
        x0 = max(int(np.floor(self.cx - r)), 0)
        x1 = min(int(np.ceil(self.cx + r)) + 1, shape[1])
        return slice(y0, y1), slice(x0, x1)

    def axes(self, sl: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) of the pixel centres of ``sl``: px from the centre along the ``a`` axis and
        across it."""
        yy, xx = np.mgrid[sl[0], sl[1]].astype(np.float32)
        dy, dx = yy - self.cy, xx - self.cx
        c, s = np.cos(self.angle), np.sin(self.angle)
        return dx * c + dy * s, -dx * s + dy * c

    def level(self, sl: tuple[slice, slice]) -> np.ndarray:
        """Normalised radius (1 on the outline) over the pixel centres of ``sl``."""
        u, v = self.axes(sl)
        return np.sqrt((u / max(self.a, 0.3)) ** 2 + (v / max(self.b, 0.3)) ** 2)


@dataclass
class CellLayers:
    """Rendering layers (float32 densities) that the cells and soft tissues paint into."""

    nuclei: np.ndarray  #: nuclear density (0..1+)
    cytoplasm: np.ndarray  #: generic cytoplasm / soft tissue density
    trap: np.ndarray  #: TRAP reaction product density
    rbc: np.ndarray  #: red blood cells
    lumen: np.ndarray  #: 0..1, where tissue is empty (adipocytes, sinusoids, lacunae)

    @classmethod
    def zeros(cls, shape: tuple[int, int]) -> CellLayers:
        return cls(*(np.zeros(shape, np.float32) for _ in range(5)))


@dataclass
class Field:
    """Ground-truth geometry of one field, in pixels at ``pixel_size_um``."""

    shape: tuple[int, int]
    pixel_size_um: float
    phenotype: str
    tissue: np.ndarray  # bool
    bone_sdf: np.ndarray  # float32, µm, > 0 inside bone
    depth_um: np.ndarray  # float32, distance into tissue from its edge
    class_map: np.ndarray  # uint8
    osteoclast_labels: np.ndarray  # int32
    osteocyte_labels: np.ndarray  # int32
    occupied: dict[int, bool]
    pit_mask: np.ndarray  # bool, Howship's lacunae (eroded surface) in bone coordinates
    # cell and texture layers used by the renderer
    nuclei: np.ndarray  # float32 nuclear density (0..1+)
    cytoplasm: np.ndarray  # float32 generic cytoplasm / soft tissue density
    trap: np.ndarray  # float32 TRAP reaction product density
    rbc: np.ndarray  # float32 red blood cells
    lumen: np.ndarray  # float32 0..1, where tissue is empty (adipocytes, sinusoids, lacunae)
    params: dict = field(default_factory=dict)
    #: float32 cartilage matrix density (long-bone sections; None in fields)
    cartilage: np.ndarray | None = None


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], pixel_size_um: float, scale_um: float
) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``scale_um``.

    Drawn on a coarse grid (a quarter of the scale) and upsampled bicubically, so the cost does
    not grow with the scale and the field is smooth at the pixel level.
    """
    h, w = shape
    coarse_um = max(scale_um / 4.0, pixel_size_um)
    ch = int(np.ceil(h * pixel_size_um / coarse_um)) + 8
    cw = int(np.ceil(w * pixel_size_um / coarse_um)) + 8
    n = rng.standard_normal((ch, cw)).astype(np.float32)
    n = ndi.gaussian_filter(n, scale_um / coarse_um, mode="wrap")
    n /= n.std() + 1e-12
    # map pixel centres to coarse coordinates (offset 4 cells of margin)
    ys = (np.arange(h, dtype=np.float32) + 0.5) * pixel_size_um / coarse_um + 4.0 - 0.5
    xs = (np.arange(w, dtype=np.float32) + 0.5) * pixel_size_um / coarse_um + 4.0 - 0.5
    map_x, map_y = np.meshgrid(xs, ys)
    return cv2.remap(n, map_x, map_y, interpolation=cv2.INTER_CUBIC)


def _unit_gradient_sdf(f: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Turn a smooth level function into an approximate signed distance in µm."""
    gy, gx = np.gradient(f)
    g = np.sqrt(gx * gx + gy * gy) / pixel_size_um
    return f / np.maximum(g, 1e-3)


def _draw_ellipse(target: np.ndarray, e: Ellipse, value, soft: bool = False) -> None:
    sl = e.bbox(target.shape)
    if sl[0].stop <= sl[0].start or sl[1].stop <= sl[1].start:
        return
    lv = e.level(sl)
    if soft:
        # soft edge over ~1 px for rendering layers
        alpha = np.clip((1.0 - lv) * max(e.b, 1.0) + 0.5, 0.0, 1.0)
        np.maximum(target[sl], alpha * value, out=target[sl])
    else:
        target[sl][lv <= 1.0] = value


def _contour_samples(mask: np.ndarray, step_px: float, rng) -> np.ndarray:
    """Points (y, x) spaced ~step_px along the boundary pixels of ``mask`` (on the inside)."""
    er = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    edge = np.argwhere(mask & (er == 0))
    if len(edge) == 0:
        return edge.reshape(0, 2)
    keep = rng.random(len(edge)) < min(1.0, 1.0 / max(step_px, 1e-3))
    return edge[keep]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (one cell is one region)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
