"""Corrected regions of a whole slide teach the model: Train on corrections and the export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histo import classes
from tests.plugin.helpers import TINY_RUN, train_tiny, wait_for_run

pytestmark = [pytest.mark.gui, pytest.mark.slow]

#: side of the synthetic slide (px at 1 µm/px); the widget's thresholds are lowered below it
SLIDE_PX = 1536
#: the region corrected, in µm (= px)
RECT_UM = ((500.0, 600.0), (800.0, 1000.0))
BOX = (500, 600, 800, 1000)  #: its pixels (y0, x0, y1, x1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 1536² pyramidal OME-TIFF at 1 µm/px: a 768² synthetic oc-rich field, 2 x 2 times."""
    from histo.synth import make_section, write_pyramidal_tiff

    field = make_section("oc-rich", size=768, pixel_size_um=1.0, seed=11).image
    path = tmp_path_factory.mktemp("slide") / "slide.ome.tif"
    return write_pyramidal_tiff(path, np.tile(field, (2, 2, 1)), 1.0)


@pytest.fixture
def trained_on(monkeypatch):
    """The fields each fine-tuning is given (the real histo.finetune.finetune then runs)."""
    import histo.finetune

    real, calls = histo.finetune.finetune, []

    def recording(fields, *args, **kwargs):
        calls.append(list(fields))
        return real(fields, *args, **kwargs)

    monkeypatch.setattr(histo.finetune, "finetune", recording)
    return calls


def _correct(layer) -> np.ndarray:
    """Paint the region's osteoclasts bone and a band of marrow across it; returns the map."""
    cm = np.asarray(layer.data)
    assert (cm == classes.OSTEOCLAST).any()  # something to correct
    cm[cm == classes.OSTEOCLAST] = classes.BONE
    cm[140:150] = classes.MARROW
    layer.refresh()
    return cm.copy()


def test_an_applied_region_trains_the_model_and_exports_as_a_pair(
    qtbot, make_napari_viewer, slide, tmp_path, monkeypatch, user_models, trained_on
):
    import histo_napari._worker as jobs
    import tifffile
    from histo_napari._widget import HistoWidget

    import histo.pipeline
    from histo.finetune import load_labelled

    monkeypatch.setattr(jobs, "LAZY_RESULTS_MIN_PX", 2**20)  # shown from the store
    monkeypatch.setattr(histo.pipeline, "LABELS_ON_DISK_MIN_PX", 2**20)  # streamed to disk
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="histo")
    widget = HistoWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.section.model.value = "classical"
    widget.section.out_dir.value = tmp_path / "out"
    widget.run()
    wait_for_run(qtbot, widget, 600_000)
    assert widget.last_error is None, widget.last_error
    assert widget.train.layers.value == []  # the lazy whole-slide map is not chosen

    viewer.add_shapes([np.array(RECT_UM)], shape_type="rectangle", name="edit here")
    widget.region_edit.load_rectangle()
    wait_for_run(qtbot, widget, 600_000)
    assert widget.last_error is None, widget.last_error
    edited = _correct(widget.region_edit.layer)
    for _ in range(2):  # the same box applied twice is one region
        widget.region_edit.apply()
        wait_for_run(qtbot, widget, 600_000)
        assert widget.last_error is None, widget.last_error
    (region,) = widget.region_edit.applied
    assert tuple(region.box) == BOX
    assert widget.train.layers.value == [region]  # offered and chosen once applied
    assert region in widget.train.layers.choices

    train_tiny(qtbot, widget, "slide-lab")
    assert widget.last_error is None, widget.last_error
    (fields,) = trained_on
    (field,) = fields
    slide_pixels = tifffile.imread(slide)[500:800, 600:1000]
    np.testing.assert_array_equal(field.class_map, edited)
    np.testing.assert_array_equal(field.image, slide_pixels)
    assert field.pixel_size_um == 1.0 and field.name == region.name
    result = widget.train.result
    assert result.steps == TINY_RUN["max_steps"] and not result.cancelled
    assert widget.section.model.value == "slide-lab"
    (record,) = json.loads((user_models / "slide-lab" / "model.json").read_text())["data"]
    # every pixel of the region is labelled, with the corrected codes (no osteoclast left)
    codes = {name: int((edited == code).sum()) for code, name in classes.ALL_NAMES.items()}
    assert record["labelled_px"] == {k: n for k, n in codes.items() if n}
    assert sum(record["labelled_px"].values()) == 300 * 400
    assert "osteoclast" not in record["labelled_px"]

    widget.region_edit.export_corrections(tmp_path / "corrections")
    wait_for_run(qtbot, widget, 600_000)
    assert widget.last_error is None, widget.last_error
    (exported,) = load_labelled([tmp_path / "corrections"])  # what `histo finetune` reads
    assert exported.name == "slide-region-y500-x600-400x300.ome.tif"
    np.testing.assert_array_equal(exported.class_map, edited)
    np.testing.assert_array_equal(exported.image, slide_pixels)

    widget.run()  # a new run writes the store over: the corrections in it are gone
    wait_for_run(qtbot, widget, 600_000)
    assert widget.last_error is None, widget.last_error
    assert widget.region_edit.applied == []
    assert region not in widget.train.layers.choices
