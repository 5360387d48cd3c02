"""Per-slide cost of ``analyze_slide`` in a warm process, for one or more source trees.

A child process per source tree (``--tree LABEL=PATH``: ``PYTHONPATH`` set to PATH and
PATH/plugins) imports histo, analyses each slide once to warm up (imports, torch, the model),
then times ``analyze_slide(slide, out_dir=..., model=...)`` (a new output folder each time, as
in a batch) on each slide ``--repeat`` times; the trees' children run one after the other,
round after round (interleaved).

- fixed cost per slide beyond the network: a 256² field (1 µm/px) with the classical segmenter,
  whose segmentation of one tile takes milliseconds: what remains is opening the slide, finding
  tissue, the label store, the measurement's set-up and writing the seven outputs;
- marginal speed on fields: 2048² fields with the default network, tissue MP (T.Ar at 1 µm/px)
  per second of one slide in a process that analyses many.

Each run also records the seconds, wall and CPU (the process's, all threads), between the
pipeline's progress messages (opening, finding tissue, quality checks, segmenting, measuring,
writing). On a loaded machine the CPU seconds vary far less than the wall seconds.
``--torch-threads N`` sets torch's threads in the children as an entry point would. Each run
also records how many cores other processes kept busy meanwhile (from /proc/stat, on Linux):
``--max-others CORES`` summarises only the runs of a quiet enough machine.

    .venv/bin/python benchmarks/bench_per_slide.py --tree main=../before --tree new=. \\
        --out bench-out/per-slide --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HISTO = [sys.executable, "-m", "histo"]

#: what the child runs: warm up on every (slide, model), then time each `repeat` times
CHILD = r"""
import json, os, shutil, sys, tempfile, time
from histo.pipeline import analyze_slide
spec = json.loads(sys.argv[1])
if spec.get("threads"):
    import torch
    torch.set_num_threads(spec["threads"])
def busy_seconds():
    # CPU seconds the whole machine has been busy (Linux /proc/stat; None elsewhere)
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
def run(path, model):
    out = tempfile.mkdtemp(prefix="histo-bench-")  # a new folder, as in a batch
    marks = []
    def progress(fraction, message):
        marks.append((time.perf_counter(), time.process_time(), message.split(" ")[0]))
    try:
        b0 = busy_seconds()
        t0, c0 = time.perf_counter(), time.process_time()
        r = analyze_slide(path, out_dir=out, model=model, progress=progress)
        t1, c1 = time.perf_counter(), time.process_time()
        b1 = busy_seconds()
        others = None if b0 is None else max(0.0, (b1 - b0) - (c1 - c0)) / (t1 - t0)
        stages, cpu_stages = {}, {}
        for (ta, ca, stage), (tb, cb, _) in zip(marks, marks[1:] + [(t1, c1, "")]):
            stages[stage] = stages.get(stage, 0.0) + tb - ta
            cpu_stages[stage] = cpu_stages.get(stage, 0.0) + cb - ca
        return r, t1 - t0, c1 - c0, (stages, cpu_stages), others
    finally:
        shutil.rmtree(out, ignore_errors=True)
for path, model in spec["runs"]:
    run(path, model)
for _ in range(spec["repeat"]):
    for path, model in spec["runs"]:
        r, s, cpu, (stages, cpu_stages), others = run(path, model)
        t_ar = r.measurement.indices["T.Ar"]
        row = {"slide": r.name, "model": model, "seconds": s, "cpu_seconds": cpu, "t_ar": t_ar}
        row["others_cores"] = others
        row["stages"], row["cpu_stages"] = stages, cpu_stages
        print(json.dumps(row), flush=True)
"""


def ensure_field(folder: Path, phenotype: str, size: int, seed: int) -> Path:
    """A synthetic field (OME-TIFF, 1 µm/px), written on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{phenotype}-{size}-{seed}.ome.tif"
    if not (folder / f"{phenotype}-{size}-{seed}.truth.json").exists():
        cmd = ["synth", "--phenotype", phenotype, "--size", str(size), "--pixel-size", "1.0"]
        subprocess.run([*HISTO, *cmd, "--seed", str(seed), "--out", str(path)], check=True)
    return path


