import json
import shutil

import numpy as np
import pytest

from histo.errors import ModelError
from histo.segment import NetworkSegmenter, load_model
from histo.segment.registry import DEFAULT_REGISTRY, read_registry


def test_shipped_default_model_loads():
    model = load_model("default")
    assert isinstance(model, NetworkSegmenter)
    assert model.working_pixel_size_um == 1.0
    assert load_model("unet").name == "unet"
    scores = model.predict_scores(np.full((64, 64, 3), 230, np.uint8))
    assert scores.shape == (6, 64, 64)


def _copy_registry(tmp_path):
    reg = read_registry()
    entry = reg["models"]["unet"]
    weights = DEFAULT_REGISTRY.parent / entry["file"]
    shutil.copy(weights, tmp_path / "w.safetensors")
    reg["models"]["unet"] = {**entry, "file": "w.safetensors"}
    (tmp_path / "registry.json").write_text(json.dumps(reg))
    return tmp_path / "registry.json", tmp_path / "w.safetensors"


def test_copy_with_valid_checksum_loads(tmp_path):
    reg, _ = _copy_registry(tmp_path)
    assert isinstance(load_model("default", registry=reg), NetworkSegmenter)
    assert isinstance(load_model(tmp_path), NetworkSegmenter)  # a folder with registry.json


def test_tampered_weights_are_refused(tmp_path):
    reg, weights = _copy_registry(tmp_path)
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum") as info:
        load_model("unet", registry=reg)
    assert "\n" not in str(info.value)


def test_missing_weights_are_refused(tmp_path):
    reg, weights = _copy_registry(tmp_path)
    weights.unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model("unet", registry=reg)


def test_corrupt_file_with_matching_checksum_is_refused(tmp_path):
    import hashlib

    reg_path, weights = _copy_registry(tmp_path)
    weights.write_bytes(b"not a safetensors file at all")
    reg = json.loads(reg_path.read_text())
    reg["models"]["unet"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    reg_path.write_text(json.dumps(reg))
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_model("unet", registry=reg_path)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(ModelError, match="not found"):
        load_model("/no/such/weights.safetensors")


def test_classical_loads_without_weights():
    assert load_model("classical").name == "classical"
