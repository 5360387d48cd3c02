"""Synthetic TRAP-stained bone sections with exact ground truth.

Three phenotypes (``normal``, ``oc-rich``, ``oc-poor``), three counterstains (hematoxylin, fast
green, methyl green), any pixel size from 0.25 to 2 µm/px. The anatomy is drawn in micrometres
(trabecular and cortical bone with lamellae, osteocyte lacunae some of them empty, marrow with
hematopoietic nuclei, adipocyte ghosts and sinusoids, osteoclasts in Howship's lacunae) with the
distractors a naive red threshold would count (mononuclear TRAP+ precursors, red blood cells,
osteoblasts, folds, dirt), then rendered by optical density (Beer-Lambert).

The truth indices use the names and units of ``indices.csv``; the bone perimeter is measured on the
generator's smooth bone field (sub-pixel), not on the class map.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage.measure import find_contours

from histo.regions import Region, RegionBox
from histo.synth._field import build_field
from histo.synth._geometry import PHENOTYPE_PARAMS, PHENOTYPES, Field
from histo.synth._longbone import SECTION_UM, LongBone, build_long_bone
from histo.synth._render import COUNTERSTAINS, render, sample_style
from histo.synth._tiff_write import new_canvas, write_pyramidal_tiff

__all__ = [
    "ANATOMIES",
    "COUNTERSTAINS",
    "PHENOTYPES",
    "PHENOTYPE_PARAMS",
    "SyntheticSection",
    "make_section",
    "write_synthetic_slide",
    "truth_paths",
    "region_paths",
    "long_bone_truth",
]

#: what a synthetic section shows: a piece of metaphysis (field) or a whole long-bone section
ANATOMIES = ("field", "long-bone")

#: physical size of one field of a mosaic (µm) and its largest size in pixels
FIELD_UM = 2500.0
FIELD_MAX_PX = 2560


@dataclass
class SyntheticSection:
    """One synthetic field with its ground truth (all arrays share one pixel grid)."""

    image: np.ndarray  #: (H, W, 3) uint8 RGB
    class_map: np.ndarray  #: (H, W) uint8, codes of histo.classes
    osteoclast_labels: np.ndarray  #: (H, W) int32, 0 = none
    osteocyte_labels: np.ndarray  #: (H, W) int32, every lacuna (occupied or empty)
    occupied: dict[int, bool]  #: osteocyte label -> lacuna holds a cell
    pixel_size_um: float
    truth: dict[str, float]  #: indices, names and units of indices.csv
    params: dict = field(default_factory=dict)
    #: long-bone sections: region map (codes of histo.regions.Region), else None
    regions: np.ndarray | None = None
    #: long-bone sections: the standard measurement region (bool), else None
    standard_region: np.ndarray | None = None
    #: long-bone sections: the standard region's edges (µm on this grid), else None
    region_box_um: RegionBox | None = None


def _check(phenotype: str, pixel_size_um: float, anatomy: str = "field") -> None:
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; choose one of {', '.join(ANATOMIES)}")
    if phenotype not in PHENOTYPES:
        raise ValueError(f"unknown phenotype {phenotype!r}; choose one of {', '.join(PHENOTYPES)}")
    if not (0.1 <= float(pixel_size_um) <= 10.0):
        raise ValueError(f"pixel size {pixel_size_um} µm is outside 0.1-10 µm/px")


def _truth_parts(fld: Field) -> dict[str, float]:
    """Additive ground-truth quantities of one field (pixel units and counts)."""
    import cv2

    cm = fld.class_map
    pit_near = cv2.dilate(fld.pit_mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    bpm = ocs = es = 0.0
    h, w = cm.shape
    padded = np.pad(fld.bone_sdf, 1, constant_values=-1.0)
    for contour in find_contours(padded, 0.0):
        c = contour - 1.0
        seg = np.diff(c, axis=0)
        length = np.hypot(seg[:, 0], seg[:, 1])
        mid = (c[:-1] + c[1:]) / 2
        iy = np.clip(np.rint(mid[:, 0]).astype(int), 0, h - 1)
        ix = np.clip(np.rint(mid[:, 1]).astype(int), 0, w - 1)
        bpm += length.sum()
        ocs += float((length * _osteoclast_share(fld.osteoclast_labels, fld.bone_sdf, mid)).sum())
        es += length[pit_near[iy, ix] > 0].sum()
    n_empty = sum(1 for v in fld.occupied.values() if not v)
    return {
        "tissue_px": float((cm > 0).sum()),
        "bone_px": float(((cm == 2) | (cm == 4)).sum()),
        "bpm_px": float(bpm),
        "ocs_px": float(ocs),
        "es_px": float(es),
        "n_oc": float(fld.params["n_osteoclasts"]),
        "n_ot": float(len(fld.occupied) - n_empty),
        "n_empty": float(n_empty),
    }


def _osteoclast_share(labels: np.ndarray, sdf: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Share of each contour segment an osteoclast covers: of the non-bone corners of the 2x2
    pixel cell the segment lies in, those an osteoclast holds (the measurement's rule with
    exact contact). The generator's cells lie on the bone, and the surface beside a cell is not
    its, so the truth does not depend on the pixel size (Oc.S, Dempster et al. 2013)."""
    h, w = labels.shape
    y0 = np.floor(mid[:, 0]).astype(int)
    x0 = np.floor(mid[:, 1]).astype(int)
    non_bone = np.zeros(len(mid))
    covered = np.zeros(len(mid))
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            yy, xx = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
            nb = ~inside | (sdf[yy, xx] <= 0)
            non_bone += nb
            covered += nb & inside & (labels[yy, xx] > 0)
    return np.divide(covered, non_bone, out=np.zeros(len(mid)), where=non_bone > 0)


