"""Render a field's anatomy to RGB by optical density (Beer-Lambert).

Each stain has an RGB optical-density vector; its concentration map comes from the anatomy.
Transmitted light is ``I = I0 * illumination * 10 ** -(sum_s c_s * v_s)``. Per-slide variation:
stain vectors, strengths, uneven staining, blur, noise, illumination falloff, folds, dirt, JPEG.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from histo import classes
from histo.synth._geometry import Field, smooth_noise

COUNTERSTAINS = ("hematoxylin", "fast-green", "methyl-green")

# Optical density per unit concentration (R, G, B); normalised at use.
STAIN_OD = {
    # Ruifrok & Johnston 2001 hematoxylin vector
    "hematoxylin": (0.65, 0.70, 0.29),
    # fast green FCF absorbs red strongly: bone and cytoplasm turn green-blue
    "fast-green": (0.86, 0.20, 0.42),
    # methyl green: green-blue nuclei
    "methyl-green": (0.80, 0.30, 0.55),
    # TRAP reaction product, fast red violet LB / pararosaniline: red to red-violet
    "trap": (0.16, 0.82, 0.52),
    # red blood cells (eosinophilic, orange-red)
    "rbc": (0.08, 0.62, 0.80),
    # neutral background tint of tissue (mounting medium, unstained protein)
    "tissue": (0.40, 0.45, 0.50),
    # dirt and debris: grey-brown
    "dirt": (0.55, 0.62, 0.72),
}

# How each counterstain colours (bone matrix, nuclei, cytoplasm)
COUNTERSTAIN_AFFINITY = {
    "hematoxylin": (0.22, 1.00, 0.10),
    "fast-green": (0.55, 0.35, 0.22),
    "methyl-green": (0.14, 0.90, 0.06),
}


#: how each counterstain colours cartilage matrix (hyaline cartilage is basophilic: hematoxylin
#: stains it deeper than bone, calcified cartilage darkest; fast green stains it paler than bone)
CARTILAGE_AFFINITY = {"hematoxylin": 0.60, "fast-green": 0.20, "methyl-green": 0.30}


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def sample_style(rng: np.random.Generator, counterstain: str | None = None) -> dict:
    """Per-slide staining and imaging parameters."""
    if counterstain is None:
        counterstain = str(rng.choice(COUNTERSTAINS))
    if counterstain not in COUNTERSTAINS:
        raise ValueError(f"unknown counterstain {counterstain!r}; choose one of {COUNTERSTAINS}")

    def jitter(name, sd=0.07):
        return _unit(np.clip(np.asarray(STAIN_OD[name]) + rng.normal(0, sd, 3), 0.02, None))

    trap_kind = rng.random()
    trap_vec = STAIN_OD["trap"] if trap_kind < 0.6 else (0.30, 0.85, 0.42)  # pararosaniline
    return {
        "counterstain": counterstain,
        "v_counter": jitter(counterstain),
        "v_trap": _unit(np.clip(np.asarray(trap_vec) + rng.normal(0, 0.06, 3), 0.02, None)),
        "v_rbc": jitter("rbc"),
        "v_tissue": jitter("tissue", 0.05),
        "v_dirt": jitter("dirt", 0.05),
        "counter_strength": float(rng.uniform(0.55, 1.35)),
        "trap_strength": float(rng.uniform(0.55, 1.4)),
        "tissue_od": float(rng.uniform(0.02, 0.10)),
        "lamella_um": float(rng.uniform(3.5, 8.0)),
        "lamella_amp": float(rng.uniform(0.08, 0.3)),
        "uneven": float(rng.uniform(0.05, 0.35)),
        "uneven_scale_um": float(rng.uniform(200.0, 900.0)),
        "blur_um": float(rng.uniform(0.2, 1.1)),
        "noise_dn": float(rng.uniform(0.8, 4.0)),
        "vignette": float(rng.uniform(0.0, 0.18)),
        "white": (rng.uniform(228, 250, 3) + rng.normal(0, 2, 3)).clip(215, 255).astype(np.float32),
        "jpeg_quality": int(rng.integers(55, 96)) if rng.random() < 0.7 else None,
        "fold": bool(rng.random() < 0.3),
        "n_dirt": int(rng.poisson(4)),
    }


class Counterstain(NamedTuple):
    """Counterstain concentration and the texture maps the other stains share."""

    density: np.ndarray  #: counterstain concentration
    fine: np.ndarray  #: fine staining texture (relative)
    uneven: np.ndarray  #: uneven staining over the slide (factor)
    empty: np.ndarray  #: 0..1 where the tissue is empty


def _counterstain_density(fld: Field, style: dict, rng: np.random.Generator) -> Counterstain:
    """Counterstain concentration: bone matrix with lamellae, cartilage, nuclei, cytoplasm."""
    h, w = fld.shape
    p = fld.pixel_size_um
    bone = np.isin(fld.class_map, (classes.BONE, classes.OSTEOCYTE))
    aff_bone, aff_nuc, aff_cyto = COUNTERSTAIN_AFFINITY[style["counterstain"]]
    # lamellar texture: bands parallel to the bone surface
    lam = 1.0 + style["lamella_amp"] * np.sin(
        2 * np.pi * fld.bone_sdf / style["lamella_um"] + smooth_noise(rng, (h, w), p, 40.0)
    )
    if style["lamella_um"] < 3 * p:  # finer than the pixels can carry: fade it out
        lam = 1.0 + (lam - 1.0) * 0.2
    fine = smooth_noise(rng, (h, w), p, 3.0) * 0.12
    uneven = 1.0 + style["uneven"] * smooth_noise(rng, (h, w), p, style["uneven_scale_um"])
    uneven = np.clip(uneven, 0.3, None)
    empty = np.clip(fld.lumen, 0.0, 1.0)
    counter = (
        aff_bone * bone * lam * (1.0 + fine)
        + aff_nuc * fld.nuclei
        + aff_cyto * fld.cytoplasm * (1.0 + 2 * fine)
    )
    if fld.cartilage is not None:
        counter = counter + CARTILAGE_AFFINITY[style["counterstain"]] * fld.cartilage * (1 + fine)
    counter = counter * (1.0 - 0.85 * empty * (fld.nuclei < 0.3))
    return Counterstain(counter * style["counter_strength"] * uneven, fine, uneven, empty)


def _optical_density(fld: Field, style: dict, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) optical density of every stain of the section."""
    counter, fine, uneven, empty = _counterstain_density(fld, style, rng)
    trap = fld.trap * style["trap_strength"] * (1.0 + 0.5 * fine) * uneven
    tissue_od = style["tissue_od"] * fld.tissue * (1.0 - 0.7 * empty)
    return (
        counter[..., None] * style["v_counter"]
        + trap[..., None] * style["v_trap"] * 1.3
        + fld.rbc[..., None] * style["v_rbc"] * 0.9
        + tissue_od[..., None] * style["v_tissue"]
    ).astype(np.float32)


