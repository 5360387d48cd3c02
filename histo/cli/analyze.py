"""``histo analyze``: slides end to end, one after the other."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histo.cli._options import (
    add_slide_options,
    check_roi_and_ranges,
    slide_analysis_kwargs,
)
from histo.cli._progress import progress_bar
from histo.cli._qc_text import qc_note, qc_summary

HELP = "analyse slides end to end: segment, measure, call the phenotype"
DESCRIPTION = """\
Analyse one or more slides end to end: find the tissue, segment bone, marrow, osteoclasts and
osteocytes, compute the ASBMR indices and call the phenotype (normal, oc-rich, oc-poor).

Writes to DIR: indices.csv (one row per slide), failures.csv (one row per slide that failed,
with the reason), report.html, and per slide DIR/<slide>/labels.ome.zarr, osteoclasts.csv,
osteocytes.csv, *.geojson (QuPath outlines) and overlay.png.

The pixel size comes from the file (OME PhysicalSizeX, Aperio MPP, TIFF resolution) or from
--pixel-size, which wins. Without either a slide fails: indices without a scale are meaningless.

Quality control (docs/qc.md) judges each slide's stain, scale, tissue and focus and what was
found; indices.csv gets its verdict (qc: pass, warn, fail) and reasons (qc_reasons). When it
fails, the phenotype is 'uncertain'. A failed check is a result: the exit status is the same.

exit status: 0 all slides analysed, 1 some failed (see failures.csv), 2 usage error,
4 output folder unusable, 5 model weights missing or corrupt.

--roi takes a GeoJSON file of polygons (holes as inner rings) in level-0 pixels of the slide
(QuPath's convention, as histo's own outlines): the indices are measured inside it. --ranges
takes the reference ranges written by 'histo calibrate' for the phenotype call.

examples:
  histo analyze slide.ome.tif --out results
  histo analyze fields/*.png --pixel-size 0.5 --model classical --out results
  histo analyze S1.svs --roi S1.trabecular.geojson --ranges lab_ranges.json --out results
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files to analyse")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_slide_options(parser, "level-0 pixel size in µm/px (overrides the file's metadata)")


def run(args: argparse.Namespace) -> int:
    from histo.batch import analyze_one, write_summary
    from histo.device import resolve_device
    from histo.io.locking import output_lock

    check_roi_and_ranges(args)
    resolve_device(args.device)  # a missing device stops here (exit 2), not once per slide
    out = Path(args.out)
    outcomes = []
    with output_lock(out):
        for i, path in enumerate(args.slides, 1):
            with progress_bar(f"[{i}/{len(args.slides)}] {Path(path).name}") as progress:
                outcome = analyze_one(path, out, progress=progress, **slide_analysis_kwargs(args))
            outcomes.append(outcome)
            if outcome.ok:
                row = outcome.row
                print(
                    f"{outcome.slide}: {row['phenotype']}  BV/TV {row['BV/TV']:.1f}%  "
                    f"N.Oc/B.Pm {row['N.Oc/B.Pm']:.2f}/mm  N.Ot/B.Ar {row['N.Ot/B.Ar']:.0f}/mm²  "
                    f"({outcome.seconds:.1f} s)" + qc_note(row),
                    file=sys.stderr,
                )
            else:
                print(f"{outcome.slide}: failed: {outcome.reason}", file=sys.stderr)
        paths = write_summary(out, outcomes)
    failed = sum(not o.ok for o in outcomes)
    print(
        f"{len(outcomes) - failed} analysed, {failed} failed; indices in {paths['indices']}",
        file=sys.stderr,
    )
    if len(outcomes) > failed:
        print(qc_summary([o.row for o in outcomes if o.ok]), file=sys.stderr)
    return 1 if failed else 0
