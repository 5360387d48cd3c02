"""Train on corrections: fine-tune the network on class maps corrected or scribbled in napari.

The user paints class codes (DESIGN.md: 0 background, 1 marrow, 2 bone, 3 osteoclast,
4 osteocyte) either over a run's class map (a full correction) or on a scribble layer, a
labels layer on the image's grid where 255 means unlabelled. Each labels layer is paired
with the image it lies on; :func:`histo.finetune.finetune` then trains in a napari thread
worker, with progress and Cancel (the best model so far is kept), into a model folder that
becomes the widget's model.

A whole slide's class map is read from its store on demand and cannot be trained on whole:
the regions of it corrected and applied in the Whole-slide region box
(:class:`histo_napari._region.AppliedRegion`) are offered instead, each read from the edited
store with the slide's pixels under it.
"""

from __future__ import annotations

import html
import math
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from magicgui.widgets import (
    CheckBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
)
from napari.layers import Image, Labels, Layer
from qtpy.QtWidgets import QSizePolicy

from histo import classes
from histo.errors import HistoError, PixelSizeError
from histo.palette import class_rgba
from histo_napari._form import button_row
from histo_napari._geometry import layer_pixel_size_um
from histo_napari._region import AppliedRegion

if TYPE_CHECKING:
    from collections.abc import Callable

    import napari

    from histo_napari._region import RegionEditor
    from histo_napari._widget import HistoWidget

#: ``histo_kind`` of the layers that can be trained on: a class map (a run's, or opened
#: from a file) and a scribble layer
TRAINABLE_KINDS = ("class_map", "scribbles")
#: largest image (pixels) a scribble layer is made for: one uint8 byte per image pixel
SCRIBBLE_MAX_PX = 64 * 2**20
#: colour of the background class (0) on a scribble layer: strokes of glass must show
SCRIBBLE_BACKGROUND_RGBA = (0.35, 0.35, 0.35, 1.0)
#: progress bar resolution
PROGRESS_STEPS = 1000
#: default training budget, minutes
DEFAULT_MINUTES = 5.0
#: how often the before/after table looks whether the re-run has finished, ms
COMPARE_POLL_MS = 100


def is_trainable(layer: Layer) -> bool:
    """A labels layer of class codes: a class map or a scribble layer."""
    return isinstance(layer, Labels) and layer.metadata.get("histo_kind") in TRAINABLE_KINDS


def scribble_colormap() -> Any:
    """Class colours with background visible and 255 (unlabelled) clear.

    255 is the colormap's background value, so napari's eraser un-labels a pixel instead of
    painting it background.
    """
    from napari.utils.colormaps import DirectLabelColormap

    colors = class_rgba()
    colors[classes.BACKGROUND] = SCRIBBLE_BACKGROUND_RGBA
    colors[classes.UNLABELLED] = (0.0, 0.0, 0.0, 0.0)
    return DirectLabelColormap(color_dict=colors, background_value=classes.UNLABELLED)


def new_scribble_layer(image: Layer, pixel_size_um: float) -> Labels:
    """An empty scribble layer (all 255) on the grid of ``image`` at ``pixel_size_um`` µm/px.

    Raises
    ------
    HistoError
        The image is larger than :data:`SCRIBBLE_MAX_PX`.
    """
    base = image.data[0] if image.multiscale else image.data
    h, w = (int(n) for n in base.shape[:2])
    if h * w > SCRIBBLE_MAX_PX:
        raise HistoError(
            f"'{image.name}' has {h} × {w} px, too large to scribble on here: "
            "open a field of the slide (at most 8192 × 8192 px)"
        )
    slide_name = str(image.metadata.get("slide_name") or image.name)
    metadata = {
        "histo_kind": "scribbles",
        "pixel_size_um": float(pixel_size_um),
        "slide_name": slide_name,
        "histo_image": image.name,
    }
    layer = Labels(
        np.full((h, w), classes.UNLABELLED, np.uint8),
        name=f"{slide_name} scribbles",
        scale=tuple(image.scale[-2:]),
        translate=tuple(image.translate[-2:]),
        units=tuple(image.units[-2:]),
        colormap=scribble_colormap(),
        metadata=metadata,
        opacity=0.7,
    )
    layer.selected_label = classes.MARROW
    layer.brush_size = 10
    return layer


