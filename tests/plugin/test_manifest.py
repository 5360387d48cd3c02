"""The npe2 manifest is valid and registered under the distribution's entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MANIFEST = Path(__file__).parents[2] / "plugins" / "histo_napari" / "napari.yaml"

pytestmark = pytest.mark.gui


def test_manifest_validates_with_npe2():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # every command's python_name imports
    contributions = manifest.contributions
    assert {s.key for s in contributions.sample_data} == {"normal", "oc-rich", "oc-poor"}
    assert contributions.readers[0].accepts_directories
    assert [w.display_name for w in contributions.widgets] == ["Histomorphometry"]


def test_npe2_validate_command_on_the_installed_plugin():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent))
    if npe2 is None:
        pytest.skip("npe2 command not installed")
    done = subprocess.run([npe2, "validate", "histo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout
