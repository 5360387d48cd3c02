"""The ``histo`` command line: one small module per command (``histo/cli/<command>.py``).

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from histo import __version__
from histo.errors import HistoError

#: command name -> one-line help (the module is histo.cli.<name>, imported only when used,
#: so that ``histo --help`` and ``histo synth`` do not pay for importing torch)
COMMANDS = {
    "synth": "write a synthetic TRAP-stained slide (OME-TIFF) and its ground truth",
    "analyze": "analyse slides end to end: segment, measure, call the phenotype",
    "batch": "analyse a folder of slides in parallel (dask), with resume",
    "measure": "ASBMR indices and object tables from class maps alone",
    "calibrate": "learn reference ranges from a lab's own control slides",
    "train": "train the segmentation network on synthetic slides",
    "evaluate": "score the network and the classical baseline on held-out synthetic slides",
    "finetune": "fine-tune the network on corrected class maps or scribbles (NAME.classes.tif)",
    "models": "list the models: shipped ones and those in the user model folder",
    "qc": "quality checks that need no segmentation: tissue, focus, stain, scale",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the options of the command named in ``argv`` are loaded from its module."""
    parser = argparse.ArgumentParser(
        prog="histo",
        description=(
            "Bone histomorphometry from TRAP-stained sections: segment osteoclasts, osteocytes, "
            "bone and marrow, compute ASBMR indices and call the osteopetrosis phenotype."
        ),
        epilog="Run 'histo COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"histo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in (argv or []) if a in COMMANDS), None)
    for name, help_line in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_line)
            continue
        module = importlib.import_module(f"histo.cli.{name}")
        p = sub.add_parser(
            name,
            help=help_line,
            description=getattr(module, "DESCRIPTION", help_line),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from histo.runtime import tune_gc, tune_malloc

    tune_malloc()  # before any thread allocates (histo.runtime: up to 2x faster on Linux)
    tune_gc()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except HistoError as exc:
        print(f"histo {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"histo {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``histo`` command: :func:`main`, then exit without the interpreter's teardown.

    Every output is written and closed when :func:`main` returns; tearing down torch, zarr's
    threads and the heap would take another ~0.5 s of a 15-s analysis for nothing.
    """
    import logging
    import os

    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (histo ... | head)
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