# --------------------------------------------------------------------------- jobs


@dataclass
class FieldSource:
    """One labels layer and the image under it, taken on the GUI thread.

    The class map is a copy (the user may keep painting); the image is the layer's array or
    the slide's path, read at the class map's grid in the worker.
    """

    name: str
    class_map: np.ndarray  #: (H, W) uint8 codes, 255 unlabelled
    pixel_size_um: float  #: of the class map
    image: Any  #: the image layer's array, or the path of its slide
    image_pixel_size_um: float  #: of the image's full resolution
    origin_um: tuple[float, float]  #: the class map's top-left corner from the image's, µm

    def labelled_field(self) -> Any:
        """The image read on the class map's grid, as a ``LabelledField`` (worker thread)."""
        from histo.finetune import LabelledField
        from histo.io import open_slide, read_region, slide_from_array

        if isinstance(self.image, np.ndarray):
            slide = slide_from_array(self.image, self.image_pixel_size_um, name=self.name)
        else:
            slide = open_slide(self.image, pixel_size_um=self.image_pixel_size_um)
        h, w = self.class_map.shape
        try:
            rgb = read_region(slide, *self.origin_um, h, w, self.pixel_size_um)
        finally:
            slide.close()
        source = None if isinstance(self.image, np.ndarray) else str(self.image)
        return LabelledField(
            image=np.ascontiguousarray(rgb, np.uint8),
            class_map=self.class_map,
            pixel_size_um=self.pixel_size_um,
            name=self.name,
            source=source,
        )


@dataclass
class TrainJob:
    """What to train on and where the model goes."""

    fields: list[FieldSource | AppliedRegion]  #: each gives its ``labelled_field()``
    out_dir: Path
    model_name: str  #: how the Model choice names the new model
    config: Any  #: histo.finetune.FinetuneConfig
    cancel_event: threading.Event = field(default_factory=threading.Event)


def progress_message(p: Any) -> str:
    """One line of a ``FinetuneProgress``: step, loss, validation Dice."""
    step = f"step {p.step}/{p.steps}" if p.steps else f"step {p.step}"
    text = f"{step} · loss {p.loss:.3f}"
    if p.val_dice is not None:
        text += f" · val Dice {p.val_dice:.3f}" + (" (best)" if p.best else "")
    return f"{text} · {p.elapsed_s:.0f} s"


def run_finetune(job: TrainJob, progress: Any = None) -> Any:
    """Read the fields and fine-tune (worker thread); returns the ``FinetuneResult``."""
    from histo.finetune import finetune

    if progress is not None:
        progress(0.0, "reading the images under the labels…")
    fields = [source.labelled_field() for source in job.fields]
    job.out_dir.parent.mkdir(parents=True, exist_ok=True)
    budget_s = max(60.0 * float(job.config.minutes), 1e-6)

    def report(p: Any) -> None:
        budget = getattr(p, "budget_s", None) or budget_s
        fraction = p.step / p.steps if p.steps else p.elapsed_s / budget
        if progress is not None:
            progress(min(max(fraction, 0.0), 1.0), progress_message(p))

    return finetune(
        fields, job.out_dir, job.config, progress=report, cancel=job.cancel_event.is_set
    )


def result_message(result: Any, model_name: str) -> str:
    """What a finished (or cancelled) fine-tuning gives: validation Dice and the folder."""
    dice = ", ".join(f"{k} {v:.3f}" for k, v in result.val_dice.items() if not math.isnan(v))
    how = "cancelled: kept the best model" if result.cancelled else "trained"
    best = getattr(result, "best_step", None)
    kept = "" if best is None else f", weights of step {best}"
    if best == 0:
        kept = ", the base's weights kept: no step scored better on the held-out pixels"
    return (
        f"{how} '{model_name}' ({result.steps} steps{kept}, {result.wall_s:.0f} s); "
        f"val Dice {dice or 'n/a'}; saved in {result.model_dir}"
    )


