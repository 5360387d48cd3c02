"""Evaluation of segmenters on held-out synthetic slides against exact ground truth.

Slides: a full factorial of 3 phenotypes x 3 counterstains x 4 source pixel sizes (0.25, 0.5, 1
and 2 µm/px) = 36 slides, generator seeds ``EVAL_SEED_BASE + i`` (900 000 and above; training
uses 100 000-199 999, see :mod:`histo.train`). Each slide is a field of ``field_um`` µm
(1200 µm by default, at most 3000 source px a side, so 750 µm at 0.25 µm/px), resampled to the
model's working resolution the way :func:`histo.io.read_region` does (area when shrinking,
linear when enlarging), segmented with :func:`histo.segment.segment_slide` and measured with
:func:`histo.measure.measure`.

Metrics, per model:

* **Dice per class**, pooled over all slides (sum of overlaps / sum of sizes), against the true
  class map resampled (nearest) to the working resolution.
* **Object F1** for osteoclasts and osteocyte lacunae: one-to-one matching of predicted and true
  instances with IoU >= 0.5 (at that threshold a match is unique); F1 = 2 TP / (2 TP + FP + FN),
  pooled over slides. Also reported, as "(centroid) F1": a prediction matches the true object
  its centroid falls in (one-to-one), the rule of counting tools; it forgives the outline
  errors that weigh heavily in the IoU of 30-px lacunae.
* **Index errors** against the generator's truth indices (computed on the smooth anatomy):
  median over slides of |error| in points for BV/TV and Oc.S/BS; of |error| / truth for
  N.Oc/B.Pm (slides with truth > 0) and N.Ot/B.Ar. For oc-poor slides (truth N.Oc = 0) the
  largest N.Oc/B.Pm found is reported.
* **Phenotype call accuracy** (:func:`histo.phenotype.call_phenotype` on the measured indices).

A ``truth map`` row measures the resampled true class map with the same engine: the error
floor that resampling and measurement leave, whatever the segmenter.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histo.classes import N_CLASSES, NAMES

EVAL_SEED_BASE = 900_000
#: model selection (stages, post-processing constants) uses this range, never the test range
VALIDATION_SEED_BASE = 800_000
PHENOTYPES = ("normal", "oc-rich", "oc-poor")
COUNTERSTAINS = ("hematoxylin", "fast-green", "methyl-green")
PIXEL_SIZES_UM = (0.25, 0.5, 1.0, 2.0)

#: targets of the network (index name -> (metric, bound))
TARGETS = {
    "osteoclast F1": 0.90,
    "osteocyte F1": 0.90,
    "bone Dice": 0.95,
    "marrow Dice": 0.95,
    "N.Oc/B.Pm rel. error": 0.10,
    "N.Ot/B.Ar rel. error": 0.10,
    "BV/TV abs. error": 2.0,
    "Oc.S/BS abs. error": 3.0,
    "phenotype accuracy": 1.0,
}
HIGHER_IS_BETTER = {
    "osteoclast F1",
    "osteocyte F1",
    "bone Dice",
    "marrow Dice",
    "phenotype accuracy",
}


@dataclass
class SlideSpec:
    """One evaluation slide."""

    index: int
    phenotype: str
    counterstain: str
    pixel_size_um: float
    seed: int
    size_px: int


def slide_specs(
    n: int | None = None,
    field_um: float = 1200.0,
    max_px: int = 3000,
    seed_base: int = EVAL_SEED_BASE,
) -> list[SlideSpec]:
    """The evaluation slides (the first ``n`` of the 36-slide factorial, cycled when larger).

    ``seed_base``: ``EVAL_SEED_BASE`` for the test set, ``VALIDATION_SEED_BASE`` for the
    validation set on which models and constants are chosen."""
    specs = []
    total = len(PHENOTYPES) * len(COUNTERSTAINS) * len(PIXEL_SIZES_UM)
    n = total if n is None else n
    for i in range(n):
        j = i % total
        ph = PHENOTYPES[j % 3]
        cs = COUNTERSTAINS[(j // 3) % 3]
        px = PIXEL_SIZES_UM[(j // 9) % 4]
        size = int(min(max_px, round(field_um / px)))
        specs.append(SlideSpec(i, ph, cs, px, seed_base + i, size))
    return specs


def match_objects(
    true_labels: np.ndarray, pred_labels: np.ndarray, iou: float = 0.5
) -> tuple[int, int, int]:
    """One-to-one matches of instances with IoU >= ``iou``: returns (TP, FP, FN)."""
    t = np.asarray(true_labels).ravel().astype(np.int64)
    p = np.asarray(pred_labels).ravel().astype(np.int64)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    n_t = int((t_ids > 0).sum())
    n_p = int((p_ids > 0).sum())
    if n_t == 0 or n_p == 0:
        return 0, n_p, n_t
    t_size = np.bincount(t_inv)
    p_size = np.bincount(p_inv)
    both = (t > 0) & (p > 0)
    pair = t_inv[both] * len(p_ids) + p_inv[both]
    pairs, inter = np.unique(pair, return_counts=True)
    ti, pi = pairs // len(p_ids), pairs % len(p_ids)
    union = t_size[ti] + p_size[pi] - inter
    ious = inter / union
    ok = ious >= iou
    order = np.argsort(-ious[ok])
    used_t, used_p = set(), set()
    tp = 0
    for a, b in zip(ti[ok][order], pi[ok][order], strict=True):
        if a not in used_t and b not in used_p:
            used_t.add(a)
            used_p.add(b)
            tp += 1
    return tp, n_p - tp, n_t - tp


def match_centroids(true_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[int, int, int]:
    """One-to-one matches where a predicted object's centroid lies in a true object: (TP, FP, FN).

    A true object hit by several centroids is matched once; the other predictions are FP.
    """
    t = np.asarray(true_labels)
    p = np.asarray(pred_labels)
    n_t = len(np.unique(t[t > 0]))
    ids = np.unique(p[p > 0])
    if ids.size == 0:
        return 0, 0, n_t
    yy, xx = np.nonzero(p)
    lab = p[yy, xx]
    count = np.bincount(lab)
    cy = np.round(np.bincount(lab, yy)[ids] / count[ids]).astype(int)
    cx = np.round(np.bincount(lab, xx)[ids] / count[ids]).astype(int)
    hit = t[cy, cx]
    tp = len(np.unique(hit[hit > 0]))
    return tp, len(ids) - tp, n_t - tp


@dataclass
class ModelScores:
    """Accumulated scores of one model."""

    name: str
    inter: np.ndarray = field(default_factory=lambda: np.zeros(N_CLASSES))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(N_CLASSES))
    objects: dict = field(
        default_factory=lambda: {
            "osteoclast": [0, 0, 0],
            "osteocyte": [0, 0, 0],
            "osteoclast (centroid)": [0, 0, 0],
            "osteocyte (centroid)": [0, 0, 0],
        }
    )
    slides: list = field(default_factory=list)
    seconds: float = 0.0
    megapixels: float = 0.0


def _resample(image: np.ndarray, scale: float, labels: bool = False) -> np.ndarray:
    import cv2

    if abs(scale - 1) < 1e-9:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if labels:
        return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


@dataclass
class _Section:
    image: np.ndarray
    class_map: np.ndarray
    osteoclast_labels: np.ndarray
    osteocyte_labels: np.ndarray
    truth: dict


def _section(spec: SlideSpec, cache_dir: str | Path | None) -> _Section:
    """The synthetic slide of ``spec`` (from the cache when present)."""
    from histo.synth import make_section

    path = None
    if cache_dir is not None:
        name = f"{spec.seed}-{spec.phenotype}-{spec.counterstain}-{spec.pixel_size_um}"
        name += f"-{spec.size_px}.npz"
        path = Path(cache_dir) / name
        if path.exists():
            z = np.load(path)
            truth = json.loads(str(z["truth"]))
            return _Section(z["image"], z["class_map"], z["oc"], z["ot"], truth)
    sec = make_section(
        spec.phenotype,
        size=spec.size_px,
        pixel_size_um=spec.pixel_size_um,
        seed=spec.seed,
        counterstain=spec.counterstain,
    )
    out = _Section(
        sec.image, sec.class_map, sec.osteoclast_labels, sec.osteocyte_labels, dict(sec.truth)
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            image=out.image,
            class_map=out.class_map,
            oc=out.osteoclast_labels,
            ot=out.osteocyte_labels,
            truth=json.dumps(out.truth),
        )
        tmp.replace(path)
    return out


def _call(indices: dict) -> str:
    try:
        from histo.phenotype import call_phenotype
    except ImportError:  # pragma: no cover - phenotype module not installed
        return "n/a"
    return str(call_phenotype(indices).phenotype)


INDEX_KEYS = ("BV/TV", "Oc.S/BS", "N.Oc/B.Pm", "N.Ot/B.Ar", "N.Oc", "N.Ot")


class _Resampled(NamedTuple):
    """A test slide and its truth at a model's working resolution."""

    image: np.ndarray
    class_map: np.ndarray
    osteoclasts: np.ndarray
    osteocytes: np.ndarray


