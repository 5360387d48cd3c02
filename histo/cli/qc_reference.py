"""``histo qc-reference``: measure a model's in-domain confidence and store it with the model."""

from __future__ import annotations

import argparse
import json

from histo.cli._options import add_device, add_model

HELP = "measure a model's confidence on held-out synthetic slides and store it with the model"
DESCRIPTION = """\
The model-confidence check of an analysis (model.unsure_share: the share of tissue on which
the network's top two classes are close) judges a slide against what the same model does on
in-domain slides. This command measures that: it segments held-out synthetic TRAP sections
(every counterstain, pixel sizes 0.25-2 µm/px, seeds 600000+) and stores the reference with
the model: the registry entry of a shipped model, the model.json of a model folder. Rerun it
whenever a model is retrained or fine-tuned (a reference measured on other weights is
ignored). A few minutes on 2 cores with the defaults.

examples:
  histo qc-reference --model default
  histo qc-reference --model ~/models/my-lab --slides 24
  histo qc-reference --model default --dry-run     # print it, store nothing
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument(
        "--slides", type=int, default=12, help="synthetic slides to segment (default %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="first slide seed (default 600000, held out)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=1024,
        metavar="PX",
        help="slide side in px at its own pixel size (default %(default)s)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the reference as JSON; store nothing"
    )
    add_device(parser)


def run(args: argparse.Namespace) -> int:
    from histo.cli._progress import progress_bar
    from histo.qc._confidence import REFERENCE_SEED, build_confidence_reference
    from histo.segment import load_model
    from histo.segment.registry import locate_model, write_qc_reference

    if args.slides < 1:
        raise SystemExit("histo qc-reference: error: --slides must be at least 1")
    model = load_model(args.model, device=args.device)
    seed = REFERENCE_SEED if args.seed is None else args.seed
    with progress_bar("qc-reference") as progress:
        reference = build_confidence_reference(
            model, args.slides, seed=seed, size=args.size, progress=progress
        )
    if args.dry_run:
        print(json.dumps(reference, indent=1))
        return 0
    path = write_qc_reference(locate_model(args.model), reference)
    print(
        f"{model.name}: unsure on at most {100 * reference['max_share']:.1f} % of tissue over "
        f"{args.slides} in-domain slides; warn above {100 * reference['warn_above']:.1f} %, "
        f"fail above {100 * reference['fail_above']:.1f} %; stored in {path}"
    )
    return 0
