"""``histo evaluate``: score segmenters on held-out synthetic slides against ground truth."""

from __future__ import annotations

import argparse
import sys

from histo.cli._options import add_device, option_values

HELP = "evaluate the network and the classical baseline on held-out synthetic slides"
DESCRIPTION = """Evaluate segmenters on held-out synthetic slides (seeds 900000+, never used in
training): 3 phenotypes x 3 counterstains x 4 source pixel sizes (0.25, 0.5, 1, 2 µm/px).
Prints a markdown table (Dice per class, object F1, index errors against truth, phenotype call
accuracy) and writes OUT/evaluation.md and OUT/evaluation.json.

Example:
  histo evaluate --out docs/evaluation
  histo evaluate --models default classical --slides 6 --out /tmp/eval
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["default", "classical"],
        help="models to compare (default: %(default)s)",
    )
    parser.add_argument(
        "--slides", type=int, default=None, help="number of slides (default: all 36)"
    )
    parser.add_argument(
        "--field-um", type=float, default=1200.0, help="field side in µm (default %(default)s)"
    )
    parser.add_argument(
        "--tile", type=int, default=768, help="tile size in working px (default %(default)s)"
    )
    parser.add_argument("--cache", default=None, help="keep generated slides in this folder")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="use the validation seeds (800000+; long bones 960000+) instead of the test "
        "seeds (900000+; long bones 950000+): choose models and constants there, report on "
        "the test seeds",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default=None,
        help="network arithmetic (default: $HISTO_PRECISION or auto = bfloat16 where the CPU "
        "has it natively)",
    )
    parser.add_argument(
        "--long-bone",
        type=float,
        nargs="+",
        default=None,
        metavar="UM",
        help="evaluate on held-out long-bone sections at these source pixel sizes (µm/px, "
        "e.g. 1 2; seeds 950000+): the standard region's indices, region edges, calls and "
        "chondrocyte lacunae taken for osteocytes; writes OUT/long-bone.md and .json",
    )
    add_device(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from histo.evaluate import (
        EVAL_SEED_BASE,
        VALIDATION_SEED_BASE,
        evaluate,
        markdown_table,
        write_report,
    )

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=100, desc="evaluate", file=sys.stderr, unit="%")

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = int(100 * fraction)
            bar.set_postfix_str(message)
            bar.refresh()

    if args.long_bone:
        return _run_long_bone(args, progress, bar)
    seed_base = VALIDATION_SEED_BASE if args.validation else EVAL_SEED_BASE
    slides = option_values(args, "field_um", n_slides="slides", cache_dir="cache")
    network = option_values(args, "precision", "device", tile_px="tile")
    try:
        report = evaluate(args.models, progress=progress, seed_base=seed_base, **slides, **network)
    finally:
        if bar is not None:
            bar.close()
    md, js = write_report(report, args.out)
    print(markdown_table(report))
    print(f"\nwrote {md} and {js}")
    return 0


def _run_long_bone(args: argparse.Namespace, progress, bar) -> int:
    import json
    from pathlib import Path

    from histo.evaluate_long_bone import (
        LONG_BONE_EVAL_SEED_BASE,
        LONG_BONE_VALIDATION_SEED_BASE,
        evaluate_long_bone,
        markdown_long_bone,
    )

    seed_base = LONG_BONE_VALIDATION_SEED_BASE if args.validation else LONG_BONE_EVAL_SEED_BASE
    try:
        report = evaluate_long_bone(
            args.models,
            pixel_sizes=args.long_bone,
            seed_base=seed_base,
            progress=progress,
            device=args.device,
        )
    finally:
        if bar is not None:
            bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_long_bone(report)
    (out / "long-bone.md").write_text("# Long-bone evaluation\n\n" + table + "\n")
    (out / "long-bone.json").write_text(json.dumps(report, indent=1, default=float))
    print(table)
    print(f"\nwrote {out / 'long-bone.md'} and {out / 'long-bone.json'}")
    return 0
