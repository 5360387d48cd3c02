"""The Histomorphometry widget: analyse a section, correct the class map, re-measure, save.

Flow
----
1. Pick an image layer (a slide opened with the histo reader, a sample, any RGB image), the
   model, the pixel size (filled in from the layer), optionally a region (every shape of a
   shapes layer; a shape inside another cuts a hole) and reference ranges.
2. **Run** calls :func:`histo.pipeline.analyze_slide` in a napari thread worker that yields
   progress; **Cancel** stops it at the next step. Results arrive as layers and as the table
   of ASBMR indices with the phenotype call and its evidence.
3. Paint or erase in the class-map layer and press **Re-measure**: :func:`histo.measure.measure`
   on the edited map in a worker, no segmentation.
4. **Save class map** writes ``NAME.classes.tif`` with the instance maps beside it (in a
   worker); **Export CSV** writes the table as a row of ``indices.csv``.

Errors a user can cause (no pixel size, unreadable file, no tissue, any
:class:`histo.errors.HistoError`) become napari notifications with their one-line reason.
The parts: :mod:`._form` (inputs), :mod:`._worker` (long work), :mod:`._layers` (result
layers), :mod:`._results` (call and table), :mod:`._geometry` (placement and regions).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog, QGroupBox, QScrollArea, QVBoxLayout, QWidget

from histo.errors import Cancelled, HistoError, PixelSizeError
from histo_napari import _worker as jobs
from histo_napari._finetune import TrainPanel
from histo_napari._form import PROGRESS_STEPS, CorrectForm, RunControls, SectionForm
from histo_napari._geometry import Placement, region_polygons
from histo_napari._layers import (
    ResultLayers,
    centres_layer,
    run_events_until,
    run_layers,
    thaw,
    warm_glyphs,
    warm_up,
)
from histo_napari._region import RegionEditor
from histo_napari._regions_layer import regions_layers, remeasure_region, run_region
from histo_napari._results import ResultsPanel

if TYPE_CHECKING:
    import napari
    from napari.layers import Labels, Layer

log = logging.getLogger(__name__)


def one_line(exc: BaseException) -> str:
    """An exception as one line for a notification."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, HistoError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Shown(NamedTuple):
    """A result and the layers prepared for it in the worker."""

    result: Any  #: AnalysisOutput or Remeasured
    layers: dict[str, Layer]


def analyze_and_prepare(job: jobs.AnalysisJob, progress: Any = None) -> Shown:
    """Run the analysis and build its layers (worker thread)."""
    output = jobs.analyze(job, progress)
    return Shown(output, {**run_layers(output), **regions_layers(output)})


def remeasure_and_prepare(job: jobs.CorrectionJob, place: Placement) -> Shown:
    """Re-measure and build the osteoclast-centre layer (worker thread)."""
    out = jobs.remeasure(job)
    return Shown(out, {"points": centres_layer(out.measurement, place, job.name)})


def _boxed(title: str, widget: QWidget) -> QGroupBox:
    box = QGroupBox(title)
    QVBoxLayout(box).addWidget(widget)
    return box


