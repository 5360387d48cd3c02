"""Cells of a synthetic section: osteoclasts and their pits, osteocytes, marrow cells.

Each step draws into the ground truth (labels, masks) and the rendering layers
(:class:`CellLayers`), in pixels at the section's pixel size, with sizes given in µm. Steps take
the masks they may draw into (where cells may lie, which surfaces they may sit on), so field and
long-bone sections share them. The order of random draws is part of the output: the same seed
must give the same section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from histo.synth._geometry import (
    CellLayers,
    Ellipse,
    PhenotypeParams,
    _contour_samples,
    _draw_ellipse,
    _largest_component,
    smooth_noise,
)

_CROSS3 = np.ones((3, 3), np.uint8)


@dataclass
class BoneSurface:
    """Shuffled sample points on the bone surface, with the bone field's gradient."""

    points: np.ndarray  #: (N, 2) int (y, x), inside bone on its boundary
    gy: np.ndarray  #: gradient of the bone field along y (per px)
    gx: np.ndarray  #: gradient of the bone field along x (per px)
    approx_bpm_mm: float  #: bone perimeter estimated from edge pixels (mm)


@dataclass
class OsteoclastCell:
    """One drawn osteoclast: its window, its mask there, its pit's carved bone field."""

    window: tuple[slice, slice]
    cell: np.ndarray  #: bool, in the window
    carved: np.ndarray  #: bool, bone removed under it (Howship's lacuna), in the window
    carved_sdf: np.ndarray  #: the bone field of the window with the pit carved


@dataclass
class Resorption:
    """Osteoclasts and eroded surface of a section."""

    labels: np.ndarray  #: int32 osteoclast instances
    pit_mask: np.ndarray  #: bool eroded surface (Howship's lacunae)
    keepout: np.ndarray  #: bool, where no further osteoclast or pit may go
    cells: list[OsteoclastCell] = field(default_factory=list)
    used: int = 0  #: surface points consumed by osteoclast placement

    @property
    def n_osteoclasts(self) -> int:
        return len(self.cells)


@dataclass
class Osteocytes:
    """Osteocyte lacunae: instance labels and which lacunae hold a cell."""

    labels: np.ndarray  #: int32
    occupied: dict[int, bool]


def bone_surface(bone_sdf: np.ndarray, pixel_size_um: float) -> BoneSurface:
    """The bone field's gradient and an estimate of the bone perimeter; no points yet."""
    bone0 = bone_sdf > 0
    gy, gx = np.gradient(bone_sdf)
    edge = bone0 ^ cv2.erode(bone0.astype(np.uint8), _CROSS3).astype(bool)
    approx_bpm_mm = edge.sum() * pixel_size_um / 1000.0 / 1.12
    return BoneSurface(np.zeros((0, 2), np.int64), gy, gx, approx_bpm_mm)


def _sample_surface(surface: BoneSurface, bone_sdf, allowed: np.ndarray, rng) -> None:
    """Shuffled surface points (about one per pixel of outline) where ``allowed``."""
    pts = _contour_samples(bone_sdf > 0, 1.0, rng)
    if len(pts):
        pts = pts[allowed[pts[:, 0], pts[:, 1]]]
    rng.shuffle(pts)
    surface.points = pts


def _osteoclast_parts(rng, y, x, ny, nx, ang_t, length, thick) -> list[Ellipse]:
    """2-4 overlapping ellipses along the surface tangent, on the marrow side."""
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
    return parts


