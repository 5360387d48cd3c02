import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from histo.errors import ModelError
from histo.segment import NetworkSegmenter, load_model
from histo.segment.registry import (
    DEFAULT_REGISTRY,
    read_registry,
    user_model_names,
    user_models_dir,
)


def test_shipped_default_model_loads():
    model = load_model("default")
    assert isinstance(model, NetworkSegmenter)
    assert model.working_pixel_size_um == 1.0
    assert load_model("unet").name == "unet"
    scores = model.predict_scores(np.full((64, 64, 3), 230, np.uint8))
    # the shipped network segments 7 classes (codes 0-6) and the osteoclast centre map
    assert model.n_outputs == 8 and scores.shape == (8, 64, 64)
    np.testing.assert_allclose(scores[:7].sum(0), 1.0, atol=1e-4)


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


def test_the_shipped_registry_is_package_data():
    import histo

    assert DEFAULT_REGISTRY.is_relative_to(Path(histo.__file__).parent)
    assert load_model("default").sha256 == read_registry()["models"]["unet"]["sha256"]


def _user_model(folder: Path, sha256: str | None = None) -> Path:
    """A model folder as ``histo train`` writes it: weights and model.json with their sha256."""
    weights = DEFAULT_REGISTRY.parent / read_registry()["models"]["unet"]["file"]
    folder.mkdir(parents=True)
    shutil.copy(weights, folder / "model.safetensors")
    sha = sha256 or hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps({"architecture": "HistoUNet", "sha256": sha}))
    return folder


def test_user_models_load_by_name_by_folder_and_by_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTO_MODELS", str(tmp_path / "models"))
    folder = _user_model(tmp_path / "models" / "my-lab")
    assert user_model_names() == ["my-lab"]
    for ref in ("my-lab", str(folder), str(folder / "model.safetensors")):
        model = load_model(ref, device="cpu")
        assert (model.name, model.sha256) == ("my-lab", read_registry()["models"]["unet"]["sha256"])
    with pytest.raises(ModelError, match="my-lab"):  # listed among the known models
        load_model("no-such-model")


def test_a_tampered_user_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTO_MODELS", str(tmp_path))
    _user_model(tmp_path / "my-lab", sha256="0" * 64)
    with pytest.raises(ModelError, match="model.json checksum"):
        load_model("my-lab")


def test_the_user_model_folder_follows_the_platform(monkeypatch):
    from histo.segment import registry

    assert user_models_dir({"HISTO_MODELS": "/data/m", "HOME": "/h"}) == Path("/data/m")
    monkeypatch.setattr(registry.sys, "platform", "linux")
    assert user_models_dir({"HOME": "/h"}) == Path("/h/.local/share/histo/models")
    assert user_models_dir({"HOME": "/h", "XDG_DATA_HOME": "/x"}) == Path("/x/histo/models")
    monkeypatch.setattr(registry.sys, "platform", "darwin")
    mac = Path("/h/Library/Application Support/histo/models")
    assert user_models_dir({"HOME": "/h"}) == mac
