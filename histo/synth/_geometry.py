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

from histo import classes

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


PHENOTYPE_PARAMS = {
    "normal": PhenotypeParams(
        bv_tv=(0.11, 0.22),
        oc_per_mm=(1.5, 4.5),
        oc_length_um=(20.0, 50.0),
        oc_nuclei=(2, 5),
        pit_depth_um=(3.0, 7.0),
        empty_pits_per_mm=(0.5, 2.0),
        trap_mono_per_mm2=(5.0, 25.0),
        adipocyte_fraction=(0.05, 0.20),
        cortex_um=(50.0, 110.0),
        trab_scale_um=(140.0, 220.0),
    ),
    "oc-rich": PhenotypeParams(
        bv_tv=(0.42, 0.68),
        oc_per_mm=(8.0, 15.0),
        oc_length_um=(30.0, 70.0),
        oc_nuclei=(4, 12),
        pit_depth_um=(0.0, 1.5),  # osteoclasts present but not resorbing
        empty_pits_per_mm=(0.0, 0.2),
        trap_mono_per_mm2=(10.0, 40.0),
        adipocyte_fraction=(0.0, 0.06),
        cortex_um=(90.0, 180.0),
        trab_scale_um=(60.0, 100.0),
    ),
    "oc-poor": PhenotypeParams(
        bv_tv=(0.42, 0.68),
        oc_per_mm=(0.0, 0.0),
        oc_length_um=(30.0, 60.0),
        oc_nuclei=(2, 4),
        pit_depth_um=(0.0, 0.0),
        empty_pits_per_mm=(0.0, 0.0),
        trap_mono_per_mm2=(0.0, 4.0),
        adipocyte_fraction=(0.0, 0.06),
        cortex_um=(90.0, 180.0),
        trab_scale_um=(60.0, 100.0),
    ),
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

    def level(self, sl: tuple[slice, slice]) -> np.ndarray:
        """Normalised radius (1 on the outline) over the pixel centres of ``sl``."""
        yy, xx = np.mgrid[sl[0], sl[1]].astype(np.float32)
        dy, dx = yy - self.cy, xx - self.cx
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = dx * c + dy * s
        v = -dx * s + dy * c
        return np.sqrt((u / max(self.a, 0.3)) ** 2 + (v / max(self.b, 0.3)) ** 2)


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


def _tissue(rng, shape, p):
    """A rounded section outline with a glass margin; returns (tissue mask, depth µm)."""
    h, w = shape
    yy = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    xx = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    ry = rng.uniform(0.78, 0.9)
    rx = rng.uniform(0.78, 0.9)
    n = rng.uniform(3.0, 6.0)  # superellipse exponent: rounded rectangle
    r = (np.abs(yy[:, None] / ry) ** n + np.abs(xx[None, :] / rx) ** n) ** (1.0 / n)
    wobble = smooth_noise(rng, shape, p, scale_um=max(h, w) * p / 6) * 0.03
    tissue = (r + wobble) < 1.0
    depth = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 5) * p
    return tissue, depth.astype(np.float32)


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


def build_field(
    phenotype: str,
    shape: tuple[int, int],
    pixel_size_um: float,
    rng: np.random.Generator,
    overrides: dict | None = None,
) -> Field:
    """Draw the anatomy of one field with its exact class map and instances."""
    if phenotype not in PHENOTYPE_PARAMS:
        raise ValueError(f"unknown phenotype {phenotype!r}; choose one of {PHENOTYPES}")
    pp = PHENOTYPE_PARAMS[phenotype]
    p = float(pixel_size_um)
    h, w = shape
    um = 1.0 / p  # pixels per µm
    ov = overrides or {}

    def pick(name, rng_range):
        return ov.get(name, float(rng.uniform(*rng_range)))

    params = {
        "phenotype": phenotype,
        "bv_tv_target": pick("bv_tv", pp.bv_tv),
        "oc_per_mm": pick("oc_per_mm", pp.oc_per_mm),
        "cortex_um": pick("cortex_um", pp.cortex_um),
        "trab_scale_um": pick("trab_scale_um", pp.trab_scale_um),
        "adipocyte_fraction": pick("adipocyte_fraction", pp.adipocyte_fraction),
        "trap_mono_per_mm2": pick("trap_mono_per_mm2", pp.trap_mono_per_mm2),
        "empty_pits_per_mm": pick("empty_pits_per_mm", pp.empty_pits_per_mm),
        "empty_lacuna_fraction": ov.get("empty_lacuna_fraction", float(rng.uniform(0.03, 0.15))),
        "osteocyte_spacing_um": ov.get("osteocyte_spacing_um", float(rng.uniform(20.0, 30.0))),
    }

    tissue, depth = _tissue(rng, shape, p)
    periost_um = rng.uniform(8.0, 25.0)

    # --- bone: cortex ring + trabecular network (|noise| < t), as a signed field in µm
    # the cortex may take at most 40% of the bone: thin it on small fields
    tissue_area_um2 = tissue.sum() * p * p
    tissue_perimeter_um = 2.0 * (h + w) * p * 0.85
    cap = 0.4 * params["bv_tv_target"] * tissue_area_um2 / tissue_perimeter_um
    params["cortex_um"] = float(min(params["cortex_um"], max(cap, 8.0)))
    cortex_var = smooth_noise(rng, shape, p, 150.0) * 0.25 + 1.0
    cortex_th = params["cortex_um"] * cortex_var
    cortex_sdf = np.minimum(depth - periost_um, periost_um + cortex_th - depth)

    noise = smooth_noise(rng, shape, p, params["trab_scale_um"])
    # a second, coarser field modulates density so that trabeculae cluster and thin out
    density = smooth_noise(rng, shape, p, params["trab_scale_um"] * 5) * 0.25
    medulla = depth > periost_um + cortex_th
    total_tissue = tissue.sum()
    cortex_area = (tissue & (cortex_sdf > 0)).sum()
    need = params["bv_tv_target"] * total_tissue - cortex_area
    frac = float(np.clip(need / max(medulla.sum(), 1), 0.02, 0.95))
    level = np.abs(noise) - density
    t = float(np.quantile(level[medulla], frac)) if medulla.any() else 0.0
    trab_sdf = _unit_gradient_sdf(t - level, p)
    trab_sdf = np.minimum(trab_sdf, depth - periost_um)  # trabeculae stay inside the periosteum
    bone_sdf = np.maximum(cortex_sdf, trab_sdf).astype(np.float32)
    bone_sdf[~tissue] = np.minimum(bone_sdf[~tissue], -1.0)

    bone0 = bone_sdf > 0

    # --- osteoclasts on bone surfaces, with Howship's lacunae (pits)
    pit_mask = np.zeros(shape, bool)
    oc_labels = np.zeros(shape, np.int32)
    oc_keepout = np.zeros(shape, bool)
    gy, gx = np.gradient(bone_sdf)
    approx_bpm_mm = (
        (bone0 ^ cv2.erode(bone0.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)).sum()
        * p
        / 1000.0
        / 1.12
    )
    n_oc_target = rng.poisson(params["oc_per_mm"] * approx_bpm_mm) if params["oc_per_mm"] > 0 else 0
    surface = _contour_samples(bone0, 1.0, rng)
    # only surfaces facing marrow deep enough in the tissue
    if len(surface):
        ok = depth[surface[:, 0], surface[:, 1]] > periost_um + 15.0
        surface = surface[ok]
    rng.shuffle(surface)
    nuclei = np.zeros(shape, np.float32)
    trap = np.zeros(shape, np.float32)
    cytoplasm = np.zeros(shape, np.float32)
    rbc = np.zeros(shape, np.float32)
    lumen = np.zeros(shape, np.float32)
    oc_params = []
    n_oc = 0
    tries = 0
    si = 0
    while n_oc < n_oc_target and si < len(surface) and tries < n_oc_target * 60:
        tries += 1
        y, x = surface[si]
        si += 1
        if oc_keepout[y, x]:
            continue
        ny, nx = -gy[y, x], -gx[y, x]  # outward normal (into marrow)
        nn = np.hypot(ny, nx)
        if nn < 1e-6:
            continue
        ny, nx = ny / nn, nx / nn
        ang_t = np.arctan2(nx, -ny)  # tangent direction (dy, dx) = (sin, cos) -> perpendicular
        length = rng.uniform(*pp.oc_length_um) * um
        thick = rng.uniform(8.0, 16.0) * um
        pit_d = rng.uniform(*pp.pit_depth_um) * um
        # pit: an ellipse centred on the surface, flattened along the surface
        pit = Ellipse(y - ny * 0.0, x - nx * 0.0, length * 0.5, max(pit_d, 0.0), ang_t)
        # the cell: 2-4 overlapping ellipses along the tangent, on the marrow side
        parts = []
        k = int(rng.integers(2, 5))
        for j in range(k):
            off = (j - (k - 1) / 2) * length / (k + 0.5) + rng.normal(0, length * 0.05)
            ty, tx = np.sin(ang_t), np.cos(ang_t)
            out = thick * rng.uniform(0.25, 0.5)
            parts.append(
                Ellipse(
                    y + ty * off + ny * out,
                    x + tx * off + nx * out,
                    length / (k + 0.2) * rng.uniform(0.7, 0.95),
                    thick * rng.uniform(0.45, 0.7),
                    ang_t + rng.normal(0, 0.2),
                )
            )
        r = int(length + thick + pit_d + 4)
        y0, y1 = max(y - r, 0), min(y + r + 1, h)
        x0, x1 = max(x - r, 0), min(x + r + 1, w)
        sl = (slice(y0, y1), slice(x0, x1))
        cell = np.zeros((y1 - y0, x1 - x0), bool)
        for e in parts:
            le = e.level(sl)
            cell |= le <= 1.0
        bone_local = bone_sdf[sl] > 0
        carved_sdf = bone_sdf[sl]
        if pit_d >= 1.0:  # shallower than a pixel: the class map cannot show it
            # carve the pit out of the bone field (a smooth min keeps a sub-pixel outline)
            carved_sdf = np.minimum(carved_sdf, (pit.level(sl) - 1.0) * pit.b * p)
        carved = bone_local & ~(carved_sdf > 0)
        cell = (cell & ~bone_local) | carved
        cell &= tissue[sl]
        cell = _largest_component(cell)
        # keep away from other osteoclasts (gap of 2 px) and from the tissue edge
        if (cell & oc_keepout[sl]).any() or cell.sum() < 20:
            continue
        n_oc += 1
        oc_labels[sl][cell] = n_oc
        if carved.any():
            pit_mask[sl] |= carved
            bone_sdf[sl] = carved_sdf
        dil = cv2.dilate(cell.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        oc_keepout[sl] |= dil
        oc_params.append((sl, cell))

    # empty pits: eroded surface from resorption that ended (no osteoclast)
    n_pits = (
        rng.poisson(params["empty_pits_per_mm"] * approx_bpm_mm)
        if params["empty_pits_per_mm"] > 0
        else 0
    )
    placed = 0
    for y, x in surface[si:]:
        if placed >= n_pits:
            break
        if oc_keepout[y, x]:
            continue
        ny, nx = -gy[y, x], -gx[y, x]
        ang_t = np.arctan2(nx, -ny)
        pit = Ellipse(y, x, rng.uniform(20, 45) * um * 0.5, rng.uniform(2.5, 6) * um, ang_t)
        sl = pit.bbox(shape)
        carved_sdf = np.minimum(bone_sdf[sl], (pit.level(sl) - 1.0) * pit.b * p)
        local = (bone_sdf[sl] > 0) & ~(carved_sdf > 0)
        if local.sum() < 3:
            continue
        pit_mask[sl] |= local
        bone_sdf[sl] = carved_sdf
        oc_keepout[sl] |= local
        placed += 1
    params["empty_pits"] = placed

    bone = bone_sdf > 0
    bone_dist_in = cv2.distanceTransform(bone.astype(np.uint8), cv2.DIST_L2, 5) * p

    # --- osteocyte lacunae: dart throwing inside bone, oriented along the lamellae
    ot_labels = np.zeros(shape, np.int32)
    occupied: dict[int, bool] = {}
    spacing = params["osteocyte_spacing_um"] * um
    cand = np.argwhere(bone_dist_in > 7.0)
    n_ot = 0
    if len(cand):
        n_try = int(len(cand) / max(spacing * spacing, 1.0) * 1.6) + 1
        picks = cand[rng.integers(0, len(cand), size=n_try)]
        taken = np.zeros(shape, bool)
        bgy, bgx = np.gradient(bone_dist_in)
        for y, x in picks:
            if taken[y, x]:
                continue
            ang = np.arctan2(bgx[y, x], -bgy[y, x])  # along the surface
            a = rng.uniform(4.0, 6.5) * um
            b = rng.uniform(2.0, 3.2) * um
            e = Ellipse(y + rng.uniform(-0.5, 0.5), x + rng.uniform(-0.5, 0.5), a, b, ang)
            sl = e.bbox(shape)
            lac = e.level(sl) <= 1.0
            if not lac.any() or (lac & ~bone[sl]).any():
                continue
            n_ot += 1
            ot_labels[sl][lac] = n_ot
            is_occ = bool(rng.random() > params["empty_lacuna_fraction"])
            occupied[n_ot] = is_occ
            lumen_e = Ellipse(e.cy, e.cx, e.a, e.b, e.angle)
            _draw_ellipse(lumen, lumen_e, 0.85, soft=True)
            if is_occ:
                _draw_ellipse(
                    nuclei, Ellipse(e.cy, e.cx, e.a * 0.72, e.b * 0.72, e.angle), 1.0, soft=True
                )
            # keep-out disk so lacunae never touch
            r = int(spacing * 0.5 + a)
            taken[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1] = True

    # --- class map
    class_map = np.zeros(shape, np.uint8)
    class_map[tissue] = classes.MARROW
    class_map[bone] = classes.BONE
    class_map[ot_labels > 0] = classes.OSTEOCYTE
    class_map[oc_labels > 0] = classes.OSTEOCLAST

    marrow = class_map == classes.MARROW
    dist_to_bone = cv2.distanceTransform((~bone).astype(np.uint8), cv2.DIST_L2, 5) * p

    # --- osteoclast rendering layers: TRAP cytoplasm with granules and several nuclei
    granules = np.clip(smooth_noise(rng, shape, p, 2.0) * 0.25 + 1.0, 0.4, 1.6)
    for sl, cell in oc_params:
        t_local = cell.astype(np.float32) * rng.uniform(0.7, 1.2)
        t_local = cv2.GaussianBlur(t_local, (0, 0), max(0.6 * um, 0.5))
        trap[sl] = np.maximum(trap[sl], t_local * granules[sl] * cell)
        cytoplasm[sl] = np.maximum(cytoplasm[sl], cell * 0.35)
        k = int(rng.integers(pp.oc_nuclei[0], pp.oc_nuclei[1] + 1))
        inside = np.argwhere(cv2.erode(cell.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
        if len(inside) == 0:
            inside = np.argwhere(cell)
        for _ in range(k):
            cy, cx = inside[rng.integers(len(inside))]
            _draw_ellipse(
                nuclei,
                Ellipse(
                    sl[0].start + cy,
                    sl[1].start + cx,
                    rng.uniform(3.0, 4.2) * um,
                    rng.uniform(2.2, 3.0) * um,
                    rng.uniform(0, np.pi),
                ),
                rng.uniform(0.6, 0.9),
                soft=True,
            )

    # --- marrow: adipocyte ghosts, sinusoids with red cells, hematopoietic nuclei
    marrow_idx = np.argwhere(marrow & (dist_to_bone > 3.0))
    marrow_area_um2 = marrow.sum() * p * p
    if len(marrow_idx):
        n_adipo = int(params["adipocyte_fraction"] * marrow_area_um2 / (np.pi * 18.0**2))
        for y, x in marrow_idx[rng.integers(0, len(marrow_idx), size=n_adipo)]:
            rad = rng.uniform(10.0, 30.0) * um
            e = Ellipse(y, x, rad, rad * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi))
            sl = e.bbox(shape)
            lv = e.level(sl)
            inside = (lv <= 1.0) & marrow[sl]
            lumen[sl][inside] = 1.0
            rim = (lv > 0.92) & (lv <= 1.05) & marrow[sl]
            cytoplasm[sl][rim] = np.maximum(cytoplasm[sl][rim], 0.5)
        n_sin = int(marrow_area_um2 / 40000.0 * rng.uniform(0.5, 2.0))
        for y, x in marrow_idx[rng.integers(0, len(marrow_idx), size=n_sin)]:
            e = Ellipse(
                y, x, rng.uniform(15, 40) * um, rng.uniform(5, 12) * um, rng.uniform(0, np.pi)
            )
            sl = e.bbox(shape)
            inside = (e.level(sl) <= 1.0) & marrow[sl]
            lumen[sl][inside] = np.maximum(lumen[sl][inside], 0.9)
            pts = np.argwhere(inside)
            for cy, cx in (
                pts[rng.integers(0, max(len(pts), 1), size=len(pts) // max(int(30 * um * um), 1))]
                if len(pts)
                else []
            ):
                _draw_ellipse(
                    rbc,
                    Ellipse(
                        sl[0].start + cy,
                        sl[1].start + cx,
                        3.5 * um,
                        3.0 * um,
                        rng.uniform(0, np.pi),
                    ),
                    rng.uniform(0.6, 1.0),
                    soft=True,
                )
        # hematopoietic nuclei: dense, small, dark
        free = marrow & (lumen < 0.5) & (oc_keepout == 0)
        free_idx = np.argwhere(free)
        density = rng.uniform(1 / 90.0, 1 / 45.0)  # per µm²
        n_nuc = int(free.sum() * p * p * density)
        if len(free_idx):
            pick_idx = free_idx[rng.integers(0, len(free_idx), size=n_nuc)]
            radii = rng.uniform(2.0, 3.8, size=n_nuc) * um
            vals = rng.uniform(0.5, 1.0, size=n_nuc)
            for (y, x), rad, val in zip(pick_idx, radii, vals, strict=True):
                cv2.circle(nuclei, (int(x), int(y)), max(int(round(rad)), 1), float(val), -1)
            # scattered red cells in the marrow
            n_rbc = n_nuc // 8
            for y, x in free_idx[rng.integers(0, len(free_idx), size=n_rbc)]:
                cv2.circle(
                    rbc,
                    (int(x), int(y)),
                    max(int(round(3.4 * um)), 1),
                    float(rng.uniform(0.5, 0.9)),
                    -1,
                )
        cytoplasm[marrow] = np.maximum(cytoplasm[marrow], 0.25)

        # distractors: mononuclear TRAP+ precursors in marrow, away from bone
        far = np.argwhere(marrow & (dist_to_bone > 20.0) & (lumen < 0.5))
        n_mono = int(params["trap_mono_per_mm2"] * marrow_area_um2 / 1e6)
        if len(far):
            for y, x in far[rng.integers(0, len(far), size=n_mono)]:
                rad = rng.uniform(5.0, 8.0) * um
                e = Ellipse(y, x, rad, rad * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
                _draw_ellipse(trap, e, rng.uniform(0.5, 1.0), soft=True)
                _draw_ellipse(nuclei, Ellipse(y, x, 3.2 * um, 2.6 * um, e.angle), 0.8, soft=True)
        params["trap_mono"] = n_mono

        # osteoblasts: cuboidal cells lining free bone surfaces (TRAP-negative)
        lining = np.argwhere(
            marrow & (dist_to_bone > 0) & (dist_to_bone < 6.0) & ~oc_keepout & (lumen < 0.5)
        )
        n_ob = int(len(lining) * rng.uniform(0.002, 0.01) * p)
        for y, x in lining[rng.integers(0, max(len(lining), 1), size=n_ob)] if len(lining) else []:
            e = Ellipse(
                y, x, rng.uniform(4, 6) * um, rng.uniform(3, 4.5) * um, rng.uniform(0, np.pi)
            )
            _draw_ellipse(cytoplasm, e, 0.7, soft=True)
            _draw_ellipse(nuclei, Ellipse(y, x, 2.8 * um, 2.2 * um, e.angle), 0.9, soft=True)
    # cells never paint into bone (their drawn disks may cross the surface)
    outside = ~tissue | bone
    nuclei[bone & (ot_labels == 0)] = 0.0
    for layer in (cytoplasm, rbc, trap):
        layer[outside] = 0.0
    lumen[~tissue] = 0.0
    trap[oc_labels > 0] = np.maximum(trap[oc_labels > 0], 0.35)

    params.update(
        {
            "n_osteoclasts": n_oc,
            "n_lacunae": n_ot,
            "n_empty_lacunae": int(sum(not v for v in occupied.values())),
            "periosteum_um": float(periost_um),
        }
    )
    return Field(
        shape=shape,
        pixel_size_um=p,
        phenotype=phenotype,
        tissue=tissue,
        bone_sdf=bone_sdf,
        depth_um=depth,
        class_map=class_map,
        osteoclast_labels=oc_labels,
        osteocyte_labels=ot_labels,
        occupied=occupied,
        pit_mask=pit_mask,
        nuclei=nuclei,
        cytoplasm=cytoplasm,
        trap=trap,
        rbc=rbc,
        lumen=lumen,
        params=params,
    )
