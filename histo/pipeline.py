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
    """
    from histo.io import detect_tissue
    from histo.measure import measure
    from histo.phenotype import call_phenotype
    from histo.segment import load_model, segment_slide

    t0 = time.perf_counter()
    step = _Steps(progress, cancel)
    step(0.0, "opening")
    slide = _open(source, pixel_size_um, name)
    try:
        name = name or slide.name
        step(0.02, "finding tissue")
        tissue = detect_tissue(slide)
        if not tissue.mask.any():
            raise EmptyTissueError(f"{name}: no tissue found on the slide")
        tissue_mp = float(tissue.mask.sum()) * (tissue.pixel_size_um / slide.pixel_size_um) ** 2
        segmenter = load_model(model)
        _check_resolution(slide, segmenter, name)
        step(0.05, "segmenting")
        tiling = {"tile_px": int(tile_px)} if tile_px else {}
        seg = segment_slide(
            slide,
            segmenter,
            tissue=tissue,
            progress=step.sub(0.05, 0.85),
            cancel=cancel,
            **tiling,
        )
        step(0.86, "measuring")
        image = _image_for_measure(slide, seg.class_map.shape, seg.pixel_size_um)
        measurement = measure(
            seg.class_map,
            seg.pixel_size_um,
            osteoclast_labels=seg.osteoclast_labels,
            osteocyte_labels=seg.osteocyte_labels,
            image=image,
            roi=roi,
        )
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
        )
        if out_dir is not None:
            step(0.9, "writing")
            result.out_dir = write_slide_outputs(result, out_dir, record=record)
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
    result: SlideResult, out_dir: str | os.PathLike, record: dict | None = None
) -> Path:
    """Write one slide's outputs to ``out_dir/<name>/`` atomically; returns that folder.

    Everything is written into ``out_dir/.<name>.partial-<pid>`` and renamed at the end. An
    existing ``<name>`` folder is first renamed aside (``.<name>.old-<pid>``) and removed only
    after the new one is in place, so ``<name>`` is at every instant absent, the old complete
    folder or the new complete folder. ``record`` is stored as ``input`` in indices.json.
    """
    import json

    from histo.io.geojson import write_geojson
    from histo.io.ome_zarr import LabelsWriter
    from histo.io.tables import write_object_table
    from histo.report import write_overlay

    out_dir = Path(out_dir)
    final = out_dir / result.name
    partial = out_dir / f".{result.name}.partial-{os.getpid()}"
    try:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        writer = LabelsWriter(
            partial / "labels.ome.zarr", result.class_map.shape, result.pixel_size_um
        )
        writer.write_tile("class_map", 0, 0, result.class_map)
        writer.write_tile("osteoclasts", 0, 0, result.osteoclast_labels)
        writer.write_tile("osteocytes", 0, 0, result.osteocyte_labels)
        writer.finalize()
        m = result.measurement
        write_object_table(partial / "osteoclasts.csv", m.osteoclasts)
        write_object_table(partial / "osteocytes.csv", m.osteocytes)
        # outlines in level-0 pixels of the slide (QuPath's convention)
        scale = result.pixel_size_um
        for kind, labels in (
            ("osteoclast", result.osteoclast_labels),
            ("osteocyte", result.osteocyte_labels),
        ):
            write_geojson(
                partial / f"{kind}s.geojson",
                labels,
                scale,
                kind,
                slide_pixel_size_um=result.source_pixel_size_um,
            )
        write_overlay(partial / "overlay.png", result)
        meta = {
            "row": result.row(),
            "model": result.model,
            "pixel_size_um": result.pixel_size_um,
            "source_pixel_size_um": result.source_pixel_size_um,
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
