"""The widget's long work, off the GUI thread: analyse, re-measure, save.

Each job is a record taken from the widget on the GUI thread (copies of what the user may
keep editing); the functions here run in napari thread workers and touch no layer or widget.
"""

from __future__ import annotations

import math
import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from histo import classes
from histo_napari._geometry import Placement, placement, region_mask, working_shape


class Progress(NamedTuple):
    """One step of a long job: how far (0-1) and what it is doing."""

    fraction: float
    message: str


def working_pixel_size_um(model: str) -> float:
    """Working resolution (µm/px) of a model (from the registry; loads the model otherwise)."""
    try:
        from histo.segment.registry import read_registry, resolve

        _, entry = resolve(model, read_registry())
        return float(entry["working_pixel_size_um"])
    except Exception:  # noqa: BLE001 - not in the registry (a weights path)
        from histo.segment import load_model

        return float(load_model(model).working_pixel_size_um)


def load_reference_ranges(path: str | Path | None) -> Any:
    """Reference ranges of ``histo calibrate`` (None: the built-in ranges)."""
    if not path:
        return None
    from histo.phenotype import load_ranges

    return load_ranges(path)


# --------------------------------------------------------------------------- analysis


@dataclass
class AnalysisJob:
    """Everything the analysis needs, taken from the widget on the GUI thread."""

    source: Any  #: path of the slide, or the RGB array of the layer
    pixel_size_um: float  #: level-0 pixel size, µm/px
    model: str
    name: str
    level0_shape: tuple[int, int]  #: (H, W) of the image at full resolution
    image_placement: Placement  #: where the image layer lies in the world
    region_world: list[np.ndarray] = field(default_factory=list)  #: ROI polygons, world (y, x)
    ranges_path: str | None = None  #: reference ranges JSON (``histo calibrate``)
    out_dir: str | None = None  #: where the slide's outputs go (None: only large slides, to a temp)
    device: str = "auto"  #: where the network runs (histo.device)
    cancel_event: threading.Event = field(default_factory=threading.Event)


@dataclass
class AnalysisOutput:
    """A finished run: the pipeline's result, where it lies, and what re-measuring needs."""

    job: AnalysisJob
    result: Any  #: histo.pipeline.SlideResult
    placement: Placement  #: where the working-resolution maps lie in the world
    roi: np.ndarray | None  #: the region mask the run measured in (working pixels)
    seconds: float
    image: np.ndarray | None = None  #: RGB at the working resolution, once known
    #: label name -> (lazy pyramid from full resolution down, µm/px) when shown from the store
    levels: dict[str, tuple[list[Any], float | None]] | None = None
    store: Path | None = None  #: the labels.ome.zarr the maps are shown from

    def attach_store(self, store: Path, temporary_dir: str | None) -> None:
        """Show the maps from the slide's labels.ome.zarr: drop the in-memory arrays.

        A temporary output folder lives as long as this output (the layers read from it).
        """
        from histo_napari._reader import store_levels

        self.levels = store_levels(store)
        self.store = Path(store)
        r = self.result
        r.class_map, r.osteoclast_labels, r.osteocyte_labels = (
            self.levels[name][0][0] for name in ("class_map", "osteoclasts", "osteocytes")
        )
        if temporary_dir is not None:
            weakref.finalize(self, shutil.rmtree, temporary_dir, True)

    def stored_instances(self) -> Instances:
        """The run's full-resolution instance maps in its store (zarr: read on indexing)."""
        levels = self.levels or {}
        return Instances(
            *(levels[k][0][0] if k in levels else None for k in ("osteoclasts", "osteocytes"))
        )

    def working_image(self) -> np.ndarray | None:
        """The RGB image the pipeline measured with (read from the slide on first need)."""
        if self.image is None:
            self.image = read_working_image(self.job, self.result)
        return self.image


@contextmanager
def analysis_runtime() -> Generator[None, None, None]:
    """The runtime tuning the ``histo`` command gives itself (:mod:`histo.runtime`), for the
    length of an analysis in napari's process.

    - malloc: at most two arenas for the threads started from now on (the analysis's; the
      GUI thread keeps the main arena) - a cap glibc applies to new arenas only, kept after
      the run, and harmless to napari, whose arenas exist already;
    - the heap's free pages given back between the analysis's phases, and Python's cyclic
      collector run less often: both only while the analysis runs, then as they were.
    """
    import gc

    from histo import runtime

    trim_allowed = bool(getattr(runtime, "_HEAP_TRIM_ALLOWED", False))
    thresholds = gc.get_threshold()
    runtime.tune_malloc()
    runtime.tune_gc()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        runtime.allow_heap_trim(trim_allowed)


def analyze(job: AnalysisJob, progress: Callable[[float, str], None] | None = None):
    """Run the pipeline for ``job`` (worker thread); raises HistoError or Cancelled."""
    with analysis_runtime():
        return _analyze(job, progress)


