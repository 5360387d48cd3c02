"""The Histomorphometry widget: analyse a section, correct the class map, re-measure, save.

Flow
----
1. Pick an image layer (a slide opened with the histo reader, a sample, any RGB image), the
   model, the pixel size (filled in from the layer) and optionally a region (shapes layer).
2. **Run** calls :func:`histo.pipeline.analyze_slide` in a napari ``thread_worker`` generator
   that yields progress; **Cancel** stops it at the next step. Results arrive as layers (class
   map, osteoclast and osteocyte instances, osteoclast centres with their features) and as a
   table of the ASBMR indices with the phenotype call and its evidence.
3. Paint or erase in the class-map layer (paint *marrow*, label 1, over a false osteoclast;
   paint label 3 to add one) and press **Re-measure**: :func:`histo.measure.measure` on the
   edited map, no segmentation (a fraction of a second for a 4-megapixel field).
4. **Save class map** writes ``NAME.classes.tif`` (uint8 codes, pixel size in the OME metadata
   and the resolution tags), which ``histo measure`` and training read; **Export CSV** writes
   the table as a row of ``indices.csv``.

Errors a user can cause (no pixel size, unreadable file, no tissue, any
:class:`histo.errors.HistoError`) become napari notifications with their one-line reason.
"""

from __future__ import annotations

import html
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from histo import classes
from histo.errors import Cancelled, HistoError, PixelSizeError

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

UNIT = "micrometer"
PROGRESS_STEPS = 1000
#: models offered when the registry cannot be read
FALLBACK_MODELS = ("default", "classical")
PHENOTYPE_COLORS = {"normal": "#3a9d5d", "oc-rich": "#d9822b", "oc-poor": "#c23030"}
#: the indices shown first in the table (the rest follow in histo.measure order)
HEADLINE = ("BV/TV", "N.Oc/B.Pm", "Oc.S/BS", "N.Oc", "Ma.Ar/T.Ar", "N.Ot/B.Ar")


# --------------------------------------------------------------------------- helpers


