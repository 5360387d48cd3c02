"""Batch benchmark: ``histo analyze`` speed and peak memory per slide size; batch speed-up.

For each size (default 2048 ≈ 4 MP, 8192, 16384, 32768 px a side, synthetic oc-rich slides at
1 µm/px written by ``histo synth`` with bounded memory and kept in ``bench-out/``), runs
``histo analyze SLIDE --model classical`` as a child process and reports wall time, megapixels
per second (level-0 pixels of the slide) and the child's peak resident memory (``ru_maxrss``
from ``os.wait4``, which covers that child alone).

Then runs ``histo batch`` on a folder of small slides with 1 and with 2 local workers and reports
the speed-up (wall time of the whole command, cluster start-up included).

    python -m benchmarks.bench_batch                       # all sizes
    python -m benchmarks.bench_batch --sizes 2048 8192     # a subset
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OUT = Path("bench-out") / "batch"
DEFAULT_SIZES = (2048, 8192, 16384, 32768)


@dataclass
class Run:
    """One child process: wall time, peak RSS and exit status."""

    seconds: float
    peak_rss_mib: float
    returncode: int
    stderr: str


def run_child(args: list[str]) -> Run:
    """Run ``histo ARGS`` and measure it (peak RSS of that child alone, via ``os.wait4``)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    with open(OUT / "stderr.log", "w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "histo", *args], stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        err.seek(0)
        text = err.read()
    return Run(seconds, usage.ru_maxrss / 1024, proc.returncode, text)


def synth(size: int, seed: int = 1, folder: Path = OUT, phenotype: str = "oc-rich") -> Path:
    """A synthetic slide of ``size`` px a side (written once, then reused)."""
    path = folder / f"{phenotype}-{size}-{seed}.ome.tif"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        r = run_child(
            [
                "synth",
                "--phenotype",
                phenotype,
                "--size",
                str(size),
                "--seed",
                str(seed),
                "--pixel-size",
                "1.0",
                "--out",
                str(path),
            ]
        )
        if r.returncode:
            raise RuntimeError(f"histo synth --size {size} failed: {r.stderr[-500:]}")
        for suffix in (".classes.tif", ".osteoclasts.tif", ".osteocytes.tif"):
            path.with_name(path.name.replace(".ome.tif", suffix)).unlink(missing_ok=True)
    return path


def bench_sizes(sizes: list[int], model: str) -> list[dict]:
    rows = []
    for size in sizes:
        slide = synth(size)
        out = OUT / f"analyze-{size}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_child(["analyze", str(slide), "--out", str(out), "--model", model])
        mp = size * size / 1e6
        rows.append(
            {
                "size": size,
                "MP": mp,
                "s": r.seconds,
                "MP/s": mp / r.seconds,
                "peak MiB": r.peak_rss_mib,
                "status": "ok" if r.returncode == 0 else f"exit {r.returncode}",
            }
        )
        print(
            f"  {size:>6} px: {r.seconds:7.1f} s, {mp / r.seconds:6.2f} MP/s, "
            f"peak {r.peak_rss_mib:7.0f} MiB ({rows[-1]['status']})",
            flush=True,
        )
    return rows


def bench_speedup(n_slides: int, size: int, model: str) -> dict:
    folder = OUT / f"batch-{n_slides}x{size}"
    for i in range(n_slides):
        synth(size, seed=100 + i, folder=folder, phenotype=("normal", "oc-rich", "oc-poor")[i % 3])
    times = {}
    for workers in (1, 2):
        out = OUT / f"batch-out-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_child(
            ["batch", str(folder), "--out", str(out), "--workers", str(workers), "--model", model]
        )
        if r.returncode:
            raise RuntimeError(f"histo batch --workers {workers} failed: {r.stderr[-500:]}")
        times[workers] = r.seconds
        print(f"  {workers} worker(s): {r.seconds:.1f} s", flush=True)
    return {
        "slides": n_slides,
        "size": size,
        "1 worker s": times[1],
        "2 workers s": times[2],
        "speed-up": times[1] / times[2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(DEFAULT_SIZES))
    parser.add_argument("--model", default="classical")
    parser.add_argument("--batch-slides", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"histo analyze --model {args.model}, one slide per process (cpus: {os.cpu_count()})")
    rows = bench_sizes(args.sizes, args.model)
    print(f"histo batch: {args.batch_slides} slides of {args.batch_size} px", flush=True)
    speed = bench_speedup(args.batch_slides, args.batch_size, args.model)
    print(f"\n{'size px':>8} {'MP':>8} {'s':>8} {'MP/s':>7} {'peak RSS MiB':>13}  status")
    for r in rows:
        print(
            f"{r['size']:>8} {r['MP']:>8.1f} {r['s']:>8.1f} {r['MP/s']:>7.2f} "
            f"{r['peak MiB']:>13.0f}  {r['status']}"
        )
    print(
        f"\nbatch of {speed['slides']} x {speed['size']} px slides: 1 worker "
        f"{speed['1 worker s']:.1f} s, 2 workers {speed['2 workers s']:.1f} s, "
        f"speed-up {speed['speed-up']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
