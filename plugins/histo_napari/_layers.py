"""Result layers: the class map, instances and osteoclast centres of a run, over its image.

The layers are built in the worker that produced the result (napari layers are models
without Qt: building them, with the imports and validation that come with it, is the slow
part); the GUI thread only puts them in the viewer, in place of the previous ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Labels, Layer, Points

from histo import classes
from histo.palette import class_rgba
from histo_napari._geometry import Placement

if TYPE_CHECKING:
    import napari

    from histo_napari._worker import AnalysisOutput

#: outline colour of the osteoclast-centre rings
CENTRE_COLOR = "#ff2060"
#: colour of the blocks where the network is unsure
LOW_COLOR = "#ffd000"
#: layer properties the user may have changed that survive a new run or re-measure
KEPT_PROPERTIES = ("opacity", "visible", "blending")
#: pause (ms) between putting two result layers in the viewer
LAYER_STAGGER_MS = 25
#: a labels layer's editing overlays (polygon tool, brush outline): napari builds their
#: visuals when the layer joins the viewer, which took as long as the layer's own visual
DEFERRED_OVERLAYS = ("polygon", "brush_stroke")


def class_colormap() -> Any:
    """napari colormap of the class codes (the project's palette; background clear)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=class_rgba())


def _maps_to_show(output: AnalysisOutput) -> dict[str, Any]:
    """Layer data of a run's maps: lazy pyramids from its store, or in-memory arrays.

    The in-memory class map is a copy: the user paints it.
    """
    if output.levels is not None:
        return {name: arrays for name, (arrays, _) in output.levels.items()}
    r = output.result
    return {
        "class_map": np.array(r.class_map, dtype=np.uint8, copy=True),
        "osteoclasts": np.asarray(r.osteoclast_labels),
        "osteocytes": np.asarray(r.osteocyte_labels),
    }


def run_layers(output: AnalysisOutput) -> dict[str, Layer]:
    """The layers of a run (worker thread): instances, class map and osteoclast centres."""
    r = output.result
    place = output.placement
    maps = _maps_to_show(output)
    lazy = output.levels is not None
    meta = {"pixel_size_um": float(r.pixel_size_um), "slide_name": r.name}
    meta["histo_run"] = id(output)
    common = {"scale": place.scale, "translate": place.translate, "multiscale": lazy}
    common.update(_units(place))

    def labels(key: str, suffix: str, **kwargs: Any) -> Labels:
        metadata = {**meta, "histo_kind": key}
        return Labels(maps[key], name=f"{r.name} {suffix}", metadata=metadata, **common, **kwargs)

    layers = {
        "osteocytes": labels("osteocytes", "osteocytes", opacity=0.7, visible=False),
        "osteoclasts": labels("osteoclasts", "osteoclasts", opacity=0.8),
        "class_map": labels("class_map", "classes", opacity=0.45, colormap=class_colormap()),
    }
    if not lazy:  # outlines are computed on the GUI thread at every redraw
        layers["osteoclasts"].contour = 2
    layers["class_map"].selected_label = classes.MARROW
    layers["points"] = centres_layer(r.measurement, place, r.name)
    unsure = low_confidence_layer(getattr(r, "low_confidence", None), place, r.name)
    if unsure is not None:
        layers["low_confidence"] = unsure
    return layers


def low_confidence_layer(unsure: Any, place: Placement, slide_name: str) -> Labels | None:
    """The blocks where the network was unsure (label 1), over maps placed at ``place``.

    ``unsure`` is a :class:`histo.qc._confidence.LowConfidenceMap` (blocks of working pixels,
    kept coarse by the pipeline so a whole slide's map stays small); None without one, or
    when no block is unsure (an empty layer would only cost the GUI thread its visual).
    """
    if unsure is None or not np.any(unsure.mask):
        return None
    b = float(unsure.block_px)
    # block (i, j) covers working pixels [i b, (i + 1) b): its centre is at i b + (b - 1) / 2
    step = np.asarray(place.scale, float)
    scale = tuple(b * step)
    translate = tuple(np.asarray(place.translate, float) + (b - 1) / 2 * step)
    return Labels(
        unsure.mask,
        name=f"{slide_name} low confidence",
        scale=scale,
        translate=translate,
        opacity=0.5,
        colormap=_low_confidence_colormap(),
        metadata={
            "histo_kind": "low_confidence",
            "slide_name": slide_name,
            "low_margin": float(unsure.low_margin),
            "block_px": int(unsure.block_px),
        },
        **_units(place),
    )


def _low_confidence_colormap() -> Any:
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: LOW_COLOR})