def truth_indices(parts: dict[str, float], pixel_size_um: float) -> dict[str, float]:
    """Indices (names and units of indices.csv) from additive ground-truth quantities."""
    p = float(pixel_size_um)
    mm2 = (p / 1000.0) ** 2
    t_ar = parts["tissue_px"] * mm2
    b_ar = parts["bone_px"] * mm2
    b_pm = parts["bpm_px"] * p / 1000.0
    nan = float("nan")

    def ratio(a, b, scale=1.0):
        return a / b * scale if b > 0 else nan

    bv_tv = ratio(b_ar, t_ar, 100.0)
    tb_th_mm = ratio(2 * b_ar, b_pm)
    tb_n = ratio(b_ar / t_ar if t_ar else nan, tb_th_mm)
    return {
        "T.Ar": t_ar,
        "B.Ar": b_ar,
        "Ma.Ar": t_ar - b_ar,
        "BV/TV": bv_tv,
        "Ma.Ar/T.Ar": ratio(t_ar - b_ar, t_ar, 100.0),
        "B.Pm": b_pm,
        "N.Oc": parts["n_oc"],
        "N.Oc/B.Pm": ratio(parts["n_oc"], b_pm),
        "N.Oc/T.Ar": ratio(parts["n_oc"], t_ar),
        "Oc.S/BS": ratio(parts["ocs_px"], parts["bpm_px"], 100.0),
        "ES/BS": ratio(parts["es_px"], parts["bpm_px"], 100.0),
        "N.Ot": parts["n_ot"],
        "N.Ot/B.Ar": ratio(parts["n_ot"], b_ar),
        "Tb.Th": tb_th_mm * 1000.0,
        "Tb.Sp": (1.0 / tb_n - tb_th_mm) * 1000.0 if tb_n and not math.isnan(tb_n) else nan,
        "Tb.N": tb_n,
        "Empty lacunae (non-standard)": parts["n_empty"],
        "N.TRAP+ off bone": 0.0,
    }


#: a long-bone section's default long side is SECTION_UM, capped at this many pixels (memory)
LONG_BONE_MAX_PX = 6000


def section_shape(
    anatomy: str, size: int | tuple[int, int] | None, pixel_size_um: float
) -> tuple[int, int]:
    """(H, W) in pixels. A long-bone section's ``size`` is its long side (rows, along the bone).

    Without ``size``: 1024 x 1024 for a field; for a long bone, 3 mm x 2 mm at the pixel size
    (the long side capped at :data:`LONG_BONE_MAX_PX`).
    """
    if isinstance(size, tuple | list):
        return int(size[0]), int(size[1])
    if anatomy == "field":
        n = 1024 if size is None else int(size)
        return n, n
    if size is None:
        size = min(round(SECTION_UM[0] / pixel_size_um), LONG_BONE_MAX_PX)
    h = int(size)
    return h, int(round(h * SECTION_UM[1] / SECTION_UM[0]))


