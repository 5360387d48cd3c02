"""The widget on one slide: time, peak memory and GUI stalls of run, display and re-measure.

``python -m histo_napari._bench SLIDE [--model classical] [--out DIR] [--region PX] [--cli]``
(under ``xvfb-run`` on a headless machine) opens the slide in a viewer, runs the
Histomorphometry widget on it, re-measures, and prints the wall time, the longest and
99th-percentile gaps of a 20 ms GUI timer in each phase (how long the GUI thread was blocked)
and the process's peak resident memory. ``--region PX`` then corrects a square of that side
at the slide's centre (load, paint an osteoclast, apply, re-measure) and times each step;
``--cli`` times ``histo analyze`` on the same slide in a child process, for comparison.
"""

from __future__ import annotations

import argparse
import time


class StallProbe:
    """Gaps between ticks of a QTimer: how long the GUI thread could not run its events.

    The gaps include entering to the first tick and the last tick to leaving, so a phase that
    blocked the GUI thread throughout shows as one long gap, however few ticks it had.
    """

    def __init__(self, interval_ms: int = 20) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.last: float | None = None
        self.gaps_s: list[float] = []
        self.ticks = 0

    @property
    def longest_gap_s(self) -> float:
        """The longest gap between two ticks (s)."""
        return max(self.gaps_s, default=0.0)

    def gap_percentile_s(self, q: float) -> float:
        """The q-th percentile of the gaps between ticks (s)."""
        import numpy as np

        return float(np.percentile(self.gaps_s, q)) if self.gaps_s else 0.0

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.gaps_s.append(now - self.last)
        self.last = now
        self.ticks += 1

    def __enter__(self) -> StallProbe:
        self.last = time.perf_counter()
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.stop()
        self.gaps_s.append(time.perf_counter() - self.last)


