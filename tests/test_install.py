"""The built wheel works where a user installs it: outside the source tree, from another folder.

How, and why this way:

- The wheel is built from a copy of the files a wheel is made of (pyproject.toml, README.md,
  histo/, plugins/), so that nothing in the checkout (a stale ``build/`` folder, files not
  declared as package data) can slip into it or make up for what it lacks.
- ``pip wheel --no-deps --no-build-isolation --no-index`` and ``pip install --no-deps --no-index
  --target SITE``: no download at all (CI has 2 cores and no wish to fetch torch again); the
  dependencies are those of the running venv, which is what ``pip install histo`` into a lab's
  environment looks like.
- The installed copy runs with ``PYTHONPATH=SITE`` from a folder outside the checkout. The
  venv may hold an editable install of the checkout: its import hook comes after the path
  finder, so SITE wins, and every subprocess checks that ``histo`` and ``histo_napari`` were
  imported from SITE. Its dist-info (also named ``histo``) stays visible to
  ``importlib.metadata``, so the napari manifest is checked through a mark written into the
  installed copy's ``napari.yaml`` only: napari's discovery (npe2) must return the marked one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what the wheel is built from
SOURCES = ("pyproject.toml", "README.md", "histo", "plugins")
MARK = "installed copy of"


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 120) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{args[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """SITE with the built wheel installed in it, and the environment that runs it."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", HISTO_MODELS=str(tmp / "um"))
    pip = [sys.executable, "-m", "pip", "--no-cache-dir"]
    dist, site = tmp / "dist", tmp / "site"
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
        tmp,
        env,
    )
    (wheel,) = dist.glob("histo-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], tmp, env)
    manifest = site / "histo_napari" / "napari.yaml"
    text = manifest.read_text()
    manifest.write_text(text.replace("\ndisplay_name: ", f"\ndisplay_name: {MARK} ", 1))
    env["PYTHONPATH"] = str(site)
    (tmp / "elsewhere").mkdir()
    return site, env


def test_wheel_carries_the_model_and_imports_from_the_install(installed):
    site, env = installed
    code = (
        "import json, histo, histo_napari; from histo.segment import registry as r; "
        "print(json.dumps([histo.__file__, histo_napari.__file__, str(r.DEFAULT_REGISTRY), "
        "r.read_registry()['models']['unet']['sha256']]))"
    )
    out = _run([sys.executable, "-c", code], site.parent / "elsewhere", env)
    histo_file, napari_file, registry, sha = json.loads(out)
    for path in (histo_file, napari_file, registry):
        assert Path(path).is_relative_to(site), path
    weights = site / "histo" / "models" / "histo-unet" / "model.safetensors"
    from histo.segment.registry import file_sha256

    assert file_sha256(weights) == sha


def test_installed_histo_synthesises_and_analyses_a_slide(installed):
    site, env = installed
    work = site.parent / "elsewhere"
    histo = [sys.executable, str(site / "bin" / "histo")]  # the wheel's console script
    version = _run([*histo, "--version"], work, env)
    assert version.split() == ["histo", _version_of(site)]
    _run(
        [
            *histo,
            "synth",
            "--phenotype",
            "oc-rich",
            "--size",
            "768",
            "--seed",
            "0",
            "--out",
            "s.ome.tif",
        ],
        work,
        env,
    )
    _run([*histo, "analyze", "s.ome.tif", "--out", "res", "--device", "auto"], work, env)
    meta = json.loads((work / "res" / "s" / "indices.json").read_text())
    reg = json.loads((site / "histo" / "models" / "registry.json").read_text())
    assert meta["model_name"] == "unet"
    assert meta["model_sha256"] == reg["models"]["unet"]["sha256"]
    assert meta["device"] == "cpu"  # auto on a machine without a GPU
    assert meta["histo_version"] == _version_of(site)
    assert (work / "res" / "indices.csv").read_text().count("\n") == 2  # header + one slide


def test_napari_discovers_the_installed_manifest(installed):
    site, env = installed
    code = (
        "import json, npe2; pm = npe2.PluginManager(); pm.discover(include_npe1=False); "
        "mf = pm.get_manifest('histo'); import histo_napari; "
        "print(json.dumps([mf.display_name, histo_napari.__file__, "
        "[c.python_name for c in mf.contributions.commands]]))"
    )
    out = _run([sys.executable, "-c", code], site.parent / "elsewhere", env)
    display_name, module_file, commands = json.loads(out)
    assert display_name.startswith(MARK)  # the installed copy's manifest, not the checkout's
    assert Path(module_file).is_relative_to(site)
    assert "histo_napari._reader:get_reader" in commands


def _version_of(site: Path) -> str:
    (info,) = site.glob("histo-*.dist-info")
    return info.name.removeprefix("histo-").removesuffix(".dist-info")
