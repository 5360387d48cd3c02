"""histo.evaluate_long_bone: what the long-bone evaluation counts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from histo import classes
from histo.evaluate_long_bone import _cartilage_lacunae, summarise_long_bone


def _found(box_um):
    return SimpleNamespace(region=SimpleNamespace(box_um=box_um))


def test_lacunae_on_cartilage_are_counted_on_the_section_and_in_the_region():
    truth = np.full((100, 100), classes.BONE, np.uint8)
    truth[:, 50:] = classes.CARTILAGE
    lacunae = np.zeros((100, 100), np.int32)
    lacunae[10:14, 60:64] = 1  # cartilage, in the region
    lacunae[80:84, 60:64] = 2  # cartilage, below the region
    lacunae[10:14, 20:24] = 3  # bone, in the region
    # the region: the top half (rows 0-25 µm at 0.5 µm/px), all columns
    got = _cartilage_lacunae(lacunae, truth, _found((0.0, 25.0, 0.0, 50.0)), 0.5)
    assert (got.section, got.region) == (2, 1)
    # measured whole (no standard region): every lacuna enters the indices
    assert _cartilage_lacunae(lacunae, truth, _found(None), 0.5).region == 2


def test_summary_adds_the_lacunae_of_the_sections():
    row = {
        "indices": {"BV/TV": 10.0, "Oc.S/BS": 5.0, "N.Oc/B.Pm": 1.0, "N.Ot/B.Ar": 100.0},
        "truth": {"BV/TV": 11.0, "Oc.S/BS": 5.0, "N.Oc/B.Pm": 1.0, "N.Ot/B.Ar": 100.0},
        "region edge error um": 4.0,
        "region": "standard",
        "lacunae in cartilage as osteocytes": 1,
        "lacunae in cartilage (whole section)": 3,
        "call": "normal",
        "phenotype": "normal",
        "slide": 0,
    }
    out = summarise_long_bone([row, row])
    assert out["lacunae in cartilage as osteocytes"] == 2
    assert out["lacunae in cartilage (whole section)"] == 6
    assert out["BV/TV abs. error"] == 1.0


def test_relative_errors_need_a_truth_above_zero():
    def row(got, want):
        return {
            "indices": {"BV/TV": 50.0, "Oc.S/BS": got, "N.Oc/B.Pm": got, "N.Ot/B.Ar": 100.0},
            "truth": {"BV/TV": 50.0, "Oc.S/BS": want, "N.Oc/B.Pm": want, "N.Ot/B.Ar": 100.0},
            "region edge error um": 4.0,
            "region": "standard",
            "call": "oc-poor",
            "phenotype": "oc-poor",
            "slide": 0,
        }

    out = summarise_long_bone([row(0.3, 0.0), row(2.2, 2.0)])
    assert out["N.Oc/B.Pm rel. error"] == pytest.approx(0.1)
    assert out["max N.Oc/B.Pm where the truth is 0 (/mm)"] == pytest.approx(0.3)
    assert out["Oc.S/BS abs. error"] == pytest.approx(0.3)
