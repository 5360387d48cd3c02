"""``--device``: auto picks CUDA, then MPS, then the CPU; a missing device is a one-line error with
exit status 2; the device used is recorded with the results.

The machines that run these tests have no GPU: GPUs are simulated by patching torch's
availability checks, which is all :func:`histo.device.resolve_device` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histo.cli import main
from histo.device import DeviceError, resolve_device, tiles_per_batch


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without CUDA or MPS, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


def test_auto_is_the_cpu_here_when_torch_sees_no_gpu():
    has_gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    assert (resolve_device("auto").type == "cpu") == (not has_gpu)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "mps", "cuda:0"])
def test_a_missing_device_is_a_one_line_error(no_gpu, name):
    with pytest.raises(DeviceError, match="not available here") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)
    assert info.value.exit_status == 2


def test_an_unknown_device_name_is_refused():
    with pytest.raises(DeviceError, match="choose one of"):
        resolve_device("tpu")


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from histo.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("slides") / "S1.ome.tif"
    write_synthetic_slide(path, "oc-rich", size=512, pixel_size_um=1.0, seed=4)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["analyze", "{slide}", "--out", "{out}"],
        ["batch", "{folder}", "--out", "{out}", "--workers", "0"],
        ["evaluate", "--out", "{out}", "--slides", "1", "--quiet"],
        ["train", "--out", "{out}", "--steps", "1", "--quiet"],
    ],
)
def test_cli_with_a_missing_device_exits_2_and_writes_nothing(
    no_gpu, tmp_path, slide, capsys, command
):
    out = tmp_path / "out"
    fill = {"slide": str(slide), "folder": str(slide.parent), "out": str(out)}
    argv = [a.format(**fill) for a in command] + ["--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"histo {command[0]}: error: device 'cuda' is not available here")
    assert "\n" not in err
    assert not out.exists()


def test_device_model_and_version_are_recorded_with_the_results(tmp_path, slide):
    from histo import __version__
    from histo.segment.registry import read_registry

    assert main(["analyze", str(slide), "--out", str(tmp_path), "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "S1" / "indices.json").read_text())
    sha = read_registry()["models"]["unet"]["sha256"]
    assert meta["device"] == "cpu"
    assert meta["device_name"]  # the CPU's model name
    assert (meta["model_name"], meta["model_sha256"]) == ("unet", sha)
    assert meta["histo_version"] == __version__
    footer = (tmp_path / "report.html").read_text().split("<footer id='provenance'")[1]
    assert sha in footer and "device cpu" in footer and f"histo {__version__}" in footer


def test_tiles_per_batch_follows_the_free_device_memory(monkeypatch):
    from histo.device import INFERENCE_BYTES_PER_PX, MAX_TILES_PER_BATCH

    assert tiles_per_batch(torch.device("cpu"), 768) == 1
    tile = INFERENCE_BYTES_PER_PX * 768 * 768
    for free, expected in [(2 * 7 * tile + 1, 7), (10**12, MAX_TILES_PER_BATCH), (1, 1)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (f, 2 * f))
        assert tiles_per_batch(torch.device("cuda"), 768) == expected


def test_a_batch_of_tiles_scores_as_the_tiles_one_by_one(synthetic_section):
    from histo.segment import load_model

    model = load_model("default", precision="float32", device="cpu")
    rgb = synthetic_section("oc-rich", size=512).image
    tiles = [rgb[:200, :232], rgb[300:500, 100:332], rgb[300:500, 270:502]]
    batched = model.predict_scores_batch(tiles)
    for tile, scores in zip(tiles, batched, strict=True):
        assert scores.shape == (model.n_outputs, 200, 232)
        np.testing.assert_allclose(scores, model.predict_scores(tile), atol=1e-4)
