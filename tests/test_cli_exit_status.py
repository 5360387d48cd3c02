"""Exit statuses of the ``histo`` command that scripts rely on: 2 for a wrong command line,
130 for an interrupted run (Ctrl-C), with nothing half-written left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _histo(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "histo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("analyze", "--no-such-option", "x.tif", "--out", "o"),
        ("analyze", "x.tif"),  # --out missing
        ("synth", "--phenotype", "not-a-phenotype", "--out", "x.ome.tif"),
        ("no-such-command",),
    ],
)
def test_wrong_command_line_exits_2_with_usage(args, tmp_path: Path) -> None:
    proc = _histo(*args, cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "usage: histo" in err
    assert "error:" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_interrupt_exits_130_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    from histo.synth import write_synthetic_slide

    slide = tmp_path / "big.ome.tif"
    write_synthetic_slide(slide, "normal", size=(3072, 3072), pixel_size_um=1.0, seed=3)
    out = tmp_path / "results"
    proc = _histo("analyze", str(slide), "--out", str(out))
    # interrupt once the slide's outputs are being produced (its partial folder exists)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(out.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted" in err
    # no finished-looking slide folder and no indices.csv claiming a result
    assert not (out / "big" / "indices.json").exists()
    assert not (out / "indices.csv").exists() or "big" not in (out / "indices.csv").read_text()
