"""Stain vectors of a slide (Macenko's method) compared with the stains histo was trained on.

Macenko et al. 2009 (ISBI, doi 10.1109/ISBI.2009.5193250): optical density (OD) of tissue
pixels above an OD floor; the plane of its two main directions (eigenvectors of the OD
second-moment matrix); the angle of each pixel's OD in that plane; the 1st and 99th percentile
angles give the two stain vectors. Here the percentiles are of the OD energy (each pixel's angle
weighted by its squared OD), not of the pixel count: a pixel's angle is off by about its noise
over its OD, so faint pixels near the OD floor scatter beyond the stains and a count percentile
overshoots them (most of all the counterstain, away from the TRAP stain: just the direction of
aniline blue). The reference vectors come from the synthetic renderer's table
(histo.synth._render.STAIN_OD), so what is "in domain" is what the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histo.io.color import optical_density, summed_od
from histo.synth._render import STAIN_OD

#: pixels whose summed OD is below this are glass or too pale to carry a stain's hue
OD_FLOOR = 0.15
#: OD vectors sampled per slide for the estimate (bounded time, percentiles stable to ~0.1 deg)
MAX_PIXELS = 200_000
#: pararosaniline, the other TRAP chromogen, as the synthetic renderer draws it
PARAROSANILINE_OD = (0.30, 0.85, 0.42)

COUNTERSTAINS = {name: STAIN_OD[name] for name in ("hematoxylin", "fast-green", "methyl-green")}
#: what the second stain direction of an in-domain slide can be: the TRAP chromogens, or, on a
#: slide with few osteoclasts, red blood cells or the neutral tint of unstained tissue
SECOND_STAINS = {
    "fast red violet (TRAP)": STAIN_OD["trap"],
    "pararosaniline (TRAP)": PARAROSANILINE_OD,
    "red blood cells": STAIN_OD["rbc"],
    "unstained tissue": STAIN_OD["tissue"],
}


@dataclass(frozen=True)
class StainEstimate:
    """The slide's two stain vectors and how they compare with the known stains.

    Attributes
    ----------
    counterstain_od, second_od : ndarray
        Unit OD vectors (R, G, B): the one nearer a known counterstain, and the other.
    counterstain, second : str
        Names of the nearest known stains.
    counterstain_deg, second_deg : float
        Angles (degrees) to those nearest known stains.
    separation_deg : float
        Angle between the two estimated vectors: small when the colours are washed out.
    third_stain : float
        Share (0-1) of the OD energy outside the plane of two stains: a third dye.
    second_share : float
        Share (0-1) of the stain amount in tissue that the second stain carries: TRAP marks
        osteoclasts only, eosin or a trichrome red covers most of the tissue.
    n_pixels : int
        Tissue pixels used.
    """

    counterstain_od: np.ndarray
    second_od: np.ndarray
    counterstain: str
    second: str
    counterstain_deg: float
    second_deg: float
    separation_deg: float
    third_stain: float
    second_share: float
    n_pixels: int


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def angle_deg(a, b) -> float:
    """Angle between two vectors in degrees."""
    c = float(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0))
    return float(np.degrees(np.arccos(c)))


def _nearest(v: np.ndarray, table: dict) -> tuple[str, float]:
    name = min(table, key=lambda k: angle_deg(v, table[k]))
    return name, angle_deg(v, table[name])


def tissue_od(
    tiles: list[np.ndarray],
    max_pixels: int = MAX_PIXELS,
    od_sums: list[np.ndarray] | None = None,
) -> np.ndarray:
    """(N, 3) OD of stained tissue pixels (summed OD above :data:`OD_FLOOR`), subsampled.

    The stained pixels of all tiles, in order, are taken with a fixed stride (deterministic)
    when there are more than ``max_pixels``; the OD is looked up for those pixels only.
    ``od_sums``: the tiles' summed OD (:func:`histo.io.color.summed_od`) when the caller has
    them.
    """
    if od_sums is None:
        od_sums = [summed_od(t) for t in tiles]
    stained = [np.flatnonzero(s > OD_FLOOR) for s in od_sums]
    n = sum(len(idx) for idx in stained)
    step = int(np.ceil(n / max_pixels)) if n > max_pixels else 1
    parts, before = [], 0  # stained pixels of the tiles before this one
    for tile, idx in zip(tiles, stained, strict=True):
        rgb = np.asarray(tile).reshape(-1, np.shape(tile)[-1])
        parts.append(optical_density(rgb[idx[(-before) % step :: step]]))
        before += len(idx)
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.float32)


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, q) -> np.ndarray:
    """Percentiles ``q`` (0-100) of ``values`` where each value counts with its weight."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order], dtype=np.float64)
    idx = np.searchsorted(cum, np.asarray(q, np.float64) / 100.0 * cum[-1])
    return values[order][np.clip(idx, 0, len(values) - 1)]


def macenko_vectors(od: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Two unit stain vectors by Macenko's method, and the OD energy share off their plane.

    The 1st and 99th percentile angles are those of the OD energy (weights ``|od|^2``), so a
    stain vector is where the bulk of its stain lies, not where faint noisy pixels scatter.
    """
    od = od.astype(np.float64)
    moment = od.T @ od / len(od)
    eigval, eigvec = np.linalg.eigh(moment)  # ascending
    plane = eigvec[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # OD directions are positive
    third = float(eigval[0] / max(eigval.sum(), 1e-12))
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = weighted_percentiles(phi, np.einsum("ij,ij->i", od, od), [1, 99])
    v1 = _unit(plane @ np.array([np.cos(lo), np.sin(lo)]))
    v2 = _unit(plane @ np.array([np.cos(hi), np.sin(hi)]))
    return v1, v2, third


def _second_share(od: np.ndarray, counter: np.ndarray, second: np.ndarray) -> float:
    """Share of the summed stain amounts (non-negative least squares on two stains)."""
    basis = np.stack([counter, second], axis=1)
    amounts = np.clip(od @ np.linalg.pinv(basis).T, 0.0, None)
    total = amounts.sum()
    return float(amounts[:, 1].sum() / total) if total > 0 else float("nan")


def estimate_stains(
    tiles: list[np.ndarray], od_sums: list[np.ndarray] | None = None
) -> StainEstimate | None:
    """Stain vectors of the tissue in ``tiles`` and their nearest known stains.

    ``od_sums``: the tiles' summed OD when the caller has them. Returns None when fewer than
    1000 stained pixels are found (no tissue to judge).
    """
    od = tissue_od(tiles, od_sums=od_sums)
    if len(od) < 1000:
        return None
    v1, v2, third = macenko_vectors(od)
    (n1, a1), (n2, a2) = _nearest(v1, COUNTERSTAINS), _nearest(v2, COUNTERSTAINS)
    counter, second = (v1, v2) if a1 <= a2 else (v2, v1)
    c_name, c_deg = (n1, a1) if a1 <= a2 else (n2, a2)
    s_name, s_deg = _nearest(second, SECOND_STAINS)
    return StainEstimate(
        counterstain_od=counter,
        second_od=second,
        counterstain=c_name,
        second=s_name,
        counterstain_deg=c_deg,
        second_deg=s_deg,
        separation_deg=angle_deg(counter, second),
        third_stain=third,
        second_share=_second_share(od, counter, second),
        n_pixels=int(len(od)),
    )
