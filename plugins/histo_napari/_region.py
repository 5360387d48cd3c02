"""Correcting a region of a whole slide: load it as an editable layer, paint, apply.

A whole slide's class map is shown from its ``labels.ome.zarr`` as a lazy pyramid that cannot
be painted. **Load view** (the part of the slide on screen) or **Load rectangle** (the last
shape of the selected shapes layer) reads the region's full-resolution class map in a worker
and shows it as a labels layer over the slide, at its place in µm. The user paints and erases
in it; **Apply** writes it back into the store in a worker
(:func:`histo.io.region_edit.write_labels_region`: instance maps and pyramid levels follow,
atomically) and the slide's layers show the change. **Re-measure** then measures the edited
store block by block. Applied regions are kept (:attr:`RegionEditor.applied`): Train on
corrections offers them (:meth:`AppliedRegion.labelled_field`), and **Export corrections**
writes them as the image and class-map pairs ``histo finetune`` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from magicgui.widgets import Container, Label, PushButton
from napari.layers import Labels, Shapes
from psygnal import Signal

from histo import classes
from histo.errors import HistoError
from histo.io.region_edit import PixelBox, RegionWrite
from histo_napari._geometry import Placement
from histo_napari._layers import attach_overlay, detach_overlays, in_turns

if TYPE_CHECKING:
    from napari.layers import Layer

    from histo_napari._widget import HistoWidget

#: the largest region loaded for editing (full-resolution pixels): the class map is held in
#: memory and writing it back labels its instances on it
REGION_MAX_PX = 3072 * 3072
#: layer metadata kind of an editable region (not "class_map": the form must not pick it)
REGION_KIND = "region_class_map"


@dataclass(frozen=True, eq=False)  # eq=False: one choice each in Train on corrections
class AppliedRegion:
    """A region written back into a slide's store, and the slide it was computed from."""

    store: Path
    box: PixelBox
    slide: Any  #: slide path or RGB array (None: unknown)
    slide_pixel_size_um: float | None
    slide_name: str = "slide"

    @property
    def name(self) -> str:
        """What the region is called in Train on corrections and in ``model.json``."""
        b = self.box
        return f"{self.slide_name} region y {b.y0}-{b.y1}, x {b.x0}-{b.x1} px"

    def check(self) -> None:
        """Raise HistoError when the region cannot be read for training (GUI thread)."""
        if self.slide is None:
            raise HistoError(f"{self.name}: its slide is not known: analyse the slide again")
        if not self.store.exists():
            raise HistoError(f"{self.name}: its labels.ome.zarr is gone: apply it again")

    def training_example(self) -> Any:
        """(image, class map, pixel size) of the corrected region (reads the slide; run it
        in a worker). See :func:`histo.io.region_edit.correction_example`."""
        from histo.io.region_edit import correction_example

        self.check()
        return correction_example(
            self.slide, self.store, self.box, slide_pixel_size_um=self.slide_pixel_size_um
        )

    def labelled_field(self) -> Any:
        """The corrected region as a ``histo.finetune.LabelledField`` (worker thread)."""
        from histo.finetune import LabelledField

        example = self.training_example()
        source = None if isinstance(self.slide, np.ndarray) else str(self.slide)
        return LabelledField(
            image=example.image,
            class_map=example.class_map,
            pixel_size_um=example.pixel_size_um,
            name=self.name,
            source=source,
            class_map_source=str(self.store),
        )


def export_regions(regions: list[AppliedRegion], folder: Path) -> list[Path]:
    """Write each region as ``NAME.ome.tif`` and ``NAME.classes.tif`` in ``folder``, the pairs
    ``histo finetune FOLDER`` reads (worker thread); returns the class maps written."""
    from histo.io.region_edit import correction_name, write_correction_pair

    written = []
    for region in regions:
        name = correction_name(region.slide_name, region.box)
        written.append(write_correction_pair(region.training_example(), folder, name).class_map)
    return written


class Target(NamedTuple):
    """The whole-slide class map a region is taken from."""

    layer: Layer  #: its lazy multiscale labels layer
    store: Path  #: its labels.ome.zarr
    place: Placement  #: where its full-resolution pixels lie in the world


def box_of_world(place: Placement, corners_world: np.ndarray, shape: tuple[int, int]) -> PixelBox:
    """The pixels (centres at integers) whose centres lie in the box around world points."""
    px = place.world_to_px(np.asarray(corners_world, float))
    lo, hi = px.min(axis=0), px.max(axis=0)
    y0, x0 = (math.floor(v + 0.5) for v in lo)
    y1, x1 = (math.floor(v + 0.5) for v in hi)
    return PixelBox(y0, x0, max(y1, y0 + 1), max(x1, x0 + 1)).clipped(shape)


def view_corners(viewer: Any) -> np.ndarray:
    """World (y, x) corners of what the canvas shows (the camera's centre and zoom)."""
    scene = getattr(viewer, "scene", None)
    camera = scene.camera if scene is not None else viewer.camera
    size = getattr(getattr(viewer, "canvas", None), "size", None) or viewer._canvas_size
    centre = np.asarray(camera.center, float)[-2:]
    half = np.asarray(size, float)[-2:] / (2 * float(camera.zoom))
    return np.array([centre - half, centre + half])


