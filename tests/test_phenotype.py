"""histo.phenotype: the call, its evidence and confidence, calibration, and a synthetic cohort."""

from __future__ import annotations

import functools
import json
import math

import pytest

from histo.errors import EmptyTissueError, HistoError
from histo.phenotype import (
    PHENOTYPES,
    ReferenceRanges,
    calibrate,
    call_phenotype,
    load_ranges,
    save_ranges,
)


def indices(bv_tv, n_oc_b_pm):
    return {"BV/TV": bv_tv, "Ma.Ar/T.Ar": 100 - bv_tv, "N.Oc/B.Pm": n_oc_b_pm}


@pytest.mark.parametrize(
    ("bv_tv", "n_oc", "expected"),
    [
        (15.0, 3.0, "normal"),
        (15.0, 0.0, "normal"),  # osteoclasts do not matter without osteopetrosis
        (55.2, 15.0, "oc-rich"),
        (48.0, 3.0, "oc-rich"),
        (55.2, 0.0, "oc-poor"),
        (62.0, 0.2, "oc-poor"),
    ],
)
def test_call(bv_tv, n_oc, expected):
    call = call_phenotype(indices(bv_tv, n_oc))
    assert call.phenotype == expected
    assert 0.5 <= call.confidence <= 1.0
    assert call.phenotype in PHENOTYPES


def test_evidence_reads_like_a_sentence():
    call = call_phenotype(indices(55.2, 0.0))
    assert call.evidence[0] == "BV/TV 55.2% > 35% (osteopetrotic)"
    assert any("oc-poor" in line for line in call.evidence)


def test_confidence_grows_with_the_margin():
    near = call_phenotype(indices(36.0, 10.0)).confidence
    far = call_phenotype(indices(60.0, 10.0)).confidence
    assert near < far
    assert call_phenotype(indices(34.9, 3.0)).confidence < 0.6
    assert call_phenotype(indices(15.0, 3.0)).confidence > 0.99


def test_marrow_fraction_is_used_when_bv_tv_is_missing():
    call = call_phenotype({"Ma.Ar/T.Ar": 40.0, "N.Oc/B.Pm": 0.0})
    assert call.phenotype == "oc-poor"


def test_no_tissue_is_an_error():
    with pytest.raises(EmptyTissueError):
        call_phenotype({"BV/TV": math.nan, "N.Oc/B.Pm": math.nan})


def test_calibrate_from_controls_and_round_trip(tmp_path):
    controls = [indices(bv, noc) for bv, noc in [(12, 3), (15, 4), (18, 2.5), (21, 5), (16, 3.5)]]
    ranges = calibrate(controls)
    assert ranges.n_controls == 5
    assert 21 < ranges.bv_tv_upper < 40
    assert 0.2 <= ranges.n_oc_b_pm_lower < 2.5
    assert "calibrated from 5" in ranges.source
    path = save_ranges(ranges, tmp_path / "ranges.json")
    assert load_ranges(path) == ranges
    assert call_phenotype(indices(15, 3), ranges).phenotype == "normal"
    assert call_phenotype(indices(55, 0), ranges).phenotype == "oc-poor"


def test_calibrate_needs_controls():
    with pytest.raises(HistoError):
        calibrate([indices(15, 3), indices(16, 3)])


def test_bad_ranges_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"bv_tv_upper": "high"}))
    with pytest.raises(HistoError):
        load_ranges(path)
    path.write_text("{not json")
    with pytest.raises(HistoError):
        load_ranges(path)
    with pytest.raises(HistoError):
        load_ranges(tmp_path / "missing.json")


def test_defaults_are_documented():
    ranges = ReferenceRanges()
    assert ranges.bv_tv_upper == 35.0
    assert ranges.ma_ar_t_ar_lower == 65.0
    assert "10-21%" in ranges.source


# --------------------------------------------------------------------------- cohort

COHORT_SEEDS = range(1000, 1010)


@functools.cache
def _cohort_indices(phenotype: str, seed: int) -> dict:
    from histo.measure import measure
    from histo.synth import make_section

    s = make_section(phenotype, 768, 1.0, seed=seed)
    m = measure(
        s.class_map,
        1.0,
        osteoclast_labels=s.osteoclast_labels,
        osteocyte_labels=s.osteocyte_labels,
    )
    return m.indices


@pytest.mark.slow
@pytest.mark.parametrize("phenotype", ["normal", "oc-rich", "oc-poor"])
def test_cohort_calls_are_right_from_true_class_maps(phenotype):
    calls = [call_phenotype(_cohort_indices(phenotype, seed)) for seed in COHORT_SEEDS]
    wrong = [
        (seed, c.phenotype, c.evidence)
        for seed, c in zip(COHORT_SEEDS, calls, strict=True)
        if c.phenotype != phenotype
    ]
    assert not wrong
    assert min(c.confidence for c in calls) > 0.8


@pytest.mark.slow
def test_cohort_calls_with_ranges_calibrated_on_normal_controls():
    controls = [_cohort_indices("normal", seed) for seed in COHORT_SEEDS]
    ranges = calibrate(controls)
    for phenotype in ("oc-rich", "oc-poor"):
        for seed in COHORT_SEEDS:
            assert call_phenotype(_cohort_indices(phenotype, seed), ranges).phenotype == phenotype
