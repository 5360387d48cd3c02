"""CSV tables: one row per slide (indices.csv) and one row per object (osteoclasts.csv, ...).

Writes are atomic: the table goes to a temporary file in the same folder, then ``os.replace``
puts it in place, so a killed run never leaves a half-written table. Undefined values (NaN,
None) are written as empty cells; floats with 10 significant digits.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from histo.io.atomic import write_text_atomic
from histo.units import INDEX_COLUMNS

__all__ = [
    "INDICES_LEADING_COLUMNS",
    "INDICES_TRAILING_COLUMNS",
    "format_cell",
    "indices_columns",
    "indices_row",
    "read_indices_csv",
    "write_indices_csv",
    "write_object_table",
]

#: columns before the indices in indices.csv
INDICES_LEADING_COLUMNS = ("slide", "phenotype")
#: columns after the indices in indices.csv: the quality-control verdict first (DESIGN.md)
INDICES_TRAILING_COLUMNS = ("qc", "qc_reasons", "confidence", "evidence")


def format_cell(value) -> str:
    """One CSV cell: empty for None/NaN, integers plainly, floats with 10 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    try:  # numpy scalars
        return format_cell(value.item())
    except AttributeError:
        return str(value)


def indices_row(
    slide: str,
    indices: Mapping,
    call=None,
    region: str | None = None,
    extra: Mapping | None = None,
    qc=None,
) -> dict:
    """One row of indices.csv: slide, phenotype, the indices, qc, qc_reasons, confidence,
    evidence.

    The one builder of the row, for ``histo analyze``, ``histo batch``, ``histo measure`` and
    the napari plugin.

    Parameters
    ----------
    slide : str
        The slide's name.
    indices : mapping
        Index name -> value (:attr:`histo.measure.Measurement.indices`).
    call : histo.phenotype.PhenotypeCall, optional
        The phenotype call; without it ``phenotype``, ``confidence`` and ``evidence`` are empty.
    region : str, optional
        Which region the indices are for ("standard", "whole section", "user ROI";
        :mod:`histo.measure.regional`), in a ``region`` column after ``evidence``.
    extra : mapping, optional
        Columns after ``region``: indices of other regions (``section:BV/TV``, ...).
    qc : histo.qc.QCReport, optional
        The slide's quality control: ``qc`` (``pass``, ``warn``, ``fail``) and
        ``qc_reasons`` (one-liners joined by ``"; "``); empty without it (a class map alone).
    """
    row = {"slide": slide, "phenotype": None if call is None else call.phenotype}
    row.update(indices)
    row["qc"] = None if qc is None else qc.status
    row["qc_reasons"] = None if qc is None else qc.reasons
    row["confidence"] = None if call is None else call.confidence
    row["evidence"] = None if call is None else "; ".join(call.evidence)
    if region is not None:
        row["region"] = region
    row.update(extra or {})
    return row


def indices_columns(rows: Sequence[Mapping]) -> list[str]:
    """Column order of indices.csv: slide, phenotype, INDEX_COLUMNS, qc, qc_reasons,
    confidence, evidence, then the rest in order of first appearance."""
    columns = [*INDICES_LEADING_COLUMNS, *INDEX_COLUMNS, *INDICES_TRAILING_COLUMNS]
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                columns.append(key)
                seen.add(key)
    return columns


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def write_indices_csv(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    """Write indices.csv, one row per slide, atomically.

    Parameters
    ----------
    path : path-like
    rows : sequence of mapping
        Each with ``slide``, ``phenotype``, the indices (:data:`histo.measure.INDEX_COLUMNS`),
        ``confidence`` and ``evidence`` (a list of strings is joined with "; "); extra keys
        become extra columns after these.

    Returns
    -------
    Path
    """
    rows = list(rows)
    return write_text_atomic(path, _csv_text(indices_columns(rows), rows))


def write_object_table(
    path: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str] | None = None
) -> Path:
    """Write a per-object table (osteoclasts.csv, osteocytes.csv), atomically.

    Parameters
    ----------
    path : path-like
    rows : sequence of mapping
        One row per object.
    columns : sequence of str, optional
        Column order; by default the keys of the rows in order of first appearance. An empty
        table still gets its header when ``columns`` is given.
    """
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    else:
        columns = list(columns)
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    return write_text_atomic(path, _csv_text(columns, rows))


def read_indices_csv(path: str | os.PathLike) -> list[dict]:
    """Read indices.csv back: numbers as float (empty cells as NaN), other cells as str."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict = {}
            for key, text in raw.items():
                if key is None:
                    continue
                if key in ("slide", "phenotype", "evidence", "qc", "qc_reasons"):
                    row[key] = text
                    continue
                try:
                    row[key] = float(text) if text not in ("", None) else math.nan
                except ValueError:
                    row[key] = text
            rows.append(row)
    return rows
