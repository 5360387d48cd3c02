"""Helpers of the napari plugin tests: a scripted stand-in for the pipeline, a run waiter.

Imported as ``tests.plugin.helpers`` (pytest puts the project root on ``sys.path``, see
``pythonpath`` in pyproject.toml), never through ``conftest``: which ``conftest`` module a
test imports depends on which folders pytest collected before it.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
from histo_napari._bench import StallProbe

from tests.helpers import measure_truth

__all__ = ["TINY_RUN", "ScriptedPipeline", "StallProbe", "train_tiny", "wait_for_run"]

#: a fine-tuning of two small steps (the budget would spend minutes)
TINY_RUN = {
    "max_steps": 2,
    "qc_reference_slides": 0,
    "forgetting_sections": 0,
    "replay_sections": 1,
    "replay_share": 0.0,
    "batch_size": 2,
    "crop_px": 96,
    "val_max_blocks": 2,
    "val_every": 1,
}


class ScriptedPipeline:
    """Stands in for histo.pipeline.analyze_slide: the synthetic truth as the segmentation.

    Honours ``progress`` and ``cancel`` like the real pipeline, in ``steps`` steps of
    ``step_s`` seconds, and can be told to raise an error.
    """

    def __init__(self, section, steps: int = 5, step_s: float = 0.01):
        self.section, self.steps, self.step_s = section, steps, step_s
        self.raise_error: Exception | None = None
        self.started = threading.Event()
        self.calls: list[dict] = []

    def __call__(
        self,
        source,
        *,
        pixel_size_um=None,
        model="default",
        roi=None,
        name=None,
        progress=None,
        cancel=None,
        **kwargs,
    ):
        from histo.errors import Cancelled

        self.calls.append({"pixel_size_um": pixel_size_um, "model": model, "roi": roi})
        self.started.set()
        for k in range(self.steps):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            if progress is not None:
                progress(k / self.steps, f"step {k + 1}/{self.steps}")
            time.sleep(self.step_s)
        if self.raise_error is not None:
            raise self.raise_error
        s = self.section
        call = SimpleNamespace(
            phenotype="oc-rich", confidence=0.9, evidence=["N.Oc/B.Pm high", "Ma.Ar/T.Ar 41% < 65%"]
        )
        return SimpleNamespace(
            name=name or "image",
            pixel_size_um=s.pixel_size_um,
            source_pixel_size_um=pixel_size_um,
            class_map=s.class_map.copy(),
            osteoclast_labels=s.osteoclast_labels.copy(),
            osteocyte_labels=s.osteocyte_labels.copy(),
            measurement=measure_truth(s, image=np.asarray(source), roi=roi),
            phenotype=call,
            model=model,
            seconds=0.0,
        )


def wait_for_run(qtbot, widget, timeout_ms: int = 60_000) -> None:
    """Wait until the widget's worker (run, re-measure or save) has finished."""
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout_ms)


def train_tiny(qtbot, widget, model_name: str) -> None:
    """Train on corrections with TINY_RUN (no re-run), waited for: max_steps ends it."""
    widget.train.model_name.value = model_name
    widget.train.rerun.value = False
    widget.train.config_options = TINY_RUN
    widget.train.minutes.value = widget.train.minutes.max  # max_steps ends it, not the clock
    widget.train.train()
    wait_for_run(qtbot, widget, 900_000)
