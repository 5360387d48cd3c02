"""Screenshot of the plugin for the docs: ``python -m histo_napari._screenshot docs/napari.png``.

Opens a viewer, loads the oc-rich sample, docks the Histomorphometry widget, runs the analysis
to completion and saves the whole window (run under ``xvfb-run`` on a headless machine; the
Makefile's ``screenshot`` target does).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--model", default="default", help="model name (default: default)")
    parser.add_argument("--size", type=int, default=1024, help="sample size in pixels")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", message="System theme detection")  # PyQt5 notice

    import napari

    from histo_napari._sample_data import make_sample
    from histo_napari._widget import HistoWidget

    viewer = napari.Viewer(title="histo", show=True)
    viewer.window._qt_window.resize(1400, 900)
    for data, kwargs, kind in make_sample("oc-rich", size=args.size):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = HistoWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Histomorphometry", area="right")
    if args.model not in widget.section.model.choices:
        print(f"unknown model {args.model!r}", file=sys.stderr)
        return 2
    widget.section.model.value = args.model
    output = widget.run_blocking()
    if output is None:
        print(f"analysis failed: {widget.last_error}", file=sys.stderr)
        return 1
    for layer in viewer.layers:
        if layer.name.endswith(" osteoclasts"):
            layer.visible = False
    viewer.reset_view()
    _close_toasts(viewer)
    viewer.screenshot(args.out, canvas_only=False)
    viewer.close()
    print(f"wrote {args.out}: {output.result.phenotype.phenotype} in {output.seconds:.1f} s")
    return 0


def _close_toasts(viewer) -> None:
    """Close notification pop-ups so that they do not cover the canvas."""
    from qtpy.QtWidgets import QApplication

    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    QApplication.processEvents()


if __name__ == "__main__":
    raise SystemExit(main())
