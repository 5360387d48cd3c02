"""``histo analyze``: outputs, failures, exit statuses; weights are data, checked by checksum."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from histo.cli import main
from histo.errors import ModelError

HISTO = [sys.executable, "-m", "histo"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from histo.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("slides") / "S1.ome.tif"
    write_synthetic_slide(path, "oc-rich", size=512, pixel_size_um=1.0, seed=4)
    return path


def test_analyze_writes_outputs_and_lists_failures(tmp_path, slide, capsys):
    bad = tmp_path / "notes.tif"
    bad.write_text("not a slide")
    out = tmp_path / "out"
    status = main(["analyze", str(slide), str(bad), "--out", str(out), "--model", "classical"])
    err = capsys.readouterr().err
    assert status == 1
    rows = read_csv(out / "indices.csv")
    assert [r["slide"] for r in rows] == ["S1"]
    for name in (
        "labels.ome.zarr",
        "osteoclasts.csv",
        "osteocytes.csv",
        "overlay.png",
        "osteoclasts.geojson",
        "osteocytes.geojson",
        "indices.json",
    ):
        assert (out / "S1" / name).exists(), name
    meta = json.loads((out / "S1" / "indices.json").read_text())
    assert meta["row"]["slide"] == "S1" and meta["row"]["phenotype"] == rows[0]["phenotype"]
    failures = read_csv(out / "failures.csv")
    assert failures == [
        {
            "slide": "notes",
            "path": str(bad),
            "error": "SlideReadError",
            "reason": "notes.tif: not a supported image (TIFF, SVS, NDPI, OME-TIFF, OME-Zarr, PNG, "
            "JPEG)",
        }
    ]
    assert f"notes: failed: {failures[0]['reason']}" in err
    assert "1 analysed, 1 failed" in err
    assert not [p for p in out.iterdir() if ".partial" in p.name]

    # analysing again replaces the slide folder whole
    assert main(["analyze", str(slide), "--out", str(out), "--model", "classical"]) == 0
    assert read_csv(out / "indices.csv") == rows
    assert read_csv(out / "failures.csv") == []
    assert not [p for p in out.iterdir() if p.name.startswith(".S1")]


def test_analyze_refuses_a_locked_output_folder(tmp_path, slide):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom histo.io.locking import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(
            [*HISTO, "analyze", str(slide), "--out", str(out), "--model", "classical"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines()[-1] == (
        f"histo analyze: error: output folder {out} is in use by another histo run "
        f"(pid {holder.pid}); wait for it or choose another --out"
    )
    assert not (out / "S1").exists()


# ------------------------------------------------------------------ weights


@pytest.fixture()
def registry(tmp_path) -> Path:
    """A registry with a tiny network, registered (file path and sha256) like shipped weights."""
    import torch
    from safetensors.torch import save_file

    from histo.segment.network import HistoUNet, NetworkConfig
    from histo.segment.registry import register_weights

    torch.manual_seed(0)
    config = NetworkConfig(widths=[4, 4, 4, 4, 4])
    net = HistoUNet(config)
    weights = tmp_path / "models" / "tiny" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    meta = {"architecture": "HistoUNet", "config": config.to_dict(), "working_pixel_size_um": 1.0}
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        str(weights),
        metadata={k: json.dumps(v) for k, v in meta.items()},
    )
    reg = tmp_path / "models" / "registry.json"
    reg.write_text(json.dumps({"aliases": {"default": "tiny"}, "models": {}}))
    register_weights("tiny", weights, reg)
    return reg


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one weight changes; the file still parses
    path.write_bytes(bytes(data))


def test_registered_weights_load_and_tampered_weights_are_refused(registry):
    from histo.segment import load_model

    model = load_model(registry)
    assert model.working_pixel_size_um == 1.0
    weights = registry.parent / "tiny" / "model.safetensors"
    _tamper(weights)
    with pytest.raises(ModelError, match="do not match the registry checksum") as info:
        load_model(registry)
    assert "\n" not in str(info.value) and "tampered" in str(info.value)
    with pytest.raises(ModelError):
        load_model("tiny", registry=registry)


def test_analyze_with_tampered_weights_exits_5(tmp_path, registry, slide):
    _tamper(registry.parent / "tiny" / "model.safetensors")
    proc = subprocess.run(
        [*HISTO, "analyze", str(slide), "--out", str(tmp_path / "out"), "--model", str(registry)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 5
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("histo analyze: error: weights ")
    assert errors[0].endswith("corrupt or tampered file")
    assert not (tmp_path / "out" / "S1").exists()


class _Payload:
    """Pickled, this would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_pickled_weights_never_execute(tmp_path, suffix):
    """A pickle is refused without being unpickled, whatever its name."""
    from histo.segment import load_model

    marker = tmp_path / "code-ran"
    weights = tmp_path / f"evil{suffix}"
    weights.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    with pytest.raises(ModelError) as info:
        load_model(weights)
    assert not marker.exists()
    assert "\n" not in str(info.value)


