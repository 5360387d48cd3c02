"""Osteopetrosis phenotype call from histomorphometry indices: normal, oc-rich or oc-poor.

Osteopetrosis is a failure of bone resorption: bone fills the marrow space (BV/TV high,
Ma.Ar/T.Ar low). It is osteoclast-rich (osteoclasts present but not resorbing: TCIRG1, CLCN7,
OSTM1; oc/oc, Clcn7-/- mice) or osteoclast-poor (no osteoclasts: RANKL or RANK loss; op/op,
RANKL-/- mice). Sobacchi & Abinun, Bone 2022 (doi:10.1016/j.bone.2022.116541).

The call has two steps: (1) osteopetrotic when BV/TV exceeds the upper limit of normal
(equivalently Ma.Ar/T.Ar below its lower limit); (2) if osteopetrotic, oc-poor when
N.Oc/B.Pm is below a threshold, oc-rich otherwise. Thresholds live in :class:`ReferenceRanges`,
learnt from a lab's own normal controls with :func:`calibrate` (no wild-type N.Oc/B.Pm is fixed
across labs). The confidence is the product of logistic functions of each decision's margin.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histo.errors import EmptyTissueError, HistoError

__all__ = [
    "PHENOTYPES",
    "UNCERTAIN",
    "PhenotypeCall",
    "ReferenceRanges",
    "calibrate",
    "call_phenotype",
    "load_ranges",
    "save_ranges",
    "withhold_call",
]

PHENOTYPES = ("normal", "oc-rich", "oc-poor")
#: the call of a slide whose quality control failed: the indices cannot be trusted
UNCERTAIN = "uncertain"

_DEFAULT_SOURCE = (
    "histo defaults: normal mouse proximal tibia BV/TV about 10-21% (DOMAIN.md; Dempster et al. "
    "JBMR 2013 nomenclature); synthetic generator normal BV/TV 11-22%, osteopetrotic 42-68%; "
    "normal N.Oc/B.Pm a few per mm, oc-rich several times that, oc-poor 0"
)


@dataclass(frozen=True)
class ReferenceRanges:
    """Thresholds of the phenotype call.

    Attributes
    ----------
    bv_tv_upper : float
        Upper limit of normal BV/TV (%). Above it the section is osteopetrotic. Default 35 %:
        well above normal mouse tibia (10-21 %) and below osteopetrotic bone (40-70 %).
    bv_tv_scale : float
        Width (%) of the logistic turning the BV/TV margin into a confidence.
    n_oc_b_pm_lower : float
        Osteopetrotic sections with N.Oc/B.Pm (/mm) below this are oc-poor. Default 1 /mm:
        normal bone has a few osteoclasts per mm, oc-poor bone none.
    n_oc_b_pm_scale : float
        Width (/mm) of the logistic for the N.Oc/B.Pm margin.
    source : str
        Where the values come from (defaults, or the calibration controls).
    n_controls : int
        Number of control slides the values were learnt from (0 for defaults).
    controls : dict
        Summary of the controls (mean, SD, range of BV/TV and N.Oc/B.Pm) when calibrated.
    """

    bv_tv_upper: float = 35.0
    bv_tv_scale: float = 2.0
    n_oc_b_pm_lower: float = 1.0
    n_oc_b_pm_scale: float = 0.25
    source: str = _DEFAULT_SOURCE
    n_controls: int = 0
    controls: dict = field(default_factory=dict)

    @property
    def ma_ar_t_ar_lower(self) -> float:
        """Lower limit of normal Ma.Ar/T.Ar (%), the complement of ``bv_tv_upper``."""
        return 100.0 - self.bv_tv_upper

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ReferenceRanges:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HistoError(f"reference ranges: unknown keys {', '.join(unknown)}")
        ranges = cls(**dict(data))
        for name in ("bv_tv_upper", "bv_tv_scale", "n_oc_b_pm_lower", "n_oc_b_pm_scale"):
            value = getattr(ranges, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise HistoError(f"reference ranges: {name} must be a number >= 0, got {value!r}")
        if ranges.bv_tv_scale <= 0 or ranges.n_oc_b_pm_scale <= 0:
            raise HistoError("reference ranges: scales must be > 0")
        return ranges


@dataclass(frozen=True)
class PhenotypeCall:
    """A phenotype call with its confidence and the evidence behind it.

    Attributes
    ----------
    phenotype : str
        ``normal``, ``oc-rich`` or ``oc-poor``.
    confidence : float
        0..1; product of the logistic confidences of each decision taken.
    evidence : list of str
        One line per decision, e.g. ``"BV/TV 55.2% > 35% (osteopetrotic)"``.
    """

    phenotype: str
    confidence: float
    evidence: list[str]


def _logistic(margin: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(margin, 50.0), -50.0)))


def _value(indices: Mapping, key: str) -> float:
    try:
        value = float(indices.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value


def call_phenotype(indices: Mapping, ranges: ReferenceRanges | None = None) -> PhenotypeCall:
    """Call normal / oc-rich / oc-poor from a slide's indices.

    Parameters
    ----------
    indices : mapping
        At least ``BV/TV`` (%) or ``Ma.Ar/T.Ar`` (%), and ``N.Oc/B.Pm`` (/mm), as produced by
        :func:`histo.measure.measure`.
    ranges : ReferenceRanges, optional
        Thresholds; the documented defaults when None.

    Returns
    -------
    PhenotypeCall

    Raises
    ------
    EmptyTissueError
        Neither BV/TV nor Ma.Ar/T.Ar is defined (no tissue measured).
    """
    ranges = ranges or ReferenceRanges()
    bv_tv = _value(indices, "BV/TV")
    evidence: list[str] = []
    if math.isnan(bv_tv):
        ma = _value(indices, "Ma.Ar/T.Ar")
        if math.isnan(ma):
            raise EmptyTissueError("no BV/TV or Ma.Ar/T.Ar: no tissue was measured")
        bv_tv = 100.0 - ma
    ma_ar = 100.0 - bv_tv
    p_op = _logistic((bv_tv - ranges.bv_tv_upper) / ranges.bv_tv_scale)
    n_oc = _value(indices, "N.Oc/B.Pm")
    oc_text = "undefined (no bone perimeter)" if math.isnan(n_oc) else f"{n_oc:.2f}/mm"

    if p_op < 0.5:
        evidence.append(f"BV/TV {bv_tv:.1f}% <= {ranges.bv_tv_upper:g}% (not osteopetrotic)")
        evidence.append(
            f"Ma.Ar/T.Ar {ma_ar:.1f}% >= {ranges.ma_ar_t_ar_lower:g}% (marrow space preserved)"
        )
        evidence.append(f"N.Oc/B.Pm {oc_text} (not used for a normal call)")
        return PhenotypeCall("normal", 1.0 - p_op, evidence)

    evidence.append(f"BV/TV {bv_tv:.1f}% > {ranges.bv_tv_upper:g}% (osteopetrotic)")
    evidence.append(
        f"Ma.Ar/T.Ar {ma_ar:.1f}% < {ranges.ma_ar_t_ar_lower:g}% (marrow space reduced)"
    )
    if math.isnan(n_oc):
        evidence.append("N.Oc/B.Pm undefined (no bone perimeter): osteoclasts taken as absent")
        return PhenotypeCall("oc-poor", p_op * 0.5, evidence)
    p_rich = _logistic((n_oc - ranges.n_oc_b_pm_lower) / ranges.n_oc_b_pm_scale)
    if p_rich >= 0.5:
        evidence.append(
            f"N.Oc/B.Pm {n_oc:.2f}/mm >= {ranges.n_oc_b_pm_lower:g}/mm "
            "(osteoclasts present: oc-rich)"
        )
        return PhenotypeCall("oc-rich", p_op * p_rich, evidence)
    evidence.append(
        f"N.Oc/B.Pm {n_oc:.2f}/mm < {ranges.n_oc_b_pm_lower:g}/mm (osteoclasts absent: oc-poor)"
    )
    return PhenotypeCall("oc-poor", p_op * (1.0 - p_rich), evidence)


def withhold_call(call: PhenotypeCall, qc_reasons: str) -> PhenotypeCall:
    """The call of a slide whose quality control failed: ``uncertain``, no confidence.

    Parameters
    ----------
    call : PhenotypeCall
        The call the indices would give.
    qc_reasons : str
        Why quality control failed (``QCReport.reasons``).

    Returns
    -------
    PhenotypeCall
        ``uncertain`` with NaN confidence; the evidence says why and keeps what the indices
        would have called, so a person who checks the slide can still see it.
    """
    evidence = [
        f"quality control failed: {qc_reasons}" if qc_reasons else "quality control failed",
        f"the indices alone would call {call.phenotype} (confidence {call.confidence:.2f}); "
        "not called because they cannot be trusted on this slide",
        *call.evidence,
    ]
    return PhenotypeCall(UNCERTAIN, math.nan, evidence)


class _Limit(NamedTuple):
    """A limit learnt from the controls, the scale of its confidence and the controls' summary."""

    limit: float
    scale: float
    summary: dict[str, float]


