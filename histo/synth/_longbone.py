"""A longitudinal section of a mouse proximal tibia / distal femur metaphysis.

Drawn in micrometres with the growth plate at the top (rows run along the bone's long axis):
articular cartilage and the epiphysis, the growth plate (resting, proliferative and hypertrophic
zones; chondrocyte lacunae in columns), the chondro-osseous junction, the primary spongiosa
(longitudinal septa: calcified-cartilage cores coated with bone), the secondary spongiosa, two
cortices with periosteum and muscle outside, marrow with adipocytes, glass around. Cells reuse the
field generator's steps (:mod:`histo.synth._cells`) and the field renderer.

Cartilage (growth plate, articular cap, calcified cores) is class 5 - chondrocyte lacunae
included, they are not osteocytes; periosteum and muscle are class 6.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from histo import classes
from histo.regions import Region, RegionBox, RegionRules
from histo.synth._cells import (
    Osteocytes,
    Resorption,
    bone_surface,
    carve_empty_pits,
    place_osteoclasts,
    place_osteocytes,
)
from histo.synth._field import FieldGeometry, assemble_field, cell_counts, paint_cells
from histo.synth._geometry import (
    PHENOTYPE_PARAMS,
    PHENOTYPES,
    CellLayers,
    Field,
    _unit_gradient_sdf,
    smooth_noise,
)

#: default extent of a long-bone section (µm): along the bone's axis, and across it
SECTION_UM = (3000.0, 2000.0)


@dataclass
class LongBoneParams:
    """Ranges sampled per section for one phenotype (µm, fractions, per mm)."""

    growth_plate_um: tuple[float, float]  #: growth plate thickness
    primary_um: tuple[float, float]  #: depth of the primary spongiosa below the junction
    core_um: tuple[float, float]  #: half-width of a calcified-cartilage core at the junction
    cores_persist: bool  #: cores stay unresorbed deep into the shaft (osteopetrosis)
    bv_tv: tuple[float, float]  #: bone fraction of the secondary spongiosa
    cortex_um: tuple[float, float]  #: diaphyseal cortical thickness
    junction_oc_per_mm: tuple[float, float]  #: TRAP+ cells per mm of chondro-osseous junction
    adipocyte_fraction: tuple[float, float]  #: marrow fraction of adipocyte ghosts
    trab_scale_um: tuple[float, float]  #: spatial scale of the trabecular network


#: the ranges of normal long bones, then of osteopetrotic ones (oc-rich and oc-poor alike)
_NORMAL_VS_OSTEOPETROTIC = {
    "growth_plate_um": ((140.0, 200.0), (170.0, 240.0)),
    "primary_um": ((150.0, 230.0), (150.0, 230.0)),
    "core_um": ((2.5, 4.0), (3.5, 6.0)),
    "cores_persist": (False, True),
    "bv_tv": ((0.12, 0.20), (0.42, 0.62)),
    "cortex_um": ((70.0, 110.0), (110.0, 170.0)),
    "adipocyte_fraction": ((0.08, 0.25), (0.0, 0.04)),
    "trab_scale_um": ((80.0, 120.0), (50.0, 80.0)),
}
#: TRAP+ cells per mm of chondro-osseous junction, the one range that tells the three apart
_JUNCTION_OC_PER_MM = {"normal": (12.0, 22.0), "oc-rich": (30.0, 50.0), "oc-poor": (0.0, 0.0)}
LONG_BONE_PARAMS = {
    phenotype: LongBoneParams(
        junction_oc_per_mm=junction,
        **{name: pair[phenotype != "normal"] for name, pair in _NORMAL_VS_OSTEOPETROTIC.items()},
    )
    for phenotype, junction in _JUNCTION_OC_PER_MM.items()
}


@dataclass
class Layout:
    """Where things lie, in µm on the section's grid (rows along the bone's axis)."""

    y: np.ndarray  #: (H, 1) row centres, µm
    dx: np.ndarray  #: (1, W) column centres relative to the bone's axis, µm
    half_width: np.ndarray  #: (H, 1) periosteal half-width of the bone at each row
    cortex_left: np.ndarray  #: (H, 1) cortical thickness, left side (0 where no cortex)
    cortex_right: np.ndarray  #: (H, 1) cortical thickness, right side
    top: np.ndarray  #: (1, W) articular surface
    plate_top: np.ndarray  #: (1, W) top of the growth plate
    junction: np.ndarray  #: (1, W) chondro-osseous junction (bottom of the growth plate)
    bottom_um: float  #: where the section's cut ends the bone
    periosteum_um: float
    tissue: np.ndarray  #: bool, the section (bone, marrow, soft tissue)
    envelope: np.ndarray  #: bool, inside the periosteal bone surface
    centre_um: float  #: column position of the bone's axis

    def endocortical(self) -> np.ndarray:
        """bool, the marrow cavity side of both endocortical surfaces (below the epiphysis)."""
        hw = self.half_width
        inside = (self.dx > -hw + self.cortex_left) & (self.dx < hw - self.cortex_right)
        return inside & self.envelope

    def depth_below_junction(self) -> np.ndarray:
        return self.y - self.junction


def sample_long_bone_params(
    phenotype: str, rng: np.random.Generator, overrides: Mapping[str, float]
) -> dict:
    """The anatomy parameters of one long-bone section; ``overrides`` fix any of them (every
    one is a number, read as a float)."""
    lb = LONG_BONE_PARAMS[phenotype]
    pp = PHENOTYPE_PARAMS[phenotype]
    params: dict = {"phenotype": phenotype, "anatomy": "long-bone"}
    ranges = {
        "growth_plate_um": lb.growth_plate_um,
        "primary_um": lb.primary_um,
        "core_um": lb.core_um,
        "bv_tv_target": lb.bv_tv,
        "cortex_um": lb.cortex_um,
        "junction_oc_per_mm": lb.junction_oc_per_mm,
        "oc_per_mm": pp.oc_per_mm,
        "adipocyte_fraction": lb.adipocyte_fraction,
        "trab_scale_um": lb.trab_scale_um,
        "trap_mono_per_mm2": pp.trap_mono_per_mm2,
        "empty_pits_per_mm": pp.empty_pits_per_mm,
        "empty_lacuna_fraction": (0.03, 0.15),
        "osteocyte_spacing_um": (20.0, 30.0),
        "epiphysis_um": (280.0, 360.0),
        "septum_spacing_um": (35.0, 55.0),
    }
    for name, (lo, hi) in ranges.items():
        drawn = float(rng.uniform(lo, hi))
        params[name] = float(overrides.get(name, drawn))
    params["cores_persist"] = lb.cores_persist
    return params


def _row_noise(rng, n: int, p: float, scale_um: float) -> np.ndarray:
    """Unit-variance smooth 1-D noise over ``n`` pixels (a row of a 2-D field)."""
    return smooth_noise(rng, (n, 1), p, scale_um)[:, 0]


def _layout(rng, shape: tuple[int, int], p: float, params: dict) -> Layout:
    """The section's outline, bone width, cortices and growth plate position (µm)."""
    h, w = shape
    H, W = h * p, w * p
    y = ((np.arange(h, dtype=np.float32) + 0.5) * p)[:, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) * p)[None, :]
    dx = x - W / 2
    margin = 50.0
    shaft = min(float(rng.uniform(520.0, 620.0)), W / 2 - margin - 160.0)
    flare = min(shaft * float(rng.uniform(1.12, 1.25)), W / 2 - margin - 90.0)
    top0 = margin + 20.0
    plate0 = top0 + params["epiphysis_um"]
    half = shaft + (flare - shaft) / (1.0 + np.exp((y - plate0 - 350.0) / 120.0))
    bow = (dx / flare) ** 2
    top = top0 + 100.0 * bow
    plate_top = plate0 + 40.0 * bow + 6.0 * _row_noise(rng, w, p, 120.0)[None, :]
    junction = plate_top + params["growth_plate_um"] + 5.0 * _row_noise(rng, w, p, 90.0)[None, :]
    j0 = float(np.median(junction))
    depth = np.clip(y - (j0 - params["growth_plate_um"] / 2), 0.0, None)
    grow = 1.0 - np.exp(-depth / 450.0)
    ct = 25.0 + (params["cortex_um"] - 25.0) * grow
    ct_l = np.where(depth > 0, ct * (1 + 0.08 * _row_noise(rng, h, p, 300.0)[:, None]), 0.0)
    ct_r = np.where(depth > 0, ct * (1 + 0.08 * _row_noise(rng, h, p, 300.0)[:, None]), 0.0)
    bottom = H - margin
    envelope = (np.abs(dx) < half) & (y > top) & (y < bottom)
    peri = float(rng.uniform(10.0, 20.0))
    muscle_um = float(rng.uniform(180.0, 320.0)) + 40.0 * _row_noise(rng, h, p, 400.0)[:, None]
    outer = np.minimum(half + peri + muscle_um, W / 2 - margin)
    muscle = (np.abs(dx) < outer) & (y > plate0 - 60.0) & (y < bottom)
    return Layout(
        y=y,
        dx=dx,
        half_width=half,
        cortex_left=ct_l.astype(np.float32),
        cortex_right=ct_r.astype(np.float32),
        top=top,
        plate_top=plate_top,
        junction=junction,
        bottom_um=float(bottom),
        periosteum_um=peri,
        tissue=envelope | muscle,
        envelope=envelope,
        centre_um=W / 2,
    )


@dataclass
class HardTissue:
    """Bone and cartilage of the section before resorption."""

    sdf: np.ndarray  #: float32 signed field (µm, > 0 inside bone or cartilage)
    cartilage: np.ndarray  #: bool, where hard tissue is cartilage


class Septa(NamedTuple):
    core: np.ndarray  #: float32 signed field (µm) of the calcified-cartilage cores
    coat: np.ndarray  #: float32 signed field (µm) of the septa with their bone coat


def _septa(rng, lay: Layout, p: float, params: dict) -> Septa:
    """Longitudinal septa below the junction: (calcified-cartilage core, bone-coated septum).

    Signed fields in µm. Cores taper and end within the primary spongiosa unless they persist
    (osteopetrosis), where they run the length of the shaft.
    """
    shape = (lay.y.shape[0], lay.dx.shape[1])
    spacing = params["septum_spacing_um"]
    xw = lay.dx - lay.dx.min() + 9.0 * smooth_noise(rng, shape, p, 150.0)
    # septa at irregular intervals (0.6-1.4 x the mean spacing); each pixel belongs to the nearest
    n = int(np.ceil(float(xw.max()) / (0.6 * spacing))) + 3
    centres = np.cumsum(rng.uniform(0.6, 1.4, n) * spacing) - spacing
    core0 = rng.uniform(*sorted((params["core_um"] * 0.7, params["core_um"] * 1.3)), n)
    right = np.clip(np.searchsorted(centres, xw), 1, n - 1)
    nearer_left = (xw - centres[right - 1]) < (centres[right] - xw)
    k = np.where(nearer_left, right - 1, right)
    u = np.abs(xw - centres[k])
    d = lay.depth_below_junction()
    if params["cores_persist"]:
        # unresorbed cores run down the shaft inside the bone; free septa end at random depths
        length = rng.uniform(0.6, 3.0, n) * params["primary_um"]
        core = core0[k] * (1.0 - 0.3 * np.clip(d / 2000.0, 0.0, 1.0))
        core *= smooth_noise(rng, shape, p, 120.0) > -0.5  # cores break into long fragments
        coat = np.clip(d / 15.0, 0.0, 5.0)
    else:
        length = rng.uniform(0.5, 1.3, n) * params["primary_um"]
        core = core0[k] * np.clip(1.0 - d / length[k], 0.0, 1.0)
        coat = np.clip(d / 15.0, 0.0, 7.0)
    end = length[k] + 10.0 - d
    core_sdf = np.minimum(core - u, d + 2.0)
    coat_sdf = np.minimum(np.minimum(core + coat - u, end), d + 2.0)
    return Septa(core_sdf.astype(np.float32), coat_sdf.astype(np.float32))


