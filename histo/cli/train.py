"""``histo train``: train the segmentation network on synthetic sections."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from histo.cli._options import add_device, option_values

if TYPE_CHECKING:
    from histo.train import TrainConfig

HELP = "train the segmentation network on synthetic sections (seeded, resumable)"
DESCRIPTION = """Train the segmentation network on synthetic TRAP sections generated on the fly.

Writes OUT/checkpoint.pt (resume with --resume), OUT/model.safetensors, OUT/model.json (with
the weights' sha256), OUT/history.json and OUT/train.log. OUT can be used wherever --model is
(histo analyze --model OUT); a folder in the user model folder ($HISTO_MODELS, default
~/.local/share/histo/models) can be named by its name alone.

With --register NAME (default: 'unet' when OUT's parent folder holds a registry.json, as the
package's histo/models/ does in a source checkout) the weights are recorded in that registry
with their sha256.

Example:
  histo train --out runs/histo-unet --seed 0
  histo train --out runs/histo-unet --seed 0 --device cuda
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from histo.train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--out", required=True, help="output folder")
    _add_schedule_options(parser, defaults)
    _add_crop_options(parser, defaults)
    _add_run_options(parser)


def _add_schedule_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The numeric options of the run's schedule and section pools."""
    for flag, kind, default, what in (
        ("--seed", int, defaults.seed, "random seed"),
        ("--steps", int, defaults.steps, "optimiser steps"),
        ("--batch-size", int, defaults.batch_size, "crops per step"),
        ("--crop", int, defaults.crop_px, "crop size in px"),
        ("--lr", float, defaults.lr, "peak learning rate"),
        ("--pool-size", int, defaults.pool_size, "sections held"),
        ("--refresh-every", int, defaults.refresh_every, "steps per replaced section"),
        ("--field", int, defaults.field_px, "section size in working px"),
        ("--threads", int, defaults.threads, "torch threads"),
        ("--long-bone-pool", int, defaults.long_bone_pool_size, "long-bone sections held"),
        (
            "--long-bone-refresh-every",
            int,
            defaults.long_bone_refresh_every,
            "steps per replaced long-bone section",
        ),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{what} (default %(default)s)")


def _add_crop_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The options choosing the crops and weighting the classes."""
    parser.add_argument(
        "--surface-crops",
        type=float,
        default=defaults.surface_crop_fraction,
        help="share of crops centred on the bone surface, where marrow cells next to bone are "
        "the hard negatives of osteoclasts (default %(default)s; at most 0.5)",
    )
    parser.add_argument(
        "--class-weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="cross-entropy weights of background, marrow, bone, osteoclast, osteocyte "
        f"(default {defaults.class_weights}), then cartilage and soft tissue when the network "
        "learns 7 classes (default 1 1)",
    )
    parser.add_argument(
        "--long-bone-crops",
        type=float,
        default=defaults.long_bone_fraction,
        metavar="F",
        help="share of the crops taken from long-bone sections; above 0 the network learns 7 "
        "classes (cartilage 5 and soft tissue 6 besides codes 0-4; --init weights with 5 "
        "classes grow their head) (default %(default)s)",
    )
    parser.add_argument(
        "--long-bone-min-px",
        type=float,
        default=defaults.long_bone_min_source_px_um,
        metavar="UM",
        help="finest source pixel size of the long-bone sections (µm/px; default: 0.5, as "
        "their size allows)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of the run itself: start weights, resume, time limit, registry, device."""
    parser.add_argument("--init", default=None, help="start from these weights (fine-tuning)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="stop after this many minutes"
    )
    parser.add_argument(
        "--register", default=None, help="record the weights in the registry under NAME"
    )
    parser.add_argument(
        "--export-checkpoint",
        action="store_true",
        help="only write OUT/model.safetensors from OUT/checkpoint.pt (e.g. while a run goes on)",
    )
    add_device(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from histo.device import resolve_device
    from histo.train import train

    resolve_device(args.device)  # before any output: a missing device is exit status 2
    out = Path(args.out)
    if args.export_checkpoint:
        from histo.train import export_checkpoint

        weights, sha = export_checkpoint(out)
        _register(args, out, weights)
        print(f"exported {weights} (sha256 {sha[:12]}...)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("histo.train")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    config = _config(args)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=1000, desc="train", file=sys.stderr, unit="‰")

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = int(fraction * 1000)
            bar.set_postfix_str(message.split(" (")[0])
            bar.refresh()

    import torch

    # torch's thread count is process-wide: set here, at the entry point
    torch.set_num_threads(max(1, config.threads))
    try:
        result = train(
            out,
            config,
            resume=args.resume,
            progress=progress,
            time_limit_s=None if args.time_limit is None else args.time_limit * 60,
            device=args.device,
        )
    finally:
        if bar is not None:
            bar.close()
        logger.removeHandler(handler)
        handler.close()
    register = _register(args, out, result.weights)
    print(
        f"trained {result.steps} steps in {result.wall_time_s / 60:.1f} min; "
        f"weights {result.weights} (sha256 {result.sha256[:12]}...)"
        + (f", registered as '{register}'" if register else "")
    )
    return 0


def _config(args: argparse.Namespace):
    """The run's TrainConfig from the command line (class weights checked against the classes)."""
    from histo.classes import N_ALL_CLASSES, N_CLASSES
    from histo.errors import HistoError
    from histo.train import TrainConfig

    n_classes = N_ALL_CLASSES if args.long_bone_crops > 0 else N_CLASSES
    weights = args.class_weights
    if weights is None:
        weights = TrainConfig().class_weights + [1.0] * (n_classes - N_CLASSES)
    if len(weights) != n_classes:
        raise HistoError(f"--class-weights takes {n_classes} weights, got {len(weights)}")
    # the options named as TrainConfig's fields, then those named otherwise
    options = option_values(
        args,
        "seed",
        "steps",
        "batch_size",
        "lr",
        "pool_size",
        "refresh_every",
        "threads",
        "long_bone_refresh_every",
        crop_px="crop",
        field_px="field",
        surface_crop_fraction="surface_crops",
        long_bone_fraction="long_bone_crops",
        long_bone_pool_size="long_bone_pool",
        long_bone_min_source_px_um="long_bone_min_px",
    )
    return TrainConfig(
        init_weights=str(Path(args.init).resolve()) if args.init else None,
        class_weights=[float(w) for w in weights],
        n_classes=n_classes,
        **options,
    )


def _register(args: argparse.Namespace, out: Path, weights: Path) -> str | None:
    """Record the weights in OUT's parent registry.json (or --register NAME's default registry)."""
    from histo.segment.registry import register_weights

    parent_registry = out.resolve().parent / "registry.json"
    name = args.register
    if name is None and parent_registry.exists():
        name = "unet"
    if name:
        register_weights(name, weights, parent_registry if parent_registry.exists() else None)
    return name
