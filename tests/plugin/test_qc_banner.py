"""The widget shows a slide's quality-control verdict and reasons above the result (xvfb)."""

from __future__ import annotations

import pytest
from conftest import wait_for_run

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