def make_section(
    phenotype: str,
    size: int | tuple[int, int] | None = None,
    pixel_size_um: float = 1.0,
    seed: int = 0,
    counterstain: str | None = None,
    style: dict | None = None,
    anatomy: str = "field",
    **overrides,
) -> SyntheticSection:
    """One synthetic section in memory, with its ground truth.

    Parameters
    ----------
    phenotype
        ``normal``, ``oc-rich`` or ``oc-poor``.
    size
        Size in pixels: an int (a square field; a long-bone section's long side) or (H, W).
        Default 1024 for a field, 3 mm at the pixel size for a long bone. Keep it to a few
        thousand pixels; use :func:`write_synthetic_slide` for whole slides.
    pixel_size_um
        Pixel size in µm/px (0.25-2 is the range scanners give).
    seed
        Seeds everything: the same arguments give the same section.
    counterstain
        ``hematoxylin``, ``fast-green`` or ``methyl-green``; random when None.
    style
        Staining and imaging parameters (see ``histo.synth._render.sample_style``); sampled
        from ``seed`` when None.
    anatomy
        ``field`` (a piece of bone and marrow) or ``long-bone`` (a longitudinal section with
        growth plate, spongiosa, cortices and muscle; the truth is that of its standard region).
    **overrides
        Fix a sampled anatomy parameter, e.g. ``bv_tv=0.15`` or ``oc_per_mm=4``.
    """
    _check(phenotype, pixel_size_um, anatomy)
    shape = section_shape(anatomy, size, pixel_size_um)
    rng = np.random.default_rng(seed)
    if style is None:
        style = sample_style(rng, counterstain)
    if anatomy == "long-bone":
        lb = _build_long_bone(phenotype, shape, pixel_size_um, rng, overrides)
        fld = lb.field
    else:
        fld = build_field(phenotype, shape, pixel_size_um, rng, overrides)
    section = _section_of(fld, render(fld, style, rng), style, seed)
    if anatomy == "long-bone":
        section.truth = long_bone_truth(lb)
        section.regions, section.standard_region = lb.regions, lb.standard
        section.region_box_um = lb.box
    else:
        section.truth = truth_indices(_truth_parts(fld), pixel_size_um)
    return section


def _section_of(fld: Field, image: np.ndarray, style: dict, seed: int) -> SyntheticSection:
    """The section record of a drawn and rendered field (truth filled in by the caller)."""
    params = dict(fld.params)
    params.update(
        {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in style.items()},
        seed=seed,
        pixel_size_um=float(fld.pixel_size_um),
    )
    return SyntheticSection(
        image=image,
        class_map=fld.class_map,
        osteoclast_labels=fld.osteoclast_labels,
        osteocyte_labels=fld.osteocyte_labels,
        occupied=fld.occupied,
        pixel_size_um=float(fld.pixel_size_um),
        truth={},
        params=params,
    )


def _build_long_bone(phenotype, shape, pixel_size_um, rng, overrides) -> LongBone:
    if max(shape) * pixel_size_um < 1500.0 or min(shape) * pixel_size_um < 1000.0:
        raise ValueError(
            f"a long-bone section of {shape[0]}x{shape[1]} px at {pixel_size_um} µm/px is too "
            "small: it needs at least 1.5 mm x 1 mm (growth plate, spongiosa and cortices)"
        )
    return build_long_bone(phenotype, shape, pixel_size_um, rng, overrides)


def long_bone_truth(lb: LongBone) -> dict[str, float]:
    """Truth indices of a long-bone section's standard region (names of indices.csv).

    :func:`histo.measure.measure` on the true class map (codes 0-6) inside the true standard
    region, the one implementation the pipeline measures with: cartilage counts with bone
    matrix (B.Ar includes calcified cartilage, Parfitt et al. 1987) and ``Cg.Ar/B.Ar`` is its
    share; soft tissue (6) lies outside T.Ar. Osteocyte counts use the generator's lacuna
    occupancy, which the class map does not hold.
    """
    from histo.measure import measure
    from histo.measure.indices import CountingRules

    fld = lb.field
    region = lb.standard
    m = measure(
        fld.class_map,
        fld.pixel_size_um,
        osteoclast_labels=fld.osteoclast_labels,
        osteocyte_labels=fld.osteocyte_labels,
        roi=region,
        # the generator's cells lie on the bone: exact contact, at any pixel size
        rules=CountingRules(oc_surface_tolerance_px=0),
    )
    indices = dict(m.indices)
    occupied, empty = _lacunae_in(fld, region)
    b_ar = indices["B.Ar"]
    indices.update(
        {
            "N.Ot": float(occupied),
            "N.Ot/B.Ar": occupied / b_ar if b_ar > 0 else math.nan,
            "Empty lacunae (non-standard)": float(empty),
            "N.TRAP+ off bone": 0.0,
        }
    )
    return indices