def centres_layer(measurement: Any, place: Placement, slide_name: str) -> Points:
    """A point per counted osteoclast, with its features, over maps placed at ``place``."""
    rows = measurement.osteoclasts
    f = place.scale[-1] / float(measurement.pixel_size_um)  # world units per µm
    coords = np.array([[r["centroid_y_um"], r["centroid_x_um"]] for r in rows], float)
    features = {
        key: np.array([r.get(key, math.nan) for r in rows], float)
        for key in ("area_um2", "bone_contact_um", "nuclei")
    }
    return Points(
        coords.reshape(-1, 2),
        name=f"{slide_name} osteoclast centres",
        features=features,
        scale=(f, f),
        translate=place.translate,
        size=12.0,
        symbol="ring",
        face_color="transparent",
        border_color=CENTRE_COLOR,
        border_width=0.15,
        metadata={"histo_kind": "osteoclast_points"},
        **_units(Placement((f, f), place.translate, f)),
    )


def warm_up() -> None:
    """Build a tiny result layer of each kind once, when the widget opens.

    The first layers built import and initialise much (unit registry, data frames, colour
    maps); in a worker that would compete with the GUI thread for the interpreter at the
    moment results arrive.
    """
    place = Placement((1.0, 1.0), (0.0, 0.0))
    Labels(np.zeros((2, 2), np.uint8), colormap=class_colormap(), **_units(place))
    centres_layer(SimpleNamespace(osteoclasts=[], pixel_size_um=1.0), place, "warm-up")


#: characters vispy's text visual measures before it lays out any text, even an empty one
#: (``vispy.visuals.text.text._text_to_vbo``)
LAYOUT_GLYPHS = "ÅÉÑŐjgpqy"


def warm_glyphs(viewer: napari.Viewer) -> None:
    """Render the glyphs of the canvas's font that the first text visual drawn needs.

    A points layer carries a text visual, empty or not; the first one drawn in a viewer
    renders these glyphs (signed distance fields, on the CPU) within that paint, on top of
    the compilation of the layer's shaders. Done here, they are ready in the font's cache.
    The viewer's Qt side is found among the application's windows (a plugin's viewer is a
    proxy that does not lead to it); nothing is done for a viewer without one.
    """
    from napari.qt import QtViewer
    from qtpy.QtWidgets import QApplication

    model = getattr(viewer, "__wrapped__", viewer)  # the viewer behind a plugin's proxy
    windows = QApplication.topLevelWidgets()
    found = (w if isinstance(w, QtViewer) else w.findChild(QtViewer) for w in windows)
    qt_viewer = next((q for q in found if q is not None and q.viewer is model), None)
    if qt_viewer is None:
        return
    info = qt_viewer.canvas.font_info()
    font = info.font_manager.get_font(info.face)
    for char in LAYOUT_GLYPHS:
        font[char]


def in_turns(steps: list[Callable[[], None]], then: Callable[[], None] | None = None) -> None:
    """Run ``steps`` on the GUI thread one per turn of the event loop, then ``then``."""
    from qtpy.QtCore import QTimer

    pending = list(steps)

    def run_next() -> None:
        if not pending:
            if then is not None:
                then()
            return
        try:
            pending.pop(0)()
        finally:  # a failed step still lets the others and ``then`` run
            # a delay, not 0: other timers and input get their turn between two steps
            QTimer.singleShot(LAYER_STAGGER_MS, run_next)

    QTimer.singleShot(0, run_next)


def run_events_until(done: Callable[[], bool], timeout_s: float) -> None:
    """Run a Qt event loop until ``done()`` (checked every 10 ms) or the timeout.

    An event loop, not ``processEvents`` in a loop: only a running loop deletes the widgets
    napari closes with ``deleteLater``, among them the progress bar of ``viewer.open``, whose
    status-bar spinner otherwise animates, repainting the window, until the loop runs.
    """
    from qtpy.QtCore import QEventLoop, QTimer

    t_end = time.monotonic() + timeout_s
    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: loop.quit() if done() or time.monotonic() >= t_end else None)
    if not done():
        timer.start()
        loop.exec()
        timer.stop()


def collect_garbage() -> None:
    """A full collection of Python's cyclic garbage collector, in a turn of its own.

    An analysis leaves enough long-lived objects behind that the collector's next full
    pass comes due while its results are being shown; that pass walks every object of the
    process, napari's included, and in the same turn as a new layer it blocked the GUI
    thread twice as long. Done first, the pass is alone in its turn and frees the
    analysis's garbage before the layers are built. What :func:`freeze_survivors` froze
    after the last display is collected again with the rest.
    """
    import gc

    gc.unfreeze()
    gc.collect()


def freeze_survivors() -> None:
    """Exempt every object alive now (napari's and the shown results) from the collector's
    passes until the next :func:`collect_garbage`.

    A full pass walks every object of the process: 0.10-0.17 s on an idle machine once
    napari and a slide's results are in, and it runs in whichever thread allocates when it
    comes due, a worker's included, holding up the GUI thread all that time. Frozen, the
    long-lived objects are left out and a pass walks only what was made since.
    """
    import gc

    gc.freeze()


