"""One slide end to end: read, find tissue, segment, measure, call, write.

One path for every size: segmentation writes the maps into a :class:`LabelStore` (numpy in
memory for small slides, the slide's OME-Zarr labels on disk for large ones), the measurement
reads the store block by block (:func:`measure_slide`) and :func:`write_slide_outputs` writes
the outputs block by block; only where the store lives depends on the slide's size.

The command line (``histo analyze``, ``histo batch``) and the napari plugin all call
:func:`analyze_slide`; neither holds logic the other lacks.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histo.errors import Cancelled, EmptyTissueError, HistoError, OutputError, PixelSizeError
from histo.runtime import import_in_background

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

#: files a finished slide folder holds; a folder missing any of them is incomplete
SLIDE_OUTPUTS = (
    "labels.ome.zarr",
    "osteoclasts.csv",
    "osteocytes.csv",
    "overlay.png",
    "osteoclasts.geojson",
    "osteocytes.geojson",
    "indices.json",
)


@dataclass
class SlideResult:
    """What :func:`analyze_slide` found on one slide (maps at the working resolution: numpy
    arrays, or zarr arrays read on indexing for slides above :data:`LABELS_ON_DISK_MIN_PX`)."""

    name: str
    pixel_size_um: float  #: working resolution of the maps, µm/px
    source_pixel_size_um: float  #: level-0 pixel size of the slide, µm/px
    class_map: np.ndarray  #: (H, W) uint8 codes of histo.classes
    osteoclast_labels: np.ndarray  #: (H, W) instance labels (0 = none)
    osteocyte_labels: np.ndarray
    measurement: object  #: histo.measure.Measurement
    phenotype: object  #: histo.phenotype.PhenotypeCall
    model: str
    seconds: float
    tissue_megapixels: float  #: tissue area in megapixels at the source resolution
    out_dir: Path | None = None
    thumbnail: np.ndarray | None = field(default=None, repr=False)
    #: histo version, model name and sha256, device (:meth:`histo.segment.Segmenter.provenance`)
    provenance: dict = field(default_factory=dict)
    #: which region the indices are for (histo.measure.regional.MeasuredRegion)
    region: object = None
    #: quality control of the slide and of what was found (histo.qc.QCReport)
    qc: object = None
    #: where the network was unsure (histo.qc._confidence.LowConfidenceMap; None for a model
    #: that reports no scores' margins)
    low_confidence: object = None

    def row(self) -> dict:
        """The slide's row of indices.csv."""
        from histo.io.tables import indices_row

        region = self.region
        return indices_row(
            self.name,
            self.measurement.indices,
            self.phenotype,
            region=None if region is None else region.name,
            extra=None if region is None else region.extra,
            qc=self.qc,
        )


class _Steps:
    """Maps the steps of one slide onto one progress range and checks for cancellation."""

    def __init__(self, progress: ProgressFn | None, cancel: CancelFn | None) -> None:
        self.progress, self.cancel = progress, cancel

    def __call__(self, fraction: float, message: str) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled")
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), message)

    def sub(self, start: float, stop: float) -> ProgressFn:
        def report(fraction: float, message: str) -> None:
            self(start + (stop - start) * fraction, message)

        return report


def _open(source, pixel_size_um: float | None, name: str | None):
    from histo.io import open_slide, require_pixel_size, slide_from_array

    if isinstance(source, np.ndarray):
        slide = slide_from_array(source, pixel_size_um=pixel_size_um, name=name or "image")
    else:
        slide = open_slide(source, pixel_size_um=pixel_size_um)
    require_pixel_size(slide)
    return slide