def _lacunae_in(fld: Field, region: np.ndarray) -> tuple[int, int]:
    """Occupied and empty osteocyte lacunae whose centroid lies in ``region``."""
    labels = fld.osteocyte_labels
    n = int(labels.max())
    if n == 0:
        return 0, 0
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    count = np.bincount(ids, minlength=n + 1)
    cy = np.bincount(ids, ys, minlength=n + 1) / np.maximum(count, 1)
    cx = np.bincount(ids, xs, minlength=n + 1) / np.maximum(count, 1)
    occupied = empty = 0
    for k in range(1, n + 1):
        if count[k] and region[int(round(cy[k])), int(round(cx[k]))]:
            if fld.occupied.get(k, True):
                occupied += 1
            else:
                empty += 1
    return occupied, empty


def truth_paths(slide_path: str | os.PathLike) -> dict[str, Path]:
    """Where the ground truth of a synthetic slide lies, beside ``NAME.ome.tif``."""
    slide_path = Path(slide_path)
    stem = slide_path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    d = slide_path.parent
    return {
        "classes": d / f"{stem}.classes.tif",
        "osteoclasts": d / f"{stem}.osteoclasts.tif",
        "osteocytes": d / f"{stem}.osteocytes.tif",
        "truth": d / f"{stem}.truth.json",
    }


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def region_paths(slide_path: str | os.PathLike) -> dict[str, Path]:
    """Where a long-bone slide's region truth lies: region map and standard region."""
    classes_path = truth_paths(slide_path)["classes"]
    stem = classes_path.name[: -len(".classes.tif")]
    return {
        "regions": classes_path.with_name(f"{stem}.regions.tif"),
        "standard": classes_path.with_name(f"{stem}.standard.tif"),
    }


def write_synthetic_slide(
    path: str | os.PathLike,
    phenotype: str,
    size: int | tuple[int, int] | None = None,
    pixel_size_um: float = 1.0,
    seed: int = 0,
    counterstain: str | None = None,
    progress: Callable[[float, str], None] | None = None,
    anatomy: str = "field",
    **overrides,
) -> dict:
    """Write a synthetic slide (pyramidal OME-TIFF) and its ground truth beside it.

    Fields: a slide larger than one field (about 2.5 mm or 3072 px a side; default 2048 px) is a
    mosaic of independent section fields, each with a glass margin, rendered one at a time: peak
    memory is set by the field, not the slide. A long-bone section (``anatomy="long-bone"``,
    default 3 mm x 2 mm) is one piece; ``size`` is its long side.

    Writes ``NAME.ome.tif``, ``NAME.classes.tif`` (uint8 class map), ``NAME.osteoclasts.tif`` and
    ``NAME.osteocytes.tif`` (uint32 instances) and ``NAME.truth.json`` (indices, parameters,
    lacuna occupancy); long bones add ``NAME.regions.tif`` (codes of
    :class:`histo.regions.Region`) and ``NAME.standard.tif`` (the standard region, 0/1), and
    their truth indices are those of the standard region.

    Returns
    -------
    dict
        The content of the truth JSON.
    """
    _check(phenotype, pixel_size_um, anatomy)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if anatomy == "field" and size is None:
        size = 2048
    h, w = section_shape(anatomy, size, pixel_size_um)
    if h < 64 or w < 64:
        raise ValueError(f"size {h}x{w} px is too small for a section (at least 64 px)")
    rng = np.random.default_rng(seed)
    style = sample_style(rng, counterstain)
    if anatomy == "long-bone":
        shape = (h, w)
        truth = _write_long_bone(path, phenotype, shape, pixel_size_um, rng, style, overrides)
    else:
        truth = _write_mosaic(
            path, phenotype, (h, w), pixel_size_um, seed, style, overrides, progress
        )
    truth = {
        "slide": path.name,
        "phenotype": phenotype,
        "anatomy": anatomy,
        "pixel_size_um": float(pixel_size_um),
        "size_px": [h, w],
        "seed": seed,
        "counterstain": style["counterstain"],
        **truth,
    }
    _write_json(truth_paths(path)["truth"], truth)
    if progress is not None:
        progress(1.0, "written")
    return truth


