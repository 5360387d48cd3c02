"""Out-of-domain synthetic sections, to choose and test the quality-check thresholds.

In-domain sections come from histo.synth. The out-of-domain kinds re-stain the same synthetic
anatomy with other dyes (Beer-Lambert, through histo.synth's own renderer), blur it, take the
bone away, or state a wrong pixel size. Dye OD vectors are those of Ruifrok & Johnston (Anal
Quant Cytol Histol 2001;23:291-299) and Landini's colour-deconvolution tables as shipped in
scikit-image (``skimage.color.rgb_from_*``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from histo.synth._field import build_field
from histo.synth._geometry import PHENOTYPES, Field
from histo.synth._render import COUNTERSTAINS, render, sample_style

#: eosin Y (skimage rgb_from_hed)
EOSIN_OD = (0.07, 0.99, 0.11)
#: aniline blue (skimage rgb_from_bro) - the collagen/bone blue of Masson's trichrome
ANILINE_BLUE_OD = (0.853, 0.509, 0.113)
#: ponceau / acid fuchsin (skimage rgb_from_bpx) - the cytoplasm red of Masson's trichrome
FUCHSIN_OD = (0.10, 0.737, 0.668)
#: Weigert's iron hematoxylin: near-neutral dark nuclei
IRON_HEMATOXYLIN_OD = (0.58, 0.60, 0.55)

#: per-component jitter of an out-of-domain dye's OD vector (a dye's spectrum varies little;
#: the in-domain renderer jitters its own by 0.06-0.07 to cover lab and scanner variation)
DYE_SD = 0.03

IN_DOMAIN = "in-domain"
#: kinds of out-of-domain section, each of which the checks must flag
OOD_KINDS = (
    "h-and-e",
    "trichrome",
    "aniline-blue",
    "trap-only",
    "greyish",
    "blurred",
    "no-bone",
    "pixel-size-2x",
    "pixel-size-0.5x",
)
KINDS = (IN_DOMAIN, *OOD_KINDS)


@dataclass
class QCCase:
    """One synthetic section for the quality checks.

    Attributes
    ----------
    image : ndarray
        (H, W, 3) uint8 RGB.
    pixel_size_um : float
        True pixel size, µm/px.
    stated_pixel_size_um : float
        The pixel size to give the checks (wrong for the pixel-size kinds).
    kind : str
        One of :data:`KINDS`.
    counterstain, phenotype : str
    seed : int
    """

    image: np.ndarray
    pixel_size_um: float
    stated_pixel_size_um: float
    kind: str
    counterstain: str
    phenotype: str
    seed: int

    def describe(self) -> dict:
        """What the case is, as the first columns of a benchmark's row."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "pixel_size_um": self.pixel_size_um,
            "stated_um": self.stated_pixel_size_um,
            "counterstain": self.counterstain,
            "phenotype": self.phenotype,
        }


def _unit_jitter(rng: np.random.Generator, od, sd: float = 0.05) -> np.ndarray:
    v = np.clip(np.asarray(od, np.float64) + rng.normal(0.0, sd, 3), 0.02, None)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _bone(fld: Field) -> np.ndarray:
    return ((fld.class_map >= 2) & (fld.class_map != 3)).astype(np.float32)


def _h_and_e(fld: Field, style: dict, rng: np.random.Generator) -> np.ndarray:
    """Hematoxylin nuclei; eosin on bone, cytoplasm, osteoclasts and red cells."""
    # eosin binds every protein: bone matrix most, cytoplasm, and a base over all tissue
    eosin = (
        1.0 * _bone(fld) + 0.8 * fld.cytoplasm + 0.5 * fld.trap + 0.6 * fld.rbc + 0.3 * fld.tissue
    )
    style = dict(style, counterstain="hematoxylin", v_trap=_unit_jitter(rng, EOSIN_OD))
    style["v_counter"] = _unit_jitter(rng, (0.65, 0.70, 0.29))
    return render(dataclasses.replace(fld, trap=eosin), style, rng)


