"""The ``histo`` command line: one small module per command (``histo/cli/<command>.py``).

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from histo import __version__
from histo.errors import HistoError

#: command name -> module under histo.cli
COMMANDS = {
    "synth": "synth",
    "analyze": "analyze",
    "batch": "batch",
    "measure": "measure",
    "calibrate": "calibrate",
    "train": "train",
    "evaluate": "evaluate",
}


def build_parser() -> argparse.ArgumentParser:
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
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"histo.cli.{module_name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except HistoError as exc:
        print(f"histo {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"histo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
