"""The napari plugin on whole slides: peak RSS, run time beside ``histo analyze``, GUI stalls,
and the time to correct a region (load, apply, re-measure).

Runs :mod:`histo_napari._bench` on synthetic slides (cached as ``bench_memory`` caches them),
under ``xvfb-run`` when there is no display. Figures go to docs/performance.md (napari).

    .venv/bin/python benchmarks/bench_napari.py                      # 8192² slide
    .venv/bin/python benchmarks/bench_napari.py --sizes 8192 32768 --region 2048
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_memory import ensure_slide


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[8192])
    parser.add_argument("--model", default="classical")
    parser.add_argument("--region", type=int, default=2048, help="side of the corrected square")
    parser.add_argument("--out", type=Path, default=Path("bench-out/napari"))
    args = parser.parse_args()
    failed = 0
    for size in args.sizes:
        slide = ensure_slide(args.out, size)
        out = args.out / f"runs-{size}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "histo_napari._bench", str(slide), "--model", args.model]
        cmd += ["--out", str(out), "--region", str(args.region), "--cli"]
        if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
            cmd = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", *cmd]
        print(f"--- {slide.name}", flush=True)
        failed += subprocess.run(cmd, check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
