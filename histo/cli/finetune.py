"""``histo finetune``: teach the network a lab's own slides from corrected class maps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histo.cli._options import add_device, option_values
from histo.cli._progress import progress_bar

HELP = "fine-tune the network on corrected class maps or scribbles (NAME.classes.tif)"
DESCRIPTION = """\
Fine-tune the segmentation network on a lab's own slides. Each slide (any format histo reads,
or a folder of them) needs its class map beside it, NAME.classes.tif (what the napari plugin's
"Save class map" writes): class codes 0-6, 255 where unlabelled, so a few brush strokes per
class (scribbles) work as well as a fully corrected map. The map is on the slide's level-0
pixel grid or carries its own pixel size.

Training starts from the shipped network (or --base), runs on crops at the working resolution
with the usual augmentation (half the crops centred on osteoclasts), replays synthetic sections
of every stain it was trained on (three quarters of each batch) so that less is forgotten,
holds out blocks of the labelled pixels for validation and keeps the best weights. Ctrl-C
stops early and keeps the best weights so far.

Writes MODEL_DIR/model.safetensors and MODEL_DIR/model.json (base model, data files and their
sha256, labelled pixels per class, steps, wall time, validation Dice, forgetting, the weights'
sha256). Use it with --model MODEL_DIR in analyze, batch and evaluate, or put the folder in
the user model folder (HISTO_MODELS) and use its name; 'histo models' lists the models.

exit status: 0 written, 2 usage error, 3 bad data (one line per bad slide/class-map pair),
4 MODEL_DIR unusable, 5 base model missing or corrupt, 130 interrupted (best weights kept).

examples:
  histo finetune S1.ome.tif S2.ome.tif --out lab-model
  histo finetune corrections/ --out ~/.local/share/histo/models/lab-a --minutes 3
  histo analyze S3.ome.tif --model lab-model --out results
"""


#: the FinetuneConfig fields set by the options of the same names
_CONFIG_OPTIONS = (
    "base",
    "minutes",
    "seed",
    "trainable",
    "lr",
    "max_steps",
    "replay_share",
    "device",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from histo.finetune import TRAINABLE, FinetuneConfig

    d = FinetuneConfig()
    parser.add_argument("data", nargs="+", metavar="DATA", help="slides or folders of slides")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder")
    parser.add_argument(
        "--base",
        default=None,
        metavar="NAME|PATH",
        help="model to start from (default: the shipped network)",
    )
    # the training options take their defaults from FinetuneConfig
    training = {
        "--minutes": {
            "type": float,
            "metavar": "M",
            "help": "wall-time budget, everything included",
        },
        "--seed": {"type": int, "help": "seed"},
        "--trainable": {"choices": TRAINABLE, "help": "what is trained"},
        "--lr": {"type": float, "help": "peak learning rate"},
        "--max-steps": {"type": int, "metavar": "N", "help": "stop after N steps"},
        "--replay-share": {
            "type": float,
            "metavar": "F",
            "help": "share of each batch replayed from synthetic sections",
        },
    }
    for flag, spec in training.items():
        default = getattr(d, flag[2:].replace("-", "_"))
        shown = "" if default is None else " (default %(default)s)"
        parser.add_argument(flag, default=default, **{**spec, "help": spec["help"] + shown})
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other setting of histo.finetune.FinetuneConfig (repeatable), for example "
        "--set distill_weight=0 --set osteoclast_crops=0.5",
    )
    add_device(parser)


def _settings(pairs: list[str], config):
    """``config`` with each ``FIELD=VALUE`` of ``--set`` applied, converted to the field's type."""
    import dataclasses

    from histo.errors import HistoError

    changes = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not hasattr(config, name):
            raise HistoError(f"--set {pair}: not FIELD=VALUE with a FinetuneConfig field")
        current = getattr(config, name)
        if isinstance(current, bool):
            value = text.lower() in ("1", "true", "yes", "on")
        elif text.lower() == "none":
            value = None
        else:
            kind = type(current) if current is not None else float
            try:
                value = kind(text)
            except ValueError:
                raise HistoError(f"--set {pair}: {text!r} is not a {kind.__name__}") from None
        changes[name] = value
    return dataclasses.replace(config, **changes)


def _describe(progress) -> str:
    val = "-" if progress.val_dice is None else f"{progress.val_dice:.3f}"
    return f"step {progress.step} loss {progress.loss:.3f} val Dice {val}" + (
        " (best)" if progress.best else ""
    )


def run(args: argparse.Namespace) -> int:
    from histo.finetune import FinetuneConfig, finetune, load_labelled

    config = FinetuneConfig(**option_values(args, *_CONFIG_OPTIONS))
    config = _settings(args.set, config)
    fields = load_labelled(args.data)
    print(
        f"{len(fields)} labelled field(s); training for up to {args.minutes:g} min", file=sys.stderr
    )
    with progress_bar(f"finetune {Path(args.out).name}") as bar:

        def progress(p) -> None:
            fraction = p.step / p.steps if p.steps else p.elapsed_s / (p.budget_s or 1.0)
            bar(fraction, _describe(p))

        result = finetune(fields, args.out, config, progress=progress)
    dice = ", ".join(f"{k} {v:.3f}" for k, v in result.val_dice.items()) or "no held-out pixels"
    print(
        f"wrote {result.model_dir} (sha256 {result.sha256[:12]}...): {result.steps} steps, "
        f"kept step {result.best_step}, {result.wall_s:.0f} s; validation Dice: {dice}",
        file=sys.stderr,
    )
    if result.cancelled:
        print("interrupted: the best weights so far were kept", file=sys.stderr)
        return 130
    return 0