class PeakRss:
    """Peak resident memory (MiB) of a child process, polled from /proc (Linux)."""

    @staticmethod
    def of(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def run_cli(slide: str, out: str, model: str) -> tuple[float, float]:
    """``histo analyze SLIDE --out OUT`` in a child process: (wall seconds, peak RSS MiB)."""
    import os
    import subprocess
    import sys

    code = "from histo.cli import main; raise SystemExit(main())"
    cmd = [sys.executable, "-c", code, "analyze", slide, "--out", out, "--model", model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, PeakRss.of(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"histo analyze failed ({proc.returncode})")
    return time.perf_counter() - t0, peak


def wait_for_result(widget) -> None:
    """Run Qt's event loop until the widget's worker has handed over its result.

    The display starts there: the result layers go in over the turns of the event loop
    that follow, possibly before the worker thread has finished.
    """
    from histo_napari._layers import run_events_until

    run_events_until(lambda: widget.worker is None or widget.showing, 600.0)


def bench_region(viewer, widget, side_px: int) -> None:
    """Load a ``side_px`` square at the slide's centre, paint an osteoclast, apply, re-measure."""
    import numpy as np

    from histo import classes

    layer = widget.correct.class_map.value
    h, w = layer.data[0].shape[-2:]
    y0, x0 = (h - side_px) // 2, (w - side_px) // 2
    corners = np.array(
        [layer.data_to_world((y0, x0)), layer.data_to_world((y0 + side_px, x0 + side_px))]
    )
    viewer.add_shapes(
        [corners[:, -2:]], shape_type="rectangle", name="region", units=layer.units[-2:]
    )
    # the user draws the rectangle before pressing Load: its first paint is not the load's
    from histo_napari._layers import run_events_until

    t_drawn = time.monotonic() + 0.5
    run_events_until(lambda: time.monotonic() > t_drawn, 1.0)
    t0 = time.perf_counter()
    with StallProbe() as load:
        widget.region_edit.load_rectangle()
        widget.wait()
    t_load = time.perf_counter() - t0
    region = widget.region_edit.layer
    region.data[side_px // 2 - 12 : side_px // 2 + 12, side_px // 2 - 12 : side_px // 2 + 12] = (
        classes.OSTEOCLAST
    )
    t0 = time.perf_counter()
    with StallProbe() as apply:
        widget.region_edit.apply()
        widget.wait()
    t_apply = time.perf_counter() - t0
    with StallProbe() as remeasure:
        widget.remeasure()
        widget.wait()
    print(
        f"region {side_px}² px: load {t_load:.2f} s, apply {t_apply:.2f} s "
        f"(write {widget.region_edit.last_write.seconds:.2f} s), "
        f"re-measure (all blocks streamed) {widget.last_remeasure_seconds:.1f} s, "
        f"error: {widget.last_error}"
    )
    for phase, probe in (("load", load), ("apply", apply), ("re-measure", remeasure)):
        print(f"region {phase}: longest GUI gap {probe.longest_gap_s:.3f} s")


def save_screenshot(viewer, widget, path: str) -> None:
    """The window with the corrected region in view (for docs/plugin.md)."""
    from napari.layers import Shapes

    viewer.window._qt_window.resize(1600, 1000)  # as _screenshot does
    for layer in viewer.layers:
        if isinstance(layer, Shapes):
            layer.visible = False
    region = widget.region_edit.layer
    h, w = region.data.shape
    viewer.scene.camera.center = tuple(region.data_to_world((h / 2, w / 2)))[-2:]
    viewer.scene.camera.zoom = 0.5 * min(viewer.canvas.size) / max(h, w)
    viewer.layers.selection.active = region
    widget.wait(2.0)
    viewer.screenshot(path, canvas_only=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", help="slide file the histo reader opens")
    parser.add_argument("--model", default="classical", help="model name (default: classical)")
    parser.add_argument("--out", help="output folder of the widget (and of histo analyze)")
    parser.add_argument("--region", type=int, default=0, help="edit a square of this side (px)")
    parser.add_argument("--cli", action="store_true", help="also time `histo analyze`")
    parser.add_argument("--screenshot", help="PNG of the window after the region's apply")
    args = parser.parse_args(argv)
    status = bench_widget(args)
    if args.cli:
        from pathlib import Path

        out = str(Path(args.out or "bench-out/napari") / "cli")
        seconds, peak = run_cli(args.slide, out, args.model)
        print(f"histo analyze: {seconds:.1f} s, peak RSS {peak:.0f} MiB")
    return status


def bench_widget(args: argparse.Namespace) -> int:
    """The widget on the slide: run, display, re-measure, optionally a region; peak RSS."""
    import resource
    from pathlib import Path

    import napari

    from histo_napari._widget import HistoWidget

    viewer = napari.Viewer(title="histo bench", show=True)
    viewer.open(args.slide, plugin="histo")
    widget = HistoWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Histomorphometry")
    widget.section.model.value = args.model
    if args.out:
        widget.section.out_dir.value = Path(args.out) / "widget"
    t0 = time.perf_counter()
    with StallProbe() as run:
        widget.run()
        wait_for_result(widget)
    t_run = time.perf_counter() - t0
    with StallProbe() as display:
        widget.wait()
    t_shown = time.perf_counter() - t0
    with StallProbe() as remeasure:
        widget.remeasure()
        widget.wait()
    print(f"run {t_run:.1f} s, shown at {t_shown:.1f} s, error: {widget.last_error}")
    print(f"re-measure {widget.last_remeasure_seconds or float('nan'):.1f} s")
    for phase, probe in (("run", run), ("display", display), ("re-measure", remeasure)):
        print(
            f"{phase}: longest GUI gap {probe.longest_gap_s:.3f} s, "
            f"99th percentile {probe.gap_percentile_s(99):.3f} s"
        )
    if args.region and widget.last_error is None:
        bench_region(viewer, widget, args.region)
        if args.screenshot:
            save_screenshot(viewer, widget, args.screenshot)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of napari + plugin {peak_mib:.0f} MiB")
    viewer.close()
    return 0 if widget.last_error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