def _network(rng, shape, p: float, scale_um: float, stretch: float = 1.0) -> np.ndarray:
    """A trabecular level field: bone where it is below a threshold (as in field mode).

    ``stretch`` > 1 elongates the network along the rows (the bone's axis), as metaphyseal
    trabeculae run mostly longitudinally.
    """
    h, w = shape
    small = (max(int(round(h / stretch)), 1), w)
    noise = smooth_noise(rng, small, p, scale_um)
    if stretch != 1.0:
        noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)
    density = smooth_noise(rng, shape, p, scale_um * 5) * 0.25
    return np.abs(noise) - density


def _threshold_for(level, zone, covered, target: float) -> float:
    """Level threshold so that the union of ``covered`` and the network fills ``target`` of zone."""
    if not zone.any():
        return 0.0
    s = float(covered[zone].mean())
    frac = float(np.clip((target - s) / max(1.0 - s, 1e-3), 0.02, 0.95))
    return float(np.quantile(level[zone], frac))


def _endocortical_seam(rng, lay: Layout, endo: np.ndarray, p: float) -> np.ndarray:
    """Where spongiosa may reach the cortex: joined on about a quarter of the rows, in stretches
    of ~100 µm, elsewhere a marrow seam of 12 µm along the endocortex (trabeculae meet the
    endocortex at points, they do not line it for millimetres)."""
    h = lay.y.shape[0]
    joined_l = _row_noise(rng, h, p, 80.0) > 0.67
    joined_r = _row_noise(rng, h, p, 80.0) > 0.67
    joined = np.where(lay.dx < 0, joined_l[:, None], joined_r[:, None])
    return np.where(joined, endo + 2.0, endo - 12.0)