def one_line(exc: BaseException) -> str:
    """An exception as one line for a notification."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, HistoError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def layer_pixel_size_um(layer: Layer | None) -> float | None:
    """Pixel size (µm/px) of a layer: from its metadata, else from its scale if in length units."""
    if layer is None:
        return None
    value = layer.metadata.get("pixel_size_um")
    if value:
        return float(value)
    try:
        unit = layer.units[-1]
        um = float((layer.scale[-1] * unit).to(UNIT).magnitude)
    except Exception:  # noqa: BLE001 - pixel, unitless or unknown units
        return None
    return um if um > 0 else None


def model_names() -> list[str]:
    """Model names of the registry, 'default' and 'classical' first."""
    names = list(FALLBACK_MODELS)
    try:
        from histo.segment.registry import read_registry

        registry = read_registry()
        extra = sorted(set(registry.get("models", {})) | set(registry.get("aliases", {})))
        names += [n for n in extra if n not in names]
    except Exception:  # noqa: BLE001 - no registry: offer the defaults
        pass
    return names


def working_pixel_size_um(model: str) -> float:
    """Working resolution (µm/px) of a model (from the registry; loads the model otherwise)."""
    try:
        from histo.segment.registry import read_registry, resolve

        _, entry = resolve(model, read_registry())
        return float(entry["working_pixel_size_um"])
    except Exception:  # noqa: BLE001 - not in the registry (a weights path)
        from histo.segment import load_model

        return float(load_model(model).working_pixel_size_um)


def class_map_instances(
    class_map: np.ndarray, instances: np.ndarray | None, code: int
) -> np.ndarray | None:
    """Instance labels consistent with an edited class map.

    Pixels of class ``code`` keep their instance; a region painted as ``code`` that touches no
    instance becomes a new one; pixels painted onto an existing instance join it. Instances
    whose pixels were painted over vanish. None if ``instances`` is None.
    """
    if instances is None:
        return None
    from scipy import ndimage as ndi

    member = class_map == code
    inst = np.asarray(instances)
    if inst.shape != class_map.shape:
        return None
    lab = np.where(member, inst, 0).astype(np.int64)
    unlabeled = member & (lab == 0)
    if not unlabeled.any():
        return lab
    comp, n = ndi.label(member, structure=np.ones((3, 3), bool))
    has_instance = np.zeros(n + 1, bool)
    has_instance[np.unique(comp[lab > 0])] = True
    has_instance[0] = False
    fresh = unlabeled & ~has_instance[comp]
    if fresh.any():  # regions painted away from any instance: one new instance each
        new, _ = ndi.label(fresh, structure=np.ones((3, 3), bool))
        lab[fresh] = new[fresh] + lab.max()
    grow = unlabeled & has_instance[comp]
    if grow.any():  # pixels added to an instance: nearest instance pixel
        _, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
        lab[grow] = lab[iy[grow], ix[grow]]
    return lab


@dataclass
class Placement:
    """Where a working-resolution raster lies in the world of the image layer."""

    scale: tuple[float, float]
    translate: tuple[float, float]
    world_per_um: float

    @property
    def units(self) -> tuple[str, str] | None:
        return (UNIT, UNIT) if math.isclose(self.world_per_um, 1.0) else None


def placement(image_layer: Layer | None, source_px: float, working_px: float) -> Placement:
    """Scale and translate of a raster at ``working_px`` µm/px over an image at ``source_px``.

    Pixel centres: a working pixel j covers [j, j+1) * working_px µm from the slide corner,
    whereas image pixel i is centred on i * scale; hence the half-pixel shift.
    """
    if image_layer is None:
        return Placement((working_px, working_px), (0.0, 0.0), 1.0)
    f = float(image_layer.scale[-1]) / source_px
    t0 = np.asarray(image_layer.translate[-2:], float)
    shift = (working_px - source_px) / 2 * f
    return Placement((working_px * f, working_px * f), tuple(float(t) for t in t0 + shift), f)


# --------------------------------------------------------------------------- analysis job


@dataclass
class AnalysisJob:
    """Everything the worker thread needs (taken from the widget on the GUI thread)."""

    source: Any  #: path or RGB array
    pixel_size_um: float  #: level-0 pixel size
    model: str
    name: str
    roi_source_px: np.ndarray | None = None  #: polygon (N, 2) in level-0 pixels
    keep_image_px: int = 40_000_000
    cancel_event: threading.Event = field(default_factory=threading.Event)


@dataclass
class AnalysisOutput:
    """A finished run: the pipeline's result plus what re-measuring needs."""

    result: Any  #: histo.pipeline.SlideResult
    image: np.ndarray | None  #: RGB at the working resolution (None for huge slides)
    roi_working_px: np.ndarray | None
    seconds: float


def analyze(job: AnalysisJob, progress=None) -> AnalysisOutput:
    """Run the pipeline for ``job`` (any thread); raises HistoError / Cancelled."""
    from histo.pipeline import analyze_slide

    t0 = time.perf_counter()
    roi = None
    if job.roi_source_px is not None:
        roi = job.roi_source_px * (job.pixel_size_um / working_pixel_size_um(job.model))
    result = analyze_slide(
        job.source,
        pixel_size_um=job.pixel_size_um,
        model=job.model,
        roi=roi,
        name=job.name,
        progress=progress,
        cancel=job.cancel_event.is_set,
    )
    image = _working_image(job, result)
    return AnalysisOutput(result, image, roi, time.perf_counter() - t0)


def _working_image(job: AnalysisJob, result: Any) -> np.ndarray | None:
    """The RGB image at the working resolution (what the pipeline measured with)."""
    from histo.io import open_slide, read_region, slide_from_array

    h, w = result.class_map.shape[:2]
    if h * w > job.keep_image_px:
        return None
    if isinstance(job.source, np.ndarray):
        src = job.source
        if (
            src.shape[:2] == (h, w)
            and src.ndim == 3
            and src.dtype == np.uint8
            and src.shape[2] == 3
        ):
            return src
        slide = slide_from_array(src, pixel_size_um=job.pixel_size_um)
    else:
        slide = open_slide(job.source, pixel_size_um=job.pixel_size_um)
    try:
        return read_region(slide, 0.0, 0.0, h, w, result.pixel_size_um)
    finally:
        slide.close()


