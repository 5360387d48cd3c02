"""One synthetic section field: a rounded piece of tissue with cortex and trabeculae.

The steps, in the order they draw from the random generator (the order is part of the output):
sample the phenotype's parameters, cut the tissue outline, grow the bone field (cortex ring and
trabecular network), place osteoclasts and empty pits, osteocytes, paint the osteoclasts, then
the marrow cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from histo import classes
from histo.synth._cells import (
    MarrowSpace,
    Osteocytes,
    Resorption,
    bone_surface,
    carve_empty_pits,
    paint_osteoclasts,
    place_osteoclasts,
    place_osteocytes,
    populate_marrow,
)
from histo.synth._geometry import (
    PHENOTYPE_PARAMS,
    PHENOTYPES,
    CellLayers,
    Field,
    PhenotypeParams,
    _unit_gradient_sdf,
    smooth_noise,
)


@dataclass
class Outline:
    """The tissue of a field and the depth of every pixel into it (µm)."""

    tissue: np.ndarray  #: bool
    depth_um: np.ndarray  #: float32, distance to the tissue edge


def sample_params(
    phenotype: str, pp: PhenotypeParams, rng: np.random.Generator, overrides: dict
) -> dict:
    """The anatomy parameters of one field; ``overrides`` fix any of them by name."""

    def pick(name, rng_range):
        return overrides.get(name, float(rng.uniform(*rng_range)))

    ov = overrides
    return {
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


def tissue_outline(rng: np.random.Generator, shape: tuple[int, int], p: float) -> Outline:
    """A rounded section outline with a glass margin."""
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
    return Outline(tissue, depth.astype(np.float32))


def trabecular_threshold(level: np.ndarray, space: np.ndarray, fraction: float) -> float:
    """The level below which ``fraction`` of ``space`` lies (bone is ``level < threshold``)."""
    return float(np.quantile(level[space], fraction)) if space.any() else 0.0


def bone_field(
    rng: np.random.Generator, outline: Outline, p: float, params: dict, periost_um: float
) -> np.ndarray:
    """Signed bone field (µm, > 0 inside): a cortex ring and a trabecular network.

    The cortex may take at most 40 % of the bone: it is thinned on small fields (and
    ``params["cortex_um"]`` updated). The network is ``|noise| - density < t``, with ``t``
    set so that the bone fraction of tissue meets ``params["bv_tv_target"]``.
    """
    tissue, depth = outline.tissue, outline.depth_um
    h, w = tissue.shape
    tissue_area_um2 = tissue.sum() * p * p
    tissue_perimeter_um = 2.0 * (h + w) * p * 0.85
    cap = 0.4 * params["bv_tv_target"] * tissue_area_um2 / tissue_perimeter_um
    params["cortex_um"] = float(min(params["cortex_um"], max(cap, 8.0)))
    cortex_th = params["cortex_um"] * (smooth_noise(rng, (h, w), p, 150.0) * 0.25 + 1.0)
    cortex_sdf = np.minimum(depth - periost_um, periost_um + cortex_th - depth)

    noise = smooth_noise(rng, (h, w), p, params["trab_scale_um"])
    # a second, coarser field modulates density so that trabeculae cluster and thin out
    density = smooth_noise(rng, (h, w), p, params["trab_scale_um"] * 5) * 0.25
    medulla = depth > periost_um + cortex_th
    cortex_area = (tissue & (cortex_sdf > 0)).sum()
    need = params["bv_tv_target"] * tissue.sum() - cortex_area
    frac = float(np.clip(need / max(medulla.sum(), 1), 0.02, 0.95))
    level = np.abs(noise) - density
    t = trabecular_threshold(level, medulla, frac)
    trab_sdf = _unit_gradient_sdf(t - level, p)
    trab_sdf = np.minimum(trab_sdf, depth - periost_um)  # trabeculae stay inside the periosteum
    bone_sdf = np.maximum(cortex_sdf, trab_sdf).astype(np.float32)
    bone_sdf[~tissue] = np.minimum(bone_sdf[~tissue], -1.0)
    return bone_sdf


def resorb(
    rng: np.random.Generator,
    bone_sdf: np.ndarray,
    allowed: np.ndarray,
    space: np.ndarray,
    params: dict,
    pp: PhenotypeParams,
    p: float,
) -> Resorption:
    """Osteoclasts (``params["oc_per_mm"]`` of bone perimeter) and empty pits on the bone.

    Carves ``bone_sdf`` in place; records ``params["empty_pits"]``.
    """
    surface = bone_surface(bone_sdf, p)
    oc_rate = params["oc_per_mm"]
    n_oc = rng.poisson(oc_rate * surface.approx_bpm_mm) if oc_rate > 0 else 0
    res = place_osteoclasts(rng, bone_sdf, surface, allowed, space, n_oc, pp, p)
    pit_rate = params["empty_pits_per_mm"]
    n_pits = rng.poisson(pit_rate * surface.approx_bpm_mm) if pit_rate > 0 else 0
    params["empty_pits"] = carve_empty_pits(rng, bone_sdf, surface, res, n_pits, p)
    return res


def class_map_of(
    tissue: np.ndarray, bone: np.ndarray, res: Resorption, ots: Osteocytes
) -> np.ndarray:
    """Class codes: tissue is marrow, then bone, osteocyte lacunae, osteoclasts on top."""
    class_map = np.zeros(tissue.shape, np.uint8)
    class_map[tissue] = classes.MARROW
    class_map[bone] = classes.BONE
    class_map[ots.labels > 0] = classes.OSTEOCYTE
    class_map[res.labels > 0] = classes.OSTEOCLAST
    return class_map


def finish_layers(
    layers: CellLayers, tissue: np.ndarray, bone: np.ndarray, res: Resorption, ots: Osteocytes
) -> None:
    """Cells never paint into bone (their drawn disks may cross the surface) or onto glass."""
    outside = ~tissue | bone
    layers.nuclei[bone & (ots.labels == 0)] = 0.0
    for layer in (layers.cytoplasm, layers.rbc, layers.trap):
        layer[outside] = 0.0
    layers.lumen[~tissue] = 0.0
    oc = res.labels > 0
    layers.trap[oc] = np.maximum(layers.trap[oc], 0.35)


def distance_to(mask: np.ndarray, p: float) -> np.ndarray:
    """Distance (µm) of every pixel to ``mask`` (0 inside it)."""
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5) * p


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
    params = sample_params(phenotype, pp, rng, overrides or {})
    outline = tissue_outline(rng, shape, p)
    tissue = outline.tissue
    periost_um = rng.uniform(8.0, 25.0)
    bone_sdf = bone_field(rng, outline, p, params, periost_um)
    # osteoclasts sit only on surfaces facing marrow deep enough in the tissue
    res = resorb(rng, bone_sdf, outline.depth_um > periost_um + 15.0, tissue, params, pp, p)
    bone = bone_sdf > 0
    layers = CellLayers.zeros(shape)
    ots = place_osteocytes(
        rng,
        bone,
        bone,
        layers,
        params["osteocyte_spacing_um"],
        params["empty_lacuna_fraction"],
        p,
    )
    class_map = class_map_of(tissue, bone, res, ots)
    geo = FieldGeometry(phenotype, p, tissue, bone_sdf, outline.depth_um, class_map, params)
    paint_cells(rng, geo, bone, res, ots, layers)
    params.update(cell_counts(res, ots, float(periost_um)))
    return assemble_field(geo, res, ots, layers)


@dataclass
class FieldGeometry:
    """What a section's drawing steps produce besides cells and layers."""

    phenotype: str
    pixel_size_um: float
    tissue: np.ndarray
    bone_sdf: np.ndarray
    depth_um: np.ndarray
    class_map: np.ndarray
    params: dict