def _hard_tissue(rng, lay: Layout, p: float, params: dict) -> HardTissue:
    """Articular cap, epiphysis, growth plate, cortices, septa and trabeculae as one field."""
    shape = (lay.y.shape[0], lay.dx.shape[1])
    y, dx, half = lay.y, lay.dx, lay.half_width
    env = np.minimum(np.minimum(half - np.abs(dx), y - lay.top), lay.bottom_um - y)
    ct = np.where(dx < 0, lay.cortex_left, lay.cortex_right)
    endo = half - ct - np.abs(dx)  # > 0 inside the marrow cavity
    cortex = np.where(ct > 0, np.minimum(env, -endo), -1e3)
    epi = lay.plate_top - y  # > 0 above the growth plate
    articular = np.minimum(env, lay.top + 40.0 - y)
    plate = np.minimum(np.minimum(env, y - lay.plate_top), lay.junction - y)
    shell = np.minimum(np.minimum(env, epi), 30.0 - (half - np.abs(dx)))
    subchondral = np.minimum(np.minimum(env, epi), lay.top + 65.0 - y)
    epi_level = _network(rng, shape, p, 90.0)
    epi_zone = (env > 0) & (epi > 0)
    t_epi = _threshold_for(epi_level, epi_zone, np.zeros(shape, bool), 0.3)
    epi_trab = np.minimum(_unit_gradient_sdf(t_epi - epi_level, p), np.minimum(env, epi))
    core, coat = _septa(rng, lay, p, params)
    d = lay.depth_below_junction()
    level = _network(rng, shape, p, params["trab_scale_um"], stretch=1.8)
    # the bone fraction is set where the standard region lies (RegionRules defaults)
    zone = (endo > 100.0) & (env > 0) & (d > 250.0) & (d < 1250.0)
    t = _threshold_for(level, zone, coat > 0, params["bv_tv_target"])
    start = 20.0 if params["cores_persist"] else 0.5 * params["primary_um"]
    trab = np.minimum(_unit_gradient_sdf(t - level, p), np.minimum(d - start, endo + 2.0))
    inner = np.minimum(np.maximum(coat, trab), _endocortical_seam(rng, lay, endo, p))
    parts = (articular, plate, shell, subchondral, epi_trab, cortex, inner)
    sdf = np.minimum(np.maximum.reduce(parts), env).astype(np.float32)
    sdf[~lay.envelope] = np.minimum(sdf[~lay.envelope], -1.0)
    # cores lie inside bone (coated), except near the junction where the septa are still bare
    cores = (core > 0) & ((sdf > 1.5) | (d < 30.0))
    cartilage = ((articular > 0) | (plate > 0) | cores) & ~(cortex > 0)
    return HardTissue(sdf, cartilage)


def _edge_fraction(sdf: np.ndarray, allowed: np.ndarray) -> float:
    """Fraction of the hard tissue's outline that lies where ``allowed``."""
    hard = (sdf > 0).astype(np.uint8)
    edge = (hard - cv2.erode(hard, np.ones((3, 3), np.uint8))).astype(bool)
    return float((edge & allowed).sum() / max(edge.sum(), 1))


