"""The widget driving the real pipeline (classical model: fast, needs no weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histo.errors import Cancelled
from tests.plugin.helpers import wait_for_run

pytest.importorskip("histo.phenotype")

pytestmark = pytest.mark.gui


@pytest.fixture
def classical(viewer_widget):
    viewer, widget = viewer_widget
    widget.section.model.value = "classical"
    return viewer, widget


def test_run_to_completion_matches_histo_measure(qtbot, classical, errors, oc_rich_section):
    from histo.measure import measure

    viewer, widget = classical
    widget.run()
    wait_for_run(qtbot, widget)
    assert errors == [] and widget.last_error is None
    result = widget.output.result
    cmap = viewer.layers["section classes"]
    oc = viewer.layers["section osteoclasts"]
    ot = viewer.layers["section osteocytes"]
    assert tuple(cmap.scale) == (result.pixel_size_um,) * 2
    expected = measure(
        cmap.data,
        result.pixel_size_um,
        osteoclast_labels=oc.data,
        osteocyte_labels=ot.data,
        image=oc_rich_section.image,
    ).indices
    shown = widget.table_indices()
    assert shown.keys() == expected.keys()
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(shown[key])) or shown[key] == value, key
    assert result.phenotype.phenotype in widget.results.phenotype_label.text()
    assert len(viewer.layers["section osteoclast centres"].data) == expected["N.Oc"]


def test_cancel_real_run(qtbot, classical, errors):
    viewer, widget = classical
    n_layers = len(viewer.layers)
    widget.run()
    widget.cancel()  # before the first step: the pipeline stops at once
    wait_for_run(qtbot, widget)
    assert isinstance(widget.last_error, Cancelled)
    assert len(viewer.layers) == n_layers and errors == []


def test_image_without_tissue_is_a_notification(qtbot, classical, errors):
    viewer, widget = classical
    viewer.add_image(
        np.full((384, 384, 3), 245, np.uint8),
        name="glass",
        rgb=True,
        metadata={"pixel_size_um": 1.0},
    )
    assert widget.section.image.value.name == "glass"
    n_layers = len(viewer.layers)
    widget.run()
    wait_for_run(qtbot, widget)
    assert len(errors) == 1 and "tissue" in errors[0]
    assert len(viewer.layers) == n_layers


def test_run_on_a_slide_file_places_results_over_it(
    qtbot, make_napari_viewer, synthetic_slide, errors
):
    """A pyramidal slide at 0.5 µm/px is analysed from its file at the model's 1 µm/px."""
    from histo_napari._widget import HistoWidget

    viewer = make_napari_viewer()
    (image,) = viewer.open(str(synthetic_slide), plugin="histo")
    widget = HistoWidget(viewer)
    widget.section.model.value = "classical"
    assert widget.section.pixel_size.value == pytest.approx(0.5)
    job = widget.make_job()
    assert job.source == str(synthetic_slide)  # read from the file, level by level
    widget.run()
    wait_for_run(qtbot, widget)
    assert errors == [], errors
    cmap = viewer.layers["rich classes"]
    assert cmap.data.shape == (384, 384)
    assert tuple(cmap.scale) == (1.0, 1.0)
    # working pixel j spans [j, j+1) µm; image pixel i is centred on 0.5 i µm
    assert tuple(cmap.translate) == pytest.approx((0.25, 0.25))
    widget.remeasure()
    wait_for_run(qtbot, widget)
    assert widget.output.image.shape == (384, 384, 3)  # read for re-measure, in the worker
    assert widget.measurement.indices == pytest.approx(
        widget.output.result.measurement.indices, nan_ok=True
    )


def test_device_choice_reaches_the_pipeline(qtbot, viewer_widget, errors):
    """The widget's device goes to the pipeline: the CPU runs; a GPU missing here is the
    one-line error of the command line, shown as a notification."""
    import torch

    from histo.device import DeviceError

    viewer, widget = viewer_widget
    widget.section.model.value = "default"
    assert "cuda" in widget.section.device.choices
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    widget.section.device.value = "cuda"
    widget.run()
    wait_for_run(qtbot, widget)
    assert isinstance(widget.last_error, DeviceError)
    assert len(errors) == 1 and "cuda" in errors[0]
    widget.section.device.value = "cpu"
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.last_error is None
    assert widget.output.result.provenance["device"] == "cpu"
