"""Every check that needs no segmentation, run on one slide, with its accepted range.

Ranges were chosen on synthetic validation sections only (benchmarks/bench_qc.py --split
validation) and are documented with their reasons in docs/qc.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from histo.io import Slide, TissueMask, require_pixel_size, slide_from_array
from histo.io.color import summed_od
from histo.qc._plausible import plausibility_signals
from histo.qc._sample import SlideSample, sample_slide
from histo.qc._scale import nucleus_diameter_um
from histo.qc._signals import QCReport, Range, Signal, grade
from histo.qc._stain import StainEstimate, estimate_stains
from histo.qc._tissue import blur_um

INF = math.inf

#: signal name -> Range(accepted, tolerated); outside tolerated fails
RANGES = {
    "tissue.area_mm2": Range((0.02, INF), (0.005, INF)),
    "focus.blur_um": Range((0.0, 1.2), (0.0, 1.8)),
    "stain.counterstain_deg": Range((0.0, 14.0), (0.0, 18.0)),
    "stain.second_deg": Range((0.0, 15.0), (0.0, 19.0)),
    "stain.separation_deg": Range((30.0, INF), (20.0, INF)),
    "stain.second_share": Range((0.0, 0.55), (0.0, 0.7)),
    "scale.nucleus_um": Range((4.7, 8.1), (3.8, 10.0)),
}
#: marrow nucleus diameter (µm) expected at the true pixel size, as the checks measure it
NUCLEUS_EXPECTED_UM = 6.0


def _tissue_signals(sample: SlideSample, od_sums: list[np.ndarray]) -> list[Signal]:
    area = sample.tissue.tissue_area_mm2
    blur = blur_um(sample.tiles, sample.pixel_size_um, od_sums) if sample.tiles else math.nan
    return [
        grade(
            "tissue.area_mm2",
            area,
            "mm²",
            RANGES["tissue.area_mm2"],
            lambda v: f"too little tissue: {v:.3g} mm² found, indices need >= 0.02 mm²",
        ),
        grade(
            "focus.blur_um",
            blur,
            "µm",
            RANGES["focus.blur_um"],
            lambda v: f"out of focus: edges blurred over {v:.1f} µm (sigma), sharp scans <= 1.2 µm",
        ),
    ]


def _stain_signals(stains: StainEstimate | None) -> list[Signal]:
    if stains is None:
        values = dict.fromkeys(("counter", "second", "sep", "share"), math.nan)
    else:
        values = {
            "counter": stains.counterstain_deg,
            "second": stains.second_deg,
            "sep": stains.separation_deg,
            "share": stains.second_share,
        }
    return [
        grade(
            "stain.counterstain_deg",
            values["counter"],
            "deg",
            RANGES["stain.counterstain_deg"],
            lambda v: (
                f"counterstain unlike hematoxylin, fast green or methyl green: "
                f"{v:.0f}° from the nearest ({stains.counterstain})"
            ),
        ),
        grade(
            "stain.second_deg",
            values["second"],
            "deg",
            RANGES["stain.second_deg"],
            lambda v: (
                f"second stain unlike TRAP (fast red violet, pararosaniline): "
                f"{v:.0f}° from the nearest ({stains.second}); eosin or a trichrome red?"
            ),
        ),
        grade(
            "stain.separation_deg",
            values["sep"],
            "deg",
            RANGES["stain.separation_deg"],
            lambda v: f"stains hardly differ in hue ({v:.0f}° apart): washed-out or greyscale?",
        ),
        grade(
            "stain.second_share",
            values["share"],
            "fraction",
            RANGES["stain.second_share"],
            lambda v: (
                f"red stain covers {100 * v:.0f} % of the stain in tissue "
                "(TRAP marks osteoclasts only): H&E, trichrome or no counterstain?"
            ),
        ),
    ]


def _scale_reason(measured_um: float) -> str:
    factor = NUCLEUS_EXPECTED_UM / measured_um
    lo, hi = RANGES["scale.nucleus_um"].accepted
    if factor > 1:
        direction, times = "small", factor
    else:
        direction, times = "large", 1.0 / factor
    return (
        f"pixel size looks ~{times:.1f}x too {direction}: marrow nuclei measure "
        f"{measured_um:.1f} µm, expected {lo:g}-{hi:g} µm"
    )


def _scale_signal(sample: SlideSample, native_um: float, od_sums: list[np.ndarray]) -> Signal:
    diameter = math.nan
    if sample.tiles:
        px = sample.pixel_size_um
        diameter = nucleus_diameter_um(sample.tiles, px, native_um, od_sums).diameter_um
    return grade("scale.nucleus_um", diameter, "µm", RANGES["scale.nucleus_um"], _scale_reason)


def check_slide(
    slide: Slide,
    *,
    tissue: TissueMask | None = None,
    thumbnail: np.ndarray | None = None,
    extra_signals: Sequence[Signal] = (),
) -> QCReport:
    """Run every check that needs no segmentation on an opened slide.

    Parameters
    ----------
    slide : Slide
        Opened with the pixel size to judge (from the file or the user).
    tissue : TissueMask, optional
        The slide's tissue mask when the caller already found it (the analysis does), so
        the slide is not searched for tissue twice.
    thumbnail : ndarray, optional
        The RGB thumbnail ``tissue`` was made from, at the mask's resolution.
    extra_signals : sequence of Signal
        Further signals computed elsewhere (the analysis's plausibility checks, the model's
        confidence), appended after these and counted in the verdict.

    Returns
    -------
    QCReport
        Signals in the order tissue, focus, stain, scale, then ``extra_signals``; ``status``
        and ``reasons`` give the verdict. Reads at most a few Mpx whatever the slide size.
    """
    start = time.perf_counter()
    ps = require_pixel_size(slide)
    sample = sample_slide(slide, tissue=tissue, thumbnail=thumbnail)
    # the tiles' summed optical density, which the focus, stain and scale checks all read
    od_sums = [summed_od(tile) for tile in sample.tiles]
    stains = estimate_stains(sample.tiles, od_sums) if sample.tiles else None
    signals = _tissue_signals(sample, od_sums) + _stain_signals(stains)
    signals.append(_scale_signal(sample, ps, od_sums))
    signals += list(extra_signals)
    return QCReport(slide.name, ps, signals, time.perf_counter() - start)


def check_image(image: np.ndarray, pixel_size_um: float, name: str = "image") -> QCReport:
    """:func:`check_slide` on an in-memory RGB image with the given pixel size (µm/px)."""
    return check_slide(slide_from_array(image, pixel_size_um, name))


def check_analysis(report: QCReport, measurement, extra_signals: Sequence[Signal] = ()) -> QCReport:
    """The slide's report completed with the checks on what the analysis found.

    Parameters
    ----------
    report : QCReport
        From :func:`check_slide` on the same slide.
    measurement : histo.measure.Measurement
        The slide's measurement (indices and counted osteoclasts).
    extra_signals : sequence of Signal
        Further signals (the model's confidence), appended last.

    Returns
    -------
    QCReport
        ``report``'s signals, then the plausibility signals, then ``extra_signals``.
    """
    return report.extended([*plausibility_signals(measurement), *extra_signals])