def _resorb(rng, sdf: np.ndarray, lay: Layout, params: dict, p: float) -> Resorption:
    """TRAP+ cells crowded at the chondro-osseous junction, osteoclasts and pits below it."""
    pp = PHENOTYPE_PARAMS[params["phenotype"]]
    d = lay.depth_below_junction()
    cavity = lay.endocortical()
    near = cavity & (d > -15.0) & (d < 120.0)
    width_mm = float(np.median(2 * lay.half_width - lay.cortex_left - lay.cortex_right)) / 1000
    rate = params["junction_oc_per_mm"]
    n_junction = rng.poisson(rate * width_mm) if rate > 0 else 0
    surface = bone_surface(sdf, p)
    res = place_osteoclasts(rng, sdf, surface, near, lay.envelope, n_junction, pp, p)
    deep = cavity & (d >= 120.0)
    bpm_mm = surface.approx_bpm_mm * _edge_fraction(sdf, deep)
    rate = params["oc_per_mm"]
    n_deep = rng.poisson(rate * bpm_mm) if rate > 0 else 0
    surface = bone_surface(sdf, p)
    res = place_osteoclasts(rng, sdf, surface, deep, lay.envelope, n_deep, pp, p, res)
    rate = params["empty_pits_per_mm"]
    n_pits = rng.poisson(rate * bpm_mm) if rate > 0 else 0
    params["empty_pits"] = carve_empty_pits(rng, sdf, surface, res, n_pits, p)
    params["n_junction_osteoclasts"] = min(res.n_osteoclasts, int(n_junction))
    return res


def _class_map(lay: Layout, bone, cartilage, res: Resorption, ots: Osteocytes) -> np.ndarray:
    cm = np.zeros(lay.tissue.shape, np.uint8)
    cm[lay.tissue] = classes.SOFT_TISSUE
    cm[lay.envelope] = classes.MARROW
    cm[bone] = classes.BONE
    cm[cartilage] = classes.CARTILAGE
    cm[ots.labels > 0] = classes.OSTEOCYTE
    cm[res.labels > 0] = classes.OSTEOCLAST
    return cm


def _ellipses(target: np.ndarray, centres_px, axes_px, value: float) -> None:
    """Filled axis-aligned ellipses (centre (y, x), semi-axes (along x, along y)) in pixels."""
    for (cy, cx), (ax, ay) in zip(centres_px, axes_px, strict=True):
        axes = (max(int(round(ax)), 1), max(int(round(ay)), 1))
        cv2.ellipse(target, (int(round(cx)), int(round(cy))), axes, 0.0, 0, 360, value, -1)


def _column_lacunae(rng, top: float, bottom: float) -> list[tuple[float, float, float]]:
    """Lacunae down one column: (centre depth, half-width, half-height) in µm.

    Resting zone: small, round, sparse; proliferative: flat discs stacked; hypertrophic: large.
    """
    out = []
    y = top + 4.0
    gp = bottom - top
    while True:
        u = (y - top) / gp
        if u < 0.2:
            a = b = rng.uniform(2.5, 3.5)
            step = rng.uniform(8.0, 16.0)
        elif u < 0.62:
            a, b = rng.uniform(5.0, 7.0), rng.uniform(1.8, 2.6)
            step = 2 * b + rng.uniform(2.0, 3.5)
        else:
            b = 4.0 + 7.0 * (u - 0.62) / 0.38 + rng.uniform(-0.5, 0.5)
            a = rng.uniform(6.5, 8.5)
            step = 2 * b + rng.uniform(2.5, 4.0)
        if y + b > bottom - 3.0:
            return out
        if u >= 0.2 or rng.random() < 0.5:
            out.append((y, a, b))
        y += step


class Cartilage(NamedTuple):
    matrix: np.ndarray  #: float32 matrix density for the renderer (calcified cores densest)
    lacunae: np.ndarray  #: bool, chondrocyte lacunae