class Column(NamedTuple):
    """One column of the before/after table: a measurement and its phenotype call."""

    title: str
    measurement: Any  #: histo.measure.Measurement
    call: Any  #: histo.phenotype.PhenotypeCall


def comparison_table(columns: list[Column]) -> str:
    """Rich text: the call and the headline indices of each column, side by side, with units."""
    from histo.measure import INDEX_UNITS
    from histo_napari._results import HEADLINE, format_value

    def row(cells: list[str], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag} align='right'>{c}</{tag}>" for c in cells) + "</tr>"

    rows = [row(["", *(c.title for c in columns), ""], "th")]
    rows.append(row(["call", *(html.escape(c.call.phenotype) for c in columns), ""]))
    for key in HEADLINE:
        values = [format_value(c.measurement.indices.get(key, math.nan)) for c in columns]
        rows.append(row([key, *values, html.escape(INDEX_UNITS.get(key, ""))]))
    return "<table cellspacing='2' cellpadding='3'>" + "".join(rows) + "</table>"


# --------------------------------------------------------------------------- pairing


def paired_image(labels: Layer, viewer: napari.Viewer, chosen: Layer | None) -> Layer:
    """The image a labels layer lies on.

    The image a scribble layer was made for, else the image of the same slide name, else the
    image chosen in the widget.
    """
    images = [lyr for lyr in viewer.layers if isinstance(lyr, Image)]
    made_for = labels.metadata.get("histo_image")
    slide = labels.metadata.get("slide_name")
    for fits in (
        lambda lyr: made_for is not None and lyr.name == made_for,
        lambda lyr: slide is not None and (lyr.metadata.get("slide_name") or lyr.name) == slide,
    ):
        match = next((lyr for lyr in reversed(images) if fits(lyr)), None)
        if match is not None:
            return match
    if chosen is None:
        raise HistoError(f"no image under '{labels.name}': open the slide it was painted on")
    return chosen


def field_source(labels: Layer, image: Layer, image_px: float) -> FieldSource:
    """A labels layer over its image as a :class:`FieldSource` (GUI thread).

    Raises
    ------
    HistoError
        The labels are lazy (a whole slide's store) or not 2-D, or the image has no data to
        read from.
    """
    data = labels.data
    if labels.multiscale or not isinstance(data, np.ndarray):
        raise HistoError(
            f"'{labels.name}' is read from disk on demand (a whole slide): correct regions "
            "of it (Whole-slide region: Load, paint, Apply) and train on those"
        )
    if data.ndim != 2:
        raise HistoError(f"'{labels.name}' is not a 2-D class map")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise HistoError(f"'{labels.name}' holds labels outside 0-255: not class codes")
    px = layer_pixel_size_um(labels) or image_px * float(labels.scale[-1] / image.scale[-1])
    # world units per µm of the image; pixel centres lie at index * scale + translate
    world_per_um = np.asarray(image.scale[-2:], float) / image_px
    corner = np.asarray(labels.translate[-2:]) - np.asarray(labels.scale[-2:]) / 2
    image_corner = np.asarray(image.translate[-2:]) - np.asarray(image.scale[-2:]) / 2
    origin = (corner - image_corner) / world_per_um
    return FieldSource(
        name=labels.name,
        class_map=np.array(data, np.uint8, copy=True),
        pixel_size_um=float(px),
        image=_image_source(image),
        image_pixel_size_um=float(image_px),
        origin_um=(float(origin[0]), float(origin[1])),
    )


def _image_source(image: Layer) -> Any:
    path = image.metadata.get("histo_path")
    if image.multiscale or not isinstance(image.data, np.ndarray):
        if not path:
            raise HistoError(f"'{image.name}' is multiscale but has no file to read from")
        return str(path)
    return image.data


def _slide_name(item: Layer | AppliedRegion) -> str:
    """The slide a chosen labels layer or applied region is of ('' when unknown)."""
    if isinstance(item, AppliedRegion):
        return item.slide_name
    return str(item.metadata.get("slide_name") or "")