def _osteoclast_at(
    rng, y: int, x: int, surface: BoneSurface, bone_sdf, space, pp: PhenotypeParams, p: float
) -> OsteoclastCell | None:
    """Draw one osteoclast on the surface at (y, x), with its pit; None where it cannot lie."""
    h, w = bone_sdf.shape
    um = 1.0 / p
    ny, nx = -surface.gy[y, x], -surface.gx[y, x]  # outward normal (into marrow)
    nn = np.hypot(ny, nx)
    if nn < 1e-6:
        return None
    ny, nx = ny / nn, nx / nn
    ang_t = np.arctan2(nx, -ny)  # tangent direction (dy, dx) = (sin, cos) -> perpendicular
    length = rng.uniform(*pp.oc_length_um) * um
    thick = rng.uniform(8.0, 16.0) * um
    pit_d = rng.uniform(*pp.pit_depth_um) * um
    # pit: an ellipse centred on the surface, flattened along the surface
    pit = Ellipse(y - ny * 0.0, x - nx * 0.0, length * 0.5, max(pit_d, 0.0), ang_t)
    parts = _osteoclast_parts(rng, y, x, ny, nx, ang_t, length, thick)
    r = int(length + thick + pit_d + 4)
    y0, y1 = max(y - r, 0), min(y + r + 1, h)
    x0, x1 = max(x - r, 0), min(x + r + 1, w)
    sl = (slice(y0, y1), slice(x0, x1))
    cell = np.zeros((y1 - y0, x1 - x0), bool)
    for e in parts:
        cell |= e.level(sl) <= 1.0
    bone_local = bone_sdf[sl] > 0
    carved_sdf = bone_sdf[sl]
    if pit_d >= 1.0:  # shallower than a pixel: the class map cannot show it
        carved_sdf = _lowered_surface(pit, carved_sdf, cell & ~bone_local, sl, p)
    carved = bone_local & ~(carved_sdf > 0)
    cell = (cell & ~bone_local) | carved
    cell &= space[sl]
    return OsteoclastCell(sl, _largest_component(cell), carved, carved_sdf)


def _lowered_surface(pit: Ellipse, sdf: np.ndarray, over, sl, p: float) -> np.ndarray:
    """The bone field of a window with a Howship's lacuna under ``over`` (a cell or the pit).

    The pit is a layer taken off the bone surface, ``pit.b`` px deep at its centre and
    thinning to nothing ``pit.a`` px along the surface either way, only within a pit depth of
    ``over``. Lowering the surface (the field is a distance in µm) keeps the pit open to the
    marrow where the surface curves; cutting the pit's flat ellipse out of the bone left its
    ends as thin channels under the surface, osteoclast in the class map that no image shows.
    """
    u, _ = pit.axes(sl)
    depth_um = pit.b * p * np.sqrt(np.clip(1.0 - (u / pit.a) ** 2, 0.0, None))
    r = int(np.ceil(pit.b)) + 1
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    under = cv2.dilate(over.astype(np.uint8), disk).astype(bool)
    return np.where(under, sdf - depth_um, sdf).astype(sdf.dtype)