def _finite_values(rows: list[Mapping], key: str) -> np.ndarray:
    """The finite values of index ``key`` over ``rows`` (missing or unreadable ones dropped)."""
    values = np.array([_value(r, key) for r in rows], float)
    return values[np.isfinite(values)]


def _summary(name: str, values: np.ndarray) -> dict[str, float]:
    """Mean, SD (n - 1), min and max of the controls' values of index ``name``."""
    return {
        f"{name} mean": float(values.mean()),
        f"{name} sd": float(values.std(ddof=1)),
        f"{name} min": float(values.min()),
        f"{name} max": float(values.max()),
    }


def _bv_tv_upper(bv: np.ndarray, k: float) -> _Limit:
    """Upper limit of normal BV/TV (%): mean + k SD of the controls, at least max + 1 SD."""
    bv_mean, bv_sd = float(bv.mean()), float(bv.std(ddof=1))
    upper = max(bv_mean + k * bv_sd, float(bv.max()) + bv_sd)
    return _Limit(upper, max(bv_sd / 2.0, 1.0), _summary("BV/TV", bv))


def _oc_poor_lower(
    noc: np.ndarray, k: float, fraction: float, floor: float, min_controls: int
) -> _Limit:
    """oc-poor threshold of N.Oc/B.Pm (/mm), see :func:`calibrate`; the defaults of
    :class:`ReferenceRanges` with fewer than ``min_controls`` usable controls."""
    if noc.size < min_controls:
        defaults = ReferenceRanges()
        return _Limit(defaults.n_oc_b_pm_lower, defaults.n_oc_b_pm_scale, {})
    noc_mean, noc_sd = float(noc.mean()), float(noc.std(ddof=1))
    noc_median = float(np.median(noc))
    lower = max(floor, min(fraction * noc_median, noc_mean - k * noc_sd))
    if noc_mean - k * noc_sd < floor:
        lower = max(floor, fraction * noc_median)
    return _Limit(lower, max(lower / 4.0, 0.05), _summary("N.Oc/B.Pm", noc))