def _analyze(job: AnalysisJob, progress: Callable[[float, str], None] | None) -> AnalysisOutput:
    from histo.pipeline import analyze_slide

    t0 = time.perf_counter()
    working_px = working_pixel_size_um(job.model)
    place = placement(job.image_placement, job.pixel_size_um, working_px)
    shape = working_shape(job.level0_shape, job.pixel_size_um, working_px)
    roi = region_mask([place.world_to_px(p) for p in job.region_world], shape)
    lazy = shape[0] * shape[1] >= LAZY_RESULTS_MIN_PX
    temporary = None if job.out_dir or not lazy else tempfile.mkdtemp(prefix="histo-napari-")
    try:
        result = analyze_slide(
            job.source,
            out_dir=job.out_dir or temporary,
            pixel_size_um=job.pixel_size_um,
            model=job.model,
            device=job.device,
            roi=roi,
            name=job.name,
            ranges=load_reference_ranges(job.ranges_path),
            progress=progress,
            cancel=job.cancel_event.is_set,
        )
    except BaseException:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    image = getattr(result, "image", None)
    if image is None and _is_working_image(job.source, result.class_map.shape):
        image = job.source  # the layer already is the image at the working resolution
    output = AnalysisOutput(job, result, place, roi, time.perf_counter() - t0, image)
    if lazy:
        output.attach_store(Path(result.out_dir) / "labels.ome.zarr", temporary)
    return output


def _is_working_image(source: Any, shape: tuple[int, ...]) -> bool:
    return (
        isinstance(source, np.ndarray)
        and source.shape == (*shape[:2], 3)
        and source.dtype == np.uint8
    )


#: re-measuring gives the image to measure up to this size (as the pipeline does)
MEASURE_IMAGE_MAX_PX = 40_000_000
#: results of at least this many working pixels are shown from the slide's labels.ome.zarr as
#: lazy pyramids (read on demand, not editable with the brush); smaller ones in memory
LAZY_RESULTS_MIN_PX = 8 * 2**20
#: block side (px) of re-measuring a stored class map block by block
BLOCK_PX = 1536


def read_working_image(job: AnalysisJob, result: Any) -> np.ndarray | None:
    """The slide at the working resolution, as the pipeline measured it (None when huge)."""
    from histo.io import open_slide, read_region, slide_from_array

    h, w = result.class_map.shape[:2]
    if h * w > MEASURE_IMAGE_MAX_PX:
        return None
    if isinstance(job.source, np.ndarray):
        slide = slide_from_array(job.source, pixel_size_um=job.pixel_size_um)
    else:
        slide = open_slide(job.source, pixel_size_um=job.pixel_size_um)
    try:
        return read_region(slide, 0.0, 0.0, h, w, result.pixel_size_um)
    finally:
        slide.close()


#: the shortest time between two progress reports handed to the GUI: each one repaints the
#: window, which under a software OpenGL renderer costs the GUI thread ~20 ms
PROGRESS_INTERVAL_S = 0.5


