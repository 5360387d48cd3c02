"""One slide end to end: read, find tissue, segment, measure, call, write.

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
    """What :func:`analyze_slide` found on one slide (arrays at the working resolution)."""

    name: str
    pixel_size_um: float  #: working resolution of the maps, µm/px
    source_pixel_size_um: float  #: level-0 pixel size of the slide, µm/px
    class_map: np.ndarray
    osteoclast_labels: np.ndarray
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

    def row(self) -> dict:
        """The slide's row of indices.csv."""
        return indices_row(self.name, self.measurement, self.phenotype)


def indices_row(name: str, measurement, phenotype) -> dict:
    """One row of indices.csv: slide, phenotype, the indices, confidence, evidence."""
    row = {"slide": name, "phenotype": phenotype.phenotype}
    row.update(measurement.indices)
    row["confidence"] = phenotype.confidence
    row["evidence"] = "; ".join(phenotype.evidence)
    return row


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
        Region of interest for the indices: boolean mask or polygon ((N, 2) of (y, x)) in
        pixels of the working resolution.
    ranges
        Reference ranges for the phenotype call (``histo.phenotype.ReferenceRanges``).
    progress
        ``progress(fraction, message)`` called as work advances.
    cancel
        ``cancel() -> bool``; when it returns True the run stops with
        :class:`histo.errors.Cancelled`.
    record
        Stored as ``input`` in the slide's indices.json (``histo batch --resume`` records the
        input path, size, mtime and a settings hash there).
    device
        Where the network runs: "auto" (default: CUDA, then MPS, then the CPU), "cpu", "cuda"
        or "mps" (:func:`histo.device.resolve_device`); recorded in indices.json.
    """
    from histo.io import detect_tissue
    from histo.phenotype import call_phenotype
    from histo.runtime import release_free_memory
    from histo.segment import load_model, segment_slide

    t0 = time.perf_counter()
    if model != "classical":
        import_in_background("torch")  # ~1.3 s, while the slide is opened and tissue found
    step = _Steps(progress, cancel)
    step(0.0, "opening")
    slide = _open(source, pixel_size_um, name)
    try:
        name = name or slide.name
        step(0.02, "finding tissue")
        tissue = detect_tissue(slide)
        if not tissue.mask.any():
            raise EmptyTissueError(f"{name}: no tissue found on the slide")
        _check_colour(slide, tissue, name)
        tissue_mp = float(tissue.mask.sum()) * (tissue.pixel_size_um / slide.pixel_size_um) ** 2
        segmenter = load_model(model, device=device)
        _check_resolution(slide, segmenter, name)
        # tissue detection's temporaries (tens of MB on a large slide) are not held through
        # the segmentation
        release_free_memory()
        step(0.05, "segmenting")
        tiling = {"tile_px": int(tile_px)} if tile_px else {}
        shape = _working_shape(slide, segmenter)
        stream = None
        if shape[0] * shape[1] > STREAMING_MIN_PX:
            stream = _Stream(out_dir, name, shape, float(segmenter.working_pixel_size_um))
        try:
            seg = segment_slide(
                slide,
                segmenter,
                tissue=tissue,
                progress=step.sub(0.05, 0.85),
                cancel=cancel,
                sink=None if stream is None else stream.sink,
                **tiling,
            )
            release_free_memory()
            step(0.86, "measuring")
            measurement = _measure_segmentation(
                slide, seg, roi, stream is not None, step.sub(0.86, 0.9)
            )
            release_free_memory()
            if measurement.indices.get("B.Ar", 0) == 0:
                raise EmptyTissueError(f"{name}: tissue found but no bone: nothing to measure")
            call = call_phenotype(measurement.indices, ranges)
            result = SlideResult(
                name=name,
                pixel_size_um=seg.pixel_size_um,
                source_pixel_size_um=float(slide.pixel_size_um),
                class_map=seg.class_map,
                osteoclast_labels=seg.osteoclast_labels,
                osteocyte_labels=seg.osteocyte_labels,
                measurement=measurement,
                phenotype=call,
                model=str(model),
                seconds=0.0,
                tissue_megapixels=tissue_mp / 1e6,
                thumbnail=_thumbnail(slide, seg.class_map.shape, seg.pixel_size_um),
                provenance=segmenter.provenance(),
            )
            if out_dir is not None:
                step(0.9, "writing")
                result.out_dir = write_slide_outputs(
                    result,
                    out_dir,
                    record=record,
                    labels_writer=None if stream is None else stream.writer,
                )
            if stream is not None:
                stream.attach(result)
        except BaseException:
            if stream is not None:
                stream.abort()
            raise
        result.seconds = time.perf_counter() - t0
        step(1.0, f"{call.phenotype} in {result.seconds:.1f} s")
        return result
    finally:
        slide.close()


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


#: the RGB image at working resolution is given to measure (lacuna occupancy, nuclei, TRAP
#: signal) up to this many pixels; larger slides are measured from the maps alone
MEASURE_IMAGE_MAX_PX = 40_000_000


def _image_for_measure(slide, shape: tuple[int, int], pixel_size_um: float):
    from histo.io import read_region

    if shape[0] * shape[1] > MEASURE_IMAGE_MAX_PX:
        return None
    return read_region(slide, 0.0, 0.0, shape[0], shape[1], pixel_size_um)


#: working-resolution maps larger than this (pixels) are streamed: segmentation writes them to
#: on-disk zarr (the slide's labels.ome.zarr, or a temporary store without ``out_dir``), they are
#: measured block by block (:func:`histo.measure_blocks.measure_by_blocks`) and
#: :class:`SlideResult` holds zarr arrays instead of numpy arrays. Smaller maps stay in memory.
STREAMING_MIN_PX = 32_000_000
#: block side (px) of the block-wise measurement of streamed slides: a block with its 256-px
#: margin is the measurement's unit of memory (~45 B a pixel of window: ~190 MB at 1536 px,
#: ~295 MB at 2048 px, where it was the peak of the whole analysis), while smaller blocks read
#: their margins more often (1536: 1.78x the map's pixels, 2048: 1.56x)
STREAMING_BLOCK_PX = 1536


def _working_shape(slide, segmenter) -> tuple[int, int]:
    """(H, W) of the slide at the model's working resolution (as segment_slide computes it)."""
    f = float(slide.pixel_size_um) / float(segmenter.working_pixel_size_um)
    base = slide.levels[0]
    return int(round(base.shape[0] * f)), int(round(base.shape[1] * f))