def _resampled(sec, scale: float) -> _Resampled:
    return _Resampled(
        np.ascontiguousarray(_resample(sec.image, scale)),
        _resample(sec.class_map, scale, labels=True),
        _resample(sec.osteoclast_labels, scale, labels=True),
        _resample(sec.osteocyte_labels, scale, labels=True),
    )


def _measure(class_map, pixel_size_um: float, osteoclasts, osteocytes, image):
    from histo.measure import measure

    return measure(
        class_map,
        pixel_size_um,
        osteoclast_labels=np.asarray(osteoclasts),
        osteocyte_labels=np.asarray(osteocytes),
        image=image,
    )


def _score_slide(
    s: ModelScores, seg, data: _Resampled, spec, sec, tile_px: int, overlap_px: int
) -> None:
    """Segment one test slide with ``seg`` and add its pixels, objects and indices to ``s``."""
    from histo.segment import segment_slide

    t0 = time.perf_counter()
    res = segment_slide(data.image, seg, tile_px=tile_px, overlap_px=overlap_px)
    s.seconds += time.perf_counter() - t0
    s.megapixels += data.image.shape[0] * data.image.shape[1] / 1e6
    cm = np.asarray(res.class_map)
    for c in range(N_CLASSES):
        a, b = cm == c, data.class_map == c
        s.inter[c] += float((a & b).sum())
        s.sizes[c] += float(a.sum() + b.sum())
    for key, tl, pl in (
        ("osteoclast", data.osteoclasts, res.osteoclast_labels),
        ("osteocyte", data.osteocytes, res.osteocyte_labels),
    ):
        for suffix, fn_match in (("", match_objects), (" (centroid)", match_centroids)):
            tp, fp, fn = fn_match(tl, np.asarray(pl))
            s.objects[key + suffix][0] += tp
            s.objects[key + suffix][1] += fp
            s.objects[key + suffix][2] += fn
    wp = float(seg.working_pixel_size_um)
    meas = _measure(cm, wp, res.osteoclast_labels, res.osteocyte_labels, data.image)
    s.slides.append(
        {
            "slide": spec.index,
            "phenotype": spec.phenotype,
            "counterstain": spec.counterstain,
            "pixel_size_um": spec.pixel_size_um,
            "seed": spec.seed,
            "indices": {key: float(meas.indices.get(key, float("nan"))) for key in INDEX_KEYS},
            "truth": {key: float(sec.truth[key]) for key in INDEX_KEYS},
            "call": _call(meas.indices),
        }
    )


