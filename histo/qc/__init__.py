"""Per-slide quality control: named signals, their accepted ranges and the verdict.

Public surface::

    check_slide(slide, tissue=, thumbnail=, extra_signals=) -> QCReport
                                          every check that needs no segmentation
    check_analysis(report, measurement, extra_signals=) -> QCReport
                                          + the plausibility of what the analysis found
    check_image(image, pixel_size_um) -> QCReport
    QCReport.status / .reasons / .signals / .to_dict()
    Signal(name, value, unit, accepted, status, reason)
    verdict(signals), join_reasons(signals)

Each signal passes, warns or fails against its range (see ``RANGES`` and docs/qc.md); the
verdict is the worst status, its reasons the one-liners of the signals outside their range.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names, for type checkers and editors
    from histo.qc._checks import RANGES, check_analysis, check_image, check_slide
    from histo.qc._plausible import PLAUSIBLE_RANGES, plausibility_signals
    from histo.qc._signals import (
        FAIL,
        PASS,
        WARN,
        QCReport,
        Range,
        Signal,
        grade,
        join_reasons,
        verdict,
    )

#: where each public name lives: loaded on first use, so that importing one part of
#: histo.qc (the segmentation imports its confidence tally) does not import every check
_SOURCES = {
    "RANGES": "_checks",
    "check_analysis": "_checks",
    "check_image": "_checks",
    "check_slide": "_checks",
    "PLAUSIBLE_RANGES": "_plausible",
    "plausibility_signals": "_plausible",
    "FAIL": "_signals",
    "PASS": "_signals",
    "WARN": "_signals",
    "QCReport": "_signals",
    "Range": "_signals",
    "Signal": "_signals",
    "grade": "_signals",
    "join_reasons": "_signals",
    "verdict": "_signals",
}

__all__ = [
    "FAIL",
    "PASS",
    "PLAUSIBLE_RANGES",
    "RANGES",
    "WARN",
    "QCReport",
    "Range",
    "Signal",
    "check_analysis",
    "check_image",
    "check_slide",
    "grade",
    "join_reasons",
    "plausibility_signals",
    "verdict",
]


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