def _checked_size(box: PixelBox) -> PixelBox:
    h, w = box.shape
    if h < 1 or w < 1:
        raise HistoError("the region lies outside the slide")
    if h * w > REGION_MAX_PX:
        raise HistoError(
            f"the region is {w} × {h} px; at most {REGION_MAX_PX / 2**20:.0f} Mpx can be "
            "edited at once: zoom in or draw a smaller rectangle"
        )
    return box


def region_layer(target: Target, box: PixelBox, name: str) -> Labels:
    """Read a region's class map and make its editable layer (worker thread)."""
    from histo.io.region_edit import read_labels_region
    from histo_napari._layers import class_colormap

    store = target.store
    region = read_labels_region(store, box)
    sy, sx = target.place.scale
    ty, tx = target.place.translate
    layer = Labels(
        region.class_map,
        name=f"{name} region",
        scale=(sy, sx),
        translate=(ty + region.box.y0 * sy, tx + region.box.x0 * sx),
        colormap=class_colormap(),
        opacity=0.7,
        metadata={"histo_kind": REGION_KIND, "histo_box": region.box, "histo_store": str(store)},
        **({"units": target.place.units} if target.place.units else {}),
    )
    layer.selected_label = classes.MARROW
    return layer


class RegionEditor(Container):
    """Load a region of a whole slide as an editable layer, then write it back (Apply)."""

    #: emitted with each :class:`AppliedRegion` once written (Train on corrections offers it)
    region_applied = Signal(object)
    #: emitted with a store whose applied regions a new run wrote over
    regions_forgotten = Signal(object)

    def __init__(self, widget: HistoWidget) -> None:
        self.widget = widget
        self.load_view_button = PushButton(
            text="Load view", tooltip="Edit the part of the slide on screen (zoom in first)."
        )
        self.load_rect_button = PushButton(
            text="Load rectangle", tooltip="Edit the last shape of the selected shapes layer."
        )
        self.apply_button = PushButton(
            text="Apply", tooltip="Write the edited region into the slide's labels.ome.zarr."
        )
        self.export_button = PushButton(
            text="Export corrections…",
            tooltip="Write each applied region as NAME.ome.tif and NAME.classes.tif in a "
            "folder: what `histo finetune FOLDER` trains on.",
        )
        self.info = Label(value="")
        buttons = Container(
            widgets=[self.load_view_button, self.load_rect_button, self.apply_button],
            layout="horizontal",
            labels=False,
        )
        buttons.margins = (0, 0, 0, 0)
        applied = Container(
            widgets=[self.info, self.export_button], layout="horizontal", labels=False
        )
        applied.margins = (0, 0, 0, 0)
        super().__init__(widgets=[buttons, applied], labels=False)
        self.layer: Labels | None = None  #: the editable region shown now
        self.applied: list[AppliedRegion] = []  #: regions written back, oldest first
        self.last_write: RegionWrite | None = None
        self.load_view_button.changed.connect(lambda: self.load_view())
        self.load_rect_button.changed.connect(lambda: self.load_rectangle())
        self.apply_button.changed.connect(lambda: self.apply())
        self.export_button.changed.connect(lambda: self.export_corrections())

    # ---- what is edited
    def target(self) -> Target:
        """The whole-slide class map chosen in the widget and its store."""
        w = self.widget
        layer = w.correct.class_map.value
        if layer is None or not layer.multiscale:
            raise HistoError(
                "no whole-slide class map: analyse a large slide or open its labels.ome.zarr"
            )
        out = w.output
        store = None
        if out is not None and layer.metadata.get("histo_run") == id(out):
            store = out.store
        elif str(layer.metadata.get("histo_path", "")).endswith(".zarr"):
            store = Path(layer.metadata["histo_path"])
        if store is None:
            raise HistoError(f"'{layer.name}' has no labels.ome.zarr to write corrections to")
        return Target(layer, Path(store), Placement.of_layer(layer))

    def _shape(self, target: Target) -> tuple[int, int]:
        return tuple(int(n) for n in target.layer.data[0].shape[-2:])

    def rectangle_box(self, target: Target) -> PixelBox:
        """The box of the last shape of the selected (else the newest) shapes layer."""
        viewer = self.widget.viewer
        active = viewer.layers.selection.active
        shapes = [lyr for lyr in viewer.layers if isinstance(lyr, Shapes) and len(lyr.data)]
        layer = active if isinstance(active, Shapes) and len(active.data) else None
        layer = layer or (shapes[-1] if shapes else None)
        if layer is None:
            raise HistoError("draw a rectangle in a shapes layer first")
        if self.widget.section.region.value is layer:  # picked as the measured region when
            self.widget.section.region.value = None  # drawn: it only says what to edit
        world = np.array([layer.data_to_world(v) for v in np.asarray(layer.data[-1], float)])
        return box_of_world(target.place, world[:, -2:], self._shape(target))

    # ---- actions
    def load_view(self) -> Any:
        """Load the part of the slide on screen as an editable layer (in a worker)."""
        corners = view_corners(self.widget.viewer)
        return self._load(lambda t: box_of_world(t.place, corners, self._shape(t)))

    def load_rectangle(self) -> Any:
        """Load the last drawn shape's bounding box as an editable layer (in a worker)."""
        return self._load(self.rectangle_box)

    def _load(self, pick_box: Any) -> Any:
        w = self.widget

        def make() -> tuple[Target, PixelBox, str]:
            target = self.target()
            name = str(target.layer.metadata.get("slide_name") or target.layer.name)
            return target, _checked_size(pick_box(target)), name

        picked = w._prepare(make)
        if picked is None:
            return None
        return w._start(region_layer, *picked, done=self._show, message="loading region…")

    def _show(self, layer: Labels) -> None:
        viewer = self.widget.viewer
        old = self.layer
        if old is not None and old in viewer.layers:  # far cheaper than a new layer's visual
            old.metadata = layer.metadata
            old.scale, old.translate = layer.scale, layer.translate
            old.data = layer.data
            old.name = layer.name
            layer = old
        else:
            overlays = detach_overlays(layer)
            viewer.layers.append(layer)
            in_turns([partial(attach_overlay, layer, n, o) for n, o in overlays.items()])
        viewer.layers.selection.active = layer
        self.layer = layer
        h, w = layer.data.shape
        self.widget.controls.status.value = f"region of {w} × {h} px loaded: paint, then Apply"

    def apply(self) -> Any:
        """Write the edited region into the slide's store (in a worker)."""
        from histo.io.region_edit import write_labels_region

        def make() -> tuple[Path, PixelBox, np.ndarray]:
            layer = self.layer
            if layer is None or layer not in self.widget.viewer.layers:
                raise HistoError("no region loaded: Load view or Load rectangle first")
            box = layer.metadata["histo_box"]
            return Path(layer.metadata["histo_store"]), box, np.array(layer.data, copy=True)

        job = self.widget._prepare(make)
        if job is None:
            return None
        store = job[0]
        return self.widget._start(
            write_labels_region,
            *job,
            done=lambda written: self._applied(written, store),
            message="writing the region…",
        )

    def _applied(self, written: RegionWrite, store: Path) -> None:
        w = self.widget
        self.last_write = written
        out = w.output
        run = out is not None and out.store == store
        slide = out.job.source if run else None
        px = out.job.pixel_size_um if run else None
        name = out.job.name if run else store.parent.name  # DIR/<slide>/labels.ome.zarr
        region = AppliedRegion(store, written.box, slide, px, name)
        # the store holds the latest edit of a box: the same box applied again is one region
        self.applied = [a for a in self.applied if (a.store, a.box) != (store, written.box)]
        self.applied.append(region)
        stale = [
            layer
            for layer in w.viewer.layers
            if layer.multiscale
            and (
                layer.metadata.get("histo_path") == str(store)
                or (
                    out is not None
                    and out.store == store
                    and layer.metadata.get("histo_run") == id(out)
                )
            )
        ]
        # the slide's lazy layers read the store again, one a turn (napari reads on the GUI
        # thread what it shows)
        in_turns([layer.refresh for layer in stale])
        h, wd = written.box.shape
        w.controls.status.value = (
            f"applied {wd} × {h} px ({written.changed_px} px changed) in "
            f"{written.seconds:.2f} s: press Re-measure"
        )
        self.info.value = f"{len(self.applied)} region(s) applied"
        self.region_applied.emit(region)

    def forget_store(self, store: Path | None) -> None:
        """Drop the applied regions of ``store``: a new run has written it over."""
        if store is None:
            return
        kept = [a for a in self.applied if Path(a.store).resolve() != Path(store).resolve()]
        if len(kept) == len(self.applied):
            return
        self.applied = kept
        self.info.value = f"{len(kept)} region(s) applied" if kept else ""
        self.regions_forgotten.emit(store)

    def export_corrections(self, folder: str | Path | None = None) -> Any:
        """Write every applied region as an image and class-map pair (in a worker)."""

        def make() -> list[AppliedRegion]:
            if not self.applied:
                raise HistoError("no region applied yet: load a region, correct it, Apply")
            for region in self.applied:
                region.check()
            return list(self.applied)

        regions = self.widget._prepare(make)
        if regions is None:
            return None
        if not folder:
            from qtpy.QtWidgets import QFileDialog

            folder = QFileDialog.getExistingDirectory(self.native, "Export corrections to")
            if not folder:
                return None

        def done(written: list[Path]) -> None:
            self.widget.controls.status.value = (
                f"exported {len(written)} region(s): histo finetune {folder} --out MODEL"
            )

        return self.widget._start(
            export_regions, regions, Path(folder), done=done, message="exporting corrections…"
        )
