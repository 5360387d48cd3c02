"""Train on corrections: scribble layers, fine-tuning in a worker, the new model selected."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from histo_napari._results import format_value

from histo import classes
from histo.finetune import FinetuneProgress, FinetuneResult
from histo.segment.registry import MODEL_FILE, MODEL_JSON, shipped_models_dir
from tests.plugin.helpers import train_tiny, wait_for_run

pytestmark = pytest.mark.gui


class FakeFinetune:
    """Stands in for histo.finetune.finetune: records the fields, steps until cancelled.

    Fast and deterministic, for what the plugin does around it (progress, Cancel, choosing
    and re-running the model); ``test_train_with_histo_finetune`` runs the real one.
    """

    def __init__(self, steps: int = 5, step_s: float = 0.01):
        self.steps, self.step_s = steps, step_s
        self.fields: list = []
        self.started = threading.Event()

    def __call__(self, fields, out_dir, config=None, progress=None, cancel=None):
        self.fields = list(fields)
        self.started.set()
        t0, done = time.monotonic(), 0
        for step in range(1, self.steps + 1):
            if cancel is not None and cancel():
                break
            time.sleep(self.step_s)
            done = step
            elapsed = time.monotonic() - t0
            progress(FinetuneProgress(step, self.steps, 1 / step, 0.5, elapsed, True))
        out = Path(out_dir)  # the shipped model as the "fine-tuned" one: it loads
        out.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, MODEL_JSON):
            shutil.copy(shipped_models_dir() / "histo-unet" / name, out / name)
        cancelled = done < self.steps
        wall = time.monotonic() - t0
        return FinetuneResult(out, "0" * 64, done, wall, {"bone": 0.5}, cancelled)


@pytest.fixture
def fake_finetune(monkeypatch):
    """The fake in place of histo.finetune.finetune."""
    import histo.finetune

    fake = FakeFinetune()
    monkeypatch.setattr(histo.finetune, "finetune", fake)
    return fake


def scribble(layer, section) -> None:
    """Strokes of the truth: every 16th row of the section's class map."""
    layer.data[::16] = section.class_map[::16]
    layer.refresh()


def assert_not_clipped(qtbot, *labels) -> None:
    """Each label gets, once laid out, the height its text needs at its width."""

    def needed(label) -> int:
        if label.hasHeightForWidth():
            return label.heightForWidth(label.width())
        return label.sizeHint().height()

    def laid_out() -> None:
        heights = [(label.height(), needed(label)) for label in labels]
        assert all(h >= n for h, n in heights), f"clipped: (height, needed) {heights}"

    qtbot.waitUntil(laid_out, timeout=2000)


def test_new_scribble_layer_lies_on_the_image_unlabelled(viewer_widget, errors):
    viewer, widget = viewer_widget
    image = viewer.layers["section"]
    image.scale, image.translate = (0.5, 0.5), (10.0, 20.0)
    widget.section.pixel_size.value = 0.5
    layer = widget.train.new_scribble_layer()
    assert errors == [] and layer is viewer.layers["section scribbles"]
    assert layer.data.shape == image.data.shape[:2] and layer.data.dtype == np.uint8
    assert (layer.data == classes.UNLABELLED).all()
    assert tuple(layer.scale) == (0.5, 0.5) and tuple(layer.translate) == (10.0, 20.0)
    assert layer.colormap.map(classes.UNLABELLED)[3] == 0  # unlabelled is clear
    assert layer.colormap.map(classes.BONE)[:3] == pytest.approx(
        [c / 255 for c in classes.COLORS[classes.BONE]], abs=1e-3
    )
    assert layer.colormap.background_value == classes.UNLABELLED  # the eraser un-labels
    assert widget.train.layers.value == [layer]