def analyze_slide(
    source,
    *,
    out_dir: str | os.PathLike | None = None,
    pixel_size_um: float | None = None,
    model: str = "default",
    roi=None,
    name: str | None = None,
    ranges=None,
    tile_px: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    record: dict | None = None,
    device: str | None = None,
) -> SlideResult:
    """Analyse one slide: segment, measure the ASBMR indices, call the phenotype.

    Parameters
    ----------
    source
        Path of a slide (any format :func:`histo.io.open_slide` reads) or an (H, W, 3) RGB
        array.
    out_dir
        When given, the slide's outputs are written to ``out_dir/<name>/`` (labels.ome.zarr,
        osteoclasts.csv, osteocytes.csv, GeoJSON outlines, overlay.png, indices.json). They are
        written into a temporary folder renamed at the end: a killed run leaves nothing
        half-written.
    pixel_size_um
        Level-0 pixel size in µm/px; wins over the file's metadata. Required for arrays.
    model
        ``default`` (the shipped network), ``classical`` or a weights path.
    roi
        Region of interest for the indices, in µm from the slide's top-left corner, so that
        it does not depend on the resolution the slide is measured at. One of:

        - a :class:`histo.io.roi.Roi`: polygons with holes, vertices (y, x) in µm;
        - an (N, 2) array of (y, x) vertices in µm (one polygon), or a list of them
          (polygons without holes);
        - the path of a GeoJSON file (Polygon, MultiPolygon; holes as inner rings) in level-0
          pixels of the slide (QuPath's convention, as histo's own outlines), scaled by the
          slide's pixel size;
        - a boolean mask on the grid of the working resolution (napari's shapes, rasterised).

        Areas count the region's pixels, perimeters the bone boundary inside it, objects
        whose centroid lies in it.
    ranges
        Reference ranges for the phenotype call: ``histo.phenotype.ReferenceRanges`` or the
        path of a JSON file written by ``histo calibrate``.
    progress
        ``progress(fraction, message)`` called as work advances.
    cancel
        ``cancel() -> bool``; True stops the run with :class:`histo.errors.Cancelled`.
    record
        Stored as ``input`` in the slide's indices.json (``histo batch --resume`` records the
        input path, size, mtime and a settings hash there).
    device
        Where the network runs: "auto" (default: CUDA, then MPS, then the CPU), "cpu", "cuda"
        or "mps" (:func:`histo.device.resolve_device`); recorded in indices.json.
    """
    t0 = time.perf_counter()
    if model != "classical":
        import_in_background("torch")  # while the slide is opened and its tissue found
    step = _Steps(progress, cancel)
    step(0.0, "opening")
    slide = _open(source, pixel_size_um, name)
    try:
        name = name or slide.name
        region = _as_roi(roi, slide)
        ranges = _as_ranges(ranges)
        step(0.02, "finding tissue")
        prepared = _prepare(slide, model, name, device, step)
        run = _Run(name, str(model), step, region, ranges, tile_px)
        result = _run_with_store(slide, prepared, run, out_dir, record)
        result.seconds = time.perf_counter() - t0
        step(1.0, f"{result.phenotype.phenotype} in {result.seconds:.1f} s")
        return result
    finally:
        slide.close()


@dataclass(frozen=True)
class _Run:
    """The settings of one slide's analysis that the stages share."""

    name: str
    model: str
    step: _Steps
    roi: object  #: histo.io.roi.Roi or None
    ranges: object  #: histo.phenotype.ReferenceRanges or None
    tile_px: int | None


def _run_with_store(slide, prepared: _Prepared, run: _Run, out_dir, record) -> SlideResult:
    """Analyse into a label store and write the outputs; the store is removed on failure."""
    segmenter = prepared.segmenter
    store = LabelStore(out_dir, run.name, _working_shape(slide, segmenter), segmenter)
    try:
        result = _analyze(slide, prepared, store, run)
        if out_dir is not None:
            run.step(0.9, "writing")
            result.out_dir = write_slide_outputs(
                result, out_dir, record=record, labels_writer=store.writer
            )
        store.attach(result)
    except BaseException:
        store.abort()
        raise
    return result


@dataclass(frozen=True)
class _Prepared:
    """What is known of a slide before segmentation."""

    tissue: object  #: histo.io.TissueMask
    segmenter: object  #: histo.segment.Segmenter
    qc: object  #: histo.qc.QCReport of the checks that need no segmentation


def _prepare(slide, model: str, name: str, device: str | None, step: _Steps) -> _Prepared:
    """The slide's tissue mask, its quality checks and the segmenter.

    The thumbnail the tissue is found on also gives the colour check and the quality
    checks' white point, so the slide is searched for tissue once.
    """
    from histo.io import read_thumbnail
    from histo.io.tissue import tissue_mask_from_rgb
    from histo.qc import check_slide
    from histo.qc._sample import TISSUE_MASK_UM
    from histo.runtime import release_free_memory
    from histo.segment import load_model

    thumb = read_thumbnail(slide, TISSUE_MASK_UM)
    tissue = tissue_mask_from_rgb(thumb, TISSUE_MASK_UM)  # as histo.io.detect_tissue
    if not tissue.mask.any():
        raise EmptyTissueError(f"{name}: no tissue found on the slide")
    _check_colour(thumb, tissue, name)
    step(0.03, "quality checks")
    qc = check_slide(slide, tissue=tissue, thumbnail=thumb)
    segmenter = load_model(model, device=device)
    _check_resolution(slide, segmenter, name)
    # tissue detection's and the checks' temporaries (tens of MB on a large slide) are not
    # held through the segmentation
    del thumb
    release_free_memory()
    return _Prepared(tissue, segmenter, qc)


