"""The model-confidence signal: its reference stored with the model, and the verdict."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from histo.qc._confidence import ConfidenceSummary, confidence_signal, slide_summary
from histo.qc.synthetic import make_case
from histo.segment import load_model
from histo.segment.registry import (
    DEFAULT_REGISTRY,
    MODEL_JSON,
    locate_model,
    read_qc_reference,
    read_registry,
    write_qc_reference,
)

REFERENCE = {
    "low_margin": 0.5,
    "max_share": 0.04,
    "warn_above": 0.09,
    "fail_above": 0.19,
    "model_sha256": None,
}


@pytest.fixture(scope="module")
def shipped():
    model = load_model("default")
    return model, read_qc_reference(locate_model("default"))


def test_shipped_model_carries_a_reference_for_its_own_weights(shipped):
    model, reference = shipped
    assert reference is not None and model.qc_reference == reference
    assert reference["model_sha256"] == model.sha256
    assert 0 < reference["max_share"] < reference["warn_above"] < reference["fail_above"] < 1


@pytest.mark.parametrize(("kind", "seed"), [("in-domain", 123), ("h-and-e", 456)])
def test_signal_passes_in_domain_and_flags_h_and_e(shipped, kind, seed):
    model, reference = shipped
    case = make_case(kind, seed, 640, 1.0, counterstain="hematoxylin")
    signal = confidence_signal(slide_summary(case.image, 1.0, model), reference)
    if kind == "in-domain":
        assert signal.status == "pass" and signal.value <= reference["max_share"] * 1.5
    else:
        assert signal.status in ("warn", "fail") and signal.value > reference["warn_above"]
        assert "unsure on" in signal.reason and "in-domain slides: at most" in signal.reason


def test_signal_grades_the_unsure_share_against_the_reference():
    # 30 tissue pixels of bone (class 2): 6 with margins below 0.5 -> 20 % unsure
    hist = np.zeros((5, 20), np.int64)
    hist[0, 2] = 1000  # background does not count
    hist[2, 3], hist[2, 19] = 6, 24
    signal = confidence_signal(ConfidenceSummary(hist), REFERENCE)
    assert signal.value == pytest.approx(0.2)
    assert signal.status == "fail"
    assert signal.reason.startswith("the network is unsure on 20 % of tissue (in-domain slides")
    hist[2, 3] = 2  # 2 / 26 = 7.7 %
    assert confidence_signal(ConfidenceSummary(hist), REFERENCE).status == "pass"
    hist[2, 3] = 3  # 3 / 27 = 11 %
    assert confidence_signal(ConfidenceSummary(hist), REFERENCE).status == "warn"


def test_signal_without_reference_warns_and_says_how_to_get_one():
    signal = confidence_signal(ConfidenceSummary(np.zeros((5, 20), np.int64)), None)
    assert signal.status == "warn" and math.isnan(signal.value)
    assert "histo qc-reference" in signal.reason


def _model_dir(tmp_path):
    entry = read_registry()["models"]["unet"]
    folder = tmp_path / "my-model"
    folder.mkdir()
    shutil.copy(DEFAULT_REGISTRY.parent / entry["file"], folder / "model.safetensors")
    meta = {k: entry[k] for k in ("architecture", "config", "working_pixel_size_um", "sha256")}
    (folder / MODEL_JSON).write_text(json.dumps(meta))
    return folder, entry["sha256"]


def test_reference_is_read_back_from_model_json_and_a_registry(tmp_path):
    folder, sha = _model_dir(tmp_path)
    ref = dict(REFERENCE, model_sha256=sha)
    assert read_qc_reference(locate_model(folder)) is None
    assert write_qc_reference(locate_model(folder), ref) == (folder / MODEL_JSON).resolve()
    assert read_qc_reference(locate_model(folder)) == ref
    assert load_model(folder).qc_reference == ref
    assert json.loads((folder / MODEL_JSON).read_text())["sha256"] == sha  # kept
    # a registry entry
    reg = read_registry()
    reg["models"]["unet"]["file"] = str(folder / "model.safetensors")
    reg["models"]["unet"].pop("qc_reference", None)
    reg_path = tmp_path / "registry.json"
    reg_path.write_text(json.dumps(reg))
    source = locate_model("default", registry=reg_path)
    write_qc_reference(source, ref)
    assert read_qc_reference(locate_model("unet", registry=reg_path)) == ref
    assert read_registry(reg_path)["models"]["classical"] == reg["models"]["classical"]
    # a reference measured on other weights is not used
    write_qc_reference(source, dict(ref, model_sha256="0" * 64))
    assert read_qc_reference(locate_model("unet", registry=reg_path)) is None


def test_qc_reference_command_stores_the_reference_in_model_json(tmp_path, capsys):
    from histo.cli import main

    folder, sha = _model_dir(tmp_path)
    args = ["qc-reference", "--model", str(folder), "--slides", "1", "--size", "512"]
    assert main([*args, "--device", "cpu"]) == 0
    ref = read_qc_reference(locate_model(folder))
    assert ref["slides"] == 1 and ref["model_sha256"] == sha
    assert ref["warn_above"] > ref["max_share"] == max(v for v in ref["shares"] if v is not None)
    assert str(folder / MODEL_JSON) in capsys.readouterr().out