def analysis_generator(job: AnalysisJob) -> Iterator[tuple[float, str]]:
    """Generator for ``thread_worker``: yields (fraction, message), returns AnalysisOutput.

    The pipeline is one blocking call; it runs in a helper thread and reports through a queue
    so that this generator can yield every progress step to the GUI thread.
    """
    messages: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = analyze(job, progress=lambda f, m: messages.put((f, m)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker below
            outcome["error"] = exc
        finally:
            messages.put(None)

    thread = threading.Thread(target=target, name="histo-analysis", daemon=True)
    thread.start()
    while (item := messages.get()) is not None:
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --------------------------------------------------------------------------- layer combo


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some types, kept in sync with the layer list."""

    def __init__(
        self,
        viewer: napari.Viewer,
        types: tuple[type, ...],
        none_text: str | None = None,
        accept=None,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.viewer, self.types, self.none_text = viewer, types, none_text
        self.accept = accept or (lambda layer: True)
        self._layers: list[Layer | None] = []
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh)
        events.reordered.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _matches(self, layer: Layer) -> bool:
        return isinstance(layer, self.types) and self.accept(layer)

    def _on_inserted(self, event: Any) -> None:
        layer = event.value
        layer.events.name.connect(self.refresh)
        self.refresh()
        if self._matches(layer):  # the newest layer is the one the user means
            self.set_layer(layer)

    def refresh(self, *_: Any) -> None:
        current = self.layer()
        self.blockSignals(True)
        self.clear()
        self._layers = [None] if self.none_text else []
        if self.none_text:
            self.addItem(self.none_text)
        for layer in reversed(list(self.viewer.layers)):
            if self._matches(layer):
                self._layers.append(layer)
                self.addItem(layer.name)
        self.blockSignals(False)
        if current is not None and current in self._layers:
            self.setCurrentIndex(self._layers.index(current))
        elif self._layers:
            self.setCurrentIndex(0)
            self.currentIndexChanged.emit(0)

    def layer(self) -> Layer | None:
        i = self.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def set_layer(self, layer: Layer) -> None:
        if layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer))


# --------------------------------------------------------------------------- the widget


class HistoWidget(QWidget):
    """Histomorphometry: segment, measure, call the phenotype; correct and re-measure."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.job: AnalysisJob | None = None
        self.output: AnalysisOutput | None = None  #: the last finished run
        self.measurement = None  #: the measurement shown in the table
        self.phenotype = None  #: the phenotype call shown
        self.last_error: BaseException | None = None
        self.last_remeasure_seconds: float | None = None
        self.image_layer: Layer | None = None  #: the image of the last run
        self._result_layers: dict[str, Layer] = {}
        self._instance_cache: dict[str, tuple[Any, Any]] = {}
        self._pixel_size_for: Layer | None = None  #: the image the pixel size was filled for
        self._build()

    # ---- layout
    def _build(self) -> None:
        root = QVBoxLayout(self)

        inputs = QGroupBox("Section")
        form = QFormLayout(inputs)
        self.image_combo = LayerCombo(self.viewer, (Image,), parent=self)
        self.image_combo.setToolTip("The TRAP-stained section to analyse (RGB image layer).")
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.addItems(model_names())
        self.model_combo.setToolTip(
            "default: the shipped network; classical: colour thresholds (fast, no weights)."
        )
        form.addRow("Model", self.model_combo)
        self.pixel_size = QDoubleSpinBox()
        self.pixel_size.setRange(0.0, 100.0)
        self.pixel_size.setDecimals(4)
        self.pixel_size.setSingleStep(0.05)
        self.pixel_size.setSuffix(" µm/px")
        self.pixel_size.setSpecialValueText("unknown: enter µm/px")
        self.pixel_size.setToolTip(
            "Pixel size of the image's full resolution, from the file when it says; "
            "indices without a scale are meaningless."
        )
        form.addRow("Pixel size", self.pixel_size)
        self.region_combo = LayerCombo(
            self.viewer, (Shapes,), none_text="whole section", parent=self
        )
        self.region_combo.setToolTip("Measure only inside the polygons of a shapes layer.")
        form.addRow("Region", self.region_combo)
        root.addWidget(inputs)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Segment, measure and call the phenotype (in the background).")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        root.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("%p%")
        root.addWidget(self.progress)
        self.status = QLabel("Pick an image and press Run.")
        self.status.setWordWrap(True)
        root.addWidget(self.status)

        results = QGroupBox("Result")
        rbox = QVBoxLayout(results)
        self.phenotype_label = QLabel("no result yet")
        self.phenotype_label.setTextFormat(Qt.RichText)
        rbox.addWidget(self.phenotype_label)
        self.evidence_label = QLabel("")
        self.evidence_label.setWordWrap(True)
        self.evidence_label.setTextFormat(Qt.RichText)
        rbox.addWidget(self.evidence_label)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Index", "Value", "Unit"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.Stretch)
        header.setSectionResizeMode(1, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        rbox.addWidget(self.table, stretch=1)
        root.addWidget(results, stretch=1)

        correct = QGroupBox("Correct")
        cform = QFormLayout(correct)
        self.class_map_combo = LayerCombo(
            self.viewer,
            (Labels,),
            accept=lambda layer: layer.metadata.get("histo_kind") == "class_map",
            parent=self,
        )
        self.class_map_combo.setToolTip(
            "Paint marrow (1) over a false osteoclast, osteoclast (3) to add one; then Re-measure."
        )
        cform.addRow("Class map", self.class_map_combo)
        row = QHBoxLayout()
        self.remeasure_button = QPushButton("Re-measure")
        self.remeasure_button.setToolTip("Indices of the edited class map (no segmentation).")
        self.remeasure_button.clicked.connect(lambda: self.remeasure())
        self.save_button = QPushButton("Save class map…")
        self.save_button.setToolTip("NAME.classes.tif: read by `histo measure` and training.")
        self.save_button.clicked.connect(lambda: self.save_class_map())
        self.export_button = QPushButton("Export CSV…")
        self.export_button.clicked.connect(lambda: self.export_csv())
        for b in (self.remeasure_button, self.save_button, self.export_button):
            row.addWidget(b)
        cform.addRow(row)
        root.addWidget(correct)
        self._on_image_changed()

    # ---- inputs
    def _on_image_changed(self, *_: Any) -> None:
        """Fill in the pixel size of a newly chosen image (keeps what the user typed)."""
        layer = self.image_combo.layer()
        if layer is self._pixel_size_for and layer is not None:
            return
        self._pixel_size_for = layer
        self.pixel_size.setValue(layer_pixel_size_um(layer) or 0.0)

    def _roi_polygon(self, image_layer: Layer) -> np.ndarray | None:
        """The first polygon of the region layer in the image's level-0 pixels."""
        shapes = self.region_combo.layer()
        if shapes is None or len(shapes.data) == 0:
            return None
        verts = np.asarray(shapes.data[0], float)[:, -2:]
        world = np.array([shapes.data_to_world(v) for v in verts])[:, -2:]
        return np.array([image_layer.world_to_data(w) for w in world])[:, -2:]

    def make_job(self) -> AnalysisJob:
        """The analysis job of the current choices (raises HistoError on bad input)."""
        layer = self.image_combo.layer()
        if layer is None:
            raise HistoError("no image layer: open a slide or a sample first")
        px = float(self.pixel_size.value())
        if px <= 0:
            raise PixelSizeError(
                f"pixel size of '{layer.name}' unknown: enter it (µm/px) in the widget"
            )
        path = layer.metadata.get("histo_path")
        if layer.multiscale or (path and not isinstance(layer.data, np.ndarray)):
            if not path:
                raise HistoError(f"'{layer.name}' is multiscale but has no file to read from")
            source: Any = path
        else:
            source = np.asarray(layer.data)
            if source.ndim not in (2, 3) or (source.ndim == 3 and not layer.rgb):
                raise HistoError(f"'{layer.name}' is not a 2-D RGB or grey image")
        name = layer.metadata.get("slide_name") or layer.name
        return AnalysisJob(
            source=source,
            pixel_size_um=px,
            model=self.model_combo.currentText(),
            name=str(name),
            roi_source_px=self._roi_polygon(layer),
        )

    # ---- run / cancel
    def run(self) -> None:
        """Start the analysis in a worker thread (returns at once)."""
        if self.worker is not None:
            return
        try:
            job = self.make_job()
        except HistoError as exc:
            self._fail(exc)
            return
        self.job, self.last_error = job, None
        self.image_layer = self.image_combo.layer()
        worker = create_worker(analysis_generator, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText(f"analysing {job.name} with the {job.model} model…")
        worker.start()

    def cancel(self) -> None:
        """Ask the running analysis to stop at its next step."""
        if self.job is not None and self.worker is not None:
            self.job.cancel_event.set()
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling…")

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _on_progress(self, item: tuple[float, str]) -> None:
        fraction, message = item
        self.progress.setValue(round(fraction * PROGRESS_STEPS))
        self.status.setText(message)

    def _on_returned(self, output: AnalysisOutput) -> None:
        self.output = output
        try:
            self._show_result(output)
        except Exception as exc:  # noqa: BLE001 - never take the viewer down
            log.exception("showing the result failed")
            self._fail(exc)
            return
        r = output.result
        self.progress.setValue(PROGRESS_STEPS)
        h, w = r.class_map.shape[:2]
        self.status.setText(
            f"done in {output.seconds:.1f} s: {w} × {h} px at {r.pixel_size_um:g} µm/px"
        )

    def _on_errored(self, exc: BaseException) -> None:
        self.last_error = exc
        self.progress.setValue(0)
        if isinstance(exc, Cancelled):
            self.status.setText("cancelled")
            show_info("histo: analysis cancelled")
            return
        if not isinstance(exc, HistoError):
            log.error("analysis failed", exc_info=exc)
        self._fail(exc)

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _fail(self, exc: BaseException) -> None:
        self.last_error = exc
        message = one_line(exc)
        self.status.setText(message)
        show_error(f"histo: {message}")

    def run_blocking(self, timeout_s: float = 600.0) -> AnalysisOutput | None:
        """Run and wait (processing Qt events): for scripts and the screenshot."""
        from qtpy.QtWidgets import QApplication

        self.run()
        t_end = time.monotonic() + timeout_s
        while self.worker is not None and time.monotonic() < t_end:
            QApplication.processEvents()
            time.sleep(0.01)
        return self.output if self.last_error is None else None

    # ---- result layers
    def _upsert(self, key: str, data: Any, kind: str, **kwargs: Any) -> Layer:
        """Update the result layer ``key`` in place, or add it."""
        name = kwargs["name"]
        layer = self._result_layers.get(key)
        if layer is None or layer not in self.viewer.layers:
            layer = next(
                (
                    lyr
                    for lyr in self.viewer.layers
                    if lyr.name == name and lyr._type_string == kind
                ),
                None,
            )
        if layer is not None:
            layer.data = data
            for attr in ("scale", "translate", "metadata", "features"):
                if attr in kwargs:
                    setattr(layer, attr, kwargs[attr])
            if kind == "points":
                layer.refresh()
        else:
            add = getattr(self.viewer, f"add_{kind}")
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            layer = add(data, **kwargs)
        self._result_layers[key] = layer
        return layer

    def _show_result(self, output: AnalysisOutput) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        from histo_napari._reader import class_colormap

        r = output.result
        pw = float(r.pixel_size_um)
        place = placement(self.image_layer, float(self.job.pixel_size_um), pw)
        common = {"scale": place.scale, "translate": place.translate, "units": place.units}
        meta = {"pixel_size_um": pw, "slide_name": r.name, "histo_run": id(output)}
        self._upsert(
            "osteocytes",
            np.asarray(r.osteocyte_labels),
            "labels",
            name=f"{r.name} osteocytes",
            opacity=0.7,
            visible=False,
            metadata={**meta, "histo_kind": "osteocytes"},
            **common,
        )
        self._upsert(
            "osteoclasts",
            np.asarray(r.osteoclast_labels),
            "labels",
            name=f"{r.name} osteoclasts",
            opacity=0.8,
            metadata={**meta, "histo_kind": "osteoclasts"},
            **common,
        )
        cmap_layer = self._upsert(
            "class_map",
            np.array(r.class_map, dtype=np.uint8, copy=True),
            "labels",
            name=f"{r.name} classes",
            opacity=0.45,
            colormap=DirectLabelColormap(color_dict=class_colormap()),
            metadata={**meta, "histo_kind": "class_map"},
            **common,
        )
        if isinstance(cmap_layer, Labels):
            cmap_layer.selected_label = classes.MARROW
            osteoclast_layer = self._result_layers["osteoclasts"]
            osteoclast_layer.contour = 2
        self.class_map_combo.refresh()
        self.class_map_combo.set_layer(cmap_layer)
        self._show_measurement(r.measurement, r.phenotype, cmap_layer)
        if self.image_layer is not None and self.image_layer in self.viewer.layers:
            self.viewer.layers.selection.active = cmap_layer

    def _points_layer(self, measurement: Any, cmap_layer: Layer) -> None:
        rows = measurement.osteoclasts
        pw = float(measurement.pixel_size_um)
        f = float(cmap_layer.scale[-1]) / pw  # world units per µm
        coords = np.array([[r["centroid_y_um"], r["centroid_x_um"]] for r in rows], float).reshape(
            -1, 2
        )
        features = {
            "area_um2": np.array([r["area_um2"] for r in rows], float),
            "bone_contact_um": np.array([r["bone_contact_um"] for r in rows], float),
            "nuclei": np.array([r.get("nuclei", math.nan) for r in rows], float),
        }
        name = cmap_layer.name.removesuffix(" classes") + " osteoclast centres"
        translate = tuple(np.asarray(cmap_layer.translate[-2:], float))
        self._upsert(
            "points",
            coords,
            "points",
            name=name,
            features=features,
            scale=(f, f),
            translate=translate,
            units=(UNIT, UNIT) if math.isclose(f, 1.0) else None,
            size=12.0,
            symbol="ring",
            face_color="transparent",
            border_color="#ff2060",
            border_width=0.15,
            metadata={"histo_kind": "osteoclast_points"},
        )

    def _show_measurement(self, measurement: Any, call: Any, cmap_layer: Layer) -> None:
        from histo.measure import INDEX_UNITS

        self.measurement, self.phenotype = measurement, call
        indices = measurement.indices
        order = [k for k in HEADLINE if k in indices]
        order += [k for k in indices if k not in order]
        self.table.setRowCount(len(order))
        for i, key in enumerate(order):
            value = indices[key]
            items = (
                QTableWidgetItem(key),
                QTableWidgetItem(format_value(value)),
                QTableWidgetItem(INDEX_UNITS.get(key, "")),
            )
            items[1].setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
            items[1].setData(Qt.UserRole, value)
            for j, item in enumerate(items):
                self.table.setItem(i, j, item)
        if call is not None:
            colour = PHENOTYPE_COLORS.get(call.phenotype, "#888888")
            self.phenotype_label.setText(
                f"<b style='font-size:14pt;color:{colour}'>{call.phenotype}</b>"
                f"&nbsp;&nbsp;confidence {call.confidence:.0%}"
            )
            self.evidence_label.setText("<br>".join(f"• {html.escape(e)}" for e in call.evidence))
        else:
            self.phenotype_label.setText("no phenotype call")
            self.evidence_label.setText("")
        self._points_layer(measurement, cmap_layer)

    def table_indices(self) -> dict[str, float]:
        """The indices shown in the table (name -> value)."""
        return {
            self.table.item(i, 0).text(): self.table.item(i, 1).data(Qt.UserRole)
            for i in range(self.table.rowCount())
        }

    # ---- correct
    def _class_map_layer(self) -> Labels:
        layer = self.class_map_combo.layer()
        if layer is None:
            raise HistoError("no class map: run the analysis or open a NAME.classes.tif")
        if layer.multiscale:
            raise HistoError(f"'{layer.name}' is too large to edit and re-measure here")
        return layer

    def _class_map_pixel_size(self, layer: Layer) -> float:
        px = layer_pixel_size_um(layer)
        if px is None:
            px = float(self.pixel_size.value()) or None
        if px is None:
            raise PixelSizeError(f"pixel size of '{layer.name}' unknown: enter it in the widget")
        return px

    def remeasure(self) -> Any:
        """Measure the (edited) class map again and update the table and points; no segmentation.

        After a run, the instance labels (edited consistently with the class map) and the
        image at the working resolution are measured with it, as the run did, so re-measuring
        an unedited map gives the run's numbers. A class map opened from a file is measured
        alone, exactly as ``histo measure`` does.
        """
        from histo.measure import measure

        try:
            t0 = time.perf_counter()
            layer = self._class_map_layer()
            px = self._class_map_pixel_size(layer)
            cmap = np.asarray(layer.data)
            kwargs: dict[str, Any] = {}
            oc, ot = self._instances(layer, cmap)
            kwargs["osteoclast_labels"] = oc
            kwargs["osteocyte_labels"] = ot
            out = self._run_of(layer, cmap)
            if out is not None:
                kwargs["image"] = out.image
                kwargs["roi"] = out.roi_working_px
            else:
                kwargs["roi"] = self._roi_for_layer(layer)
            measurement = measure(cmap, px, **kwargs)
            call = self._call(measurement)
            self._show_measurement(measurement, call, layer)
            self.last_remeasure_seconds = time.perf_counter() - t0
        except HistoError as exc:
            self._fail(exc)
            return None
        except Exception as exc:  # noqa: BLE001 - never take the viewer down
            log.exception("re-measure failed")
            self._fail(exc)
            return None
        self.status.setText(
            f"re-measured in {self.last_remeasure_seconds:.2f} s: "
            f"N.Oc {measurement.indices.get('N.Oc', 0):g}"
        )
        return measurement

    def _run_of(self, layer: Layer, cmap: np.ndarray) -> AnalysisOutput | None:
        """The run that produced the class-map layer (None for a map opened from a file)."""
        out = self.output
        if (
            out is not None
            and layer.metadata.get("histo_run") == id(out)
            and cmap.shape == out.result.class_map.shape
        ):
            return out
        return None

    def _instances(
        self, layer: Layer, cmap: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Osteoclast and osteocyte instances consistent with the (edited) class map.

        From the run's instance layers, or, for a class map opened from a file, from the
        instance maps beside it (``NAME.osteoclasts.tif``, a labels.ome.zarr's labels), as
        ``histo measure`` reads them. (None, None) when there are none: each connected region
        is then one object.
        """
        if self._run_of(layer, cmap) is not None:
            raw = tuple(
                None if (lyr := self._result_layers.get(k)) is None else np.asarray(lyr.data)
                for k in ("osteoclasts", "osteocytes")
            )
        else:
            raw = self._file_instances(layer.metadata.get("histo_path"))
        return (
            class_map_instances(cmap, raw[0], classes.OSTEOCLAST),
            class_map_instances(cmap, raw[1], classes.OSTEOCYTE),
        )

    def _file_instances(self, path: str | None) -> tuple[Any, Any]:
        if not path:
            return None, None
        if path not in self._instance_cache:
            try:
                from histo.cli.measure import load_class_map

                _, oc, ot, _ = load_class_map(path)
            except (ImportError, HistoError, OSError):
                oc = ot = None
            self._instance_cache[path] = (oc, ot)
        return self._instance_cache[path]

    def _roi_for_layer(self, layer: Layer) -> np.ndarray | None:
        shapes = self.region_combo.layer()
        if shapes is None or len(shapes.data) == 0:
            return None
        verts = np.asarray(shapes.data[0], float)
        world = np.array([shapes.data_to_world(v) for v in verts])[:, -2:]
        return np.array([layer.world_to_data(w) for w in world])[:, -2:]

    @staticmethod
    def _call(measurement: Any) -> Any:
        try:
            from histo.phenotype import call_phenotype
        except ImportError:
            return None
        return call_phenotype(measurement.indices)

    def save_class_map(self, path: str | Path | None = None) -> Path | None:
        """Write the class map as ``NAME.classes.tif`` (uint8, pixel size in the metadata)."""
        try:
            layer = self._class_map_layer()
            px = self._class_map_pixel_size(layer)
            if path is None:
                stem = layer.metadata.get("slide_name") or layer.name.removesuffix(" classes")
                path, _ = QFileDialog.getSaveFileName(
                    self, "Save class map", f"{stem}.classes.tif", "TIFF (*.classes.tif *.tif)"
                )
                if not path:
                    return None
            cmap = np.asarray(layer.data)
            path = write_class_map_tiff(path, cmap, px)
            base = (
                path.name[: -len(".classes.tif")]
                if path.name.endswith(".classes.tif")
                else path.stem
            )
            for kind, labels in zip(
                ("osteoclasts", "osteocytes"), self._instances(layer, cmap), strict=True
            ):
                if labels is not None:  # beside it, where `histo measure` looks for them
                    write_label_tiff(
                        path.with_name(f"{base}.{kind}.tif"), labels.astype(np.uint32), px
                    )
        except (HistoError, OSError) as exc:
            self._fail(exc)
            return None
        self._instance_cache.clear()
        self.status.setText(f"saved {path}")
        show_info(f"histo: class map saved to {path}")
        return path

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the table (one row of indices.csv: slide, phenotype, indices, evidence)."""
        if self.measurement is None:
            self._fail(HistoError("nothing to export: run or re-measure first"))
            return None
        layer = self.class_map_combo.layer()
        name = (layer.metadata.get("slide_name") if layer is not None else None) or "slide"
        try:
            if path is None:
                path, _ = QFileDialog.getSaveFileName(
                    self, "Export indices", f"{name}.indices.csv", "CSV (*.csv)"
                )
                if not path:
                    return None
            path = write_indices(path, name, self.measurement, self.phenotype)
        except (HistoError, OSError) as exc:
            self._fail(exc)
            return None
        self.status.setText(f"exported {path}")
        return path


# --------------------------------------------------------------------------- writers


def format_value(value: Any) -> str:
    """Table text of an index value (counts as integers, others to 4 significant digits)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    if isinstance(value, int | np.integer) or (v.is_integer() and abs(v) >= 1):
        return f"{int(v):d}"
    return f"{v:.4g}"


def write_class_map_tiff(path: str | Path, class_map: np.ndarray, pixel_size_um: float) -> Path:
    """Write a uint8 class map as TIFF with its pixel size (OME PhysicalSizeX + resolution)."""
    from histo.measure import validate_class_map

    path = Path(path)
    if not path.name.lower().endswith((".tif", ".tiff")):
        path = path.with_name(path.name + ".classes.tif")
    return write_label_tiff(path, validate_class_map(class_map).astype(np.uint8), pixel_size_um)


def write_label_tiff(path: Path, labels: np.ndarray, pixel_size_um: float) -> Path:
    """Write a label image as an OME-TIFF with its pixel size, atomically."""
    import os

    import tifffile

    from histo.measure import validate_pixel_size

    px = validate_pixel_size(pixel_size_um)
    cmap = np.ascontiguousarray(labels)
    partial = path.with_name(path.name + ".partial")
    metadata = {
        "axes": "YX",
        "PhysicalSizeX": px,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": px,
        "PhysicalSizeYUnit": "µm",
    }
    with tifffile.TiffWriter(partial, ome=True) as tif:
        tif.write(
            cmap,
            photometric="minisblack",
            compression="zlib",
            resolution=(1e4 / px, 1e4 / px),
            resolutionunit="CENTIMETER",
            metadata=metadata,
        )
    os.replace(partial, path)
    return path


def write_indices(path: str | Path, name: str, measurement: Any, call: Any) -> Path:
    """One row of indices.csv for ``name`` (histo.io.tables when available)."""
    import csv

    path = Path(path)
    row: dict[str, Any] = {"slide": name, "phenotype": getattr(call, "phenotype", "")}
    row.update(measurement.indices)
    row["confidence"] = getattr(call, "confidence", "")
    row["evidence"] = "; ".join(getattr(call, "evidence", []) or [])
    try:
        from histo.io.tables import write_indices_csv
    except ImportError:
        write_indices_csv = None
    if write_indices_csv is not None:
        try:
            write_indices_csv(path, [row])
            return path
        except TypeError:  # another signature: fall back to the plain writer
            pass
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return path