def _analyze(slide, prepared: _Prepared, store: LabelStore, run: _Run) -> SlideResult:
    """Segment into the label store, measure it block by block, judge what was found and call
    the phenotype."""
    from histo.runtime import release_free_memory
    from histo.segment import segment_slide

    segmenter, tissue = prepared.segmenter, prepared.tissue
    step = run.step
    step(0.05, "segmenting")
    tiling = {"tile_px": int(run.tile_px)} if run.tile_px else {}
    seg = segment_slide(
        slide,
        segmenter,
        tissue=tissue,
        progress=step.sub(0.05, 0.85),
        cancel=step.cancel,
        sink=store.sink,
        margin_map=True,
        **tiling,
    )
    release_free_memory()
    step(0.86, "measuring")
    regional = measure_slide_regions(slide, seg, run.roi, step.sub(0.86, 0.9))
    measurement = regional.measurement
    release_free_memory()
    if measurement.indices.get("B.Ar", 0) == 0:
        raise EmptyTissueError(f"{run.name}: tissue found but no bone: nothing to measure")
    tissue_mp = float(tissue.mask.sum()) * (tissue.pixel_size_um / slide.pixel_size_um) ** 2
    qc, call = _judge(prepared.qc, measurement, run.ranges, _confidence(seg, segmenter))
    return SlideResult(
        name=run.name,
        pixel_size_um=seg.pixel_size_um,
        source_pixel_size_um=float(slide.pixel_size_um),
        class_map=seg.class_map,
        osteoclast_labels=seg.osteoclast_labels,
        osteocyte_labels=seg.osteocyte_labels,
        measurement=measurement,
        phenotype=call,
        model=run.model,
        seconds=0.0,
        tissue_megapixels=tissue_mp / 1e6,
        thumbnail=_thumbnail(slide, seg.class_map.shape, seg.pixel_size_um),
        provenance=segmenter.provenance(),
        region=regional.region,
        qc=qc,
        low_confidence=_low_confidence(seg, segmenter),
    )


def _low_confidence(seg, segmenter):
    """The blocks where the network was unsure, by the model's own reference (for a viewer)."""
    from histo.qc._confidence import low_confidence_map

    return low_confidence_map(
        getattr(seg, "confidence", None), getattr(segmenter, "qc_reference", None)
    )


def _confidence(seg, segmenter) -> list:
    """The model-confidence signal of a segmentation against the model's own in-domain
    reference (none for a segmenter that reports no confidence, e.g. the classical one)."""
    from histo.qc._confidence import confidence_signal

    summary = getattr(seg, "confidence", None)
    if summary is None:
        return []
    return [confidence_signal(summary, getattr(segmenter, "qc_reference", None))]


def _judge(slide_qc, measurement, ranges, extra_signals=()):
    """(QCReport, PhenotypeCall): the slide's checks completed with the plausibility of what
    was found and the model's confidence; a failed report withholds the call (``uncertain``),
    a warning keeps it."""
    from histo.phenotype import call_phenotype, withhold_call
    from histo.qc import FAIL, check_analysis

    qc = check_analysis(slide_qc, measurement, extra_signals)
    call = call_phenotype(measurement.indices, ranges)
    if qc.status == FAIL:
        call = withhold_call(call, qc.reasons)
    return qc, call


def _as_roi(roi, slide):
    """The ``roi`` argument of :func:`analyze_slide` as a :class:`histo.io.roi.Roi` (µm)."""
    from histo.io.roi import Roi, read_roi_geojson

    if roi is None or isinstance(roi, Roi):
        return roi
    if isinstance(roi, np.ndarray) and roi.dtype == bool:
        return roi  # a mask on the grid of the working resolution (napari's shapes, rasterised)
    if isinstance(roi, (str, os.PathLike)):
        return read_roi_geojson(roi, float(slide.pixel_size_um))
    if isinstance(roi, np.ndarray) and roi.ndim == 2:
        return Roi.from_rings([[roi]])
    return Roi.from_rings([[np.asarray(polygon, float)] for polygon in roi])