def _measure_segmentation(slide, seg, roi, streamed: bool, progress: ProgressFn):
    """Measure the maps: whole arrays in memory, or block by block for streamed slides."""
    if not streamed:
        from histo.measure import measure

        image = _image_for_measure(slide, seg.class_map.shape, seg.pixel_size_um)
        return measure(
            seg.class_map,
            seg.pixel_size_um,
            osteoclast_labels=seg.osteoclast_labels,
            osteocyte_labels=seg.osteocyte_labels,
            image=image,
            roi=roi,
        )
    from histo.io import read_region
    from histo.measure_blocks import measure_by_blocks

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
        block_px=STREAMING_BLOCK_PX,
        progress=progress,
    )


class _Stream:
    """On-disk maps of a streamed slide: a LabelsWriter in the slide's partial output folder
    (``out_dir`` given; :func:`write_slide_outputs` finalises it in place) or in a temporary
    folder removed when the :class:`SlideResult` is garbage-collected."""

    def __init__(self, out_dir, name: str, shape: tuple[int, int], pixel_size_um: float) -> None:
        import tempfile

        from histo.block_outputs import LabelsSink
        from histo.io.ome_zarr import LabelsWriter

        self.temporary = out_dir is None
        if self.temporary:
            self.root = Path(tempfile.mkdtemp(prefix="histo-stream-"))
        else:
            self.root = _partial_dir(Path(out_dir), name)
            if self.root.exists():
                shutil.rmtree(self.root)
            self.root.mkdir(parents=True)
        self.writer = LabelsWriter(self.root / "labels.ome.zarr", shape, pixel_size_um)
        names = ("class_map", "osteoclasts", "osteocytes")
        self.sink = {k: LabelsSink(self.writer, k) for k in names}

    def attach(self, result: SlideResult) -> None:
        """Point ``result``'s maps at the finished store (zarr arrays, read on indexing)."""
        import weakref

        from histo.io.ome_zarr import read_labels

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
        self.writer.abort()
        shutil.rmtree(self.root, ignore_errors=True)