def test_train_selects_the_new_model_and_compares(
    qtbot,
    monkeypatch,
    viewer_widget,
    errors,
    user_models,
    fake_finetune,
    scripted_pipeline,
    oc_rich_section,
):
    import histo_napari._worker as jobs

    # the scripted pipeline works at 1 µm/px whatever the model: no weights to load for it
    monkeypatch.setattr(jobs, "working_pixel_size_um", lambda model: 1.0)
    viewer, widget = viewer_widget
    viewer.window.show()  # laid out as on screen: the table must get its height
    widget.run()
    wait_for_run(qtbot, widget)
    layer = widget.train.new_scribble_layer()
    scribble(layer, oc_rich_section)
    assert widget.train.layers.value == [viewer.layers["section classes"], layer]
    widget.train.model_name.value = "tibia-lab"
    widget.train.minutes.value = 0.05
    progress = []
    widget.train.train_button.native.click()
    assert widget.running and not widget.controls.run_button.enabled
    widget.train.worker.yielded.connect(progress.append)
    widget.train.wait(120)  # the training, then the re-run with the new model
    assert "new model" in widget.train.comparison.value
    assert errors == [] and widget.train.result is not None
    assert (user_models / "tibia-lab" / "model.safetensors").is_file()
    assert widget.section.model.value == "tibia-lab"
    assert "tibia-lab" in widget.section.model.choices
    assert "val Dice" in widget.train.status.value and "tibia-lab" in widget.train.status.value
    assert any("loss" in p.message for p in progress)
    # the analysis ran again with the new model, and the table compares the runs
    assert [c["model"] for c in scripted_pipeline.calls] == ["classical", "tibia-lab"]
    bv_tv = format_value(widget.measurement.indices["BV/TV"])
    assert "before" in widget.train.comparison.value
    assert widget.train.comparison.value.count(f">{bv_tv}<") == 2
    assert widget.controls.run_button.enabled and widget.train.train_button.enabled
    assert_not_clipped(qtbot, widget.train.status.native, widget.train.comparison.native)
    # the image under the scribbles is the section itself, pixel for pixel
    field = next(f for f in fake_finetune.fields if f.name == layer.name)
    assert field.pixel_size_um == pytest.approx(1.0)
    np.testing.assert_array_equal(field.image, oc_rich_section.image)
    np.testing.assert_array_equal(field.class_map, layer.data)


def test_cancel_stops_the_worker(qtbot, viewer_widget, errors, user_models, fake_finetune):
    viewer, widget = viewer_widget
    widget.train.new_scribble_layer().data[:40, :40] = classes.MARROW
    widget.train.rerun.value = False
    fake_finetune.steps, fake_finetune.step_s = 2000, 0.02
    widget.train.train()
    assert fake_finetune.started.wait(10)
    t0 = time.monotonic()
    widget.train.cancel()
    wait_for_run(qtbot, widget, 10_000)
    assert time.monotonic() - t0 < 5
    result = widget.train.result
    assert result.cancelled and result.steps < fake_finetune.steps
    # the best so far is kept, under the automatic name
    assert widget.section.model.value == result.model_dir.name
    assert result.model_dir.parent == user_models and result.model_dir.name.startswith("section-")
    assert widget.train.train_button.enabled and not widget.train.cancel_button.enabled


def test_class_map_at_working_resolution_reads_the_image_on_its_grid(
    make_napari_viewer, fake_finetune
):
    from histo_napari._finetune import field_source
    from histo_napari._geometry import Placement, placement

    from histo.synth import make_section

    section = make_section("normal", size=256, pixel_size_um=0.5, seed=3)
    viewer = make_napari_viewer()
    image = viewer.add_image(section.image, rgb=True, scale=(0.5, 0.5), translate=(4.0, 8.0))
    place = placement(Placement.of_layer(image), 0.5, 1.0)  # where a run's class map lies
    cmap = viewer.add_labels(
        np.full((128, 128), 1, np.uint8), scale=place.scale, translate=place.translate
    )
    source = field_source(cmap, image, 0.5)
    assert source.pixel_size_um == pytest.approx(1.0)
    assert source.origin_um == pytest.approx((0.0, 0.0), abs=1e-9)
    field = source.labelled_field()
    # 2 × 2 means of the 0.5 µm/px image: the class map's 1 µm pixels
    means = section.image.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert field.image.shape == (128, 128, 3) and field.pixel_size_um == 1.0
    assert np.abs(field.image - means).max() <= 1.0


def test_lazy_labels_are_refused_with_a_message(viewer_widget, errors):
    import dask.array as da

    viewer, widget = viewer_widget
    lazy = da.zeros((512, 512), dtype=np.uint8, chunks=128)
    viewer.add_labels(lazy, name="slide classes", metadata={"histo_kind": "class_map"})
    assert widget.train.train() is None and not widget.running
    assert len(errors) == 1 and "on demand" in errors[0]


def test_train_with_histo_finetune(qtbot, viewer_widget, errors, user_models, oc_rich_section):
    import json

    from histo.segment.registry import file_sha256, locate_model

    viewer, widget = viewer_widget
    layer = widget.train.new_scribble_layer()
    scribble(layer, oc_rich_section)
    train_tiny(qtbot, widget, "lab")
    assert errors == []
    result = widget.train.result
    assert result.steps == 2 and not result.cancelled
    folder = user_models / "lab"
    assert file_sha256(folder / "model.safetensors") == result.sha256
    assert locate_model("lab").verify() == result.sha256  # the Model choice's name loads
    assert widget.section.model.value == "lab"
    # model.json counts the painted pixels of each class
    (record,) = json.loads((folder / "model.json").read_text())["data"]
    painted = {
        name: int((layer.data == code).sum())
        for code, name in classes.NAMES.items()
        if (layer.data == code).any()
    }
    assert {k: v for k, v in record["labelled_px"].items() if v} == painted