@dataclass
class _MosaicTruth:
    """Ground truth gathered field by field (instance labels are offset to stay unique)."""

    totals: dict[str, float] = field(default_factory=dict)
    occupied: dict[int, bool] = field(default_factory=dict)
    fields_params: list[dict] = field(default_factory=list)
    oc_offset: int = 0
    ot_offset: int = 0

    def add(self, fld: Field, canvases: dict, window: tuple[slice, slice]) -> None:
        canvases["cm"][window] = fld.class_map
        for name, lab, offset in (
            ("ocl", fld.osteoclast_labels, self.oc_offset),
            ("otl", fld.osteocyte_labels, self.ot_offset),
        ):
            lab = lab.astype(np.uint32)
            canvases[name][window] = np.where(lab > 0, lab + offset, 0)
        for key, v in fld.occupied.items():
            self.occupied[key + self.ot_offset] = v
        for key, v in _truth_parts(fld).items():
            self.totals[key] = self.totals.get(key, 0.0) + v
        self.oc_offset += fld.params["n_osteoclasts"]
        self.ot_offset += fld.params["n_lacunae"]
        self.fields_params.append(fld.params)


def _write_mosaic(path, phenotype, shape, pixel_size_um, seed, style, overrides, progress) -> dict:
    """Fields rendered one at a time into the slide's canvases, then written as OME-TIFF."""
    h, w = shape
    field_px = int(min(FIELD_MAX_PX, max(512, FIELD_UM / pixel_size_um)))
    rows = _split(h, math.ceil(h / field_px))
    cols = _split(w, math.ceil(w / field_px))
    acc = _MosaicTruth()
    total = len(rows) * len(cols)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as tmp:
        canvases = {
            "image": new_canvas((h, w, 3), np.uint8, tmp, "image"),
            "cm": new_canvas((h, w), np.uint8, tmp, "classes"),
            "ocl": new_canvas((h, w), np.uint32, tmp, "osteoclasts"),
            "otl": new_canvas((h, w), np.uint32, tmp, "osteocytes"),
        }
        for i, (y0, y1) in enumerate(rows):
            for j, (x0, x1) in enumerate(cols):
                frng = np.random.default_rng([seed, i, j])
                fld = build_field(phenotype, (y1 - y0, x1 - x0), pixel_size_um, frng, overrides)
                window = (slice(y0, y1), slice(x0, x1))
                canvases["image"][window] = render(fld, style, frng)
                acc.add(fld, canvases, window)
                del fld
                if progress is not None:
                    k = len(acc.fields_params)
                    progress(k / (total + 1), f"rendered field {k}/{total}")
        _write_tiffs(path, canvases, pixel_size_um, tmp)
    return {
        "indices": truth_indices(acc.totals, pixel_size_um),
        "fields": len(acc.fields_params),
        "field_params": acc.fields_params[:16],
        "occupied_lacunae": {str(k): v for k, v in acc.occupied.items()}
        if len(acc.occupied) < 200_000
        else None,
    }


def _write_tiffs(path: Path, canvases: dict, pixel_size_um: float, tmp) -> None:
    out = truth_paths(path)
    write_pyramidal_tiff(path, canvases["image"], pixel_size_um, workdir=tmp)
    for key, name in (("cm", "classes"), ("ocl", "osteoclasts"), ("otl", "osteocytes")):
        write_pyramidal_tiff(out[name], canvases[key], pixel_size_um, label=True, workdir=tmp)


def _write_long_bone(path, phenotype, shape, pixel_size_um, rng, style, overrides) -> dict:
    """One long-bone section with its region maps; the truth is its standard region's."""
    lb = _build_long_bone(phenotype, shape, pixel_size_um, rng, overrides)
    fld = lb.field
    canvases = {
        "image": render(fld, style, rng),
        "cm": fld.class_map,
        "ocl": fld.osteoclast_labels.astype(np.uint32),
        "otl": fld.osteocyte_labels.astype(np.uint32),
    }
    extra = region_paths(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as tmp:
        _write_tiffs(path, canvases, pixel_size_um, tmp)
        write_pyramidal_tiff(extra["regions"], lb.regions, pixel_size_um, label=True, workdir=tmp)
        standard = lb.standard.astype(np.uint8)
        write_pyramidal_tiff(extra["standard"], standard, pixel_size_um, label=True, workdir=tmp)
    return {
        "indices": long_bone_truth(lb),
        "standard_region_um": dict(
            zip(("top", "bottom", "left", "right"), lb.box.edges(), strict=True)
        ),
        "junction_um": lb.junction_um,
        "region_codes": {r.name.lower(): int(r) for r in Region},
        "fields": 1,
        "field_params": [fld.params],
        "occupied_lacunae": {str(k): v for k, v in fld.occupied.items()},
    }


def _write_json(path: Path, truth: dict) -> None:
    tmp_json = path.with_name(path.name + ".partial")
    tmp_json.write_text(json.dumps(truth, indent=1, default=_json_default, allow_nan=True))
    os.replace(tmp_json, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