def run_tree(
    label: str, path: str, runs: list[tuple[str, str]], repeat: int, threads: int | None = None
) -> list[dict]:
    root = Path(path).resolve()
    # PYTHONSAFEPATH: `python -c` would otherwise import the working folder's histo first
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{root / 'plugins'}",
        "PYTHONSAFEPATH": "1",
    }
    spec = json.dumps({"runs": runs, "repeat": repeat, "threads": threads})
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, spec], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"{label}: child failed: {proc.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [{**row, "tree": label} for row in rows]


def _others(row: dict) -> float | None:
    return row.get("others_cores")


def summarise(rows: list[dict], max_others: float | None = None) -> None:
    """Median seconds and MP/s per (slide, model, tree); CPU seconds of the process (all its
    threads) when recorded: on a loaded machine they vary far less than wall seconds.

    ``max_others``: only the runs during which other processes kept at most that many cores
    busy on average (runs recorded without the figure are kept)."""
    if max_others is not None:
        rows = [r for r in rows if _others(r) is None or _others(r) <= max_others]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["slide"], r["model"], r["tree"]), []).append(r)
    print(
        "slide  model  tree  runs  median s (range)  median MP/s  median CPU s (range)  "
        "other processes' cores (median)"
    )
    for (slide, model, tree), runs in sorted(groups.items()):
        secs = [r["seconds"] for r in runs]
        rate = statistics.median(r["t_ar"] / r["seconds"] for r in runs)
        cpu = [r["cpu_seconds"] for r in runs if "cpu_seconds" in r]
        cpu_text = f"{statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f})" if cpu else "-"
        others = [_others(r) for r in runs if _others(r) is not None]
        others_text = f"{statistics.median(others):.2f}" if others else "-"
        print(
            f"{slide}  {model}  {tree}  {len(runs)}  {statistics.median(secs):.2f} "
            f"({min(secs):.2f}-{max(secs):.2f})  {rate:.2f}  {cpu_text}  {others_text}"
        )
        for key, what in (("stages", "stages (median s)"), ("cpu_stages", "CPU s")):
            staged = [r[key] for r in runs if key in r]
            if staged:
                names = sorted({k for st in staged for k in st}, key=lambda k: -staged[0].get(k, 0))
                medians = {k: statistics.median(st.get(k, 0.0) for st in staged) for k in names}
                print(
                    f"    {what}: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in medians.items() if v >= 0.005)
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--out", type=Path, default=Path("bench-out") / "per-slide")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each slide (3)")
    parser.add_argument("--rounds", type=int, default=2, help="children per tree, interleaved")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads in the children, as an entry point would (default: torch's)",
    )
    parser.add_argument("--table", action="store_true", help="print recorded results only")
    parser.add_argument(
        "--max-others",
        type=float,
        default=None,
        metavar="CORES",
        help="summarise only the runs during which other processes kept at most CORES cores "
        "busy on average (Linux; each run records the figure)",
    )
    args = parser.parse_args()
    results = args.out / "results.jsonl"
    if not args.table:
        slides = args.out / "slides"
        tiny = ensure_field(slides, "oc-rich", 256, 1)
        fields = [ensure_field(slides, p, 2048, s) for p, s in (("oc-rich", 7), ("normal", 3))]
        runs = [(str(tiny), "classical")] + [(str(f), "default") for f in fields]
        trees = [t.partition("=")[::2] for t in args.tree]
        for _ in range(args.rounds):
            for label, path in trees:
                print(f"{label} ...", flush=True)
                for row in run_tree(label, path, runs, args.repeat, args.torch_threads):
                    with open(results, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line]
    summarise(rows, args.max_others)
    return 0


if __name__ == "__main__":
    sys.exit(main())