def _paint_cartilage(rng, lay: Layout, cartilage: np.ndarray, layers: CellLayers, p: float):
    """Cartilage matrix density and chondrocyte lacunae in columns."""
    shape = cartilage.shape
    d = lay.depth_below_junction()
    u = np.clip((lay.y - lay.plate_top) / np.maximum(lay.junction - lay.plate_top, 1.0), 0, 1)
    matrix = np.where(d > 0, 1.0, 0.5 + 0.3 * u).astype(np.float32) * cartilage
    lac = np.zeros(shape, np.float32)
    nuc = np.zeros(shape, np.float32)
    w = shape[1]
    x = float(rng.uniform(0.0, 10.0))
    while x < w * p:
        xi = min(int(x / p), w - 1)
        if abs(lay.dx[0, xi]) < float(lay.half_width.min()) - 20.0:
            top, bottom = float(lay.plate_top[0, xi]), float(lay.junction[0, xi])
            for yc, a, b in _column_lacunae(rng, top, bottom):
                hyper = (yc - top) / (bottom - top) > 0.62
                centre = [(yc / p, x / p)]
                _ellipses(lac, centre, [(a / p, b / p)], 0.9 if hyper else 0.8)
                scale = 0.35 if hyper else 0.6
                _ellipses(nuc, centre, [(a * scale / p, b * 0.7 / p)], 0.4 if hyper else 0.8)
        x += float(rng.uniform(14.0, 20.0))
    _articular_chondrocytes(rng, lay, cartilage, lac, nuc, p)
    lacunae = (lac > 0) & cartilage
    np.maximum(layers.lumen, lac * lacunae, out=layers.lumen)
    np.maximum(layers.nuclei, nuc * lacunae, out=layers.nuclei)
    return Cartilage(matrix, lacunae)


def _articular_chondrocytes(rng, lay: Layout, cartilage, lac, nuc, p: float) -> None:
    """Small round chondrocytes scattered in the articular cartilage (one per ~300 µm²)."""
    articular = cartilage & (lay.y < lay.plate_top - 20.0)
    idx = np.argwhere(articular)
    n = int(articular.sum() * p * p / 300.0)
    if not len(idx) or n == 0:
        return
    pick = idx[rng.integers(0, len(idx), size=n)]
    radius = rng.uniform(2.5, 3.5, n) / p
    _ellipses(lac, pick, np.column_stack([radius * 1.3, radius]), 0.8)
    _ellipses(nuc, pick, np.column_stack([radius * 0.7, radius * 0.6]), 0.8)


def _paint_soft_tissue(rng, lay: Layout, soft: np.ndarray, layers: CellLayers, p: float) -> None:
    """Muscle fibres along the bone's axis with elongated nuclei; a fibrous periosteum."""
    shape = soft.shape
    fibre = float(rng.uniform(30.0, 50.0))
    wav = 6.0 * smooth_noise(rng, shape, p, 200.0)
    stripes = 0.5 + 0.18 * np.sin(2 * np.pi * (lay.dx + wav) / fibre)
    texture = stripes * (1.0 + 0.1 * smooth_noise(rng, shape, p, 4.0))
    periosteum = soft & (np.abs(lay.dx) < lay.half_width + lay.periosteum_um)
    layers.cytoplasm[soft] = np.where(periosteum, 0.65, texture)[soft]
    nuclei = np.zeros(shape, np.float32)
    for mask, per_um2 in ((soft & ~periosteum, 1 / 500.0), (periosteum, 1 / 150.0)):
        idx = np.argwhere(mask)
        n = int(mask.sum() * p * p * per_um2)
        if not len(idx) or n == 0:
            continue
        pick = idx[rng.integers(0, len(idx), size=n)]
        axes = np.column_stack([np.full(n, 1.4), rng.uniform(4.0, 8.0, n)]) / p
        _ellipses(nuclei, pick, axes, 0.8)
    np.maximum(layers.nuclei, nuclei * soft, out=layers.nuclei)


@dataclass
class LongBone:
    """A long-bone section with its ground truth (all arrays on the section's pixel grid)."""

    field: Field  #: anatomy and rendering layers; class map codes 0-6
    regions: np.ndarray  #: uint8 codes of :class:`histo.regions.Region`
    standard: np.ndarray  #: bool, the standard measurement region (secondary spongiosa)
    box: RegionBox  #: the standard region's edges (µm, this grid)
    junction_um: float  #: the chondro-osseous junction's row position (µm, median)
    chondrocytes: np.ndarray  #: bool, chondrocyte lacunae (inside class 5)


