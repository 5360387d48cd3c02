"""Peak memory and speed of ``histo analyze`` against slide size (bounded memory check).

For each size N, a synthetic slide ``histo synth --phenotype normal --size N --pixel-size 1.0``
is written once under ``OUT/slides/`` and reused (synthesis is slow: 1-2 s per 1000² field),
then ``histo analyze SLIDE --out OUT/runs/... --model MODEL`` runs as a child process whose peak
resident memory (``VmHWM`` of ``/proc/<pid>/status``, polled; ``ru_maxrss`` as a floor) and wall
time are recorded, with the child's CPU seconds. Throughput is megapixels of tissue (T.Ar at
1 µm/px) per second. Slides whose working-resolution map exceeds
``histo.pipeline.LABELS_ON_DISK_MIN_PX`` keep their label store on disk.

Each finished run is appended to ``OUT/results.jsonl``; the table is printed at the end (and
with ``--table`` alone, from the results recorded so far), followed by the median time and
throughput and the largest peak of each slide and model over its runs, and the marginal speed
between the smallest slide and each larger one (extra tissue over extra time, so the start-up
of the process cancels). A machine whose speed drifts (a shared virtual machine) needs several
runs: ``--repeat N`` runs each slide N times, interleaving the models.

``--tree LABEL=PATH`` (repeatable) runs ``histo`` from another source tree (``PYTHONPATH`` set
to PATH and PATH/plugins in the child), so that two versions are compared side by side in one
invocation, their runs interleaved slide by slide.

    .venv/bin/python benchmarks/bench_memory.py --sizes 2048 8192 16384 [--models classical default]
    .venv/bin/python benchmarks/bench_memory.py --sizes 8192 --models default --repeat 5
    nohup .venv/bin/python benchmarks/bench_memory.py --sizes 32768 > bench-out/memory/32k.log &
    .venv/bin/python benchmarks/bench_memory.py --sizes 2048 8192 --models default --repeat 3 \
        --tree main=../before --tree new=.
    .venv/bin/python benchmarks/bench_memory.py --table
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HISTO = [sys.executable, "-m", "histo"]


def _registry_models() -> set[str]:
    try:
        reg = json.loads((ROOT / "histo" / "models" / "registry.json").read_text())
    except (OSError, ValueError):
        return {"classical"}
    return set(reg.get("models", {})) | set(reg.get("aliases", {}))


def ensure_slide(out: Path, size: int) -> Path:
    """The cached synthetic slide of ``size`` px (written on first use)."""
    slides = out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    path = slides / f"normal-{size}.ome.tif"
    done = slides / f"normal-{size}.truth.json"  # written last by histo synth
    if not done.exists():
        print(f"synthesising {path} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run(
            [
                *HISTO,
                "synth",
                "--phenotype",
                "normal",
                "--size",
                str(size),
                "--pixel-size",
                "1.0",
                "--seed",
                "0",
                "--out",
                str(path),
            ],
            check=True,
        )
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_env(path: str | None) -> dict[str, str] | None:
    """The environment of a child that runs histo from the source tree ``path`` (None: ours)."""
    if path is None:
        return None
    root = Path(path).resolve()
    # PYTHONSAFEPATH: `python -m histo` would otherwise import the working folder's histo first
    return {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{root / 'plugins'}",
        "PYTHONSAFEPATH": "1",
    }


def run_analyze(
    slide: Path, out: Path, model: str, timeout_s: float, tree: tuple[str, str | None] = ("", None)
) -> dict:
    """Run ``histo analyze`` on one slide; peak RSS (MiB), seconds, tissue MP, exit status.

    ``tree`` is (label, source tree path or None for this one).
    """
    label, path = tree
    run_dir = out / "runs" / f"{slide.name.split('.')[0]}-{model}{'-' + label if label else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [*HISTO, "analyze", str(slide), "--out", str(run_dir), "--model", model]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_dir.mkdir(parents=True)
    log_path = out / "runs" / f"{run_dir.name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below; never a pipe (a full pipe blocks)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=tree_env(path))
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.close()
    stderr = log_path.read_text(errors="replace").replace("\r", "\n")
    seconds = time.perf_counter() - t0
    if peak_kib == 0:  # finished before the first poll
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    row: dict = {
        "slide": slide.name,
        "model": model,
        "tree": label,
        "status": proc.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024),
        # CPU of the child (all threads): steadier than wall time on a shared machine
        "cpu_seconds": round(
            (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1
        ),
    }
    try:
        with open(run_dir / "indices.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        t_ar_mm2 = float(rows[0]["T.Ar"])
        row["tissue_mp"] = round(t_ar_mm2, 2)  # 1 mm² = 1 MP at 1 µm/px
        row["tissue_mp_per_s"] = round(t_ar_mm2 / seconds, 3)
        row["phenotype"] = rows[0]["phenotype"]
        row["N.Oc"] = rows[0]["N.Oc"]
    except (OSError, IndexError, KeyError, ValueError):
        row["error"] = stderr.strip().splitlines()[-1:] or ["no output"]
    return row


def print_table(results: list[dict]) -> None:
    cols = (
        "slide",
        "model",
        "tree",
        "status",
        "seconds",
        "cpu_seconds",
        "peak_rss_mib",
        "tissue_mp",
        "tissue_mp_per_s",
        "phenotype",
        "N.Oc",
    )
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in results)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in results:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


#: peak resident memory allowed for one slide's analysis, whatever its size
PEAK_TARGET_MIB = 900


def print_summary(results: list[dict]) -> bool:
    """Median seconds and MP/s, largest peak RSS, per slide and model (runs that succeeded),
    then the memory verdict per model: the range of the peaks over slide sizes and whether
    every one is under :data:`PEAK_TARGET_MIB`. Returns False if a run failed or a peak was
    over the target."""
    import statistics

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        if r.get("status") == 0 and "tissue_mp_per_s" in r:
            groups.setdefault((r["slide"], r["model"], r.get("tree", "")), []).append(r)
    failed = [r for r in results if r.get("status") != 0 or "tissue_mp_per_s" not in r]
    for r in failed:
        print(f"FAILED: {r['slide']} --model {r['model']}: {r.get('error') or r.get('status')}")
    if not groups:
        return not failed
    peak = {key: max(r["peak_rss_mib"] for r in runs) for key, runs in groups.items()}
    print("\nslide  model  tree  runs  median s  median MP/s (range)  max peak RSS MiB")
    for (slide, model, tree), runs in groups.items():
        rates = [r["tissue_mp_per_s"] for r in runs]
        print(
            f"{slide}  {model}  {tree or '-'}  {len(runs)}"
            f"  {statistics.median(r['seconds'] for r in runs):.1f}"
            f"  {statistics.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f})"
            f"  {peak[slide, model, tree]}"
        )
    print_marginal(groups)
    ok = not failed
    for model, tree in sorted({(m, t) for _, m, t in groups}):
        peaks = {s: mib for (s, m, t), mib in peak.items() if (m, t) == (model, tree)}
        lo, hi = min(peaks, key=peaks.get), max(peaks, key=peaks.get)
        under = peaks[hi] <= PEAK_TARGET_MIB
        ok &= under
        print(
            f"memory, {model} {tree or ''}: peaks {peaks[lo]} MiB ({lo}) to {peaks[hi]} MiB "
            f"({hi}), {100 * (peaks[hi] / peaks[lo] - 1):+.0f} %; "
            f"{'all under' if under else 'OVER'} the {PEAK_TARGET_MIB} MiB target"
        )
    return ok


def print_marginal(groups: dict[tuple[str, str, str], list[dict]]) -> None:
    """Marginal speed from the smallest slide to each larger one, per model and tree: extra
    tissue MP over extra median seconds (the process start-up and model loading cancel)."""
    import statistics

    medians = {
        key: (
            statistics.median(r["tissue_mp"] for r in runs),
            statistics.median(r["seconds"] for r in runs),
        )
        for key, runs in groups.items()
    }
    for model, tree in sorted({(m, t) for _, m, t in groups}):
        mine = sorted((v for (s, m, t), v in medians.items() if (m, t) == (model, tree)))
        for (mp0, s0), (mp1, s1) in zip(mine[:1] * (len(mine) - 1), mine[1:], strict=True):
            if s1 > s0:
                print(
                    f"marginal, {model} {tree or ''}: {mp0:.1f} -> {mp1:.1f} MP of tissue: "
                    f"{(mp1 - mp0) / (s1 - s0):.2f} MP/s"
                )


def _tree(text: str) -> tuple[str, str]:
    label, _, path = text.partition("=")
    if not path:
        raise SystemExit(f"--tree wants LABEL=PATH, got {text!r}")
    return label, path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--models", nargs="*", default=["classical", "default"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "memory")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run")
    parser.add_argument("--table", action="store_true", help="print recorded results only")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each slide and model (default 1)"
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="run histo from this source tree too (repeatable; runs interleaved)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    results_path = args.out / "results.jsonl"
    if not args.table:
        available = _registry_models()
        models = [m for m in args.models if m in available]
        args.out.mkdir(parents=True, exist_ok=True)
        trees = [_tree(t) for t in args.tree] or [("", None)]
        for size in args.sizes:
            slide = ensure_slide(args.out, size)
            for _ in range(args.repeat):
                for model in models:
                    for tree in trees:
                        print(f"analyze {slide.name} --model {model} {tree[0]}...", flush=True)
                        row = run_analyze(slide, args.out, model, args.timeout, tree)
                        row["size"] = size
                        row["pid"] = os.getpid()
                        print("  ", row, flush=True)
                        with open(results_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
    results = []
    if results_path.exists():
        results = [json.loads(line) for line in results_path.read_text().splitlines() if line]
    if results:
        print_table(results)
        # the summary is of this invocation's runs (the file keeps every earlier one)
        ours = [r for r in results if r.get("pid") == os.getpid()]
        return 0 if print_summary(results if args.table else ours) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
