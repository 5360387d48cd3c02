"""``histo models``: the models histo can use, shipped and the user's own."""

from __future__ import annotations

import argparse

HELP = "list the models: shipped ones and those in the user model folder"
DESCRIPTION = """\
List the models --model accepts by name: the shipped ones (and their aliases) and the folders
in the user model folder (HISTO_MODELS, default the platform's user data folder, e.g.
~/.local/share/histo/models), each with its classes, the first digits of its weights' sha256
and, for a fine-tuned model, the model it started from. A model folder anywhere else is used by
its path: --model path/to/MODEL_DIR.

example:
  histo models
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from histo.segment.registry import list_models, read_registry, user_models_dir

    aliases: dict[str, list[str]] = {}
    for alias, target in read_registry()["aliases"].items():
        aliases.setdefault(target, []).append(alias)
    rows = [("NAME", "WHERE", "CLASSES", "SHA256", "BASE")]
    for m in list_models():
        name = m.name + "".join(f" ({a})" for a in aliases.get(m.name, []))
        classes = "-" if m.classes is None else str(m.classes)
        sha = m.sha256[:12] if m.sha256 else "-"
        rows.append((name, m.where, classes, sha, m.base or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"\nuser model folder: {user_models_dir()}")
    return 0