def _add_fold(od: np.ndarray, tissue: np.ndarray, p: float, rng: np.random.Generator) -> None:
    """A fold: the section lies double along a band."""
    h, w = tissue.shape
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    off = rng.uniform(-0.3, 0.3) * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dline = np.abs((xx - w / 2) * s - (yy - h / 2) * c - off) * p
    width = rng.uniform(15.0, 50.0)
    band = np.clip(1.0 - dline / width, 0.0, 1.0) ** 0.5 * tissue
    od *= (1.0 + 0.9 * band)[..., None]


def _add_dirt(od: np.ndarray, style: dict, p: float, rng: np.random.Generator) -> None:
    """Dirt and debris, on tissue or glass."""
    h, w = od.shape[:2]
    for _ in range(style["n_dirt"]):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rad = rng.uniform(3.0, 18.0) / p
        blob = np.zeros((h, w), np.float32)
        cv2.ellipse(
            blob,
            (int(cx), int(cy)),
            (max(int(rad), 1), max(int(rad * rng.uniform(0.3, 1.0)), 1)),
            float(rng.uniform(0, 180)),
            0,
            360,
            float(rng.uniform(0.4, 1.5)),
            -1,
        )
        od += blob[..., None] * style["v_dirt"]


def _image(od: np.ndarray, style: dict, p: float, rng: np.random.Generator) -> np.ndarray:
    """Blur, transmitted light with vignetting, noise and JPEG, as a scanner would."""
    h, w = od.shape[:2]
    sigma = style["blur_um"] / p
    if sigma > 0.3:
        od = cv2.GaussianBlur(od, (0, 0), sigma)
    yy = (np.arange(h, dtype=np.float32) / max(h - 1, 1) - 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5)[None, :]
    illum = 1.0 - style["vignette"] * (yy * yy + xx * xx) * 2.0
    img = style["white"] * illum[..., None] * np.power(10.0, -od)
    img += rng.normal(0.0, style["noise_dn"], img.shape).astype(np.float32)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if style["jpeg_quality"] is not None:
        ok, buf = cv2.imencode(
            ".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, style["jpeg_quality"]]
        )
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(img)


def render(fld: Field, style: dict, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 image of ``fld`` stained and imaged as ``style`` says."""
    od = _optical_density(fld, style, rng)
    if style["fold"]:
        _add_fold(od, fld.tissue, fld.pixel_size_um, rng)
    _add_dirt(od, style, fld.pixel_size_um, rng)
    return _image(od, style, fld.pixel_size_um, rng)