def _write_overview(writer, result: SlideResult) -> None:
    """The thumbnail as the store's overview image (cheaper than colouring a coarse level)."""
    if result.thumbnail is not None:
        scale = result.class_map.shape[0] / result.thumbnail.shape[0]
        writer.write_overview(np.ascontiguousarray(result.thumbnail), result.pixel_size_um * scale)


def _partial_dir(out_dir: Path, name: str) -> Path:
    """Where a slide's outputs are written before being renamed to ``out_dir/<name>``."""
    return out_dir / f".{name}.partial-{os.getpid()}"


#: tissue whose channels differ by less than this (0-255) everywhere is grayscale
GRAYSCALE_SPREAD = 6


def _check_colour(slide, tissue, name: str) -> None:
    """Refuse grayscale slides: TRAP is told from its counterstain by colour alone."""
    from histo.errors import SlideReadError
    from histo.io import read_thumbnail

    thumb = read_thumbnail(slide, tissue.pixel_size_um)
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


def _overlay_source(result: SlideResult, class_map):
    """What write_overlay needs of a streamed result: the class map at the overlay's size."""
    from types import SimpleNamespace

    from histo.measure_blocks import downsample_nearest
    from histo.report import OVERLAY_MAX_PX

    H, W = class_map.shape
    scale = min(1.0, OVERLAY_MAX_PX / max(H, W))
    shape = (max(1, round(H * scale)), max(1, round(W * scale)))
    small = downsample_nearest(class_map, shape)
    return SimpleNamespace(class_map=small, thumbnail=result.thumbnail)


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

    Streamed slides (zarr maps, see :data:`STREAMING_MIN_PX`) are written without loading a
    map whole: ``labels_writer`` is the LabelsWriter that segmentation filled inside the partial
    folder (otherwise the maps are copied band by band); the overlay is drawn from a map
    downsampled to the overlay's size; GeoJSON outlines are written block by block, skipping
    objects larger than the block margin (256 px; none on real cells).
    """
    import json

    from histo.block_outputs import copy_labels, write_label_geojson_by_blocks
    from histo.io.geojson import write_geojson
    from histo.io.ome_zarr import LabelsWriter
    from histo.io.tables import write_object_table
    from histo.report import write_overlay

    out_dir = Path(out_dir)
    final = out_dir / result.name
    partial = _partial_dir(out_dir, result.name)
    streamed = not isinstance(result.class_map, np.ndarray)
    maps = (
        ("class_map", result.class_map),
        ("osteoclasts", result.osteoclast_labels),
        ("osteocytes", result.osteocyte_labels),
    )
    try:
        if labels_writer is None:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            writer = LabelsWriter(
                partial / "labels.ome.zarr", tuple(result.class_map.shape), result.pixel_size_um
            )
            for key, array in maps:
                if streamed:
                    copy_labels(writer, key, array)
                else:
                    writer.write_tile(key, 0, 0, array)
        else:
            writer = labels_writer  # segmentation streamed the maps into partial/ already
        if streamed:
            _write_overview(writer, result)
        store = writer.finalize()
        if streamed:
            # read the maps back from the finalized store (the writer's arrays were renamed)
            from histo.io.ome_zarr import read_labels

            stored = read_labels(store, lazy=True)
            maps = tuple((key, stored[key][0]) for key, _ in maps)
        m = result.measurement
        write_object_table(partial / "osteoclasts.csv", m.osteoclasts)
        write_object_table(partial / "osteocytes.csv", m.osteocytes)
        # outlines in level-0 pixels of the slide (QuPath's convention)
        scale = result.pixel_size_um
        for kind, (_, labels) in zip(("osteoclast", "osteocyte"), maps[1:], strict=True):
            write = write_label_geojson_by_blocks if streamed else write_geojson
            write(
                partial / f"{kind}s.geojson",
                labels,
                scale,
                kind,
                slide_pixel_size_um=result.source_pixel_size_um,
            )
        write_overlay(
            partial / "overlay.png", _overlay_source(result, maps[0][1]) if streamed else result
        )
        meta = {
            "row": result.row(),
            "model": result.model,
            "pixel_size_um": result.pixel_size_um,
            "source_pixel_size_um": result.source_pixel_size_um,
            **result.provenance,
        }
        if record is not None:
            meta["input"] = record
        (partial / "indices.json").write_text(json.dumps(meta, indent=1, default=_json_value))
        old = out_dir / f".{result.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    except HistoError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(f"cannot write outputs to {out_dir}: {exc.strerror or exc}") from None
    return final