def _region_map(lay: Layout, params: dict) -> np.ndarray:
    reg = np.zeros(lay.tissue.shape, np.uint8)
    reg[lay.tissue] = Region.SOFT_TISSUE
    reg[lay.envelope & (lay.y < lay.plate_top)] = Region.EPIPHYSIS
    reg[lay.envelope & (lay.y >= lay.plate_top)] = Region.CORTEX
    reg[lay.envelope & (lay.y >= lay.plate_top) & (lay.y < lay.junction)] = Region.GROWTH_PLATE
    d = lay.depth_below_junction()
    cavity = lay.endocortical() & (d >= 0)
    reg[cavity] = Region.SECONDARY_SPONGIOSA
    reg[cavity & (d < params["primary_um"])] = Region.PRIMARY_SPONGIOSA
    return reg


def _junction_um(lay: Layout) -> float:
    """The junction's row position: its median over the growth plate's width (µm)."""
    plate_half_width = np.interp(lay.junction.mean(), lay.y[:, 0], lay.half_width[:, 0])
    return float(np.median(lay.junction[0, np.abs(lay.dx[0]) < plate_half_width]))


def _truth_box(lay: Layout, junction: float, rules: RegionRules) -> RegionBox:
    """The standard region placed by ``rules`` on the drawn anatomy (growth plate at the top)."""
    top = junction + rules.offset_um
    bottom = min(top + rules.depth_um, lay.bottom_um - rules.end_margin_um)
    rows = (lay.y[:, 0] >= top) & (lay.y[:, 0] < bottom)
    hw = lay.half_width[rows, 0]
    left = lay.centre_um + float(np.max(-hw + lay.cortex_left[rows, 0])) + rules.margin_um
    right = lay.centre_um + float(np.min(hw - lay.cortex_right[rows, 0])) - rules.margin_um
    return RegionBox(top, bottom, left, right)


def build_long_bone(
    phenotype: str,
    shape: tuple[int, int],
    pixel_size_um: float,
    rng: np.random.Generator,
    overrides: Mapping[str, float] | None = None,
    rules: RegionRules | None = None,
) -> LongBone:
    """Draw a long-bone section (growth plate at the top) with its class and region maps."""
    if phenotype not in LONG_BONE_PARAMS:
        raise ValueError(f"unknown phenotype {phenotype!r}; choose one of {PHENOTYPES}")
    p = float(pixel_size_um)
    params = sample_long_bone_params(phenotype, rng, overrides or {})
    lay = _layout(rng, shape, p, params)
    hard = _hard_tissue(rng, lay, p, params)
    res = _resorb(rng, hard.sdf, lay, params, p)
    hard_mask = hard.sdf > 0
    cartilage = hard.cartilage & hard_mask
    bone = hard_mask & ~cartilage
    layers = CellLayers.zeros(shape)
    # lacunae keep a pixel of bone around them and stay 3 µm off cartilage
    host = bone & ~cv2.dilate(cartilage.astype(np.uint8), _disk(3.0 / p)).astype(bool)
    host = cv2.erode(host.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    spacing, empty = params["osteocyte_spacing_um"], params["empty_lacuna_fraction"]
    ots = place_osteocytes(rng, bone, host, layers, spacing, empty, p)
    class_map = _class_map(lay, bone, cartilage, res, ots)
    geo = FieldGeometry(
        phenotype, p, lay.tissue, hard.sdf, np.zeros(shape, np.float32), class_map, params
    )
    paint_cells(rng, geo, hard_mask, res, ots, layers)
    chondro = _paint_cartilage(rng, lay, cartilage, layers, p)
    _paint_soft_tissue(rng, lay, class_map == classes.SOFT_TISSUE, layers, p)
    junction = _junction_um(lay)
    box = _truth_box(lay, junction, rules or RegionRules())
    standard = box.mask(shape, p) & lay.envelope
    params.update(cell_counts(res, ots, lay.periosteum_um))
    fld = assemble_field(geo, res, ots, layers, cartilage=chondro.matrix)
    return LongBone(fld, _region_map(lay, params), standard, box, junction, chondro.lacunae)


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