def paint_cells(
    rng: np.random.Generator,
    geo: FieldGeometry,
    hard: np.ndarray,
    res: Resorption,
    ots: Osteocytes,
    layers: CellLayers,
) -> None:
    """Paint the osteoclasts and the marrow cells into ``layers``, then clip them.

    ``hard`` is the hard tissue (bone, and cartilage on a long bone) the marrow cells keep off.
    """
    p = geo.pixel_size_um
    paint_osteoclasts(rng, res, layers, PHENOTYPE_PARAMS[geo.phenotype].oc_nuclei, p)
    space = MarrowSpace(geo.class_map == classes.MARROW, distance_to(hard, p), res.keepout, p)
    populate_marrow(rng, space, layers, geo.params)
    finish_layers(layers, geo.tissue, hard, res, ots)


def cell_counts(res: Resorption, ots: Osteocytes, periosteum_um: float) -> dict:
    """The cell counts a section's parameters record."""
    return {
        "n_osteoclasts": res.n_osteoclasts,
        "n_lacunae": len(ots.occupied),
        "n_empty_lacunae": int(sum(not v for v in ots.occupied.values())),
        "periosteum_um": periosteum_um,
    }


def assemble_field(
    geo: FieldGeometry,
    res: Resorption,
    ots: Osteocytes,
    layers: CellLayers,
    cartilage: np.ndarray | None = None,
) -> Field:
    """The :class:`Field` record the renderer and the truth read."""
    return Field(
        shape=geo.class_map.shape,
        pixel_size_um=geo.pixel_size_um,
        phenotype=geo.phenotype,
        tissue=geo.tissue,
        bone_sdf=geo.bone_sdf,
        depth_um=geo.depth_um,
        class_map=geo.class_map,
        osteoclast_labels=res.labels,
        osteocyte_labels=ots.labels,
        occupied=ots.occupied,
        pit_mask=res.pit_mask,
        nuclei=layers.nuclei,
        cytoplasm=layers.cytoplasm,
        trap=layers.trap,
        rbc=layers.rbc,
        lumen=layers.lumen,
        params=geo.params,
        cartilage=cartilage,
    )
