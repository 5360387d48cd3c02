"""Codes 5 (cartilage) and 6 (soft tissue) in the measurement; codes 0-4 as before."""

import math

import numpy as np
import pytest

from histo import classes
from histo.measure import CountingRules, measure
from tests.helpers import measure_truth


def _bar_map() -> np.ndarray:
    """200 x 200 px of marrow on glass, with a 40 x 100 px bone bar (known areas)."""
    cm = np.zeros((240, 240), np.uint8)
    cm[20:220, 20:220] = classes.MARROW
    cm[70:110, 70:170] = classes.BONE
    return cm


def test_a_field_map_measures_as_before_and_reports_no_cartilage():
    m = measure(_bar_map(), 2.0)
    assert m.indices["BV/TV"] == pytest.approx(100 * 4000 / 40000)
    assert m.indices["T.Ar"] == pytest.approx(40000 * 4e-6)
    assert "Cg.Ar/B.Ar" not in m.indices


def test_cartilage_is_bone_area_with_its_share_and_soft_tissue_is_outside_the_tissue():
    before = measure(_bar_map(), 2.0).indices
    cm = _bar_map()
    cm[70:110, 70:95] = classes.CARTILAGE  # a quarter of the bar: a calcified-cartilage core
    cm[:, :20] = classes.SOFT_TISSUE  # muscle beside the section, where glass was
    after = measure(cm, 2.0).indices
    for name in ("T.Ar", "B.Ar", "BV/TV", "B.Pm", "Tb.Th"):
        assert after[name] == pytest.approx(before[name]), name
    assert after["Cg.Ar/B.Ar"] == pytest.approx(25.0)


def test_a_long_bone_map_without_cartilage_in_the_region_reports_a_zero_share():
    cm = _bar_map()
    cm[0:10, :] = classes.SOFT_TISSUE
    m = measure(cm, 2.0)
    assert m.indices["Cg.Ar/B.Ar"] == 0.0
    assert not math.isnan(m.indices["BV/TV"])


def test_measure_on_the_raw_long_bone_map_is_the_generators_truth(tibia):
    """One rule: measuring the class map with codes 5 and 6 in the standard region gives the
    synthetic truth (which N.Ot aside is the same measurement, with exact osteoclast contact:
    the generator's cells lie on the bone)."""
    exact = CountingRules(oc_surface_tolerance_px=0)
    m = measure_truth(tibia, roi=tibia.standard_region, rules=exact)
    for name in ("BV/TV", "B.Pm", "N.Oc/B.Pm", "Oc.S/BS", "ES/BS", "Cg.Ar/B.Ar"):
        assert m.indices[name] == pytest.approx(tibia.truth[name], rel=1e-9), name
    assert m.indices["Cg.Ar/B.Ar"] > 1.0  # osteopetrotic cores persist in the region
