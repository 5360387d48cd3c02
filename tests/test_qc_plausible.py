"""histo.qc plausibility signals on class maps whose answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histo import classes
from histo.measure import measure
from histo.qc import FAIL, PASS, QCReport, Signal, check_analysis, plausibility_signals

PX = 1.0  # µm/px
SIZE = 600
BANDS = ((100, 150), (275, 325), (450, 500))  # three 50-µm trabeculae (rows)


def _bone_bands() -> np.ndarray:
    cmap = np.full((SIZE, SIZE), classes.MARROW, np.uint8)
    for y0, y1 in BANDS:
        cmap[y0:y1] = classes.BONE
    return cmap


def _with_osteocytes(cmap: np.ndarray, spacing: int) -> np.ndarray:
    for y0, y1 in BANDS:
        for y in range(y0 + spacing // 2, y1 - 4, spacing):
            for x in range(spacing // 2, SIZE - 8, spacing):
                cmap[y : y + 3, x : x + 6] = classes.OSTEOCYTE
    return cmap


def _normal_map() -> np.ndarray:
    """Trabeculae with lacunae every 25 µm and a 40 x 10 µm osteoclast every 200 µm."""
    cmap = _with_osteocytes(_bone_bands(), 25)
    for y0, _ in BANDS:
        for x in range(50, SIZE - 40, 200):
            cmap[y0 - 10 : y0, x : x + 40] = classes.OSTEOCLAST
    return cmap


def _signals(cmap: np.ndarray) -> dict[str, Signal]:
    return {s.name: s for s in plausibility_signals(measure(cmap, PX))}


def test_bone_with_osteoclasts_and_osteocytes_like_bone_passes():
    sig = _signals(_normal_map())
    assert {s.status for s in sig.values()} == {PASS}, [s.reason for s in sig.values()]
    # 3 osteoclasts on the upper face of each of 3 bands: 9 over 3.6 mm of perimeter
    assert sig["osteoclast.n_per_bone_mm"].value == pytest.approx(2.5, rel=0.1)
    assert sig["osteoclast.thickness_um"].value == pytest.approx(10.0, rel=0.2)
    assert 1000 < sig["osteocyte.per_bone_mm2"].value < 1800  # one per 25 x 25 µm


def test_osteoclast_seams_lining_every_bone_surface_fail():
    cmap = _bone_bands()
    for y0, y1 in BANDS:  # a 2-µm seam on both faces of every trabecula
        cmap[y0 - 2 : y0] = classes.OSTEOCLAST
        cmap[y1 : y1 + 2] = classes.OSTEOCLAST
    sig = _signals(cmap)
    assert sig["osteoclast.surface_pct"].status == FAIL
    assert sig["osteoclast.surface_pct"].value > 90
    assert sig["osteoclast.thickness_um"].status == FAIL
    assert sig["osteoclast.thickness_um"].value < 2.5
    assert "thin seams" in sig["osteoclast.thickness_um"].reason


def test_a_few_thin_cells_on_little_surface_are_not_judged_by_their_thickness():
    """One 30 x 2 µm seam on 3.6 mm of bone surface (Oc.S/BS under 1 %) is what a false
    positive on an oc-poor section looks like: its thickness is reported and passes; the
    same seams along 20 % of the surface fail."""
    cmap = _bone_bands()
    y0 = BANDS[0][0]
    cmap[y0 - 2 : y0, 100:130] = classes.OSTEOCLAST
    sig = _signals(cmap)
    th = sig["osteoclast.thickness_um"]
    assert th.value < 2.5
    assert th.status == PASS
    assert sig["osteoclast.surface_pct"].value < 2.0
    for y0, _ in BANDS:  # now 8 seams on each band's upper face: 20 % of the surface
        for x in range(20, SIZE - 40, 70):
            cmap[y0 - 2 : y0, x : x + 30] = classes.OSTEOCLAST
    sig = _signals(cmap)
    assert sig["osteoclast.surface_pct"].value > 2.0
    assert sig["osteoclast.thickness_um"].status == FAIL


def test_marrow_nuclei_read_as_osteocytes_fail():
    sig = _signals(_with_osteocytes(_bone_bands(), 8))  # one lacuna per 8 x 8 µm
    ot = sig["osteocyte.per_bone_mm2"]
    assert ot.value > 8000 and ot.status == FAIL
    assert "nuclei of other cells" in ot.reason


def test_no_bone_and_tiny_bone_fail_and_no_osteoclasts_is_not_a_flag():
    from histo.qc.synthetic import _no_bone
    from histo.synth._field import build_field

    fld = _no_bone(build_field("normal", (400, 400), PX, np.random.default_rng(3), {}))
    culture = fld.class_map.copy()
    assert not np.isin(culture, (classes.BONE, classes.OSTEOCYTE)).any()
    sig = _signals(culture)
    assert sig["content.bone_area_mm2"].status == FAIL
    assert "almost no bone" in sig["content.bone_area_mm2"].reason
    culture[200:220, 200:220] = classes.BONE  # 400 µm² of "bone" in a culture
    sig = _signals(culture)
    assert sig["content.bone_area_mm2"].value == pytest.approx(0.0004, rel=0.01)
    assert sig["content.bone_area_mm2"].status == FAIL
    assert sig["content.bv_tv_pct"].status == FAIL
    # no osteoclast found (oc-poor bone) is not implausible
    assert math.isnan(sig["osteoclast.thickness_um"].value)
    assert sig["osteoclast.thickness_um"].status == PASS


def test_check_analysis_appends_plausibility_then_extra_signals_to_the_verdict():
    slide_qc = QCReport("s", PX, [Signal("stain.x", 1.0, "deg", "0-14", PASS)])
    extra = Signal("model.confidence", 0.2, "fraction", ">= 0.5", "warn", "model unsure")
    report = check_analysis(slide_qc, measure(_normal_map(), PX), extra_signals=[extra])
    names = [s.name for s in report.signals]
    assert names[0] == "stain.x" and names[-1] == "model.confidence"
    assert "osteocyte.per_bone_mm2" in names
    assert report.status == "warn" and report.reasons == "model unsure"
    assert slide_qc.status == PASS and len(slide_qc.signals) == 1  # the input is unchanged