def _as_ranges(ranges):
    """The ``ranges`` argument of :func:`analyze_slide`: ReferenceRanges, a JSON path or None."""
    if isinstance(ranges, (str, os.PathLike)):
        from histo.phenotype import load_ranges

        return load_ranges(ranges)
    return ranges


#: a slide may be at most this many times coarser than the model's working resolution: beyond
#: it, upsampling invents detail (and a 100 µm/px file would become a gigantic working image)
MAX_UPSAMPLING = 4.0


def _check_resolution(slide, segmenter, name: str) -> None:
    working = float(segmenter.working_pixel_size_um)
    if slide.pixel_size_um > MAX_UPSAMPLING * working:
        raise PixelSizeError(
            f"{name}: pixel size {slide.pixel_size_um:g} µm/px is too coarse for the model "
            f"(it works at {working:g} µm/px and accepts slides up to "
            f"{MAX_UPSAMPLING * working:g} µm/px); check the file's pixel size or --pixel-size"
        )


#: working-resolution maps larger than this (pixels) are stored on disk while the slide is
#: analysed (zarr: the slide's labels.ome.zarr, or a temporary store without ``out_dir``), and
#: :class:`SlideResult` holds zarr arrays; smaller maps are held in memory (numpy, 9 bytes a
#: pixel). Every later stage reads the store block by block, wherever it lives.
LABELS_ON_DISK_MIN_PX = 32_000_000
#: block side (px) of the measurement: a block with its 256-px margin is the measurement's
#: unit of memory (~45 B a pixel of window: ~190 MB at 1536 px), while smaller blocks read
#: their margins more often (1536: 1.78x the map's pixels)
MEASURE_BLOCK_PX = 1536


def _working_shape(slide, segmenter) -> tuple[int, int]:
    """(H, W) of the slide at the model's working resolution (as segment_slide computes it)."""
    f = float(slide.pixel_size_um) / float(segmenter.working_pixel_size_um)
    base = slide.levels[0]
    return int(round(base.shape[0] * f)), int(round(base.shape[1] * f))


