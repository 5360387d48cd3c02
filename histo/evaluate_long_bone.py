"""Evaluation on held-out synthetic long-bone sections: the standard region's indices.

Sections: 3 phenotypes x 3 counterstains x the source pixel sizes asked (1 and 2 µm/px by
default), 3 mm x 2 mm, generator seeds ``LONG_BONE_EVAL_SEED_BASE + i`` (950 000 and above;
training uses 100 000-399 999, field evaluation 800 000-899 999 and 900 000-949 999). Each
section is resampled to the model's working resolution, segmented
(:func:`histo.segment.segment_slide`), its regions found and its indices measured
(:func:`histo.measure.regional.measure_by_region`), as ``histo analyze`` does.

Against the generator's truth of the standard region (issue limits): BV/TV <= 2 points,
N.Oc/B.Pm <= 10 %, N.Ot/B.Ar <= 10 %, Oc.S/BS <= 3 points (worst section, and median; relative
errors over the sections whose truth is above 0, and beside them the largest N.Oc/B.Pm measured
where the truth is 0, oc-poor, as the field evaluation reports it), the
phenotype call, the standard region's edges (largest distance to the truth region's edges,
µm) and lacunae on cartilage counted as osteocytes: predicted osteocyte lacunae whose centroid
lies on true cartilage, in the region measured (they enter N.Ot) and, beside it, on the whole
section (the osteocyte labels; outside the region they enter no index). A ``truth map`` row
runs the same on the true class map.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from histo import classes
from histo.regions import RegionBox

LONG_BONE_EVAL_SEED_BASE = 950_000
#: long-bone sections to choose post-processing constants on (the test seeds stay unseen)
LONG_BONE_VALIDATION_SEED_BASE = 960_000
PHENOTYPES = ("normal", "oc-rich", "oc-poor")
COUNTERSTAINS = ("hematoxylin", "fast-green", "methyl-green")
#: limits of the issue, on the standard region (points, relative, points, µm)
LIMITS = {
    "BV/TV abs. error": 2.0,
    "N.Oc/B.Pm rel. error": 0.10,
    "N.Ot/B.Ar rel. error": 0.10,
    "Oc.S/BS abs. error": 3.0,
    "region edge error um": 50.0,
    "lacunae in cartilage as osteocytes": 0,
}
KEYS = ("BV/TV", "N.Oc/B.Pm", "N.Ot/B.Ar", "Oc.S/BS", "Cg.Ar/B.Ar")


@dataclass
class LongBoneSpec:
    """One evaluation section."""

    index: int
    phenotype: str
    counterstain: str
    pixel_size_um: float
    seed: int


def long_bone_specs(
    pixel_sizes: Sequence[float] = (1.0, 2.0), seed_base: int = LONG_BONE_EVAL_SEED_BASE
) -> list[LongBoneSpec]:
    """The factorial: phenotypes x counterstains x pixel sizes, one seed each."""
    specs = []
    for p in pixel_sizes:
        for cs in COUNTERSTAINS:
            for ph in PHENOTYPES:
                i = len(specs)
                specs.append(LongBoneSpec(i, ph, cs, float(p), seed_base + i))
    return specs


class CartilageLacunae(NamedTuple):
    """Predicted osteocyte lacunae whose centroid lies on true cartilage (class 5)."""

    section: int  #: anywhere on the section (the osteocyte labels)
    region: int  #: in the standard region the indices are for (they enter N.Ot)


def _cartilage_lacunae(ot_labels: np.ndarray, cm_true: np.ndarray, found, px: float):
    """Lacunae on true cartilage, on the section and in the region ``found`` measured."""
    lab = np.asarray(ot_labels)
    ids = np.unique(lab[lab > 0])
    if ids.size == 0:
        return CartilageLacunae(0, 0)
    yy, xx = np.nonzero(lab)
    v = lab[yy, xx]
    n = np.bincount(v)
    cy = np.round(np.bincount(v, yy)[ids] / n[ids]).astype(int)
    cx = np.round(np.bincount(v, xx)[ids] / n[ids]).astype(int)
    on_cartilage = cm_true[cy, cx] == classes.CARTILAGE
    box = found.region.box_um
    inside = RegionBox(*box).mask(lab.shape, px)[cy, cx] if box else np.ones_like(on_cartilage)
    return CartilageLacunae(int(on_cartilage.sum()), int((on_cartilage & inside).sum()))


def _scored(found, sec, spec: LongBoneSpec, lacunae: CartilageLacunae) -> dict:
    """One section's row: measured and true indices, region edges, call."""
    from histo.phenotype import call_phenotype

    ind = found.measurement.indices
    box = found.region.box_um
    truth_box = sec.region_box_um.edges()
    edge = float(np.max(np.abs(np.subtract(box, truth_box)))) if box else math.nan
    return {
        "slide": spec.index,
        "phenotype": spec.phenotype,
        "counterstain": spec.counterstain,
        "pixel_size_um": spec.pixel_size_um,
        "seed": spec.seed,
        "region": found.region.name,
        "indices": {k: float(ind.get(k, math.nan)) for k in KEYS},
        "truth": {k: float(sec.truth.get(k, math.nan)) for k in KEYS},
        "N.Oc.junction": found.region.extra.get("N.Oc.junction"),
        "region edge error um": edge,
        "lacunae in cartilage as osteocytes": lacunae.region,
        "lacunae in cartilage (whole section)": lacunae.section,
        "call": str(call_phenotype(ind).phenotype),
    }


