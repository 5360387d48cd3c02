"""Options shared by several commands: pixel size, model, region of interest, reference ranges."""

from __future__ import annotations

import argparse

#: --roi of the commands that analyse slides
SLIDE_ROI_HELP = "region of interest: GeoJSON polygons in level-0 pixels of the slide (x, y)"


def add_pixel_size(parser: argparse.ArgumentParser, help: str) -> None:
    """``--pixel-size UM`` (float, default None)."""
    parser.add_argument("--pixel-size", type=float, default=None, metavar="UM", help=help)


def add_model(parser: argparse.ArgumentParser) -> None:
    """``--model NAME|PATH`` (default: the shipped network)."""
    parser.add_argument(
        "--model",
        default="default",
        metavar="NAME|PATH",
        help="'default' (shipped network), 'classical' (threshold baseline), a model folder "
        "from 'histo finetune', a user model's name ('histo models') or a weights file",
    )


def add_roi_and_ranges(parser: argparse.ArgumentParser, roi_help: str = SLIDE_ROI_HELP) -> None:
    """``--roi FILE`` and ``--ranges JSON``."""
    parser.add_argument("--roi", default=None, metavar="GEOJSON", help=roi_help)
    parser.add_argument(
        "--ranges",
        default=None,
        metavar="JSON",
        help="reference ranges from 'histo calibrate' (default: built-in ranges)",
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option shared by the commands that run the network."""
    from histo.device import DEVICES

    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the network runs: auto (a CUDA GPU, then Apple MPS, then the CPU), cpu, "
        "cuda or mps (default %(default)s); a device missing here is an error (exit status 2)",
    )


def add_slide_options(parser: argparse.ArgumentParser, pixel_size_help: str) -> None:
    """The options of the commands that analyse slides: --pixel-size, --model, --roi, --ranges
    and --device (read back with :func:`slide_analysis_kwargs`)."""
    add_pixel_size(parser, pixel_size_help)
    add_model(parser)
    add_roi_and_ranges(parser)
    add_device(parser)


def option_values(args: argparse.Namespace, *same: str, **renamed: str) -> dict:
    """Keyword arguments from parsed options: those named ``same`` under their own names, and
    ``keyword="option"`` pairs for the others (e.g. ``pixel_size_um="pixel_size"``)."""
    values = {name: getattr(args, name) for name in same}
    values.update({keyword: getattr(args, option) for keyword, option in renamed.items()})
    return values


def slide_analysis_kwargs(args: argparse.Namespace) -> dict:
    """The analysis arguments of --pixel-size, --model, --roi, --ranges and --device."""
    return option_values(args, "model", "roi", "ranges", "device", pixel_size_um="pixel_size")


def check_roi_and_ranges(args: argparse.Namespace) -> None:
    """Fail before any slide runs when the --roi GeoJSON or the --ranges file is unusable."""
    if args.roi:
        from histo.io.roi import geojson_rings

        geojson_rings(args.roi)
    if args.ranges:
        from histo.phenotype import load_ranges

        load_ranges(args.ranges)
