"""The widget on one slide: time, peak memory and GUI stalls of run, display and re-measure.

``python -m histo_napari._bench SLIDE [--model classical]`` (under ``xvfb-run`` on a headless
machine) opens the slide in a viewer, runs the Histomorphometry widget on it, re-measures,
and prints the wall time, the longest and 99th-percentile gaps of a 20 ms GUI timer in each
phase (how long the GUI thread was blocked) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import time


class StallProbe:
    """Gaps between ticks of a QTimer: how long the GUI thread could not run its events."""

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
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", help="slide file the histo reader opens")
    parser.add_argument("--model", default="classical", help="model name (default: classical)")
    args = parser.parse_args(argv)

    import resource

    import napari

    from histo_napari._widget import HistoWidget

    viewer = napari.Viewer(title="histo bench", show=True)
    viewer.open(args.slide, plugin="histo")
    widget = HistoWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Histomorphometry")
    widget.section.model.value = args.model
    t0 = time.perf_counter()
    with StallProbe() as run:
        widget.run()
        while widget.worker is not None:
            widget.wait(0.05)
    t_run = time.perf_counter() - t0
    with StallProbe() as display:
        widget.wait()
    t_shown = time.perf_counter() - t0
    with StallProbe() as remeasure:
        widget.remeasure()
        widget.wait()
    print(f"run {t_run:.1f} s, shown at {t_shown:.1f} s, error: {widget.last_error}")
    for phase, probe in (("run", run), ("display", display), ("re-measure", remeasure)):
        print(
            f"{phase}: longest GUI gap {probe.longest_gap_s:.3f} s, "
            f"99th percentile {probe.gap_percentile_s(99):.3f} s"
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB")
    viewer.close()
    return 0 if widget.last_error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