def _trichrome(fld: Field, style: dict, rng: np.random.Generator) -> np.ndarray:
    """Masson: aniline-blue bone, fuchsin-red cytoplasm and cells, iron-hematoxylin nuclei."""
    red = (
        0.9 * fld.cytoplasm + 0.8 * fld.trap + 0.8 * fld.rbc + 0.2 * fld.tissue * (_bone(fld) == 0)
    )
    style = dict(style, counterstain="fast-green", v_trap=_unit_jitter(rng, FUCHSIN_OD))
    style["v_counter"] = _unit_jitter(rng, ANILINE_BLUE_OD, DYE_SD)
    style["v_rbc"] = _unit_jitter(rng, IRON_HEMATOXYLIN_OD, 0.03)  # carries the nuclei
    fld = dataclasses.replace(fld, trap=red, rbc=0.8 * fld.nuclei)
    return render(fld, style, rng)


def _no_bone(fld: Field) -> Field:
    """A culture-like field: the marrow and the osteoclasts, the bone taken away (glass)."""
    bone = _bone(fld) > 0
    class_map = np.where(bone, 0, fld.class_map).astype(np.uint8)
    return dataclasses.replace(
        fld,
        tissue=fld.tissue & ~bone,
        class_map=class_map,
        nuclei=np.where(bone, 0.0, fld.nuclei).astype(np.float32),
        bone_sdf=np.minimum(fld.bone_sdf, -1.0).astype(np.float32),
    )


def _greyish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None].astype(np.float32)
    a = float(rng.uniform(0.75, 1.0))
    return np.clip(a * grey + (1.0 - a) * image + 0.5, 0, 255).astype(np.uint8)


def make_case(
    kind: str,
    seed: int,
    size: int = 1024,
    pixel_size_um: float = 1.0,
    counterstain: str | None = None,
    phenotype: str | None = None,
) -> QCCase:
    """One in-domain or out-of-domain synthetic section.

    Parameters
    ----------
    kind : str
        ``in-domain`` or one of :data:`OOD_KINDS`.
    seed : int
        Seeds everything (anatomy, stains, the out-of-domain change).
    size : int
        Field side in pixels.
    pixel_size_um : float
        True pixel size, µm/px.
    counterstain, phenotype : str, optional
        Drawn from ``seed`` when None.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    rng = np.random.default_rng(seed)
    counterstain = counterstain or str(rng.choice(COUNTERSTAINS))
    phenotype = phenotype or str(rng.choice(PHENOTYPES))
    style = sample_style(rng, counterstain)
    fld = build_field(phenotype, (size, size), pixel_size_um, rng, {})
    stated = pixel_size_um
    if kind == "h-and-e":
        image = _h_and_e(fld, style, rng)
    elif kind == "trichrome":
        image = _trichrome(fld, style, rng)
    elif kind == "aniline-blue":
        style = dict(
            style, counterstain="fast-green", v_counter=_unit_jitter(rng, ANILINE_BLUE_OD, DYE_SD)
        )
        image = render(fld, style, rng)
    elif kind == "trap-only":
        image = render(fld, dict(style, counter_strength=0.0), rng)
    elif kind == "no-bone":
        image = render(_no_bone(fld), style, rng)
    else:
        image = render(fld, style, rng)
    if kind == "greyish":
        image = _greyish(image, rng)
    elif kind == "blurred":
        sigma_px = float(rng.uniform(3.0, 6.0)) / pixel_size_um
        image = cv2.GaussianBlur(image, (0, 0), sigma_px)
    elif kind == "pixel-size-2x":
        stated = 2.0 * pixel_size_um
    elif kind == "pixel-size-0.5x":
        stated = 0.5 * pixel_size_um
    return QCCase(image, pixel_size_um, stated, kind, counterstain, phenotype, seed)