def with_progress(fn: Callable[..., Any], *args: Any) -> Generator[Progress, None, Any]:
    """Run ``fn(*args, progress=...)`` in a helper thread, yielding its progress.

    A generator for napari's ``thread_worker``: the pipeline is one blocking call that
    reports through a callback, so it runs beside the worker and its reports are handed to
    the GUI thread, the latest one at most every :data:`PROGRESS_INTERVAL_S`. Returns what
    ``fn`` returns; re-raises what it raises.
    """
    messages: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, progress=lambda f, m: messages.put(Progress(f, m)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker below
            outcome["error"] = exc
        finally:
            messages.put(None)

    thread = threading.Thread(target=target, name="histo-job", daemon=True)
    thread.start()
    yield from _latest_every(messages, PROGRESS_INTERVAL_S)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _latest_every(messages: queue.Queue, interval_s: float) -> Generator[Progress, None, None]:
    """The queue's items up to None, the latest at most every ``interval_s`` (the last one
    always)."""
    pending: Progress | None = None
    last = -math.inf
    while True:
        wait = None if pending is None else max(0.0, last + interval_s - time.monotonic())
        try:
            item = messages.get(timeout=wait)
        except queue.Empty:
            item = pending  # no newer report came in time: hand over the one held
        if item is None:
            break
        pending = item
        if time.monotonic() - last >= interval_s:
            yield pending
            pending, last = None, time.monotonic()
    if pending is not None:
        yield pending


# --------------------------------------------------------------------------- corrections


def class_map_instances(
    class_map: np.ndarray, instances: np.ndarray | None, code: int
) -> np.ndarray | None:
    """Instance labels consistent with an edited class map (None if ``instances`` is None).

    The rule of :func:`histo.io.region_edit.edited_instances`: a cell left alone keeps its
    label, pixels painted onto a cell join it, a region painted apart is a new cell.
    """
    if instances is None:
        return None
    from histo.io.region_edit import edited_instances

    inst = np.asarray(instances)
    if inst.shape != class_map.shape:
        return None
    return edited_instances(class_map, inst, code)


class Instances(NamedTuple):
    """Osteoclast and osteocyte instance labels (None: each connected region is one cell)."""

    osteoclasts: np.ndarray | None
    osteocytes: np.ndarray | None


@dataclass
class CorrectionJob:
    """A class map as the user left it, and where its instances and image come from."""

    class_map: Any  #: a numpy copy (the user may keep painting), or the stored zarr map
    pixel_size_um: float
    name: str
    instances: Instances | Callable[[], Instances]  #: as they were before the edit
    run: AnalysisOutput | None = None  #: the run that produced the map (None: from a file)
    region_px: Sequence[np.ndarray] = ()  #: ROI polygons in pixels of the class map
    ranges_path: str | None = None

    @property
    def stored(self) -> bool:
        """True for a map read from the slide's store (too large to hold; not painted)."""
        return not isinstance(self.class_map, np.ndarray)

    def edited_instances(self) -> Instances:
        """The instances made consistent with the edited class map."""
        raw = self.instances() if callable(self.instances) else self.instances
        if self.stored:
            return raw
        return Instances(
            class_map_instances(self.class_map, raw.osteoclasts, classes.OSTEOCLAST),
            class_map_instances(self.class_map, raw.osteocytes, classes.OSTEOCYTE),
        )


class Remeasured(NamedTuple):
    """What re-measuring an edited class map found."""

    measurement: Any  #: histo.measure.Measurement
    phenotype: Any  #: histo.phenotype.PhenotypeCall
    seconds: float


def remeasure(job: CorrectionJob) -> Remeasured:
    """Measure the edited class map (worker thread): no segmentation.

    After a run the image at the working resolution and the run's instances are measured
    with it, so an unedited map gives the run's numbers; a map opened from a file is measured
    as ``histo measure`` measures it, with the instance maps beside it.
    """
    from histo.measure import measure
    from histo.phenotype import call_phenotype

    t0 = time.perf_counter()
    instances = job.edited_instances()
    roi = region_mask(list(job.region_px), job.class_map.shape)
    if job.stored:
        measurement = _measure_stored(job, instances, roi)
    else:
        measurement = measure(
            job.class_map,
            job.pixel_size_um,
            osteoclast_labels=instances.osteoclasts,
            osteocyte_labels=instances.osteocytes,
            image=job.run.working_image() if job.run is not None else None,
            roi=roi,
        )
    call = call_phenotype(measurement.indices, load_reference_ranges(job.ranges_path))
    return Remeasured(measurement, call, time.perf_counter() - t0)


def _measure_stored(job: CorrectionJob, instances: Instances, roi: np.ndarray | None) -> Any:
    """Block-wise measurement of a stored class map, reading the slide block by block."""
    from histo.io import open_slide
    from histo.measure import measure_by_blocks

    px = job.pixel_size_um
    arguments = {
        "osteoclast_labels": instances.osteoclasts,
        "osteocyte_labels": instances.osteocytes,
        "roi": roi,
        "block_px": BLOCK_PX,
    }
    run = job.run
    if run is None or isinstance(run.job.source, np.ndarray):
        return measure_by_blocks(job.class_map, px, **arguments)
    with open_slide(run.job.source, pixel_size_um=run.job.pixel_size_um) as slide:

        def read(y: int, x: int, h: int, w: int) -> np.ndarray:
            from histo.io import read_region

            return np.asarray(read_region(slide, y * px, x * px, h, w, px))

        return measure_by_blocks(job.class_map, px, image=read, **arguments)


def save_corrections(job: CorrectionJob, path: str | Path) -> Path:
    """Write ``NAME.classes.tif`` and the instance maps beside it (worker thread).

    The layout ``histo measure``, ``histo finetune`` and the reader take: uint8 codes and
    uint32 instances as OME-TIFF with the pixel size, each written atomically.
    """
    from histo.measure import validate_class_map
    from histo.synth import write_pyramidal_tiff

    path = Path(path)
    if not path.name.lower().endswith((".tif", ".tiff")):
        path = path.with_name(path.name + ".classes.tif")
    cmap = job.class_map if job.stored else validate_class_map(job.class_map).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    instances = job.edited_instances()
    write_pyramidal_tiff(path, cmap, job.pixel_size_um, label=True)
    base = path.name[: -len(".classes.tif")] if path.name.endswith(".classes.tif") else path.stem
    for kind, labels in zip(instances._fields, instances, strict=True):
        if labels is not None:  # beside it, where `histo measure` looks for them
            target = path.with_name(f"{base}.{kind}.tif")
            labels = labels if job.stored else labels.astype(np.uint32)
            write_pyramidal_tiff(target, labels, job.pixel_size_um, label=True)
    return path
