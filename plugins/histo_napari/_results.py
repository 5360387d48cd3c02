"""The result panel: the phenotype call with its evidence, and the table of ASBMR indices."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QGroupBox,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from histo.palette import phenotype_color

#: the indices shown first in the table (the rest follow in histo.measure order)
HEADLINE = ("BV/TV", "N.Oc/B.Pm", "Oc.S/BS", "N.Oc", "Ma.Ar/T.Ar", "N.Ot/B.Ar")
VALUE_ROLE = Qt.ItemDataRole.UserRole


def format_value(value: Any) -> str:
    """Table text of an index value (counts as integers, others to 4 significant digits)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    if isinstance(value, int | np.integer) or (v.is_integer() and abs(v) >= 1):
        return f"{int(v):d}"
    return f"{v:.4g}"


def call_banner(call: Any) -> tuple[str, str]:
    """Rich text of a phenotype call and of its evidence (one bullet a line)."""
    if call is None:
        return "no phenotype call", ""
    colour = phenotype_color(call.phenotype)
    banner = f"<b style='font-size:14pt;color:{colour}'>{html.escape(call.phenotype)}</b>"
    if math.isfinite(call.confidence):  # a call withheld by quality control has none
        banner += f"&nbsp;&nbsp;confidence {call.confidence:.0%}"
    return banner, "<br>".join(f"• {html.escape(e)}" for e in call.evidence)


#: background of the quality-control banner per verdict (as in report.html)
QC_BACKGROUND = {"warn": "#fff0c2", "fail": "#f7d4d4"}


def qc_banner(report: Any) -> str:
    """Rich text of a slide's quality-control verdict and its reasons (one a line)."""
    if report is None:
        return ""
    head = {
        "pass": "quality control: pass",
        "warn": "quality control: <b>warn</b>: check the slide",
        "fail": "quality control: <b>fail</b>: no phenotype call, the indices cannot be trusted",
    }[report.status]
    reasons = [f"• {html.escape(r)}" for r in report.reasons.split("; ") if r]
    return "<br>".join([head, *reasons])


def ordered_indices(indices: dict[str, Any]) -> list[str]:
    """Index names with the headline indices first."""
    order = [k for k in HEADLINE if k in indices]
    return order + [k for k in indices if k not in order]


class ResultsPanel(QGroupBox):
    """Phenotype banner, evidence and the indices table (name, value, unit)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Result", parent)
        box = QVBoxLayout(self)
        self.qc_label = QLabel("")
        self.qc_label.setWordWrap(True)
        self.qc_label.setTextFormat(Qt.TextFormat.RichText)
        self.qc_label.setVisible(False)
        box.addWidget(self.qc_label)
        self.phenotype_label = QLabel("no result yet")
        self.phenotype_label.setTextFormat(Qt.TextFormat.RichText)
        self.evidence_label = QLabel("")
        self.evidence_label.setWordWrap(True)
        self.evidence_label.setTextFormat(Qt.TextFormat.RichText)
        self.region_label = QLabel("")  #: which region the indices are for
        self.region_label.setWordWrap(True)
        # a fixed height: a label that grows would resize (and redraw) the canvas
        self.region_label.setFixedHeight(2 * self.region_label.fontMetrics().lineSpacing() + 4)
        self.region: str | None = None
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Index", "Value", "Unit"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in (1, 2):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        box.addWidget(self.phenotype_label)
        box.addWidget(self.evidence_label)
        box.addWidget(self.region_label)
        box.addWidget(self.table, stretch=1)

    def show_result(self, measurement: Any, call: Any) -> None:
        """Fill the banner and the table from a measurement and its phenotype call."""
        from histo.measure import INDEX_UNITS

        indices = measurement.indices
        order = ordered_indices(indices)
        self.table.setRowCount(len(order))
        right = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        for i, key in enumerate(order):
            value = indices[key]
            name, shown = QTableWidgetItem(key), QTableWidgetItem(format_value(value))
            shown.setTextAlignment(right)
            shown.setData(VALUE_ROLE, value)
            self.table.setItem(i, 0, name)
            self.table.setItem(i, 1, shown)
            self.table.setItem(i, 2, QTableWidgetItem(INDEX_UNITS.get(key, "")))
        banner, evidence = call_banner(call)
        self.phenotype_label.setText(banner)
        self.evidence_label.setText(evidence)

    def show_region(self, name: str | None, reason: str = "") -> None:
        """Say which region the indices are for (:mod:`histo.measure.regional` names)."""
        from histo_napari._regions_layer import region_text

        self.region = name
        self.region_label.setText(region_text(name, reason))

    def show_qc(self, report: Any) -> None:
        """Show a slide's quality-control verdict above the result (hidden when it passes)."""
        self.qc_label.setText(qc_banner(report))
        status = None if report is None else report.status
        self.qc_label.setStyleSheet(
            f"background:{QC_BACKGROUND[status]};color:#222;padding:4px"
            if status in QC_BACKGROUND
            else ""
        )
        self.qc_label.setVisible(status in QC_BACKGROUND)

    def indices(self) -> dict[str, float]:
        """The indices shown in the table (name -> value)."""
        return {
            self.table.item(i, 0).text(): self.table.item(i, 1).data(VALUE_ROLE)
            for i in range(self.table.rowCount())
        }