def calibrate(
    control_indices: Iterable[Mapping],
    *,
    k: float = 3.0,
    oc_poor_fraction: float = 0.3,
    oc_poor_floor: float = 0.2,
    min_controls: int = 3,
) -> ReferenceRanges:
    """Learn reference ranges from a lab's normal control slides.

    Parameters
    ----------
    control_indices : iterable of mapping
        Indices of normal (non-osteopetrotic) control slides: ``BV/TV`` (%) and ``N.Oc/B.Pm``
        (/mm) are used.
    k : float
        Upper limit of normal BV/TV = mean + k·SD (at least max + 1 SD of the controls).
    oc_poor_fraction, oc_poor_floor : float
        oc-poor threshold of N.Oc/B.Pm: ``oc_poor_fraction`` × the control median, or mean −
        k·SD if lower, but never below ``oc_poor_floor`` (/mm).
    min_controls : int
        Fewer usable controls raise an error (an SD from two slides means little).

    Returns
    -------
    ReferenceRanges
        With ``source`` and ``controls`` describing the calibration.
    """
    rows = list(control_indices)
    bv = _finite_values(rows, "BV/TV")
    noc = _finite_values(rows, "N.Oc/B.Pm")
    if bv.size < min_controls:
        raise HistoError(
            f"calibration needs at least {min_controls} control slides with BV/TV, got {bv.size}"
        )
    bv_tv = _bv_tv_upper(bv, k)
    n_oc = _oc_poor_lower(noc, k, oc_poor_fraction, oc_poor_floor, min_controls)
    return ReferenceRanges(
        bv_tv_upper=round(bv_tv.limit, 3),
        bv_tv_scale=round(bv_tv.scale, 3),
        n_oc_b_pm_lower=round(n_oc.limit, 3),
        n_oc_b_pm_scale=round(n_oc.scale, 3),
        source=(
            f"calibrated from {bv.size} normal control slides: BV/TV upper = max(mean + {k:g} SD, "
            f"max + 1 SD); oc-poor below {oc_poor_fraction:g} x control median N.Oc/B.Pm "
            f"(or mean - {k:g} SD if lower), floor {oc_poor_floor:g}/mm"
        ),
        n_controls=int(bv.size),
        controls={**bv_tv.summary, **n_oc.summary},
    )


def save_ranges(ranges: ReferenceRanges, path: str | os.PathLike) -> Path:
    """Write reference ranges as JSON, atomically (temporary file then ``os.replace``)."""
    from histo.io.atomic import write_text_atomic

    text = json.dumps(ranges.to_dict(), indent=2, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text)


def load_ranges(path: str | os.PathLike) -> ReferenceRanges:
    """Read reference ranges written by :func:`save_ranges` (one-line error if unusable)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HistoError(f"reference ranges file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise HistoError(f"reference ranges file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HistoError(f"reference ranges file {path} must hold a JSON object")
    return ReferenceRanges.from_dict(data)
