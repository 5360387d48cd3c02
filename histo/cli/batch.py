"""``histo batch``: a folder of slides in parallel on dask, with resume."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from histo.batch import BatchReporter
from histo.cli._options import (
    add_slide_options,
    check_roi_and_ranges,
    slide_analysis_kwargs,
)
from histo.cli._qc_text import qc_note, qc_summary
from histo.io.formats import SLIDE_SUFFIXES

HELP = "analyse a folder of slides in parallel (dask), with resume"
DESCRIPTION = """\
Analyse every slide under FOLDER (recursively) in parallel:
{suffixes}
Skipped: hidden files, histo's own output folders and the ground truth written beside
synthetic slides (*.classes.tif, *.osteoclasts.tif, *.osteocytes.tif).

Slides run on local worker processes (--workers N, default one per core and per 2 GB of
memory) or on an existing dask.distributed cluster (--scheduler ADDRESS, whose workers must see
FOLDER and DIR at the same paths). A slide that fails never stops the others: it is listed in
DIR/failures.csv with a one-line reason. Each slide's outputs appear complete or not at all.

--roi (GeoJSON, level-0 pixels) and --ranges (from 'histo calibrate') apply to every slide, as
for 'histo analyze'.

With --resume, slides whose outputs in DIR are complete and were made from the same file (path,
size, modification time) with the same settings (model, pixel size, histo version) are not
analysed again; their rows are reused. Leftovers of a killed run are removed at start.

Writes DIR/indices.csv, DIR/failures.csv, DIR/report.html and per slide DIR/<slide>/ (see
'histo analyze --help'). Two runs cannot share DIR: the second is refused (exit status 4).

Each slide gets a quality-control verdict (pass, warn, fail; columns qc and qc_reasons of
indices.csv); the counts are printed at the end. A slide that fails quality control is still
analysed (phenotype 'uncertain') and does not change the exit status.

exit status: 0 all slides analysed, 1 some failed (see failures.csv), 2 usage error, 3 FOLDER
or the sample sheet unusable or the scheduler unreachable, 4 output folder unusable (read-only,
in use by another run), 5 model weights missing or corrupt.

examples:
  histo batch slides/ --out results
  histo batch slides/ --out results --resume
  histo batch fields/ --out results --pixel-size 0.5 --model classical --workers 2
  histo batch /shared/slides --out /shared/results --scheduler tcp://10.0.0.5:8786
  histo batch slides/ --out results --sample-sheet groups.csv
  histo batch fields/ --out results --roi field.geojson --ranges lab_ranges.json
"""
DESCRIPTION = DESCRIPTION.replace(
    "{suffixes}",
    textwrap.fill(", ".join(SLIDE_SUFFIXES) + " files and OME-Zarr image folders (*.zarr).", 95),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="folder searched for slides")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="local worker processes (default: one per core, at most one per 2 GB of memory; "
        "0 runs in this process without dask)",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run on an existing dask.distributed cluster: scheduler address "
        "(tcp://host:8786) or scheduler file",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip slides whose outputs are complete for the same input and settings",
    )
    parser.add_argument(
        "--sample-sheet",
        default=None,
        metavar="CSV",
        help="CSV with columns slide,group: the report compares the groups",
    )
    add_slide_options(
        parser, "level-0 pixel size in µm/px for every slide (overrides the files' metadata)"
    )


class _Bars(BatchReporter):
    """Progress on stderr: an overall bar (slides done/total) and, on a terminal, one bar per
    running slide; one line per finished slide."""

    def __init__(self) -> None:
        super().__init__()
        self.overall = None
        self.slides: dict[str, object] = {}
        self.per_slide = sys.stderr.isatty()

    def start(self, total: int, resumed: int) -> None:
        from tqdm import tqdm

        if resumed:
            print(f"resuming: {resumed} of {total} slides already done", file=sys.stderr)
        self.overall = tqdm(
            total=total,
            initial=resumed,
            desc="slides",
            unit="slide",
            file=sys.stderr,
            position=0,
            dynamic_ncols=True,
        )

    def slide_progress(self, slide: str, fraction: float, message: str) -> None:
        if not self.per_slide:
            return
        from tqdm import tqdm

        bar = self.slides.get(slide)
        if bar is None:
            bar = tqdm(
                total=100,
                desc=slide[:30],
                file=sys.stderr,
                leave=False,
                position=len(self.slides) + 1,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
            )
            self.slides[slide] = bar
        target = round(max(0.0, min(1.0, fraction)) * 100, 1)
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(message, refresh=True)

    def slide_done(self, outcome) -> None:
        from tqdm import tqdm

        bar = self.slides.pop(outcome.slide, None)
        if bar is not None:
            bar.close()
        if outcome.ok:
            row = outcome.row
            line = (
                f"{outcome.slide}: {row.get('phenotype')}  BV/TV {row.get('BV/TV', 0):.1f}%  "
                f"N.Oc/B.Pm {row.get('N.Oc/B.Pm', 0):.2f}/mm  ({outcome.seconds:.1f} s)"
                + qc_note(row)
            )
        else:
            line = f"{outcome.slide}: failed: {outcome.reason}"
        tqdm.write(line, file=sys.stderr)
        if self.overall is not None:
            self.overall.update(1)

    def close(self) -> None:
        for bar in self.slides.values():
            bar.close()
        self.slides.clear()
        if self.overall is not None:
            self.overall.close()


def run(args: argparse.Namespace) -> int:
    from histo.batch import run_batch
    from histo.io import check_pixel_size
    from histo.report import read_sample_sheet

    if args.workers is not None and args.workers < 0:
        raise SystemExit("histo batch: error: --workers must be 0 or more")
    if args.pixel_size is not None:
        check_pixel_size(args.pixel_size, "--pixel-size")
    check_roi_and_ranges(args)
    groups = read_sample_sheet(args.sample_sheet) if args.sample_sheet else None
    result = run_batch(
        args.folder,
        args.out,
        workers=args.workers,
        scheduler=args.scheduler,
        resume=args.resume,
        groups=groups,
        reporter=_Bars(),
        **slide_analysis_kwargs(args),
    )
    out = Path(args.out)
    if not result.outcomes:
        print(f"no slides found in {args.folder}", file=sys.stderr)
    resumed = f" ({result.resumed} reused)" if result.resumed else ""
    print(
        f"{result.succeeded} analysed{resumed}, {result.failed} failed in "
        f"{result.seconds:.0f} s; indices in {out / 'indices.csv'}"
        + (f", failures in {out / 'failures.csv'}" if result.failed else ""),
        file=sys.stderr,
    )
    if result.succeeded:
        print(qc_summary([o.row for o in result.outcomes if o.ok]), file=sys.stderr)
    return 1 if result.failed else 0
