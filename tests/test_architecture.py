"""The core library never imports napari or Qt: the GUI is a thin adapter over it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import histo

FORBIDDEN = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy", "magicgui")


def test_importing_every_core_module_loads_no_gui_toolkit():
    modules = sorted(
        m.name
        for m in pkgutil.walk_packages(histo.__path__, "histo.")
        if m.name != "histo.__main__"
    )
    assert "histo.pipeline" in modules and "histo.synth" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "", f"histo imported GUI modules: {out.stdout}"


def test_import_linter_contract_is_declared():
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(histo.__file__).parents[1] / "pyproject.toml").read_text())
    contracts = cfg["tool"]["importlinter"]["contracts"]
    forbidden = {m for c in contracts if c["type"] == "forbidden" for m in c["forbidden_modules"]}
    assert set(FORBIDDEN) <= forbidden