def _write_roi(path: Path) -> None:
    """Left half of the 512² slide with a square hole, in level-0 pixels (x, y)."""
    outer = [[0, 0], [256, 0], [256, 511], [0, 511], [0, 0]]
    hole = [[64, 64], [128, 64], [128, 128], [64, 128], [64, 64]]
    geometry = {"type": "Polygon", "coordinates": [outer, hole]}
    path.write_text(json.dumps({"type": "Feature", "geometry": geometry}))


def test_analyze_roi_and_ranges(tmp_path, slide):
    import numpy as np
    from skimage.draw import polygon2mask

    from histo.phenotype import ReferenceRanges, save_ranges
    from histo.pipeline import analyze_slide
    from tests.helpers import measure_truth

    roi, ranges = tmp_path / "roi.geojson", tmp_path / "ranges.json"
    _write_roi(roi)
    save_ranges(ReferenceRanges(bv_tv_upper=99.0), ranges)
    out = tmp_path / "out"
    args = ["analyze", str(slide), "--out", str(out), "--model", "classical"]
    assert main([*args, "--roi", str(roi), "--ranges", str(ranges)]) == 0
    row = read_csv(out / "indices.csv")[0]
    assert json.loads((out / "S1" / "indices.json").read_text())["model"] == "classical"
    whole = analyze_slide(slide, model="classical")
    assert whole.phenotype.phenotype != "normal"  # BV/TV above the default 35 %
    assert row["phenotype"] == "normal" and "99%" in row["evidence"]

    # the indices are those of the maps measured inside the polygon with its hole
    f = whole.source_pixel_size_um / whole.pixel_size_um  # level-0 px -> working px
    shape = whole.class_map.shape
    inside = polygon2mask(shape, np.array([[0, 0], [0, 256], [511, 256], [511, 0]]) * f)
    inside &= ~polygon2mask(shape, np.array([[64, 64], [64, 128], [128, 128], [128, 64]]) * f)
    want = measure_truth(whole, roi=inside).indices
    for key in ("T.Ar", "B.Ar", "B.Pm", "N.Oc", "Oc.S/BS"):
        assert float(row[key]) == pytest.approx(want[key], rel=1e-9), key
    assert float(row["T.Ar"]) < 0.6 * whole.measurement.indices["T.Ar"]


def test_analyze_refuses_an_unreadable_roi_before_any_slide(tmp_path, slide):
    bad = tmp_path / "roi.geojson"
    bad.write_text("{}")
    out = tmp_path / "out"
    status = main(["analyze", str(slide), "--out", str(out), "--roi", str(bad)])
    assert status != 0 and not (out / "S1").exists()


def test_measure_of_analyze_labels_has_analyze_columns_and_areas(tmp_path, slide):
    """histo measure on the labels histo analyze wrote: the same indices.csv columns, in the
    same order, and the same areas, perimeter and osteoclast count."""
    out = tmp_path / "out"
    assert main(["analyze", str(slide), "--out", str(out), "--model", "classical"]) == 0
    measured = tmp_path / "measured"
    labels = out / "S1" / "labels.ome.zarr"
    assert main(["measure", str(labels), "--out", str(measured)]) == 0
    analysed, remeasured = read_csv(out / "indices.csv"), read_csv(measured / "indices.csv")
    assert list(remeasured[0]) == list(analysed[0])
    assert remeasured[0]["slide"] == "S1"
    for key in ("T.Ar", "B.Ar", "B.Pm", "N.Oc", "Oc.S/BS"):
        assert float(remeasured[0][key]) == pytest.approx(float(analysed[0][key]), rel=1e-9)


def test_analyze_withholds_the_call_on_an_h_and_e_section_and_exits_0(tmp_path, slide, capsys):
    """An eosin-stained section fails quality control: a result (exit 0), phenotype uncertain,
    every signal in indices.json; the in-domain slide beside it keeps its call."""
    import tifffile

    from histo.qc.synthetic import make_case

    case = make_case("h-and-e", 12, 512, 1.0, counterstain="hematoxylin", phenotype="normal")
    he = tmp_path / "HE.tif"
    tifffile.imwrite(he, case.image)
    out = tmp_path / "out"
    args = ["analyze", str(slide), str(he), "--out", str(out), "--pixel-size", "1"]
    assert main([*args, "--model", "classical"]) == 0
    err = capsys.readouterr().err
    rows = {r["slide"]: r for r in read_csv(out / "indices.csv")}
    assert rows["HE"]["qc"] == "fail" and rows["HE"]["phenotype"] == "uncertain"
    assert "TRAP" in rows["HE"]["qc_reasons"] and rows["HE"]["confidence"] == ""
    assert rows["S1"]["qc"] != "fail" and rows["S1"]["phenotype"] != "uncertain"
    meta = json.loads((out / "HE" / "indices.json").read_text())
    signals = {s["name"]: s for s in meta["qc"]["signals"]}
    assert {"stain.second_deg", "scale.nucleus_um", "osteoclast.thickness_um"} <= set(signals)
    assert set(signals["stain.second_deg"]) == {
        "name",
        "value",
        "unit",
        "accepted",
        "status",
        "reason",
    }
    assert meta["qc"]["qc"] == "fail" and meta["row"]["qc"] == "fail"
    assert "HE: uncertain" in err and "quality control:" in err and "1 fail" in err
