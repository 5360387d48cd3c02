"""The widget shows a slide's quality-control verdict and reasons above the result (xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ScriptedPipeline, wait_for_run

from histo.qc import FAIL, PASS, QCReport, Signal

pytestmark = pytest.mark.gui


def _run_with_qc(qtbot, monkeypatch, widget, scripted_pipeline, signals) -> None:
    import histo.pipeline

    def with_qc(source, **kwargs):
        result = scripted_pipeline(source, **kwargs)
        result.qc = QCReport(result.name, 1.0, signals)
        return result

    monkeypatch.setattr(histo.pipeline, "analyze_slide", with_qc)
    widget.controls.run_button.native.click()
    wait_for_run(qtbot, widget)


def test_failed_quality_control_is_shown_above_the_result(
    qtbot, monkeypatch, viewer_widget, scripted_pipeline, errors
):
    _, widget = viewer_widget
    bad = [
        Signal("stain.second_deg", 27.0, "deg", "0-15", FAIL, "second stain unlike TRAP <eosin>"),
        Signal("scale.nucleus_um", 3.2, "µm", "3.8-9", "warn", "pixel size looks ~1.9x too small"),
    ]
    _run_with_qc(qtbot, monkeypatch, widget, scripted_pipeline, bad)
    assert errors == []
    banner = widget.results.qc_label
    assert not banner.isHidden()
    text = banner.text()
    assert "<b>fail</b>" in text and "second stain unlike TRAP &lt;eosin&gt;" in text
    assert text.index("TRAP") < text.index("pixel size looks ~1.9x too small")  # fails first
    layout = widget.results.layout()
    assert layout.indexOf(banner) < layout.indexOf(widget.results.phenotype_label)

    # a slide that passes hides the banner again
    _run_with_qc(qtbot, monkeypatch, widget, scripted_pipeline, [Signal("a", 1.0, "", "", PASS)])
    assert banner.isHidden()


def _direct_block_margins(image, model, block: int) -> np.ndarray:
    """Mean margin (top class probability minus the second) per block, from the network's
    scores on the whole image at once (no tiles, no blending)."""
    scores = model.predict_scores(image)[: model.n_outputs - 1]
    top2 = np.sort(scores, axis=0)[-2:]
    margin = top2[1] - top2[0]
    h, w = (n // block * block for n in margin.shape)
    return margin[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))


def test_low_confidence_layer_marks_where_the_network_is_unsure(
    qtbot, monkeypatch, viewer_widget, errors, oc_rich_section
):
    import histo.pipeline
    from histo.qc.synthetic import make_case
    from histo.segment import load_model

    viewer, widget = viewer_widget
    # an H&E-like section: a stain the network was not trained on leaves it unsure in places
    case = make_case("h-and-e", 456, 512, 1.0, counterstain="hematoxylin")
    viewer.add_image(
        case.image, name="he", rgb=True, metadata={"pixel_size_um": 1.0, "slide_name": "he"}
    )
    widget.section.model.value = "default"
    widget.run()
    wait_for_run(qtbot, widget, timeout_ms=300_000)
    assert errors == [] and widget.last_error is None
    layer = viewer.layers["he low confidence"]
    unsure = widget.output.result.low_confidence
    block = unsure.block_px
    px = widget.output.result.pixel_size_um
    assert tuple(layer.scale) == (block * px, block * px)
    # block (0, 0) is centred on the middle of the class map's first 8 x 8 pixels
    cmap = viewer.layers["he classes"]
    assert tuple(layer.translate) == pytest.approx(
        tuple(t + (block - 1) / 2 * px for t in cmap.translate)
    )
    model = load_model("default")
    direct = _direct_block_margins(case.image, model, block) < unsure.low_margin
    shown = np.asarray(layer.data)[: direct.shape[0], : direct.shape[1]] == 1
    assert direct.sum() >= 20  # the network is truly unsure on a part of this section
    # tiles blended at their borders move a few blocks' means across the limit, no more
    assert (shown == direct).mean() >= 0.97
    assert (shown & direct).sum() >= 0.85 * direct.sum()
    assert 1 - 1e-9 > shown.mean() > 0

    # a run without a margin map (a scripted pipeline) leaves no stale layer behind
    monkeypatch.setattr(histo.pipeline, "analyze_slide", ScriptedPipeline(oc_rich_section))
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.last_error is None and "he low confidence" not in viewer.layers


def test_no_low_confidence_layer_where_no_block_is_unsure():
    from histo_napari._geometry import Placement
    from histo_napari._layers import low_confidence_layer

    from histo.qc._confidence import LowConfidenceMap

    place = Placement((1.0, 1.0), (0.0, 0.0))
    sure = LowConfidenceMap(np.zeros((16, 16), np.uint8), 8, 1.0, 0.5)
    assert low_confidence_layer(sure, place, "s") is None
    sure.mask[3, 4] = 1
    layer = low_confidence_layer(sure, place, "s")
    assert layer is not None and np.asarray(layer.data)[3, 4] == 1
