"""Plausibility of what the segmentation found: bone, osteoclasts and osteocytes like bone's.

Computed from the measurement alone (indices and the per-osteoclast table), so it costs
nothing beside the analysis. The ranges are wide on purpose: they take in normal and
osteopetrotic mouse bone and human bone as published (sources in docs/qc.md) and fire on
what no bone section shows, such as a culture dish read as bone, an eosin edge read as a ring
of osteoclasts round every trabecula, or marrow nuclei counted as osteocytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from histo.qc._signals import PASS, Range, Signal, grade

INF = math.inf

#: signal name -> Range(accepted, tolerated); outside tolerated fails (docs/qc.md)
PLAUSIBLE_RANGES = {
    # bone area: a trabecular cross-section of 50 x 100 µm is 0.005 mm²; less than a 22-µm
    # square (0.0005 mm², under one trabecula's thickness squared) is specks, not bone. A
    # small user ROI may hold little bone: between the two it only warns
    "content.bone_area_mm2": Range((0.01, INF), (0.0005, INF)),
    # BV/TV: aged mouse tibiae reach 2-3 %, osteopetrotic bone 70-90 %; below 1 % the
    # section is marrow, soft tissue or a culture with specks read as bone, and a call on it
    # would be "normal" with full confidence
    "content.bv_tv_pct": Range((2.0, INF), (1.0, INF)),
    # osteoclasts per mm of bone perimeter: mouse 1-10, oc-rich osteopetrosis up to ~25;
    # osteoclasts 20 µm or longer cannot exceed 50 per mm
    "osteoclast.n_per_bone_mm": Range((0.0, 30.0), (0.0, 50.0)),
    # share of the bone surface under osteoclasts: mouse 5-20 %, oc-rich up to ~50-60 %
    "osteoclast.surface_pct": Range((0.0, 75.0), (0.0, 90.0)),
    # osteoclast area per µm of bone contact: cells 5-20 µm thick, not seams of 1-3 µm
    "osteoclast.thickness_um": Range((4.0, INF), (2.5, INF)),
    # lacunae per mm² of bone: human 200-900, mouse 400-2500; marrow nuclei pack ~15000.
    # Few lacunae only warn: a segmenter that misses osteocytes (the classical baseline finds
    # 30-40 /mm²) does not make the bone less of a bone
    "osteocyte.per_bone_mm2": Range((20.0, 4000.0), (0.0, 8000.0)),
}


def _value(indices: Mapping, key: str) -> float:
    try:
        return float(indices.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan


def _osteoclast_thickness_um(osteoclasts: Sequence[Mapping]) -> float:
    """Summed osteoclast area over summed bone contact (µm); NaN without osteoclasts.

    A cell lying on bone covers about its thickness in area per µm of contact; a thin seam
    along the bone surface, or a ring round a trabecula, covers 1-3 µm.
    """
    area = sum(float(o.get("area_um2", 0.0)) for o in osteoclasts)
    contact = sum(float(o.get("bone_contact_um", 0.0)) for o in osteoclasts)
    return area / contact if contact > 0 else math.nan


#: the cells' thickness is judged where osteoclasts cover at least this share of the bone
#: surface (%): a stained edge read as osteoclasts lines much of it (an H&E ring, every
#: trabecula), while a few false cells on an oc-poor section, whatever their shape, move
#: neither Oc.S/BS nor the call (synthetic normal sections: 3-13 %)
THICKNESS_MIN_SURFACE_PCT = 2.0


def _judge(name: str, value: float, unit: str, why) -> Signal:
    """``grade`` that passes a value that is undefined because nothing was found to judge."""
    bounds = PLAUSIBLE_RANGES[name]
    if not math.isfinite(value):
        return Signal(name, float("nan"), unit, bounds.text(), PASS, "")
    return grade(name, value, unit, bounds, why)


def _bone_signals(indices: Mapping) -> list[Signal]:
    return [
        _judge(
            "content.bone_area_mm2",
            _value(indices, "B.Ar"),
            "mm²",
            lambda v: f"almost no bone found ({v:.2g} mm²): a culture, soft tissue or no section?",
        ),
        _judge(
            "content.bv_tv_pct",
            _value(indices, "BV/TV"),
            "%",
            lambda v: f"bone is {v:.2g} % of the tissue: too little to measure on",
        ),
    ]


def _osteoclast_signals(indices: Mapping, osteoclasts: Sequence[Mapping]) -> list[Signal]:
    return [
        _judge(
            "osteoclast.n_per_bone_mm",
            _value(indices, "N.Oc/B.Pm"),
            "/mm",
            lambda v: (
                f"N.Oc/B.Pm {v:.0f}/mm is beyond any published bone (<= 30/mm): "
                "other cells or stain read as osteoclasts?"
            ),
        ),
        _judge(
            "osteoclast.surface_pct",
            _value(indices, "Oc.S/BS"),
            "%",
            lambda v: (
                f"osteoclasts line {v:.0f} % of the bone surface (published <= 75 %): "
                "a stained bone edge read as osteoclasts?"
            ),
        ),
        _thickness_signal(_osteoclast_thickness_um(osteoclasts), _value(indices, "Oc.S/BS")),
    ]


def _thickness_signal(thickness_um: float, surface_pct: float) -> Signal:
    """``osteoclast.thickness_um``, passed (with its value) where osteoclasts line too little
    of the bone to matter (:data:`THICKNESS_MIN_SURFACE_PCT`)."""
    name = "osteoclast.thickness_um"
    if math.isfinite(thickness_um) and not surface_pct >= THICKNESS_MIN_SURFACE_PCT:
        return Signal(name, thickness_um, "µm", PLAUSIBLE_RANGES[name].text(), PASS, "")
    return _judge(
        name,
        thickness_um,
        "µm",
        lambda v: (
            f"osteoclasts are thin seams along the bone ({v:.1f} µm thick, cells >= 4 µm): "
            "a stained bone edge read as osteoclasts?"
        ),
    )


def _osteocyte_signal(indices: Mapping) -> Signal:
    def why(v: float) -> str:
        if v > PLAUSIBLE_RANGES["osteocyte.per_bone_mm2"].accepted[1]:
            return (
                f"{v:.0f} osteocytes per mm² of bone (bone holds 200-2500): "
                "nuclei of other cells read as osteocytes?"
            )
        return (
            f"only {v:.0f} osteocytes per mm² of bone (bone holds 200-2500): "
            "is it bone, and were the osteocytes found?"
        )

    return _judge("osteocyte.per_bone_mm2", _value(indices, "N.Ot/B.Ar"), "/mm²", why)


def plausibility_signals(measurement) -> list[Signal]:
    """Signals on what the analysis found, from its measurement.

    Parameters
    ----------
    measurement : histo.measure.Measurement
        Indices (``B.Ar`` mm², ``BV/TV`` %, ``N.Oc/B.Pm`` /mm, ``Oc.S/BS`` %, ``N.Ot/B.Ar``
        /mm²) and the counted osteoclasts (``area_um2``, ``bone_contact_um``).

    Returns
    -------
    list of Signal
        Bone amount, osteoclast number, surface and thickness, osteocyte density. A value
        left undefined because nothing was found to judge (no osteoclasts) passes.
    """
    indices = measurement.indices
    return [
        *_bone_signals(indices),
        *_osteoclast_signals(indices, measurement.osteoclasts),
        _osteocyte_signal(indices),
    ]