def measure_slide(slide, seg, roi=None, progress: ProgressFn | None = None):
    """Measure a segmentation block by block, reading the slide's image block by block.

    Parameters
    ----------
    slide
        The slide (:func:`histo.io.open_slide`) the segmentation was made from.
    seg
        :class:`histo.segment.SegmentationResult` (numpy or zarr maps).
    roi
        None or a :class:`histo.io.roi.Roi` (µm).
    progress
        ``progress(fraction, message)`` after each block.
    """
    from histo.io import read_region
    from histo.measure import measure_by_blocks

    px = seg.pixel_size_um

    def read(y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.asarray(read_region(slide, y * px, x * px, h, w, px))

    return measure_by_blocks(
        seg.class_map,
        px,
        osteoclast_labels=seg.osteoclast_labels,
        osteocyte_labels=seg.osteocyte_labels,
        image=read,
        roi=roi,
        block_px=MEASURE_BLOCK_PX,
        progress=progress,
    )


def measure_slide_regions(slide, seg, roi=None, progress: ProgressFn | None = None):
    """:func:`measure_slide` in the region the indices are for
    (:func:`histo.measure.regional.measure_by_region`): a user's ROI; on a long bone without
    one, the standard region (with the whole section, cortex and primary spongiosa beside it);
    otherwise the whole section.

    Returns a :class:`histo.measure.regional.RegionalMeasurement`.
    """
    from histo.measure.regional import measure_by_region

    def measure_roi(region_roi):
        # progress restarts for each region measured (one on a field, four on a long bone)
        return measure_slide(slide, seg, region_roi, progress)

    return measure_by_region(seg.class_map, seg.pixel_size_um, measure_roi, roi=roi)


class LabelStore:
    """Where a slide's label images live while it is analysed.

    Small slides (at most :data:`LABELS_ON_DISK_MIN_PX` working pixels) are held in memory:
    segmentation allocates numpy arrays. Larger ones are written to an OME-Zarr
    :class:`histo.io.ome_zarr.LabelsWriter`: in the slide's partial output folder when
    ``out_dir`` is given (:func:`write_slide_outputs` finalises it in place), otherwise in a
    temporary folder removed when the :class:`SlideResult` is garbage-collected.
    """

    def __init__(self, out_dir, name: str, shape: tuple[int, int], segmenter) -> None:
        self.writer = None
        self.sink = None
        self.root: Path | None = None
        if shape[0] * shape[1] <= LABELS_ON_DISK_MIN_PX:
            return
        import tempfile

        from histo.io.label_store import LabelsSink
        from histo.io.ome_zarr import LabelsWriter

        self.temporary = out_dir is None
        if self.temporary:
            self.root = Path(tempfile.mkdtemp(prefix="histo-stream-"))
        else:
            self.root = _partial_dir(Path(out_dir), name)
            if self.root.exists():
                shutil.rmtree(self.root)
            self.root.mkdir(parents=True)
        px = float(segmenter.working_pixel_size_um)
        self.writer = LabelsWriter(self.root / "labels.ome.zarr", shape, px)
        names = ("class_map", "osteoclasts", "osteocytes")
        self.sink = {k: LabelsSink(self.writer, k) for k in names}

    def attach(self, result: SlideResult) -> None:
        """Point an on-disk ``result``'s maps at the finished store (zarr arrays)."""
        import weakref

        from histo.io.ome_zarr import read_labels

        if self.writer is None:
            return
        if self.temporary:
            _write_overview(self.writer, result)
            store = self.writer.finalize()
            weakref.finalize(result, shutil.rmtree, str(self.root), True)
        else:
            store = Path(result.out_dir) / "labels.ome.zarr"
        maps = read_labels(store, lazy=True)
        result.class_map = maps["class_map"][0]
        result.osteoclast_labels = maps["osteoclasts"][0]
        result.osteocyte_labels = maps["osteocytes"][0]

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _write_overview(writer, result: SlideResult) -> None:
    """The thumbnail as the store's overview image, at most at the size of the labels'
    coarsest level (the photo under the labels in a viewer; compressing a larger one would
    cost a small slide half a second)."""
    import cv2

    if result.thumbnail is None:
        return
    thumb = result.thumbnail
    coarse = writer.coarsest_shape
    if thumb.shape[0] > coarse[0] or thumb.shape[1] > coarse[1]:
        thumb = cv2.resize(thumb, (coarse[1], coarse[0]), interpolation=cv2.INTER_AREA)
    scale = result.class_map.shape[0] / thumb.shape[0]
    writer.write_overview(np.ascontiguousarray(thumb), result.pixel_size_um * scale)


def _partial_dir(out_dir: Path, name: str) -> Path:
    """Where a slide's outputs are written before being renamed to ``out_dir/<name>``."""
    return out_dir / f".{name}.partial-{os.getpid()}"


#: tissue whose channels differ by less than this (0-255) everywhere is grayscale
GRAYSCALE_SPREAD = 6


def _check_colour(thumb: np.ndarray, tissue, name: str) -> None:
    """Refuse grayscale slides: TRAP is told from its counterstain by colour alone
    (``thumb``: the RGB thumbnail ``tissue`` was found on)."""
    from histo.errors import SlideReadError

    mask = tissue.mask[: thumb.shape[0], : thumb.shape[1]]
    pixels = thumb[: mask.shape[0], : mask.shape[1]][mask].astype(np.int16)
    if len(pixels) and np.percentile(np.ptp(pixels, axis=1), 99) < GRAYSCALE_SPREAD:
        raise SlideReadError(
            f"{name}: the slide is grayscale; TRAP staining is recognised by colour, "
            "so scan or export it in RGB"
        )


def _thumbnail(slide, shape: tuple[int, int], pixel_size_um: float) -> np.ndarray:
    """The slide at the size of the overlay (longest side at most OVERLAY_MAX_PX)."""
    from histo.io import read_region
    from histo.report import OVERLAY_MAX_PX

    scale = min(1.0, OVERLAY_MAX_PX / max(shape))
    h, w = max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))
    return read_region(slide, 0.0, 0.0, h, w, pixel_size_um / scale)


