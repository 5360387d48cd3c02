"""Which region the indices are for: the standard region on a long bone, the whole section on
a field, a user's ROI whenever one is drawn."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from histo.measure import CountingRules, measure
from histo.measure.regional import (
    REGION_STANDARD,
    REGION_USER,
    REGION_WHOLE,
    measure_by_region,
)
from tests.helpers import measure_truth


def _measurer(sec):
    """``measure_roi(roi)`` of the section's true class map, as the pipeline passes it, with the
    truth's exact osteoclast contact: at this map's 2 µm/px the default one-pixel bridge spans
    2 µm clefts between crowded osteoclasts and facing walls (docs/measure.md)."""
    exact = CountingRules(oc_surface_tolerance_px=0)
    return lambda roi: measure_truth(sec, roi=roi, rules=exact)


def test_a_long_bone_is_measured_in_its_standard_region(tibia):
    found = measure_by_region(tibia.class_map, 2.0, _measurer(tibia))
    assert found.region.name == REGION_STANDARD
    # the region found on the class map lies within 50 µm of the generator's
    truth_box = tibia.region_box_um.edges()
    assert np.max(np.abs(np.subtract(found.region.box_um, truth_box))) <= 50.0
    got, want = found.measurement.indices, tibia.truth
    assert abs(got["BV/TV"] - want["BV/TV"]) <= 2.0
    assert got["N.Oc/B.Pm"] == pytest.approx(want["N.Oc/B.Pm"], rel=0.10)
    assert abs(got["Oc.S/BS"] - want["Oc.S/BS"]) <= 3.0
    extra = found.region.extra
    # the whole section holds the growth plate: far more cartilage than the region
    assert extra["section:Cg.Ar/B.Ar"] > got["Cg.Ar/B.Ar"]
    assert extra["section:T.Ar"] > 2 * got["T.Ar"]
    assert 0 < extra["N.Oc.junction"] <= extra["section:N.Oc"]
    assert {"cortex:BV/TV", "primary:BV/TV", "primary:N.Oc/B.Pm"} <= set(extra)


def test_a_user_roi_wins_over_the_standard_region(tibia):
    roi = np.zeros(tibia.class_map.shape, bool)
    roi[700:900, 300:700] = True
    found = measure_by_region(tibia.class_map, 2.0, _measurer(tibia), roi=roi)
    assert found.region.name == REGION_USER and not found.region.extra
    assert found.measurement.indices["T.Ar"] <= 200 * 400 * 4e-6


def test_a_field_is_measured_whole_and_says_why():
    from histo.synth import make_section

    sec = make_section("normal", size=384, pixel_size_um=1.0, seed=2)
    found = measure_by_region(sec.class_map, 1.0, _measurer(sec))
    assert found.region.name == REGION_WHOLE
    assert "no growth plate" in found.region.reason
    assert found.measurement.indices["BV/TV"] == measure(sec.class_map, 1.0).indices["BV/TV"]


def test_histo_measure_reports_the_standard_region_of_a_true_long_bone_map(tmp_path, tibia):
    from histo.cli import main

    np.save(tmp_path / "T1.classes.npy", tibia.class_map)
    np.save(tmp_path / "T1.osteoclasts.npy", tibia.osteoclast_labels)
    np.save(tmp_path / "T1.osteocytes.npy", tibia.osteocyte_labels)
    out = tmp_path / "out"
    assert (
        main(["measure", str(tmp_path / "T1.classes.npy"), "--pixel-size", "2", "--out", str(out)])
        == 0
    )
    with open(out / "indices.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["region"] == REGION_STANDARD
    assert abs(float(row["BV/TV"]) - tibia.truth["BV/TV"]) <= 2.0
    assert float(row["section:N.Oc"]) > float(row["N.Oc"])
    assert json.dumps(row)  # every column is plain text


def test_analyze_says_a_field_is_measured_whole(tmp_path):
    from histo.pipeline import analyze_slide
    from histo.synth import make_section

    sec = make_section("oc-rich", size=384, pixel_size_um=1.0, seed=5)
    result = analyze_slide(
        sec.image, pixel_size_um=1.0, model="classical", out_dir=tmp_path, name="F1"
    )
    assert result.row()["region"] == REGION_WHOLE
    meta = json.loads((tmp_path / "F1" / "indices.json").read_text())
    assert meta["row"]["region"] == REGION_WHOLE
    assert "no growth plate" in meta["region"]["reason"]