def place_osteoclasts(
    rng: np.random.Generator,
    bone_sdf: np.ndarray,
    surface: BoneSurface,
    allowed: np.ndarray,
    space: np.ndarray,
    n_target: int,
    pp: PhenotypeParams,
    pixel_size_um: float,
    res: Resorption | None = None,
) -> Resorption:
    """Up to ``n_target`` osteoclasts on allowed surface points, each in a Howship's lacuna.

    ``bone_sdf`` is carved in place under the pits. Osteoclasts keep a 2 px gap between them and
    stay inside ``space`` (where cells may lie). Given ``res``, adds to it (``n_target`` more).
    """
    shape = bone_sdf.shape
    if res is None:
        res = Resorption(np.zeros(shape, np.int32), np.zeros(shape, bool), np.zeros(shape, bool))
    n_target += res.n_osteoclasts
    _sample_surface(surface, bone_sdf, allowed, rng)
    tries = si = 0
    pts = surface.points
    while res.n_osteoclasts < n_target and si < len(pts) and tries < n_target * 60:
        tries += 1
        y, x = pts[si]
        si += 1
        if res.keepout[y, x]:
            continue
        oc = _osteoclast_at(rng, y, x, surface, bone_sdf, space, pp, pixel_size_um)
        if oc is None or (oc.cell & res.keepout[oc.window]).any() or oc.cell.sum() < 20:
            continue
        res.cells.append(oc)
        res.labels[oc.window][oc.cell] = res.n_osteoclasts
        if oc.carved.any():
            res.pit_mask[oc.window] |= oc.carved
            bone_sdf[oc.window] = oc.carved_sdf
        dil = cv2.dilate(oc.cell.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        res.keepout[oc.window] |= dil
    res.used = si
    return res


def carve_empty_pits(
    rng: np.random.Generator,
    bone_sdf: np.ndarray,
    surface: BoneSurface,
    res: Resorption,
    n_pits: int,
    pixel_size_um: float,
) -> int:
    """Eroded surface left by resorption that ended (no osteoclast); returns the pits carved."""
    p = pixel_size_um
    um = 1.0 / p
    placed = 0
    for y, x in surface.points[res.used :]:
        if placed >= n_pits:
            break
        if res.keepout[y, x]:
            continue
        ny, nx = -surface.gy[y, x], -surface.gx[y, x]
        ang_t = np.arctan2(nx, -ny)
        pit = Ellipse(y, x, rng.uniform(20, 45) * um * 0.5, rng.uniform(2.5, 6) * um, ang_t)
        sl = pit.bbox(bone_sdf.shape)
        carved_sdf = _lowered_surface(pit, bone_sdf[sl], pit.level(sl) <= 1.0, sl, p)
        local = (bone_sdf[sl] > 0) & ~(carved_sdf > 0)
        if local.sum() < 3:
            continue
        res.pit_mask[sl] |= local
        bone_sdf[sl] = carved_sdf
        res.keepout[sl] |= local
        placed += 1
    return placed


def _lacuna(rng, y, x, bgy, bgx, um) -> Ellipse:
    ang = np.arctan2(bgx[y, x], -bgy[y, x])  # along the surface
    a = rng.uniform(4.0, 6.5) * um
    b = rng.uniform(2.0, 3.2) * um
    return Ellipse(y + rng.uniform(-0.5, 0.5), x + rng.uniform(-0.5, 0.5), a, b, ang)


def place_osteocytes(
    rng: np.random.Generator,
    bone: np.ndarray,
    host: np.ndarray,
    layers: CellLayers,
    spacing_um: float,
    empty_fraction: float,
    pixel_size_um: float,
) -> Osteocytes:
    """Osteocyte lacunae by dart throwing inside ``host`` bone, oriented along the lamellae.

    ``bone`` is the bone matrix (its distance map orients the lacunae and keeps them 7 µm in);
    ``host`` is where a lacuna may lie (bone, minus cartilage in long-bone sections).
    """
    p = pixel_size_um
    um = 1.0 / p
    shape = bone.shape
    bone_dist_in = cv2.distanceTransform(bone.astype(np.uint8), cv2.DIST_L2, 5) * p
    out = Osteocytes(np.zeros(shape, np.int32), {})
    spacing = spacing_um * um
    cand = np.argwhere(bone_dist_in > 7.0)
    if not len(cand):
        return out
    n_try = int(len(cand) / max(spacing * spacing, 1.0) * 1.6) + 1
    picks = cand[rng.integers(0, len(cand), size=n_try)]
    taken = np.zeros(shape, bool)
    bgy, bgx = np.gradient(bone_dist_in)
    for y, x in picks:
        if taken[y, x]:
            continue
        e = _lacuna(rng, y, x, bgy, bgx, um)
        sl = e.bbox(shape)
        lac = e.level(sl) <= 1.0
        if not lac.any() or (lac & ~host[sl]).any():
            continue
        n = len(out.occupied) + 1
        out.labels[sl][lac] = n
        is_occ = bool(rng.random() > empty_fraction)
        out.occupied[n] = is_occ
        _draw_ellipse(layers.lumen, Ellipse(e.cy, e.cx, e.a, e.b, e.angle), 0.85, soft=True)
        if is_occ:
            nucleus = Ellipse(e.cy, e.cx, e.a * 0.72, e.b * 0.72, e.angle)
            _draw_ellipse(layers.nuclei, nucleus, 1.0, soft=True)
        # keep-out disk so lacunae never touch
        r = int(spacing * 0.5 + e.a)
        taken[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1] = True
    return out


def paint_osteoclasts(
    rng: np.random.Generator,
    res: Resorption,
    layers: CellLayers,
    nuclei_range: tuple[int, int],
    pixel_size_um: float,
) -> None:
    """TRAP cytoplasm with granules and several nuclei in every osteoclast."""
    p = pixel_size_um
    um = 1.0 / p
    granules = np.clip(smooth_noise(rng, res.labels.shape, p, 2.0) * 0.25 + 1.0, 0.4, 1.6)
    for oc in res.cells:
        sl, cell = oc.window, oc.cell
        t_local = cell.astype(np.float32) * rng.uniform(0.7, 1.2)
        t_local = cv2.GaussianBlur(t_local, (0, 0), max(0.6 * um, 0.5))
        layers.trap[sl] = np.maximum(layers.trap[sl], t_local * granules[sl] * cell)
        layers.cytoplasm[sl] = np.maximum(layers.cytoplasm[sl], cell * 0.35)
        k = int(rng.integers(nuclei_range[0], nuclei_range[1] + 1))
        inside = np.argwhere(cv2.erode(cell.astype(np.uint8), _CROSS3) > 0)
        if len(inside) == 0:
            inside = np.argwhere(cell)
        for _ in range(k):
            cy, cx = inside[rng.integers(len(inside))]
            _draw_ellipse(
                layers.nuclei,
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


@dataclass
class MarrowSpace:
    """Where marrow cells go: the marrow mask and the distance to bone (µm)."""

    marrow: np.ndarray  #: bool
    dist_to_bone: np.ndarray  #: float32 µm
    keepout: np.ndarray  #: bool, osteoclasts and pits (no lining cells there)
    pixel_size_um: float

    @property
    def area_um2(self) -> float:
        return self.marrow.sum() * self.pixel_size_um * self.pixel_size_um


def _adipocytes(rng, space: MarrowSpace, idx, layers: CellLayers, fraction: float) -> None:
    """Round white ghosts 20-60 µm across with a thin cytoplasm rim."""
    um = 1.0 / space.pixel_size_um
    marrow = space.marrow
    n_adipo = int(fraction * space.area_um2 / (np.pi * 18.0**2))
    for y, x in idx[rng.integers(0, len(idx), size=n_adipo)]:
        rad = rng.uniform(10.0, 30.0) * um
        e = Ellipse(y, x, rad, rad * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi))
        sl = e.bbox(marrow.shape)
        lv = e.level(sl)
        inside = (lv <= 1.0) & marrow[sl]
        layers.lumen[sl][inside] = 1.0
        rim = (lv > 0.92) & (lv <= 1.05) & marrow[sl]
        layers.cytoplasm[sl][rim] = np.maximum(layers.cytoplasm[sl][rim], 0.5)


def _sinusoids(rng, space: MarrowSpace, idx, layers: CellLayers) -> None:
    """Elongated empty vessels holding red blood cells."""
    um = 1.0 / space.pixel_size_um
    marrow = space.marrow
    n_sin = int(space.area_um2 / 40000.0 * rng.uniform(0.5, 2.0))
    for y, x in idx[rng.integers(0, len(idx), size=n_sin)]:
        e = Ellipse(y, x, rng.uniform(15, 40) * um, rng.uniform(5, 12) * um, rng.uniform(0, np.pi))
        sl = e.bbox(marrow.shape)
        inside = (e.level(sl) <= 1.0) & marrow[sl]
        layers.lumen[sl][inside] = np.maximum(layers.lumen[sl][inside], 0.9)
        pts = np.argwhere(inside)
        if not len(pts):
            continue
        for cy, cx in pts[rng.integers(0, len(pts), size=len(pts) // max(int(30 * um * um), 1))]:
            angle = rng.uniform(0, np.pi)
            cell = Ellipse(sl[0].start + cy, sl[1].start + cx, 3.5 * um, 3.0 * um, angle)
            _draw_ellipse(layers.rbc, cell, rng.uniform(0.6, 1.0), soft=True)


def _hematopoietic(rng, space: MarrowSpace, layers: CellLayers) -> None:
    """Dense, small, dark nuclei, with scattered red cells."""
    p = space.pixel_size_um
    um = 1.0 / p
    free = space.marrow & (layers.lumen < 0.5) & (space.keepout == 0)
    free_idx = np.argwhere(free)
    density = rng.uniform(1 / 90.0, 1 / 45.0)  # per µm²
    n_nuc = int(free.sum() * p * p * density)
    if not len(free_idx):
        return
    pick_idx = free_idx[rng.integers(0, len(free_idx), size=n_nuc)]
    radii = rng.uniform(2.0, 3.8, size=n_nuc) * um
    vals = rng.uniform(0.5, 1.0, size=n_nuc)
    for (y, x), rad, val in zip(pick_idx, radii, vals, strict=True):
        cv2.circle(layers.nuclei, (int(x), int(y)), max(int(round(rad)), 1), float(val), -1)
    n_rbc = n_nuc // 8
    for y, x in free_idx[rng.integers(0, len(free_idx), size=n_rbc)]:
        rad = max(int(round(3.4 * um)), 1)
        cv2.circle(layers.rbc, (int(x), int(y)), rad, float(rng.uniform(0.5, 0.9)), -1)


def _trap_precursors(rng, space: MarrowSpace, layers: CellLayers, per_mm2: float) -> int:
    """Distractors: mononuclear TRAP+ precursors in marrow, away from bone."""
    um = 1.0 / space.pixel_size_um
    far = np.argwhere(space.marrow & (space.dist_to_bone > 20.0) & (layers.lumen < 0.5))
    n_mono = int(per_mm2 * space.area_um2 / 1e6)
    if len(far):
        for y, x in far[rng.integers(0, len(far), size=n_mono)]:
            rad = rng.uniform(5.0, 8.0) * um
            e = Ellipse(y, x, rad, rad * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
            _draw_ellipse(layers.trap, e, rng.uniform(0.5, 1.0), soft=True)
            nucleus = Ellipse(y, x, 3.2 * um, 2.6 * um, e.angle)
            _draw_ellipse(layers.nuclei, nucleus, 0.8, soft=True)
    return n_mono


def _osteoblasts(rng, space: MarrowSpace, layers: CellLayers) -> None:
    """Cuboidal TRAP-negative cells lining free bone surfaces."""
    p = space.pixel_size_um
    um = 1.0 / p
    d = space.dist_to_bone
    lining = np.argwhere(space.marrow & (d > 0) & (d < 6.0) & ~space.keepout & (layers.lumen < 0.5))
    n_ob = int(len(lining) * rng.uniform(0.002, 0.01) * p)
    if not len(lining):
        return
    for y, x in lining[rng.integers(0, len(lining), size=n_ob)]:
        e = Ellipse(y, x, rng.uniform(4, 6) * um, rng.uniform(3, 4.5) * um, rng.uniform(0, np.pi))
        _draw_ellipse(layers.cytoplasm, e, 0.7, soft=True)
        _draw_ellipse(layers.nuclei, Ellipse(y, x, 2.8 * um, 2.2 * um, e.angle), 0.9, soft=True)


def populate_marrow(
    rng: np.random.Generator, space: MarrowSpace, layers: CellLayers, params: dict
) -> None:
    """Adipocytes, sinusoids, hematopoietic cells, TRAP+ precursors and osteoblasts.

    Reads ``adipocyte_fraction`` and ``trap_mono_per_mm2`` from ``params`` and records the
    number of precursors drawn as ``params["trap_mono"]``.
    """
    idx = np.argwhere(space.marrow & (space.dist_to_bone > 3.0))
    if not len(idx):
        return
    _adipocytes(rng, space, idx, layers, params["adipocyte_fraction"])
    _sinusoids(rng, space, idx, layers)
    _hematopoietic(rng, space, layers)
    layers.cytoplasm[space.marrow] = np.maximum(layers.cytoplasm[space.marrow], 0.25)
    params["trap_mono"] = _trap_precursors(rng, space, layers, params["trap_mono_per_mm2"])
    _osteoblasts(rng, space, layers)