class HistoWidget(QWidget):
    """Histomorphometry: segment, measure, call the phenotype; correct and re-measure."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.section = SectionForm(napari_viewer)
        self.controls = RunControls()
        self.results = ResultsPanel()
        self.correct = CorrectForm(napari_viewer)
        self.layers = ResultLayers(napari_viewer)
        warm_up()
        warm_glyphs(napari_viewer)
        self.destroyed.connect(thaw)
        self.worker: Any = None  #: the job running now (one at a time)
        self.job: jobs.AnalysisJob | None = None
        self.output: jobs.AnalysisOutput | None = None  #: the last finished run
        self.measurement: Any = None  #: the measurement shown in the table
        self.phenotype: Any = None  #: the phenotype call shown
        self.last_error: BaseException | None = None
        self.last_remeasure_seconds: float | None = None
        self._showing = False  #: result layers still being put in the viewer
        # a scroll area: on a short screen the panels scroll instead of clipping their text
        self.scroll = QScrollArea(self)
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        QVBoxLayout(self).addWidget(self.scroll)
        self.layout().setContentsMargins(0, 0, 0, 0)
        panels = QWidget()
        root = QVBoxLayout(panels)
        root.addWidget(_boxed("Section", self.section.native))
        root.addWidget(self.controls.native)
        root.addWidget(self.results, stretch=1)
        root.addWidget(_boxed("Correct", self.correct.native))
        self.train = TrainPanel(self)  #: Train on corrections (fine-tuning)
        root.addWidget(_boxed("Train on corrections", self.train.native))
        self.region_edit = RegionEditor(self)  #: a region of a whole slide, edited and applied
        root.addWidget(_boxed("Whole-slide region", self.region_edit.native))
        self.train.layers.follow_regions(self.region_edit)  # applied regions can teach
        self.scroll.setWidget(panels)
        # lambdas: a button's signal carries its checked state, which is no path
        self.controls.run_button.clicked.connect(lambda: self.run())
        self.controls.cancel_button.clicked.connect(lambda: self.cancel())
        self.correct.remeasure_button.clicked.connect(lambda: self.remeasure())
        self.correct.save_button.clicked.connect(lambda: self.save_class_map())
        self.correct.export_button.clicked.connect(lambda: self.export_csv())

    # ---- state
    @property
    def running(self) -> bool:
        """True while a run, re-measure, save or fine-tuning is going on."""
        return self.worker is not None or self._showing or self.train.running

    @property
    def showing(self) -> bool:
        """True while the result layers of a finished job are being put in the viewer."""
        return self._showing

    def table_indices(self) -> dict[str, float]:
        """The indices shown in the table (name -> value)."""
        return self.results.indices()

    def _start(self, fn: Any, *args: Any, done: Any, message: str, cancellable=False) -> Any:
        """Start ``fn(*args)`` in a thread worker; ``done`` gets its return value."""
        worker = create_worker(fn, *args, _start_thread=False, _ignore_errors=True)
        if hasattr(worker, "yielded"):
            worker.yielded.connect(self._on_progress)
        worker.returned.connect(done)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker, self.last_error = worker, None
        self.controls.set_busy(True, cancellable)
        self.controls.status.value = message
        worker.start()
        return worker

    def _prepare(self, make_job: Any) -> Any:
        """``make_job()``, or None when a job is running or the input is wrong (notified)."""
        if self.running:
            return None
        try:
            return make_job()
        except HistoError as exc:
            self._fail(exc)
            return None

    def _on_progress(self, item: jobs.Progress) -> None:
        self.controls.progress.value = round(item.fraction * PROGRESS_STEPS)
        self.controls.status.value = item.message

    def _on_errored(self, exc: BaseException) -> None:
        self.last_error = exc
        self.controls.progress.value = 0
        if isinstance(exc, Cancelled):
            self.controls.status.value = "cancelled"
            show_info("histo: analysis cancelled")
            return
        if not isinstance(exc, HistoError):
            log.error("histo job failed", exc_info=exc)
        self._fail(exc)

    def _on_finished(self) -> None:
        self.worker = None
        self.controls.set_busy(False)

    def _fail(self, exc: BaseException) -> None:
        self.last_error = exc
        message = one_line(exc)
        self.controls.status.value = message
        show_error(f"histo: {message}")

    def wait(self, timeout_s: float = 600.0) -> None:
        """Run Qt's event loop until the running job ends (for scripts and the screenshot)."""
        run_events_until(lambda: not self.running, timeout_s)

    # ---- analyse
    def make_job(self) -> jobs.AnalysisJob:
        """The analysis job of the current choices (raises HistoError on bad input)."""
        layer = self.section.image.value
        if layer is None:
            raise HistoError("no image layer: open a slide or a sample first")
        px = float(self.section.pixel_size.value)
        if px <= 0:
            raise PixelSizeError(
                f"pixel size of '{layer.name}' unknown: enter it (µm/px) in the widget"
            )
        path = layer.metadata.get("histo_path")
        base = layer.data[0] if layer.multiscale else layer.data
        if layer.multiscale or (path and not isinstance(layer.data, np.ndarray)):
            if not path:
                raise HistoError(f"'{layer.name}' is multiscale but has no file to read from")
            source: Any = path
        else:
            source = np.asarray(layer.data)
            if source.ndim not in (2, 3) or (source.ndim == 3 and not layer.rgb):
                raise HistoError(f"'{layer.name}' is not a 2-D RGB or grey image")
        return jobs.AnalysisJob(
            source=source,
            pixel_size_um=px,
            model=str(self.section.model.value),
            name=str(layer.metadata.get("slide_name") or layer.name),
            level0_shape=tuple(int(n) for n in base.shape[:2]),
            image_placement=Placement.of_layer(layer),
            region_world=region_polygons(self.section.region.value),
            ranges_path=self.section.ranges_path(),
            out_dir=self.section.out_dir_path(),
            device=str(self.section.device.value),
        )

    def run(self) -> Any:
        """Start the analysis in a worker thread (returns at once)."""
        job = self._prepare(self.make_job)
        if job is None:
            return None
        self.job = job
        self.controls.progress.value = 0
        message = f"analysing {job.name} with the {job.model} model…"
        return self._start(
            jobs.with_progress,
            analyze_and_prepare,
            job,
            done=self._on_run,
            message=message,
            cancellable=True,
        )

    def cancel(self) -> None:
        """Ask the running analysis to stop at its next step."""
        if self.job is not None and self.running:
            self.job.cancel_event.set()
            self.controls.cancel_button.enabled = False
            self.controls.status.value = "cancelling…"

    def run_blocking(self, timeout_s: float = 600.0) -> jobs.AnalysisOutput | None:
        """Run and wait (processing Qt events): for scripts and the screenshot."""
        self.run()
        self.wait(timeout_s)
        return self.output if self.last_error is None else None

    def _on_run(self, shown: Shown) -> None:
        self.output = shown.result
        self._showing = True
        self.region_edit.forget_store(shown.result.store)  # corrections there are gone

        def shown_all() -> None:
            self._showing = False
            self._finish_run(shown)

        try:
            if "low_confidence" not in shown.layers:  # not the last run's unsure blocks
                self.layers.drop("low_confidence")
            self.layers.show(shown.layers, then=shown_all, collect_first=True)
        except Exception as exc:  # noqa: BLE001 - never take the viewer down
            self._showing = False
            log.exception("showing the result failed")
            self._fail(exc)

    def _finish_run(self, shown: Shown) -> None:
        output = shown.result
        self._show(output.result.measurement, output.result.phenotype)
        self.results.show_region(*run_region(output.result))
        self.results.show_qc(getattr(output.result, "qc", None))
        self.correct.class_map.value = shown.layers["class_map"]
        r = output.result
        self.controls.progress.value = PROGRESS_STEPS
        h, w = r.class_map.shape[:2]
        self.controls.status.value = (
            f"done in {output.seconds:.1f} s: {w} × {h} px at {r.pixel_size_um:g} µm/px"
        )

    def _shown_all(self) -> None:
        self._showing = False

    def _show(self, measurement: Any, call: Any) -> None:
        self.measurement, self.phenotype = measurement, call
        self.results.show_result(measurement, call)

    # ---- correct
    def _class_map_layer(self) -> Labels:
        layer = self.correct.class_map.value
        if layer is None:
            raise HistoError("no class map: run the analysis or open a NAME.classes.tif")
        if layer.multiscale and not self._is_stored_run(layer):
            raise HistoError(f"'{layer.name}' is too large to edit and re-measure here")
        return layer

    def _is_stored_run(self, layer: Layer) -> bool:
        """The class map of the last run, shown from its store (a lazy pyramid)."""
        out = self.output
        return (
            out is not None
            and out.levels is not None
            and layer.metadata.get("histo_run") == id(out)
        )

    def correction_job(self) -> jobs.CorrectionJob:
        """The chosen class map as the user left it, ready for a worker."""
        layer = self._class_map_layer()
        px = Placement.of_layer(layer)
        pixel_size = float(layer.metadata.get("pixel_size_um") or 0) or float(
            self.section.pixel_size.value
        )
        if pixel_size <= 0:
            raise PixelSizeError(f"pixel size of '{layer.name}' unknown: enter it in the widget")
        out = self.output
        run = out if out is not None and layer.metadata.get("histo_run") == id(out) else None
        if run is not None and run.levels is not None:
            instances: Any = run.stored_instances()
        elif run is not None:
            instances = jobs.Instances(*self.layers.instances_of(layer))
        else:
            instances = _instances_beside(layer.metadata.get("histo_path"))
        stored = layer.multiscale
        return jobs.CorrectionJob(
            class_map=layer.data[0] if stored else np.array(layer.data, copy=True),
            pixel_size_um=pixel_size,
            name=str(layer.metadata.get("slide_name") or layer.name.removesuffix(" classes")),
            instances=instances,
            run=run,
            region_px=[px.world_to_px(p) for p in region_polygons(self.section.region.value)],
            ranges_path=self.section.ranges_path(),
        )

    def remeasure(self) -> Any:
        """Measure the (edited) class map again in a worker; the table follows when done."""
        job = self._prepare(self.correction_job)
        if job is None:
            return None
        place = Placement.of_layer(self.correct.class_map.value)
        job, region = remeasure_region(
            job, self.layers.get("regions"), self.correct.class_map.value
        )

        def done(shown: Shown) -> None:
            out = shown.result
            self.last_remeasure_seconds = out.seconds
            self._show(out.measurement, out.phenotype)
            self.results.show_region(region)
            # busy until the new layers are in (they go in over later event-loop turns), so
            # wait() and the Run button see the re-measure as finished only then
            self._showing = True
            try:
                self.layers.show(shown.layers, then=self._shown_all)
            except Exception:
                self._showing = False
                raise
            n_oc = out.measurement.indices.get("N.Oc", 0)
            self.controls.status.value = f"re-measured in {out.seconds:.2f} s: N.Oc {n_oc:g}"

        return self._start(remeasure_and_prepare, job, place, done=done, message="re-measuring…")

    def save_class_map(self, path: str | Path | None = None) -> Any:
        """Write ``NAME.classes.tif`` and the instance maps beside it, in a worker."""
        job = self._prepare(self.correction_job)
        if job is None:
            return None
        if not path:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save class map", f"{job.name}.classes.tif", "TIFF (*.classes.tif *.tif)"
            )
            if not path:
                return None

        def done(saved: Path) -> None:
            self.controls.status.value = f"saved {saved}"
            show_info(f"histo: class map saved to {saved}")

        return self._start(jobs.save_corrections, job, path, done=done, message="saving…")

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the table as one row of indices.csv (a small file: written at once)."""
        from histo.io.tables import indices_row, write_indices_csv

        if self.measurement is None or self.phenotype is None:
            self._fail(HistoError("nothing to export: run or re-measure first"))
            return None
        layer = self.correct.class_map.value
        name = (layer.metadata.get("slide_name") if layer is not None else None) or "slide"
        if not path:
            path, _ = QFileDialog.getSaveFileName(
                self, "Export indices", f"{name}.indices.csv", "CSV (*.csv)"
            )
            if not path:
                return None
        try:
            path = write_indices_csv(
                path,
                [indices_row(name, self.measurement.indices, self.phenotype, self.results.region)],
            )
        except (HistoError, OSError) as exc:
            self._fail(exc)
            return None
        self.controls.status.value = f"exported {path}"
        return path


def _instances_beside(path: str | None) -> Any:
    """A loader (run in the worker) of the instance maps stored with a class-map file."""

    def load() -> jobs.Instances:
        from histo_napari._reader import instance_maps

        return jobs.Instances(*instance_maps(path)) if path else jobs.Instances(None, None)

    return load
