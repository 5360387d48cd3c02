"""``histo qc``: the quality checks that need no segmentation, slide by slide."""

from __future__ import annotations

import argparse
import json
import math
import sys

from histo.errors import HistoError

HELP = "quality checks that need no segmentation: tissue, focus, stain, scale"
DESCRIPTION = """\
Check slides before (or instead of) analysing them. Each check reads a small sample of the
slide at 0.5 µm/px (a few seconds whatever its size) and reports its value, the accepted
range, pass / warn / fail and, when outside, a one-line reason:

  tissue.area_mm2         enough tissue to measure
  focus.blur_um           apparent blur of edges (Gaussian sigma, µm): out of focus?
  stain.counterstain_deg  counterstain hue vs hematoxylin, fast green, methyl green
  stain.second_deg        second stain hue vs TRAP (fast red violet, pararosaniline)
  stain.separation_deg    hue difference of the two stains: washed out or greyscale?
  stain.second_share      share of stain in the red dye: H&E or trichrome rather than TRAP?
  scale.nucleus_um        marrow nucleus diameter by the stated pixel size: is it right?

The verdict of a slide is its worst check. See docs/qc.md for each range, why it is there and
what to do when it fires.

exit status: 0 every slide was checked (whatever the verdict: a failed check is a result),
1 some slide could not be read (no pixel size, not an image), 2 usage error.

examples:
  histo qc slide.ome.tif
  histo qc fields/*.png --pixel-size 0.5 --json > qc.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files to check")
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="level-0 pixel size in µm/px (overrides the file's metadata; the scale check "
        "judges this value)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON list of every slide's checks"
    )


def _format(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}"


def _print_report(path: str, report) -> None:
    print(f"{path}: {report.status}  ({report.seconds:.1f} s, {report.pixel_size_um:g} µm/px)")
    for s in report.signals:
        value = f"{_format(s.value)} {s.unit}"
        print(f"  {s.name:<24}{value:>14}  {s.accepted:>12}  {s.status:<5} {s.reason}".rstrip())


def run(args: argparse.Namespace) -> int:
    from histo.io import open_slide
    from histo.qc import check_slide

    results, unread = [], 0
    for path in args.slides:
        try:
            with open_slide(path, args.pixel_size) as slide:
                report = check_slide(slide)
        except HistoError as exc:
            unread += 1
            print(f"{path}: could not be checked: {exc}", file=sys.stderr)
            continue
        if args.json:
            results.append(dict(report.to_dict(), path=str(path)))
        else:
            _print_report(path, report)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    return 1 if unread else 0