def default_model_name(slide_name: str, root: Path) -> str:
    """``<slide>-<YYYYmmdd-HHMM>``, with ``-2``, ``-3``… added when that folder exists."""
    stem = re.sub(r"[^\w.-]+", "-", slide_name).strip("-.") or "model"
    base = f"{stem}-{datetime.now():%Y%m%d-%H%M}"
    name, k = base, 2
    while (root / name).exists():
        name, k = f"{base}-{k}", k + 1
    return name


# --------------------------------------------------------------------------- the panel


class LabelsSelect(Select):
    """A multiple choice of the viewer's class-map and scribble layers, and of the regions of
    whole slides corrected and applied.

    A layer added to the viewer that fits, or a region just applied, joins the selection: it
    is the one just made (a whole slide's lazy class map does not: it cannot be trained on).
    """

    def __init__(self, viewer: napari.Viewer, **kwargs: Any) -> None:
        self.viewer = viewer
        #: the applied regions of whole slides, oldest first (:meth:`follow_regions`)
        self.regions: Callable[[], list[AppliedRegion]] = list
        super().__init__(choices=self._layers, **kwargs)
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        for event in (events.removed, events.reordered, events.renamed):
            event.connect(self.reset_choices)
        row = self.native.fontMetrics().lineSpacing() + 6
        self.native.setFixedHeight(4 * row + 8)  # four layers show; more scroll

    def _layers(self, _: Any = None) -> list[tuple[str, Any]]:
        layers = [(lyr.name, lyr) for lyr in reversed(self.viewer.layers) if is_trainable(lyr)]
        regions = [(r.name, r) for r in reversed(self.regions()) if r.store.exists()]
        return [*layers, *regions]

    def _choose_also(self, item: Any) -> None:
        chosen = list(self.value)
        self.reset_choices()
        self.value = [*(c for c in chosen if c in self.choices), item]

    def _on_inserted(self, event: Any) -> None:
        if is_trainable(event.value) and not event.value.multiscale:  # a whole slide: no
            self._choose_also(event.value)
        else:
            self.reset_choices()

    def follow_regions(self, editor: RegionEditor) -> None:
        """Offer the regions ``editor`` applies, and choose each one as it is applied."""
        self.regions = lambda: editor.applied
        editor.region_applied.connect(self._choose_also)
        editor.regions_forgotten.connect(lambda _store: self.reset_choices())
        self.reset_choices()


