"""Every slide streams through the same stages; large slides keep their label store on disk.

The on-disk threshold is lowered so that a small synthetic slide keeps its maps in zarr; its
results must be those of the same slide with its maps in memory, whatever the block size.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import numpy as np
import pytest

from histo import pipeline
from histo.io.ome_zarr import read_labels


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    from histo.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("large") / "L1.ome.tif"
    write_synthetic_slide(path, "oc-rich", size=768, pixel_size_um=1.0, seed=11)
    return path


@pytest.fixture(scope="module")
def in_memory(slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem")
    return pipeline.analyze_slide(slide, out_dir=out, model="classical"), out


def _stream(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "LABELS_ON_DISK_MIN_PX", 300_000)
    monkeypatch.setattr(pipeline, "MEASURE_BLOCK_PX", 256)


def _same_indices(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, float) and math.isnan(va):
            assert math.isnan(vb), key
        else:
            assert vb == pytest.approx(va, rel=1e-9), key


def test_streamed_slide_matches_in_memory(slide, in_memory, tmp_path, monkeypatch):
    mem, mem_out = in_memory
    assert isinstance(mem.class_map, np.ndarray)
    _stream(monkeypatch)
    res = pipeline.analyze_slide(slide, out_dir=tmp_path, model="classical")

    # the maps are zarr arrays of the slide's labels.ome.zarr, not numpy
    assert not isinstance(res.class_map, np.ndarray)
    assert res.class_map.shape == mem.class_map.shape
    assert np.array_equal(np.asarray(res.class_map[:]), mem.class_map)
    assert np.array_equal(np.asarray(res.osteoclast_labels[:]), mem.osteoclast_labels)
    assert np.array_equal(np.asarray(res.osteocyte_labels[:]), mem.osteocyte_labels)

    _same_indices(mem.measurement.indices, res.measurement.indices)
    assert res.measurement.indices["N.Oc"] > 5
    assert res.phenotype.phenotype == mem.phenotype.phenotype
    for name in ("osteoclasts", "osteocytes", "trap_off_bone"):
        ra, rb = getattr(mem.measurement, name), getattr(res.measurement, name)
        assert [r["label"] for r in ra] == [r["label"] for r in rb]
        for x, y in zip(ra, rb, strict=True):
            for key, v in x.items():
                assert y[key] == pytest.approx(v, rel=1e-9, nan_ok=True), (name, key)

    # the same outputs, complete, nothing partial left behind
    folder = tmp_path / "L1"
    assert res.out_dir == folder
    for name in pipeline.SLIDE_OUTPUTS:
        assert (folder / name).exists(), name
    assert not list(tmp_path.glob(".L1.*"))
    stored = read_labels(folder / "labels.ome.zarr")
    ref = read_labels(mem_out / "L1" / "labels.ome.zarr")
    for key in ("class_map", "osteoclasts", "osteocytes"):
        assert np.array_equal(stored[key][0], ref[key][0]), key
    for kind in ("osteoclasts", "osteocytes"):
        got = json.loads((folder / f"{kind}.geojson").read_text())["features"]
        want = json.loads((mem_out / "L1" / f"{kind}.geojson").read_text())["features"]
        assert sorted(f["properties"]["name"] for f in got) == sorted(
            f["properties"]["name"] for f in want
        )
    meta = json.loads((folder / "indices.json").read_text())
    assert meta["row"]["N.Oc"] == mem.measurement.indices["N.Oc"]
    assert (folder / "overlay.png").stat().st_size > 1000


def test_streamed_without_out_dir_uses_a_temporary_store(slide, in_memory, monkeypatch):
    mem, _ = in_memory
    _stream(monkeypatch)
    res = pipeline.analyze_slide(slide, model="classical")
    assert not isinstance(res.osteoclast_labels, np.ndarray)
    store = Path(str(res.class_map.store.root))
    assert store.exists()
    _same_indices(mem.measurement.indices, res.measurement.indices)
    del res
    gc.collect()
    assert not store.exists()


def test_streamed_run_that_fails_leaves_nothing(slide, tmp_path, monkeypatch):
    from histo.errors import Cancelled

    _stream(monkeypatch)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 12  # during segmentation, after bands were written to disk

    with pytest.raises(Cancelled):
        pipeline.analyze_slide(slide, out_dir=tmp_path, model="classical", cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_pipeline_measures_as_the_public_measure(slide, in_memory):
    """The pipeline's block-wise measurement is histo.measure.measure on the same maps."""
    from histo.io import open_slide, read_region
    from tests.helpers import measure_truth

    mem, _ = in_memory
    with open_slide(slide) as s:
        image = read_region(s, 0.0, 0.0, *mem.class_map.shape, mem.pixel_size_um)
    whole = measure_truth(mem, image=image)
    _same_indices(whole.indices, mem.measurement.indices)
    assert [r["nuclei"] for r in whole.osteoclasts] == [
        r["nuclei"] for r in mem.measurement.osteoclasts
    ]
