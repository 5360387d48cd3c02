"""The widget driving the real pipeline (classical model: fast, needs no weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import wait_for_run

from histo.errors import Cancelled

pytest.importorskip("histo.phenotype")

pytestmark = pytest.mark.gui


@pytest.fixture
def classical(viewer_widget):
    viewer, widget = viewer_widget
    widget.model_combo.setCurrentIndex(widget.model_combo.findText("classical"))
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
    assert result.phenotype.phenotype in widget.phenotype_label.text()
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
        np.full((256, 256, 3), 245, np.uint8),
        name="glass",
        rgb=True,
        metadata={"pixel_size_um": 1.0},
    )
    assert widget.image_combo.layer().name == "glass"
    n_layers = len(viewer.layers)
    widget.run()
    wait_for_run(qtbot, widget)
    assert len(errors) == 1 and "tissue" in errors[0]
    assert len(viewer.layers) == n_layers
