"""Peak memory of tiled segmentation against slide width (it should not grow much).

Each (mode, width) runs in a child process, which prints the peak traced allocation
(tracemalloc) and the growth of peak resident memory (``VmHWM``) over the process's memory
before the run:

- ``label``: :func:`histo.segment.instances.label_band` on a 1216-row band (a 256-row margin, a
  704-row stride and a 256-row margin: the default tiling at 1 µm/px), made by repeating
  the class map, centre map and best non-cell class of a 1216 x 2048 synthetic field;
- ``slide``: :func:`histo.segment.segment_slide` on a 2048-row slide of that width (a
  synthetic 2048² section repeated along x), outputs discarded (a null sink), so only the
  segmentation's working memory counts.

    .venv/bin/python benchmarks/bench_segment_memory.py --widths 4096 8192 16384 32768
    .venv/bin/python benchmarks/bench_segment_memory.py --modes label --model classical
    # the implementation of another checkout (e.g. before a change): --src /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        pass


class _NullSink:
    def __setitem__(self, key, value) -> None:
        pass


class Workload(NamedTuple):
    """What a child times: ``run()`` returns the object counts; ``rows`` is its height (px)."""

    rows: int
    run: Callable[[], Any]


def _label_workload(model: Any, base: Any, width: int) -> Workload:
    """``label_band`` on one band of network scores, tiled to ``width`` px."""
    import numpy as np

    from histo.segment.instances import label_band

    n_cls = int(getattr(model, "n_outputs", 6)) - 1
    h = 1216
    scores = model.predict_scores(base[:h])
    cm0 = np.argmax(scores[:n_cls], axis=0).astype(np.uint8)
    alt0 = np.argmax(scores[:3], axis=0).astype(np.uint8)
    ce0 = np.asarray(scores[n_cls], np.float32)
    del scores
    reps = -(-width // cm0.shape[1])

    def tile(a):
        return np.ascontiguousarray(np.tile(a, (1, reps))[:, :width])

    cm, ce, alt = tile(cm0), tile(ce0), tile(alt0)
    out = (np.zeros((h, width), np.int32), np.zeros((h, width), np.int32))

    def run():
        try:
            return label_band(cm, ce, alt, 256, 960, 1.0, into=out)[3:]
        except TypeError:  # an implementation without ``into``
            return label_band(cm, ce, alt, 256, 960, 1.0)[3:]

    return Workload(h, run)


def _slide_workload(model: Any, base: Any, width: int) -> Workload:
    """``segment_slide`` of a 2048-row slide ``width`` px wide (the field repeated), outputs
    discarded."""
    import numpy as np

    from histo.segment import segment_slide

    h, bw = 2048, base.shape[1]

    def read(y, x, hh, ww):
        return np.take(base[y : y + hh], np.arange(x, x + ww) % bw, axis=1)

    sink = {"class_map": _NullSink(), "osteoclasts": _NullSink(), "osteocytes": _NullSink()}

    def run():
        r = segment_slide(read, model, sink=sink, shape=(h, width))
        return r.n_osteoclasts, r.n_osteocytes

    return Workload(h, run)


def child(mode: str, width: int, model_name: str) -> dict:
    import tracemalloc

    from histo.runtime import tune_gc, tune_malloc
    from histo.segment import load_model
    from histo.synth import make_section

    # the process settings of the ``histo`` command (the child is an entry point too)
    tune_malloc()
    tune_gc()

    model = load_model(model_name)
    base = make_section("normal", 2048, 1.0, seed=0).image
    make = _label_workload if mode == "label" else _slide_workload
    work = make(model, base, width)
    rss0 = _rss_kib()
    _reset_hwm()
    tracemalloc.start()
    t0 = time.perf_counter()
    counts = work.run()
    dt = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "mode": mode,
        "width": width,
        "rows": work.rows,
        "traced_peak_mib": round(traced / 2**20, 1),
        "rss_growth_mib": round((_hwm_kib() - rss0) / 1024, 1),
        "seconds": round(dt, 1),
        "counts": list(counts),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--modes", nargs="+", default=["label", "slide"], choices=["label", "slide"])
    ap.add_argument("--model", default="classical")
    ap.add_argument("--src", default=str(ROOT), help="checkout whose histo package to measure")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "WIDTH", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, width, model = args.child
        print(json.dumps(child(mode, int(width), model)), flush=True)
        return
    # PYTHONSAFEPATH: the child would otherwise import the working folder's histo first
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.src), PYTHONSAFEPATH="1")
    print(
        f"{'mode':6} {'width':>6} {'rows':>5} {'traced MiB':>11} {'RSS+ MiB':>9} {'s':>6}  counts"
    )
    for mode in args.modes:
        for width in args.widths:
            cmd = [sys.executable, __file__, "--child", mode, str(width), args.model]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.src)
            if p.returncode:
                print(f"{mode:6} {width:>6} failed: {p.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(
                f"{r['mode']:6} {r['width']:>6} {r['rows']:>5} {r['traced_peak_mib']:>11}"
                f" {r['rss_growth_mib']:>9} {r['seconds']:>6}  {r['counts']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
