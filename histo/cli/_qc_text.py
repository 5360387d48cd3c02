"""Quality-control verdicts as the commands print them (shared by analyze and batch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def qc_note(row: Mapping) -> str:
    """``"  qc warn: <reasons>"`` for a slide's row that did not pass; empty otherwise."""
    status = row.get("qc")
    if status in (None, "", "pass"):
        return ""
    reasons = row.get("qc_reasons") or ""
    return f"  qc {status}: {reasons}" if reasons else f"  qc {status}"


def qc_summary(rows: Sequence[Mapping]) -> str:
    """One line: how many analysed slides passed, warned and failed quality control."""
    from histo.report import qc_counts

    counts = qc_counts(list(rows))
    text = ", ".join(f"{n} {status}" for status, n in counts.items())
    hint = " (fail: phenotype 'uncertain'; see qc_reasons)" if counts["fail"] else ""
    return f"quality control: {text}{hint}"
