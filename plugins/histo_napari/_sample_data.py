"""Sample data: one synthetic TRAP section of each phenotype, with its ground truth.

The sections come from :func:`histo.synth.make_section` (1024 x 1024 px at 1 µm/px); the
layer metadata hold the pixel size and the true indices (``metadata['truth']``), so a
result can be compared with the truth at once.
"""

from __future__ import annotations

from typing import Any

SAMPLE_SIZE_PX = 1024
SAMPLE_PIXEL_SIZE_UM = 1.0
#: seeds chosen to give a typical field of each phenotype
SEEDS = {"normal": 1, "oc-rich": 7, "oc-poor": 3}


def make_sample(
    phenotype: str,
    size: int = SAMPLE_SIZE_PX,
    pixel_size_um: float = SAMPLE_PIXEL_SIZE_UM,
    seed: int | None = None,
) -> list[tuple[Any, dict[str, Any], str]]:
    """Layer data of a synthetic section: an RGB image layer scaled in µm."""
    from histo.synth import make_section

    seed = SEEDS.get(phenotype, 0) if seed is None else seed
    section = make_section(phenotype, size=size, pixel_size_um=pixel_size_um, seed=seed)
    px = section.pixel_size_um
    meta = {
        "pixel_size_um": px,
        "truth": dict(section.truth),
        "phenotype_truth": phenotype,
        "slide_name": f"synthetic-{phenotype}",
        "seed": seed,
    }
    kwargs = {
        "name": f"synthetic {phenotype}",
        "rgb": True,
        "scale": (px, px),
        "units": ("micrometer", "micrometer"),
        "metadata": meta,
    }
    return [(section.image, kwargs, "image")]


def normal() -> list[tuple[Any, dict[str, Any], str]]:
    """A synthetic section of a normal mouse proximal tibia."""
    return make_sample("normal")


def oc_rich() -> list[tuple[Any, dict[str, Any], str]]:
    """A synthetic osteoclast-rich osteopetrotic section (many non-resorbing osteoclasts)."""
    return make_sample("oc-rich")


def oc_poor() -> list[tuple[Any, dict[str, Any], str]]:
    """A synthetic osteoclast-poor osteopetrotic section (no osteoclasts)."""
    return make_sample("oc-poor")
