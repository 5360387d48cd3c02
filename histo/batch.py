"""Many slides: one outcome per slide, failures isolated, summary tables written at the end.

``histo analyze`` runs slides one after the other through :func:`analyze_one`; ``histo batch``
runs the same function on dask workers. A slide that fails never stops the others: its one-line
reason goes to failures.csv.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from histo.errors import HistoError, OutputError


@dataclass
class SlideOutcome:
    """What happened to one slide: a row of indices.csv, or a failure reason."""

    slide: str
    path: str
    row: dict | None = None
    reason: str | None = None
    error: str | None = None  #: error class name, e.g. 'PixelSizeError'
    seconds: float = 0.0
    tissue_megapixels: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.row is not None


def analyze_one(path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> SlideOutcome:
    """Analyse one slide into ``out_dir``; never raises for a bad slide.

    histo's own errors become a one-line reason; any other exception (a bug, or a library
    failing on odd input) also becomes a failure, with its type named, so that one slide can
    never take a batch down. Output-folder errors are re-raised: they concern every slide.
    """
    from histo.io import slide_name
    from histo.pipeline import analyze_slide

    path = Path(path)
    name = slide_name(path)
    try:
        result = analyze_slide(path, out_dir=out_dir, **kwargs)
    except OutputError:
        raise
    except HistoError as exc:
        return SlideOutcome(name, str(path), reason=str(exc), error=type(exc).__name__)
    except MemoryError:
        return SlideOutcome(name, str(path), reason="out of memory", error="MemoryError")
    except Exception as exc:  # noqa: BLE001 - isolate any failure to its slide
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
        reason = f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return SlideOutcome(name, str(path), reason=reason + where, error=type(exc).__name__)
    return SlideOutcome(
        result.name,
        str(path),
        row=result.row(),
        seconds=result.seconds,
        tissue_megapixels=result.tissue_megapixels,
    )


def write_summary(out_dir: str | os.PathLike, outcomes: list[SlideOutcome]) -> dict[str, Path]:
    """Write indices.csv, failures.csv and report.html for ``outcomes`` into ``out_dir``."""
    from histo.io.tables import write_indices_csv, write_object_table
    from histo.report import write_report_html

    out_dir = Path(out_dir)
    rows = [o.row for o in outcomes if o.ok]
    failures = [
        {"slide": o.slide, "path": o.path, "error": o.error, "reason": o.reason}
        for o in outcomes
        if not o.ok
    ]
    paths = {
        "indices": out_dir / "indices.csv",
        "failures": out_dir / "failures.csv",
        "report": out_dir / "report.html",
    }
    write_indices_csv(paths["indices"], rows)
    write_object_table(paths["failures"], failures, columns=["slide", "path", "error", "reason"])
    write_report_html(paths["report"], rows, failures)
    return paths
