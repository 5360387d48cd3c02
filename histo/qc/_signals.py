"""Named quality signals and the verdict that combines them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

PASS, WARN, FAIL = "pass", "warn", "fail"
_RANK = {PASS: 0, WARN: 1, FAIL: 2}


@dataclass(frozen=True)
class Range:
    """Accepted and tolerated intervals of one signal.

    A value inside ``accepted`` passes, inside ``tolerated`` (but not ``accepted``) warns,
    and outside ``tolerated`` fails. Open ends are ``-inf`` / ``inf``.
    """

    accepted: tuple[float, float]
    tolerated: tuple[float, float]

    def status(self, value: float) -> str:
        """``pass``, ``warn`` or ``fail`` for ``value`` (NaN warns: it could not be measured)."""
        if not math.isfinite(value):
            return WARN
        lo, hi = self.accepted
        if lo <= value <= hi:
            return PASS
        lo, hi = self.tolerated
        return WARN if lo <= value <= hi else FAIL

    def text(self) -> str:
        """The accepted interval as text (``>= 0.04``, ``<= 14``, ``4.6-9.2``)."""
        lo, hi = self.accepted
        if math.isinf(lo):
            return f"<= {hi:g}"
        if math.isinf(hi):
            return f">= {lo:g}"
        return f"{lo:g}-{hi:g}"


@dataclass(frozen=True)
class Signal:
    """One quality check on one slide.

    Attributes
    ----------
    name : str
        Dotted name, e.g. ``stain.counterstain``.
    value : float
        The measured value, in ``unit`` (NaN when it could not be measured).
    unit : str
        Unit of ``value`` (``deg``, ``µm``, ``mm²``, ``fraction``).
    accepted : str
        The accepted range as text.
    status : str
        ``pass``, ``warn`` or ``fail``.
    reason : str
        One line saying what is wrong and what it means; empty when the check passes.
    """

    name: str
    value: float
    unit: str
    accepted: str
    status: str
    reason: str = ""


def grade(name: str, value: float, unit: str, bounds: Range, why: Callable[[float], str]) -> Signal:
    """A :class:`Signal` for ``value`` judged by ``bounds``; ``why(value)`` words the reason."""
    status = bounds.status(value)
    if status == PASS:
        reason = ""
    elif not math.isfinite(value):
        reason = f"{name} could not be measured"
    else:
        reason = why(value)
    return Signal(name, float(value), unit, bounds.text(), status, reason)


@dataclass
class QCReport:
    """Every signal of one slide and the verdict they give.

    Attributes
    ----------
    slide : str
        Slide name.
    pixel_size_um : float
        The pixel size the checks were given (stated), µm/px.
    signals : list of Signal
        In a stable order: tissue, focus, stain, scale.
    seconds : float
        Wall time of the checks.
    """

    slide: str
    pixel_size_um: float
    signals: list[Signal] = field(default_factory=list)
    seconds: float = float("nan")

    @property
    def status(self) -> str:
        """The worst status over the signals (``pass`` when there are none)."""
        return verdict(self.signals)

    @property
    def reasons(self) -> str:
        """Reasons of the signals that did not pass, joined by ``"; "`` (fails first)."""
        return join_reasons(self.signals)

    def extended(self, signals: Sequence[Signal]) -> QCReport:
        """A copy of this report with ``signals`` appended (they join the verdict)."""
        return QCReport(self.slide, self.pixel_size_um, [*self.signals, *signals], self.seconds)

    def values(self) -> dict[str, float]:
        """``{signal name: value}``, e.g. for indices.json."""
        return {s.name: s.value for s in self.signals}

    def to_dict(self) -> dict:
        """JSON-ready dict: slide, pixel size, verdict, reasons and every signal (NaN -> None)."""
        return {
            "slide": self.slide,
            "pixel_size_um": self.pixel_size_um,
            "qc": self.status,
            "qc_reasons": self.reasons,
            "seconds": self.seconds,
            "signals": [dict(asdict(s), value=_finite_or_none(s.value)) for s in self.signals],
        }


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: an unmeasured value is null."""
    return value if math.isfinite(value) else None


def verdict(signals: Sequence[Signal]) -> str:
    """The worst of the signals' statuses: ``fail`` > ``warn`` > ``pass``."""
    return max((s.status for s in signals), key=_RANK.__getitem__, default=PASS)


def join_reasons(signals: Sequence[Signal]) -> str:
    """One-line reasons of the non-passing signals, fails before warns, joined by ``"; "``."""
    bad = sorted((s for s in signals if s.status != PASS), key=lambda s: -_RANK[s.status])
    return "; ".join(s.reason for s in bad)