def detach_overlays(layer: Layer) -> dict[str, Any]:
    """Take a labels layer's editing overlays off it before it joins the viewer.

    Put back one per turn with :func:`attach_overlay`, their visuals are built in steps
    short enough to keep the GUI live. Nothing is taken where napari keeps no such overlays.
    """
    overlays = getattr(layer, "_overlays", None)
    if not isinstance(layer, Labels) or overlays is None:
        return {}
    return {name: overlays.pop(name) for name in DEFERRED_OVERLAYS if name in overlays}


def attach_overlay(layer: Layer, name: str, overlay: Any) -> None:
    """Give back an overlay :func:`detach_overlays` took (its visual is built now)."""
    layer._overlays[name] = overlay


def thaw(*_: object) -> None:
    """Undo :func:`freeze_survivors` (when the widget goes: what it froze is not its own)."""
    import gc

    gc.unfreeze()


def _units(place: Placement) -> dict[str, Any]:
    return {"units": place.units} if place.units is not None else {}


class ResultLayers:
    """The result layers in the viewer: a new run or re-measure takes the old ones' places."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.viewer = viewer
        self._layers: dict[str, Layer] = {}
        self._hidden: dict[str, Layer] = {}  #: put in the viewer hidden, to be shown

    def get(self, key: str) -> Layer | None:
        """The result layer ``key`` if it is still in the viewer."""
        layer = self._layers.get(key)
        return layer if layer is not None and layer in self.viewer.layers else None

    def _previous(self, key: str, new: Layer) -> Layer | None:
        same_name = (
            lyr
            for lyr in self.viewer.layers
            if lyr.name == new.name and lyr._type_string == new._type_string
        )
        return self.get(key) or next(same_name, None)

    def show(
        self,
        layers: dict[str, Layer],
        then: Callable[[], None] | None = None,
        collect_first: bool = False,
    ) -> None:
        """Put prepared layers in the viewer (GUI thread), each where its predecessor was.

        One step per turn of the event loop, starting at the next: a layer joins the viewer
        hidden (napari builds its visual and controls), is shown (its data are sliced and
        drawn for the first time), then gets back its editing overlays one by one. napari
        does all of it on the GUI thread, and each turn ends with the window's repaint, so
        adding a layer at once would block the GUI thread that much longer. With
        ``collect_first`` (after an analysis), :func:`collect_garbage` is the first step and
        :func:`freeze_survivors` the last.
        ``then`` is called once the last step is done.
        """
        pending: list[Callable[[], None]] = [collect_garbage] if collect_first else []
        for key, layer in layers.items():
            overlays = detach_overlays(layer)
            pending += [partial(self._put, key, layer), partial(self._reveal, key)]
            pending += [partial(attach_overlay, layer, name, o) for name, o in overlays.items()]
        in_turns(pending + ([freeze_survivors] if collect_first else []), then)

    def drop(self, key: str) -> None:
        """Remove the result layer ``key`` (a run without it must not leave the last one's)."""
        layer = self.get(key)
        if layer is not None:
            self.viewer.layers.remove(layer)
        self._layers.pop(key, None)

    def _put(self, key: str, new: Layer) -> None:
        old = self._previous(key, new)
        if isinstance(old, Points):  # cheaper than a new visual: take the new points
            old.data, old.features = new.data, new.features
            old.scale, old.translate = new.scale, new.translate
            self._layers[key] = old
            return
        if old is not None:
            for name in KEPT_PROPERTIES:
                setattr(new, name, getattr(old, name))
        if new.visible:  # drawn first in a turn of its own, by _reveal
            new.visible = False
            self._hidden[key] = new
        if old is None:
            self.viewer.layers.append(new)
        else:
            index = self.viewer.layers.index(old)
            self.viewer.layers.remove(old)
            self.viewer.layers.insert(index, new)
        self._layers[key] = new

    def _reveal(self, key: str) -> None:
        """Show a layer :meth:`_put` hid (napari slices a hidden layer only once shown)."""
        layer = self._hidden.pop(key, None)
        if layer is not None and layer in self.viewer.layers:
            layer.visible = True

    def instances_of(self, cmap_layer: Layer) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The run's osteoclast and osteocyte instances shown beside ``cmap_layer``."""
        out = []
        for key in ("osteoclasts", "osteocytes"):
            layer = self.get(key)
            same_run = layer is not None and (
                layer.metadata.get("histo_run") == cmap_layer.metadata.get("histo_run")
            )
            out.append(np.asarray(layer.data) if same_run else None)
        return out[0], out[1]