def _resampled(sec, scale: float):
    from histo.evaluate import _resample

    return (
        np.ascontiguousarray(_resample(sec.image, scale)),
        _resample(sec.class_map, scale, labels=True),
        _resample(sec.osteoclast_labels, scale, labels=True),
        _resample(sec.osteocyte_labels, scale, labels=True),
    )


def _measure_maps(cm, oc, ot, image, px: float):
    from histo.measure import measure
    from histo.measure.regional import measure_by_region

    def measure_roi(roi):
        return measure(cm, px, osteoclast_labels=oc, osteocyte_labels=ot, image=image, roi=roi)

    return measure_by_region(cm, px, measure_roi)


def evaluate_long_bone(
    models: Sequence[str] = ("default",),
    pixel_sizes: Sequence[float] = (1.0, 2.0),
    seed_base: int = LONG_BONE_EVAL_SEED_BASE,
    progress: Callable[[float, str], None] | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate segmenters on held-out long-bone sections; returns a JSON-able report."""
    from histo.segment import load_model, segment_slide
    from histo.synth import make_section

    segmenters = {m: load_model(m, device=device) for m in models}
    rows: dict[str, list] = {m: [] for m in [*models, "truth map"]}
    seconds = dict.fromkeys(models, 0.0)
    specs = long_bone_specs(pixel_sizes, seed_base)
    for k, spec in enumerate(specs):
        sec = make_section(
            spec.phenotype,
            pixel_size_um=spec.pixel_size_um,
            seed=spec.seed,
            counterstain=spec.counterstain,
            anatomy="long-bone",
        )
        for m, seg in segmenters.items():
            wp = float(seg.working_pixel_size_um)
            image, cm_true, _, _ = _resampled(sec, spec.pixel_size_um / wp)
            t0 = time.perf_counter()
            res = segment_slide(image, seg)
            seconds[m] += time.perf_counter() - t0
            cm, oc, ot = (
                np.asarray(a) for a in (res.class_map, res.osteoclast_labels, res.osteocyte_labels)
            )
            found = _measure_maps(cm, oc, ot, image, wp)
            lacunae = _cartilage_lacunae(ot, cm_true, found, wp)
            rows[m].append(_scored(found, sec, spec, lacunae))
        image, cm_true, oc_true, ot_true = _resampled(sec, spec.pixel_size_um / 1.0)
        found = _measure_maps(cm_true, oc_true, ot_true, image, 1.0)
        rows["truth map"].append(_scored(found, sec, spec, CartilageLacunae(0, 0)))
        if progress is not None:
            progress((k + 1) / len(specs), f"section {k + 1}/{len(specs)} ({spec.phenotype})")
    return {
        "sections": [vars(s) for s in specs],
        "models": list(models),
        "provenance": {m: seg.provenance() for m, seg in segmenters.items()},
        "seconds": seconds,
        "summary": {m: summarise_long_bone(r) for m, r in rows.items()},
        "per_section": rows,
        "limits": LIMITS,
    }


def summarise_long_bone(rows: list[dict]) -> dict:
    """Worst and median errors over sections, region edges, calls, lacunae in cartilage."""
    out: dict = {}
    for key, name, relative in (
        ("BV/TV", "BV/TV abs. error", False),
        ("Oc.S/BS", "Oc.S/BS abs. error", False),
        ("N.Oc/B.Pm", "N.Oc/B.Pm rel. error", True),
        ("N.Ot/B.Ar", "N.Ot/B.Ar rel. error", True),
    ):
        errs = []
        for r in rows:
            got, want = r["indices"][key], r["truth"][key]
            if relative:
                # a relative error needs a truth above 0 (oc-poor: reported below)
                if want > 0:
                    errs.append(abs(got - want) / want)
            else:
                errs.append(abs(got - want))
        errs = [e for e in errs if not math.isnan(e)]
        out[name] = max(errs) if errs else math.nan
        out[name.replace("error", "error (median)")] = float(np.median(errs)) if errs else math.nan
    poor = [r["indices"]["N.Oc/B.Pm"] for r in rows if r["truth"]["N.Oc/B.Pm"] == 0]
    out["max N.Oc/B.Pm where the truth is 0 (/mm)"] = max(poor) if poor else math.nan
    edges = [r["region edge error um"] for r in rows]
    out["region edge error um"] = max(edges) if edges else math.nan
    out["standard region found"] = sum(r["region"] == "standard" for r in rows)
    for key in ("lacunae in cartilage as osteocytes", "lacunae in cartilage (whole section)"):
        out[key] = sum(r.get(key, 0) for r in rows)
    out["phenotype accuracy"] = float(np.mean([r["call"] == r["phenotype"] for r in rows]))
    out["phenotype wrong"] = [
        f"{r['slide']}:{r['phenotype']}->{r['call']}" for r in rows if r["call"] != r["phenotype"]
    ]
    out["sections"] = len(rows)
    return out


def markdown_long_bone(report: dict) -> str:
    """The summary as a markdown table, one column per model."""
    cols = list(report["summary"])
    lines = ["| metric | limit | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    keys = list(report["summary"][cols[0]])
    for key in keys:
        limit = LIMITS.get(key, "")
        vals = []
        for c in cols:
            v = report["summary"][c].get(key)
            if isinstance(v, list):
                vals.append(", ".join(v) or "none")
            elif isinstance(v, float) and "rel." in key:
                vals.append(f"{100 * v:.1f}%")
            elif isinstance(v, float):
                vals.append(f"{v:.2f}")
            else:
                vals.append(str(v))
        lim = f"{100 * limit:.0f}%" if isinstance(limit, float) and limit < 1 else str(limit)
        lines.append(f"| {key} | {lim} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
