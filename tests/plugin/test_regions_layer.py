"""A long bone's regions as a shapes layer; re-measuring in a moved standard region.

The run is scripted from the synthetic section's true class map (the shipped network predates
the cartilage and soft-tissue codes), measured by region as the pipeline measures it.
"""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import wait_for_run

pytestmark = pytest.mark.gui

PX = 2.0  #: µm/px of the section, also the scripted model's working resolution
MOVE_UM = 200.0  #: the standard region is moved this far toward the growth plate


@pytest.fixture(scope="module")
def long_bone():
    from histo.synth import make_section

    return make_section("oc-rich", size=1000, pixel_size_um=PX, seed=3, anatomy="long-bone")


def _measure_roi(section):
    from histo.measure import measure

    def measure_roi(roi):
        s = section
        return measure(
            s.class_map,
            PX,
            osteoclast_labels=s.osteoclast_labels,
            osteocyte_labels=s.osteocyte_labels,
            image=s.image,
            roi=roi,
        )

    return measure_roi


def _by_region(section, roi=None):
    from histo.measure.regional import measure_by_region

    return measure_by_region(section.class_map, PX, _measure_roi(section), roi=roi)


@pytest.fixture
def scripted_long_bone(monkeypatch, long_bone):
    """analyze_slide replaced by the truth measured by region (as the pipeline measures)."""
    import histo_napari._worker

    import histo.pipeline

    def analyze_slide(source, *, roi=None, name=None, model="default", **kwargs):
        s = long_bone
        found = _by_region(s, roi)
        return SimpleNamespace(
            name=name or "image",
            pixel_size_um=PX,
            source_pixel_size_um=PX,
            class_map=s.class_map.copy(),
            osteoclast_labels=s.osteoclast_labels.copy(),
            osteocyte_labels=s.osteocyte_labels.copy(),
            measurement=found.measurement,
            phenotype=SimpleNamespace(phenotype="oc-rich", confidence=0.9, evidence=[]),
            region=found.region,
            model=model,
            seconds=0.0,
        )

    monkeypatch.setattr(histo.pipeline, "analyze_slide", analyze_slide)
    monkeypatch.setattr(histo_napari._worker, "working_pixel_size_um", lambda model: PX)


@pytest.fixture
def long_bone_widget(make_napari_viewer, long_bone, scripted_long_bone):
    from histo_napari._widget import HistoWidget

    viewer = make_napari_viewer()
    viewer.add_image(
        long_bone.image,
        name="tibia",
        rgb=True,
        scale=(PX, PX),
        units=("micrometer", "micrometer"),
        metadata={"pixel_size_um": PX, "slide_name": "tibia"},
    )
    widget = HistoWidget(viewer)
    widget.section.model.value = "classical"
    viewer.window.add_dock_widget(widget, name="Histomorphometry")
    return viewer, widget


def _assert_same(shown: dict, expected: dict) -> None:
    assert shown.keys() == expected.keys()
    for key, want in expected.items():
        got = float(shown[key])
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-9), key


def _standard_index(layer) -> int:
    (index,) = np.flatnonzero(layer.features["region"].to_numpy() == "standard")
    return int(index)


def test_standard_region_shown_moved_and_remeasured(
    tmp_path, qtbot, long_bone, long_bone_widget, errors
):
    from histo_napari._regions_layer import MOVED_STANDARD

    from histo.io.blocks import downsample_nearest
    from histo.io.roi import Roi
    from histo.measure.regional import search_grid
    from histo.regions import find_regions

    viewer, widget = long_bone_widget
    widget.run()
    wait_for_run(qtbot, widget)
    assert errors == [] and widget.last_error is None
    layer = viewer.layers["tibia regions"]
    assert {"standard", "growth_plate", "cortex", "primary"} <= set(layer.features["region"])
    # the run's Region choice does not take the regions layer for a user ROI
    assert widget.section.region.value is None
    assert widget.results.region == "standard"
    run = _by_region(long_bone)
    _assert_same(widget.table_indices(), run.measurement.indices)

    # the standard region in the world (µm) is the region histo.regions places, within a pixel
    i = _standard_index(layer)
    world = np.array([layer.data_to_world(v) for v in layer.data[i]])
    small_shape, grid = search_grid(long_bone.class_map.shape, PX)
    small = downsample_nearest(long_bone.class_map, small_shape)
    box = find_regions(small, grid).regions.box
    edges = [world[:, 0].min(), world[:, 0].max(), world[:, 1].min(), world[:, 1].max()]
    assert np.abs(np.subtract(edges, box.edges())).max() <= PX

    # unmoved, re-measuring keeps to the standard region
    widget.remeasure()
    wait_for_run(qtbot, widget)
    assert widget.results.region == "standard"
    _assert_same(widget.table_indices(), run.measurement.indices)

    # moved toward the growth plate: the indices of that polygon as a user ROI
    data = [np.asarray(d, float) for d in layer.data]
    data[i] = data[i] + [-MOVE_UM / layer.scale[0], 0.0]
    layer.data = data
    widget.remeasure()
    wait_for_run(qtbot, widget)
    assert errors == []
    moved_world = world + [-MOVE_UM, 0.0]
    expected = _by_region(long_bone, Roi.from_rings([[moved_world]]))
    assert expected.region.name == "user ROI"
    _assert_same(widget.table_indices(), expected.measurement.indices)
    shown = widget.table_indices()
    assert abs(shown["BV/TV"] - run.measurement.indices["BV/TV"]) > 1.0  # the region did move
    assert widget.results.region == MOVED_STANDARD
    assert "moved" in widget.results.region_label.text()
    out = widget.export_csv(tmp_path / "indices.csv")
    (row,) = csv.DictReader(open(out, encoding="utf-8"))
    assert row["region"] == MOVED_STANDARD


def test_a_field_gets_no_regions_layer(qtbot, long_bone_widget, monkeypatch, errors):
    """A run whose result has no standard region (a field) adds no layer and says so."""
    import histo.pipeline
    from histo.measure.regional import REGION_WHOLE, MeasuredRegion

    viewer, widget = long_bone_widget
    scripted = histo.pipeline.analyze_slide

    def field(*args, **kwargs):
        out = scripted(*args, **kwargs)
        out.region = MeasuredRegion(
            REGION_WHOLE, "no growth plate found: measuring the whole field"
        )
        return out

    monkeypatch.setattr(histo.pipeline, "analyze_slide", field)
    widget.run()
    wait_for_run(qtbot, widget)
    assert errors == []
    assert "tibia regions" not in [layer.name for layer in viewer.layers]
    assert widget.results.region == REGION_WHOLE
    assert "no growth plate" in widget.results.region_label.text()
    widget.remeasure()
    wait_for_run(qtbot, widget)
    assert widget.results.region == REGION_WHOLE
