"""Network arithmetic: float32 or bfloat16 (HISTO_PRECISION), and what bfloat16 changes."""

from __future__ import annotations

import numpy as np
import pytest

from histo.errors import ModelError
from histo.segment import bfloat16_supported, load_model, resolve_precision
from histo.synth import make_section


def test_precision_names_and_environment(monkeypatch):
    monkeypatch.delenv("HISTO_PRECISION", raising=False)
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("BFloat16") == "bfloat16"
    auto = "bfloat16" if bfloat16_supported() else "float32"
    assert resolve_precision(None) == resolve_precision("auto") == auto
    monkeypatch.setenv("HISTO_PRECISION", "float32")
    assert resolve_precision(None) == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"  # an explicit choice wins
    monkeypatch.setenv("HISTO_PRECISION", "half")
    with pytest.raises(ModelError, match="precision 'half'"):
        resolve_precision(None)
    with pytest.raises(ModelError, match="precision"):
        load_model("default", precision="float16")


def test_bfloat16_scores_match_float32():
    """Same classes on >= 99.5 % of a synthetic field, probabilities within a few hundredths."""
    sec = make_section("oc-rich", size=384, pixel_size_um=1.0, seed=77, counterstain="fast-green")
    f32 = load_model("default", precision="float32")
    b16 = load_model("default", precision="bfloat16")
    assert (f32.precision, b16.precision) == ("float32", "bfloat16")
    a = f32.predict_scores(sec.image)
    b = b16.predict_scores(sec.image)
    n = f32.n_outputs - 1  # class scores, then the centre map
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (n + 1, 384, 384)
    np.testing.assert_allclose(b[:n].sum(0), 1.0, atol=1e-4)  # still probabilities
    agree = float((a[:n].argmax(0) == b[:n].argmax(0)).mean())
    assert agree >= 0.995, agree
    assert float(np.abs(a - b).mean()) < 0.01
    # the class map is not noise: the network finds the drawn osteoclasts in either precision
    oc_true = sec.class_map == 3
    for s in (a, b):
        hit = (s[:5].argmax(0) == 3) & oc_true
        assert hit.sum() >= 0.7 * oc_true.sum()