def _json_value(value):
    """numpy scalars and arrays as JSON values (integers stay integers)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return float(value)


def write_slide_outputs(
    result: SlideResult,
    out_dir: str | os.PathLike,
    record: dict | None = None,
    labels_writer=None,
) -> Path:
    """Write one slide's outputs to ``out_dir/<name>/`` atomically; returns that folder.

    Everything is written into ``out_dir/.<name>.partial-<pid>`` and renamed at the end. An
    existing ``<name>`` folder is first renamed aside (``.<name>.old-<pid>``) and removed only
    after the new one is in place, so ``<name>`` is at every instant absent, the old complete
    folder or the new complete folder. ``record`` is stored as ``input`` in indices.json.

    The maps (numpy or zarr) are never needed whole: ``labels_writer`` is the LabelsWriter
    that segmentation filled inside the partial folder (otherwise the maps are copied band by
    band); the overlay is drawn from the map downsampled to its size; GeoJSON outlines
    are written block by block, skipping objects larger than the block margin (256 px; none
    on real cells).
    """
    from concurrent.futures import ThreadPoolExecutor

    from histo.report import overlay_class_map, write_overlay

    out_dir = Path(out_dir)
    partial = _partial_dir(out_dir, result.name)
    try:
        if labels_writer is None:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        # the overlay's PNG encoding (the longest write of a small slide) runs in a thread
        # beside the other outputs; its class map is read before the store is finalized
        small = overlay_class_map(result.class_map)
        with ThreadPoolExecutor(1, thread_name_prefix="histo-overlay") as pool:
            drawn = pool.submit(write_overlay, partial / "overlay.png", small, result.thumbnail)
            maps = _write_labels(result, partial, labels_writer)
            _write_tables(result, partial, maps, record)
            drawn.result()
        final = _publish(partial, out_dir / result.name)
    except HistoError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(f"cannot write outputs to {out_dir}: {exc.strerror or exc}") from None
    return final


_MAP_NAMES = ("class_map", "osteoclasts", "osteocytes")


def _write_labels(result: SlideResult, partial: Path, writer) -> dict:
    """labels.ome.zarr in ``partial``; returns the maps to read the other outputs from."""
    from histo.io.label_store import copy_labels
    from histo.io.ome_zarr import LabelsWriter, read_labels

    maps = dict(
        zip(
            _MAP_NAMES,
            (result.class_map, result.osteoclast_labels, result.osteocyte_labels),
            strict=True,
        )
    )
    if writer is None:
        shape = tuple(result.class_map.shape)
        writer = LabelsWriter(partial / "labels.ome.zarr", shape, result.pixel_size_um)
        for key, array in maps.items():
            copy_labels(writer, key, array)
    _write_overview(writer, result)
    store = writer.finalize()
    if all(isinstance(a, np.ndarray) for a in maps.values()):
        return maps
    # zarr maps: read back from the finalized store (the writer's arrays were renamed)
    stored = read_labels(store, lazy=True)
    return {key: stored[key][0] for key in _MAP_NAMES}


def _write_tables(result: SlideResult, partial: Path, maps: dict, record: dict | None) -> None:
    """Object tables, GeoJSON outlines and indices.json in ``partial``."""
    import json

    from histo.io.geojson import write_label_geojson_by_blocks
    from histo.io.tables import write_object_table

    m = result.measurement
    write_object_table(partial / "osteoclasts.csv", m.osteoclasts)
    write_object_table(partial / "osteocytes.csv", m.osteocytes)
    # outlines in level-0 pixels of the slide (QuPath's convention)
    for kind in ("osteoclast", "osteocyte"):
        write_label_geojson_by_blocks(
            partial / f"{kind}s.geojson",
            maps[f"{kind}s"],
            result.pixel_size_um,
            kind,
            slide_pixel_size_um=result.source_pixel_size_um,
        )
    meta = {
        "row": result.row(),
        "model": result.model,
        "pixel_size_um": result.pixel_size_um,
        "source_pixel_size_um": result.source_pixel_size_um,
        **result.provenance,
    }
    if result.region is not None:
        meta["region"] = result.region.as_dict()
    if result.qc is not None:
        meta["qc"] = result.qc.to_dict()
    if record is not None:
        meta["input"] = record
    (partial / "indices.json").write_text(json.dumps(meta, indent=1, default=_json_value))


def _publish(partial: Path, final: Path) -> Path:
    """Rename ``partial`` to ``final``; a previous ``final`` is moved aside, then removed."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
