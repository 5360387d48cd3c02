"""histo.qc loads its parts on first use: the segmentation's confidence tally does not bring
every check (and their imports) with it."""

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_segmentation_imports_the_tally_without_the_checks():
    loaded = _modules_after("import histo.segment.tiled")
    assert "histo.qc._confidence" in loaded
    assert "histo.qc._checks" not in loaded
    assert "skimage.feature" not in loaded


def test_public_names_load_their_module_on_first_use():
    import histo.qc

    assert histo.qc.check_slide.__module__ == "histo.qc._checks"
    assert histo.qc.FAIL == "fail"
    assert set(histo.qc.__all__) <= set(dir(histo.qc))
    with pytest.raises(AttributeError, match="no_such_check"):
        histo.qc.no_such_check  # noqa: B018