def _truth_row(spec, sec, pixel_size_um: float, data: _Resampled) -> dict:
    """The true class map measured by the same engine: the floor of the index errors."""
    meas = _measure(data.class_map, pixel_size_um, data.osteoclasts, data.osteocytes, data.image)
    return {
        "slide": spec.index,
        "phenotype": spec.phenotype,
        "indices": {key: float(meas.indices.get(key, float("nan"))) for key in INDEX_KEYS},
        "truth": {key: float(sec.truth[key]) for key in INDEX_KEYS},
        "call": _call(meas.indices),
    }


def _evaluate_slide(
    spec: SlideSpec,
    sec: _Section,
    segmenters: dict,
    scores: dict[str, ModelScores],
    tile_px: int,
    overlap_px: int,
) -> dict:
    """Score each segmenter on one slide, resampled once per working pixel size; returns the
    truth map's row (measured at the first working pixel size)."""
    per_px: dict[float, _Resampled] = {}
    for m, seg in segmenters.items():
        wp = float(seg.working_pixel_size_um)
        if wp not in per_px:
            per_px[wp] = _resampled(sec, spec.pixel_size_um / wp)
        _score_slide(scores[m], seg, per_px[wp], spec, sec, tile_px, overlap_px)
    return _truth_row(spec, sec, *next(iter(per_px.items())))


def evaluate(
    models: Sequence[str] = ("default", "classical"),
    n_slides: int | None = None,
    field_um: float = 1200.0,
    max_px: int = 3000,
    tile_px: int = 768,
    overlap_px: int = 64,
    progress: Callable[[float, str], None] | None = None,
    cache_dir: str | Path | None = None,
    seed_base: int = EVAL_SEED_BASE,
    precision: str | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate segmenters on the held-out synthetic slides; returns a JSON-able report.

    Every slide is segmented by every model and scored against its ground truth: Dice per
    class, object F1, errors of the indices and the phenotype call.

    Parameters
    ----------
    models
        Names or paths for :func:`histo.segment.load_model`.
    n_slides
        Number of slides (default: all 36 of the factorial).
    field_um
        Side of each field in µm (capped at ``max_px`` source pixels).
    tile_px, overlap_px
        Tiling of :func:`histo.segment.segment_slide`.
    progress
        ``progress(fraction, message)`` after each slide.
    cache_dir
        Keep the generated slides here (``.npz`` per seed) to skip regenerating them next time.
    seed_base
        First generator seed: ``EVAL_SEED_BASE`` (test) or ``VALIDATION_SEED_BASE``.
    precision
        Network arithmetic for :func:`histo.segment.load_model` ("auto", "float32",
        "bfloat16"; ``None``: ``HISTO_PRECISION`` or auto).
    device
        Where the networks run: "auto" (default), "cpu", "cuda" or "mps"
        (:func:`histo.device.resolve_device`).
    """
    from histo.segment import load_model

    segmenters = {m: load_model(m, precision=precision, device=device) for m in models}
    scores = {m: ModelScores(m) for m in models}
    truth_rows = []
    specs = slide_specs(n_slides, field_um, max_px, seed_base)
    for k, spec in enumerate(specs):
        sec = _section(spec, cache_dir)
        truth_rows.append(_evaluate_slide(spec, sec, segmenters, scores, tile_px, overlap_px))
        if progress is not None:
            progress(
                (k + 1) / len(specs),
                f"slide {k + 1}/{len(specs)} ({spec.phenotype}, "
                f"{spec.counterstain}, {spec.pixel_size_um} µm/px)",
            )
    return _report(specs, models, segmenters, scores, truth_rows, field_um, seed_base)


def _report(
    specs: list[SlideSpec],
    models: Sequence[str],
    segmenters: dict,
    scores: dict[str, ModelScores],
    truth_rows: list[dict],
    field_um: float,
    seed_base: int,
) -> dict:
    """The JSON-able report of :func:`evaluate`: the slides, the models' provenance, summaries
    and per-slide rows of every model and of the truth map."""
    summary = {m: summarise(s.slides, s) for m, s in scores.items()}
    summary["truth map"] = summarise(truth_rows, None)
    return {
        "slides": [vars(s) for s in specs],
        "seed_range": [seed_base, seed_base + len(specs) - 1],
        "precision": {m: getattr(seg, "precision", "n/a") for m, seg in segmenters.items()},
        "provenance": {m: seg.provenance() for m, seg in segmenters.items()},
        "field_um": field_um,
        "models": list(models),
        "summary": summary,
        "per_slide": {m: s.slides for m, s in scores.items()} | {"truth map": truth_rows},
        "targets": TARGETS,
    }


def _median(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.median(v)) if v else float("nan")


def summarise(rows: list[dict], s: ModelScores | None) -> dict:
    """Summary metrics of one model over slides (see module docstring)."""
    out: dict = {}
    if s is not None:
        dice = 2 * s.inter / np.maximum(s.sizes, 1)
        for c in range(N_CLASSES):
            out[f"{NAMES[c]} Dice"] = float(dice[c])
        for key, (tp, fp, fn) in s.objects.items():
            out[f"{key} F1"] = 2 * tp / max(1, 2 * tp + fp + fn)
            out[f"{key} precision"] = tp / max(1, tp + fp)
            out[f"{key} recall"] = tp / max(1, tp + fn)
        out["MP/s"] = s.megapixels / max(s.seconds, 1e-9)
    err = {k: [] for k in ("BV/TV", "Oc.S/BS")}
    rel = {k: [] for k in ("N.Oc/B.Pm", "N.Ot/B.Ar")}
    poor_noc = []
    calls = []
    for r in rows:
        for k in err:
            err[k].append(abs(r["indices"][k] - r["truth"][k]))
        for k in rel:
            t = r["truth"][k]
            if t > 0:
                rel[k].append(abs(r["indices"][k] - t) / t)
        if r["truth"]["N.Oc"] == 0:
            poor_noc.append(r["indices"]["N.Oc/B.Pm"])
        calls.append(r["call"] == r["phenotype"])
    out["BV/TV abs. error"] = _median(err["BV/TV"])
    out["Oc.S/BS abs. error"] = _median(err["Oc.S/BS"])
    out["N.Oc/B.Pm rel. error"] = _median(rel["N.Oc/B.Pm"])
    out["N.Ot/B.Ar rel. error"] = _median(rel["N.Ot/B.Ar"])
    out["max N.Oc/B.Pm on oc-poor"] = max(poor_noc) if poor_noc else float("nan")
    out["phenotype accuracy"] = float(np.mean(calls)) if calls else float("nan")
    out["phenotype wrong"] = [
        f"{r['slide']}:{r['phenotype']}->{r['call']}" for r in rows if r["call"] != r["phenotype"]
    ]
    return out


def _fmt(key: str, v) -> str:
    if isinstance(v, list):
        return ", ".join(v) if v else "none"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if "rel. error" in key:
        return f"{100 * v:.1f}%"
    if "accuracy" in key:
        return f"{100 * v:.0f}%"
    if "abs. error" in key:
        return f"{v:.2f} pts"
    if key == "max N.Oc/B.Pm on oc-poor":
        return f"{v:.2f} /mm"
    if key == "MP/s":
        return f"{v:.2f}"
    return f"{v:.3f}"


ROWS = (
    "background Dice",
    "marrow Dice",
    "bone Dice",
    "osteoclast Dice",
    "osteocyte Dice",
    "osteoclast F1",
    "osteoclast precision",
    "osteoclast recall",
    "osteocyte F1",
    "osteocyte precision",
    "osteocyte recall",
    "osteoclast (centroid) F1",
    "osteocyte (centroid) F1",
    "BV/TV abs. error",
    "Oc.S/BS abs. error",
    "N.Oc/B.Pm rel. error",
    "N.Ot/B.Ar rel. error",
    "max N.Oc/B.Pm on oc-poor",
    "phenotype accuracy",
    "phenotype wrong",
    "MP/s",
)


def _meets(key: str, v: float) -> bool | None:
    if key not in TARGETS or v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v >= TARGETS[key] if key in HIGHER_IS_BETTER else v <= TARGETS[key]


def markdown_table(report: dict) -> str:
    """The summary as a markdown table: one column per model, plus target and met?."""
    cols = list(report["summary"])
    first = report["models"][0]
    lines = [
        "| metric | target | " + " | ".join(cols) + f" | {first} meets target |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for key in ROWS:
        tgt = ""
        if key in TARGETS:
            tgt = ("≥ " if key in HIGHER_IS_BETTER else "≤ ") + _fmt(key, TARGETS[key])
        vals = [_fmt(key, report["summary"][c].get(key)) for c in cols]
        met = _meets(key, report["summary"][first].get(key))
        lines.append(
            f"| {key} | {tgt} | "
            + " | ".join(vals)
            + f" | {'' if met is None else ('yes' if met else 'NO')} |"
        )
    n = len(report["slides"])
    lo, hi = report["seed_range"]
    lines.append("")
    which = "validation" if lo < EVAL_SEED_BASE else "held-out"
    prec = ", ".join(f"{m}: {p}" for m, p in report.get("precision", {}).items())
    lines.append(
        f"{n} {which} synthetic slides (seeds {lo}-{hi}; phenotypes x counterstains x source "
        f"pixel sizes 0.25/0.5/1/2 µm/px; fields of {report['field_um']:.0f} µm, at most 3000 "
        "source px). Objects matched one-to-one at IoU ≥ 0.5. 'truth map' = the true class map "
        "measured by the same engine (the floor of the index errors)."
        + (f" Network precision: {prec}." if prec else "")
    )
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``evaluation.md`` and ``evaluation.json`` (atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "evaluation.md", out / "evaluation.json"
    text = "# Segmentation evaluation\n\n" + markdown_table(report) + "\n"
    for path, content in ((md, text), (js, json.dumps(report, indent=1, default=float))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)
    return md, js