class TrainForm(Container):
    """The inputs and buttons of "Train on corrections"."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.layers = LabelsSelect(
            viewer,
            label="Labels",
            tooltip="Corrected class maps and scribble layers to learn from (255: unlabelled).",
        )
        self.scribble_button = PushButton(
            text="New scribble layer",
            tooltip="An empty labels layer over the image: paint a few strokes of each class "
            "(the eraser un-labels).",
        )
        self.model_name = LineEdit(
            label="New model",
            tooltip="A name (a folder in the user model folder) or a folder path.",
        )
        self.model_name.native.setPlaceholderText("automatic: <slide>-<date>")
        self.minutes = FloatSpinBox(
            label="Minutes",
            value=DEFAULT_MINUTES,
            min=0.01,
            max=600.0,
            step=1.0,
            tooltip="Training time budget (wall clock).",
        )
        self.rerun = CheckBox(
            text="then re-run and compare",
            value=True,
            tooltip="Analyse the image again with the new model; a table compares the indices.",
        )
        self.train_button = PushButton(text="Train", tooltip="Fine-tune the model on the labels.")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = button_row(self.train_button, self.cancel_button)
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0)
        self.status = Label(value="Correct a class map or scribble, then Train.")
        # as wide as the panel: the layout reserves the height of the wrapped text at the
        # panel's width, and a narrower label (magicgui's fixed policy) needs more lines
        self.status.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.status.native.setWordWrap(True)
        self.comparison = Label(value="")
        inputs = Container(
            widgets=[self.layers, self.scribble_button, self.model_name, self.minutes, self.rerun]
        )
        inputs.margins = (0, 0, 0, 0)
        # the status and the table are rows of their own, outside the labelled rows: a
        # labelled row keeps the height it was first laid out with and clips a table that
        # arrives later
        super().__init__(
            widgets=[inputs, buttons, self.progress, self.status, self.comparison], labels=False
        )


class TrainPanel(TrainForm):
    """Train on corrections: pairs the labels with their images and runs the fine-tuning.

    Parameters
    ----------
    widget
        The Histomorphometry widget: its image, pixel size and model choices, and whether a
        job of its own is running (one job at a time).
    """

    def __init__(self, widget: HistoWidget) -> None:
        super().__init__(widget.viewer)
        self.widget = widget
        self.worker: Any = None
        self.job: TrainJob | None = None
        self.result: Any = None  #: the last FinetuneResult
        #: more ``FinetuneConfig`` fields for scripts (``{"max_steps": 50, "seed": 1}``)
        self.config_options: dict[str, Any] = {}
        self._rerun_pending = False
        self._compare_timer: Any = None
        self.scribble_button.clicked.connect(lambda: self.new_scribble_layer())
        self.train_button.clicked.connect(lambda: self.train())
        self.cancel_button.clicked.connect(lambda: self.cancel())

    @property
    def running(self) -> bool:
        """True while a fine-tuning runs."""
        return self.worker is not None

    def _image_pixel_size(self, image: Layer) -> float:
        section = self.widget.section
        if image is section.image.value:  # what the user typed wins
            px = float(section.pixel_size.value)
        else:
            px = layer_pixel_size_um(image) or 0.0
        if px <= 0:
            raise PixelSizeError(
                f"pixel size of '{image.name}' unknown: enter it (µm/px) in the widget"
            )
        return px

    def new_scribble_layer(self) -> Labels | None:
        """Add an empty scribble layer over the chosen image and select it for painting."""
        image = self.widget.section.image.value
        try:
            if image is None:
                raise HistoError("no image layer: open a slide or a sample first")
            layer = new_scribble_layer(image, self._image_pixel_size(image))
        except HistoError as exc:
            self._fail(exc)
            return None
        viewer = self.widget.viewer
        viewer.layers.append(layer)
        viewer.layers.selection.active = layer
        layer.mode = "paint"
        self.status.value = "paint strokes of each class (1 marrow, 2 bone, 3 osteoclast, …)"
        return layer

    def make_job(self) -> TrainJob:
        """The training job of the chosen layers (raises HistoError on bad input)."""
        from histo.finetune import FinetuneConfig

        chosen = list(self.layers.value)
        if not chosen:
            raise HistoError("no labels chosen: correct a class map or add a scribble layer")
        section = self.widget.section
        sources: list[FieldSource | AppliedRegion] = []
        for labels in chosen:
            if isinstance(labels, AppliedRegion):  # read from its store in the worker
                labels.check()
                sources.append(labels)
                continue
            image = paired_image(labels, self.widget.viewer, section.image.value)
            sources.append(field_source(labels, image, self._image_pixel_size(image)))
        out_dir, name = self._model_folder(_slide_name(chosen[0]))
        base = str(section.model.value)
        config = FinetuneConfig(
            base=None if base in ("default", "classical") else base,
            minutes=float(self.minutes.value),
            **self.config_options,
        )
        device = str(section.device.value)
        if device != "auto" and hasattr(config, "device"):  # else the fine-tuning's default
            config.device = device
        return TrainJob(sources, out_dir, name, config)

    def _model_folder(self, slide_name: str) -> tuple[Path, str]:
        """The new model's folder, and its name in the Model choice (a path outside the
        user model folder)."""
        from histo.segment.registry import user_models_dir

        root = user_models_dir()
        typed = str(self.model_name.value).strip()
        if not typed:
            out_dir = root / default_model_name(slide_name or "model", root)
        else:
            out_dir = Path(typed).expanduser()
            if not out_dir.is_absolute() and len(out_dir.parts) == 1:
                out_dir = root / out_dir
        if out_dir.exists() and any(out_dir.iterdir()):
            raise HistoError(f"model folder {out_dir} exists: choose another name")
        in_user_folder = out_dir.parent.resolve() == root.resolve()
        return out_dir, out_dir.name if in_user_folder else str(out_dir)

    def train(self) -> Any:
        """Start the fine-tuning in a worker thread (returns at once)."""
        from napari.qt.threading import create_worker

        from histo_napari._worker import with_progress

        if self.widget.running:
            self._fail(HistoError("wait for the running job to finish, then Train"))
            return None
        try:
            job = self.make_job()
        except HistoError as exc:
            self._fail(exc)
            return None
        self.job, self.result = job, None
        worker = create_worker(
            with_progress, run_finetune, job, _start_thread=False, _ignore_errors=True
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_busy(True)
        self.progress.value = 0
        self.status.value = f"training '{job.model_name}' for {job.config.minutes:g} min…"
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the fine-tuning at its next step; the best model so far is kept."""
        if self.job is not None and self.running:
            self.job.cancel_event.set()
            self.cancel_button.enabled = False
            self.status.value = "cancelling: keeping the best model so far…"

    def wait(self, timeout_s: float = 900.0) -> None:
        """Run Qt's event loop until the fine-tuning, and the re-run after it, end (scripts)."""
        from histo_napari._layers import run_events_until

        def idle() -> bool:
            timer = self._compare_timer
            return not (self.widget.running or (timer is not None and timer.isActive()))

        run_events_until(idle, timeout_s)

    def _set_busy(self, busy: bool) -> None:
        self.train_button.enabled = self.scribble_button.enabled = not busy
        self.cancel_button.enabled = busy
        self.widget.controls.set_busy(busy)

    def _on_progress(self, item: Any) -> None:
        self.progress.value = round(item.fraction * PROGRESS_STEPS)
        self.status.value = item.message

    def _on_done(self, result: Any) -> None:
        from napari.utils.notifications import show_info

        from histo_napari._form import model_names

        self.result = result
        name = self.job.model_name if self.job is not None else str(result.model_dir)
        model = self.widget.section.model
        names = model_names()
        model.choices = names if name in names else [*names, name]
        model.value = name
        self.progress.value = PROGRESS_STEPS
        self.status.value = result_message(result, name)
        show_info(f"histo: {self.status.value}")
        self._rerun_pending = bool(self.rerun.value) and self.widget.section.image.value is not None

    def _on_errored(self, exc: BaseException) -> None:
        from histo.errors import Cancelled

        self.progress.value = 0
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled before a model was saved"
            return
        if not isinstance(exc, HistoError):
            import logging

            logging.getLogger(__name__).error("fine-tuning failed", exc_info=exc)
        self._fail(exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._set_busy(False)
        if self._rerun_pending:
            self._rerun_pending = False
            self.rerun_and_compare()

    def rerun_and_compare(self) -> Any:
        """Analyse the image with the chosen (new) model; then compare with what was shown.

        The table's columns: the last run (the model before), the corrected map when it was
        re-measured since, and the new model's run.
        """
        widget = self.widget
        columns = []
        if widget.output is not None:
            run = widget.output.result
            columns.append(Column("before", run.measurement, run.phenotype))
            if widget.measurement is not run.measurement and widget.phenotype is not None:
                columns.append(Column("corrected", widget.measurement, widget.phenotype))
        shown = widget.measurement
        worker = widget.run()
        if worker is None:
            return None
        from qtpy.QtCore import QTimer

        def compare() -> None:  # the run's layers arrive after its worker ends: poll
            if widget.running:
                return
            self._compare_timer.stop()
            if widget.last_error is None and widget.measurement is not shown:
                after = Column("new model", widget.measurement, widget.phenotype)
                self.comparison.value = comparison_table([*columns, after])

        self._compare_timer = QTimer(self.native)
        self._compare_timer.timeout.connect(compare)
        self._compare_timer.start(COMPARE_POLL_MS)
        return worker

    def _fail(self, exc: BaseException) -> None:
        from histo_napari._widget import one_line

        self.status.value = one_line(exc)
        self.widget._fail(exc)
