"""Screenshot of the plugin for the docs: ``python -m histo_napari._screenshot docs/napari.png``.

Opens a viewer, loads the oc-rich sample, docks the Histomorphometry widget, runs the analysis
to completion and saves the whole window (run under ``xvfb-run`` on a headless machine; the
Makefile's ``screenshot`` target does). With ``--train MINUTES`` it then paints scribbles from
the sample's truth, trains on them with Train on corrections (the real fine-tuning, models
written to a temporary ``$HISTO_MODELS``) and shows the comparison of the two runs.
``--palette`` saves 256 colours, as the docs keep their pictures.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--model", default="default", help="model name (default: default)")
    parser.add_argument("--size", type=int, default=1024, help="sample size in pixels")
    parser.add_argument(
        "--train", type=float, metavar="MINUTES", help="then fine-tune on scribbles this long"
    )
    parser.add_argument(
        "--palette", action="store_true", help="save 256 colours (a docs picture of ~200 KB)"
    )
    args = parser.parse_args(argv)
    if args.train is not None:
        import os
        import tempfile

        os.environ["HISTO_MODELS"] = tempfile.mkdtemp(prefix="histo-models-")

    import warnings

    warnings.filterwarnings("ignore", message="System theme detection")  # PyQt5 notice

    import napari

    from histo_napari._sample_data import make_sample
    from histo_napari._widget import HistoWidget

    viewer = napari.Viewer(title="histo", show=True)
    viewer.window._qt_window.resize(1400, 900 if args.train is None else 1500)
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
    if args.train is not None:
        _train_on_scribbles(widget, args.size, args.train)
    viewer.reset_view()
    _close_toasts(viewer)
    if args.train is not None:
        _scroll_to_bottom(widget)
    viewer.screenshot(args.out, canvas_only=False)
    if args.palette:
        to_palette(args.out)
    viewer.close()
    print(f"wrote {args.out}: {output.result.phenotype.phenotype} in {output.seconds:.1f} s")
    return 0


def _train_on_scribbles(widget, size: int, minutes: float) -> None:
    """Scribbles every 32nd row of the sample's truth, then Train on corrections, waited for."""
    from histo.synth import make_section
    from histo_napari._sample_data import SAMPLE_PIXEL_SIZE_UM, SEEDS

    px = SAMPLE_PIXEL_SIZE_UM
    truth = make_section("oc-rich", size=size, pixel_size_um=px, seed=SEEDS["oc-rich"]).class_map
    layer = widget.train.new_scribble_layer()
    layer.data[::32] = truth[::32]
    layer.refresh()
    widget.train.layers.value = [layer]
    widget.train.model_name.value = "my-lab"
    widget.train.minutes.value = minutes
    widget.train.train()
    widget.train.wait()
    layer.visible = False


def _scroll_to_bottom(widget, timeout_s: float = 10.0) -> None:
    """Scroll the widget's panels to the end (the comparison table), once their layout has
    settled: a new table's height climbs to the scroll area in rounds of layout requests, and
    the scroll bar that then appears narrows the panels and re-wraps their text."""
    import time

    from histo_napari._layers import run_events_until

    bar = widget.scroll.verticalScrollBar()
    t_end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < t_end:
        run_events_until(lambda: False, 0.2)
        bar.setValue(bar.maximum())
        if (bar.maximum(), bar.value()) == last:
            return
        last = (bar.maximum(), bar.value())


def to_palette(path: str) -> None:
    """Rewrite a PNG with 256 colours (octree, no dithering: flat widgets stay flat and the
    class colours exact), a quarter of its RGBA size."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    rgb.quantize(256, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)


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
