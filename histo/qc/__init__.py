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
