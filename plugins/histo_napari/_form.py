"""The widget's forms, built from magicgui widgets: what to analyse and what to correct."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton
from napari.layers import Image, Labels, Layer, Shapes

from histo_napari._geometry import layer_pixel_size_um

if TYPE_CHECKING:
    import napari

#: models offered when the registry cannot be read
FALLBACK_MODELS = ("default", "classical")


def model_names() -> list[str]:
    """Model names of the registry, 'default' and 'classical' first."""
    names = list(FALLBACK_MODELS)
    try:
        from histo.segment.registry import read_registry

        registry = read_registry()
        from histo.segment.registry import user_model_names

        extra = sorted(set(registry.get("models", {})) | set(registry.get("aliases", {})))
        names += [n for n in [*extra, *user_model_names()] if n not in names]
    except Exception:  # noqa: BLE001 - no registry: offer the defaults
        pass
    return names


def button_row(*buttons: PushButton) -> Container:
    """Buttons side by side, with no labels nor margins."""
    row = Container(widgets=list(buttons), layout="horizontal", labels=False)
    row.margins = (0, 0, 0, 0)
    return row


def is_class_map(layer: Layer) -> bool:
    """A labels layer holding histo class codes (a run's, or a class map opened from file)."""
    return isinstance(layer, Labels) and layer.metadata.get("histo_kind") == "class_map"


class LayerChoice(ComboBox):
    """A choice of the viewer's layers of some kinds, newest first, following the layer list.

    A layer added to the viewer that fits becomes the choice: it is the one the user means.
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        fits: Callable[[Layer], bool],
        none_text: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.viewer, self.fits = viewer, fits
        if none_text:
            self.null_string = none_text
        super().__init__(choices=self._layers, nullable=none_text is not None, **kwargs)
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        for event in (events.removed, events.reordered, events.renamed):
            event.connect(self.reset_choices)

    def _layers(self, _: Any = None) -> list[tuple[str, Layer]]:
        return [(lyr.name, lyr) for lyr in reversed(self.viewer.layers) if self.fits(lyr)]

    def _on_inserted(self, event: Any) -> None:
        self.reset_choices()
        if self.fits(event.value):
            self.value = event.value


class SectionForm(Container):
    """What to analyse: image, model, pixel size, region and reference ranges."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.image = LayerChoice(
            viewer,
            lambda layer: isinstance(layer, Image),
            label="Image",
            tooltip="The TRAP-stained section to analyse (RGB image layer).",
        )
        self.model = ComboBox(
            label="Model",
            choices=model_names(),
            tooltip="default: the shipped network; classical: colour rules (fast, no weights).",
        )
        from histo.device import DEVICES

        self.device = ComboBox(
            label="Device",
            choices=list(DEVICES),
            value="auto",
            tooltip="Where the network runs: auto takes a CUDA GPU, then Apple MPS, then the CPU.",
        )
        self.pixel_size = FloatSpinBox(
            label="Pixel size",
            min=0.0,
            max=100.0,
            step=0.05,
            tooltip="µm per pixel of the image's full resolution, from the file when it "
            "says; indices without a scale are meaningless.",
        )
        self.pixel_size.native.setDecimals(4)
        self.pixel_size.native.setSuffix(" µm/px")
        self.pixel_size.native.setSpecialValueText("unknown: enter µm/px")
        self.region = LayerChoice(
            viewer,
            # not a run's regions layer: its standard region is re-measured on its own
            lambda layer: (
                isinstance(layer, Shapes) and layer.metadata.get("histo_kind") != "regions"
            ),
            none_text="whole section",
            label="Region",
            tooltip="Measure only inside the shapes of a shapes layer (all of them; a shape "
            "drawn inside another cuts a hole).",
        )
        self.ranges = FileEdit(
            label="Reference ranges",
            mode="r",
            filter="*.json",
            nullable=True,
            tooltip="Optional: ranges.json of `histo calibrate` for your strain and lab.",
        )
        self.out_dir = FileEdit(
            label="Output folder",
            mode="d",
            nullable=True,
            tooltip="Optional: write the slide's outputs here, as `histo analyze --out` does "
            "(large slides are shown from their labels.ome.zarr).",
        )
        super().__init__(
            widgets=[
                self.image,
                self.model,
                self.device,
                self.pixel_size,
                self.region,
                self.ranges,
                self.out_dir,
            ]
        )
        self._pixel_size_for: Layer | None = None
        self.image.changed.connect(self._fill_pixel_size)
        self._fill_pixel_size()

    def _fill_pixel_size(self, *_: Any) -> None:
        """Fill in the pixel size of a newly chosen image (keeps what the user typed)."""
        layer = self.image.value
        if layer is self._pixel_size_for and layer is not None:
            return
        self._pixel_size_for = layer
        self.pixel_size.value = layer_pixel_size_um(layer) or 0.0

    def ranges_path(self) -> str | None:
        """The reference ranges file, or None for the built-in ranges."""
        return _path_or_none(self.ranges)

    def out_dir_path(self) -> str | None:
        """The output folder, or None (outputs are not kept)."""
        return _path_or_none(self.out_dir)


def _path_or_none(edit: FileEdit) -> str | None:
    value = edit.value
    return str(value) if value and str(value) not in ("", ".") else None


class CorrectForm(Container):
    """Which class map to correct, and the buttons that act on it."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.class_map = LayerChoice(
            viewer,
            is_class_map,
            label="Class map",
            tooltip="Paint marrow (1) over a false osteoclast, osteoclast (3) to add one; "
            "then Re-measure.",
        )
        self.remeasure_button = PushButton(
            text="Re-measure", tooltip="Indices of the edited class map (no segmentation)."
        )
        self.save_button = PushButton(
            text="Save class map…", tooltip="NAME.classes.tif: for `histo measure` and training."
        )
        self.export_button = PushButton(text="Export CSV…", tooltip="The table as indices.csv.")
        buttons = button_row(self.remeasure_button, self.save_button, self.export_button)
        super().__init__(widgets=[self.class_map, buttons])


class RunControls(Container):
    """Run and Cancel, the progress bar and the status line."""

    def __init__(self) -> None:
        from magicgui.widgets import ProgressBar
        from qtpy.QtWidgets import QSizePolicy

        self.run_button = PushButton(text="Run", tooltip="Segment, measure and call the phenotype.")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = button_row(self.run_button, self.cancel_button)
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0)
        self.status = Label(value="Pick an image and press Run.")
        status = self.status.native
        status.setWordWrap(True)
        # a fixed height: a status line that grows would resize (and redraw) the canvas
        status.setFixedHeight(3 * status.fontMetrics().lineSpacing() + 4)
        status.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        super().__init__(widgets=[buttons, self.progress, self.status], labels=False)

    def set_busy(self, busy: bool, cancellable: bool = False) -> None:
        """Grey out Run while work is going on; Cancel only for a cancellable run."""
        self.run_button.enabled = not busy
        self.cancel_button.enabled = busy and cancellable


PROGRESS_STEPS = 1000
