"""``histo measure``: ASBMR indices and object tables from class maps alone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from histo.errors import ClassMapError, HistoError, PixelSizeError, SlideReadError

HELP = "ASBMR indices and object tables from class maps alone"
DESCRIPTION = """\
Compute the ASBMR histomorphometry indices and the osteopetrosis phenotype call from class maps
(codes 0 background, 1 marrow, 2 bone, 3 osteoclast, 4 osteocyte lacuna), without segmenting.

Class maps: .tif/.tiff (tifffile), .png, .npy, .zarr (an array, or a labels.ome.zarr written by
'histo analyze'). Instance maps are picked up beside a class map by the synthetic naming
convention: NAME.classes.tif -> NAME.osteoclasts.tif and NAME.osteocytes.tif. The pixel size
comes from --pixel-size, else from the file (OME PhysicalSizeX, TIFF resolution tags, OME-Zarr
scale); with neither the slide fails: indices without a scale are meaningless.

Writes DIR/indices.csv (slide, phenotype, the indices, confidence, evidence), and per slide
DIR/<slide>/osteoclasts.csv and osteocytes.csv; slides that fail go to DIR/failures.csv.

examples:
  histo measure demo/oc-rich.classes.tif --out measured
  histo measure maps/*.npy --pixel-size 0.5 --out measured --ranges lab_ranges.json
  histo measure S1.classes.tif --pixel-size 1 --roi trabecular.geojson --out measured
"""

_CLASS_SUFFIX = ".classes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("classmaps", nargs="+", metavar="CLASSMAP", help="class map files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="µm per pixel (wins over the file's metadata)",
    )
    parser.add_argument(
        "--ranges",
        default=None,
        metavar="JSON",
        help="reference ranges from 'histo calibrate' (default: built-in ranges)",
    )
    parser.add_argument(
        "--roi",
        default=None,
        metavar="MASK_OR_GEOJSON",
        help="region of interest: a mask image of the class map's shape (non-zero = inside) or "
        "a GeoJSON polygon in pixel coordinates (x, y)",
    )
    parser.add_argument(
        "--no-instances",
        action="store_true",
        help="ignore instance maps beside the class maps (objects = connected components)",
    )


# --------------------------------------------------------------------------- reading


def slide_name_of(path: Path) -> str:
    """Slide name of a class map: ``NAME.classes.tif`` -> ``NAME``; a labels.ome.zarr -> its
    folder's name; otherwise the file name without image suffixes."""
    if path.name.endswith(".ome.zarr") and path.name.startswith("labels"):
        return path.resolve().parent.name
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".npy", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(_CLASS_SUFFIX):
        name = name[: -len(_CLASS_SUFFIX)]
    return name


def _tiff_pixel_size(tf) -> float | None:
    from histo.io._readers import _ome_physical_size, _tiff_resolution

    if tf.is_ome and tf.ome_metadata:
        size, _ = _ome_physical_size(tf.ome_metadata, 0)
        if size is not None:
            return size
    if tf.is_imagej and tf.imagej_metadata:
        unit = str(tf.imagej_metadata.get("unit", "")).lower()
        page = tf.pages.first
        if unit in ("micron", "µm", "um", "\\u00b5m") and 282 in page.tags:
            num, den = page.tags.valueof(282)
            if num:
                return den / num
    return _tiff_resolution(tf.pages.first)


def read_label_image(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Read a class map or instance map: (2-D integer array, pixel size in µm or None)."""
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                array = tf.series[0].levels[0].asarray()
                pixel_size = _tiff_pixel_size(tf)
            return array, pixel_size
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if suffix == ".png":
            import cv2

            array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if array is None:
                raise SlideReadError(f"{path.name}: not a readable PNG")
            return array, None
        if suffix == ".zarr" or path.is_dir():
            import zarr

            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Array):
                return np.asarray(node[...]), None
            raise SlideReadError(f"{path.name}: a zarr group, not an array")
    except HistoError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlideReadError(f"{path.name}: cannot read ({reason[:160]})") from None
    raise SlideReadError(f"{path.name}: unsupported class map format {suffix or '(none)'}")


def _is_labels_store(path: Path) -> bool:
    return path.is_dir() and path.name.endswith(".ome.zarr")


def load_class_map(
    path: str | Path, *, instances: bool = True
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, float | None]:
    """Class map, osteoclast and osteocyte instances (or None), and the file's pixel size."""
    path = Path(path)
    if _is_labels_store(path):
        from histo.io.ome_zarr import read_labels

        labels = read_labels(path)
        if "class_map" not in labels:
            raise SlideReadError(f"{path.name}: no 'class_map' label image")
        cmap, pixel_size = labels["class_map"]
        oc = labels.get("osteoclasts", (None, None))[0] if instances else None
        ot = labels.get("osteocytes", (None, None))[0] if instances else None
        return np.asarray(cmap), oc, ot, pixel_size
    cmap, pixel_size = read_label_image(path)
    oc = ot = None
    if instances:
        name = path.name
        for suffix in (".tiff", ".tif", ".png", ".npy"):
            stem = f"{_CLASS_SUFFIX}{suffix}"
            if name.endswith(stem):
                base = name[: -len(stem)]
                oc_path = path.with_name(f"{base}.osteoclasts{suffix}")
                ot_path = path.with_name(f"{base}.osteocytes{suffix}")
                oc = read_label_image(oc_path)[0] if oc_path.exists() else None
                ot = read_label_image(ot_path)[0] if ot_path.exists() else None
                break
    return cmap, oc, ot, pixel_size


def read_roi(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A region of interest as a mask of ``shape``: a mask image or a GeoJSON polygon (x, y px)."""
    from histo.measure import roi_mask

    path = Path(path)
    if path.suffix.lower() in (".geojson", ".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SlideReadError(f"ROI {path.name}: not valid GeoJSON ({exc})") from None
        polygons = list(_geojson_polygons(data))
        if not polygons:
            raise SlideReadError(f"ROI {path.name}: no Polygon or MultiPolygon in the GeoJSON")
        mask = np.zeros(shape, bool)
        for rings in polygons:
            outer = roi_mask(np.asarray(rings[0], float)[:, ::-1], shape)
            for hole in rings[1:]:
                outer &= ~roi_mask(np.asarray(hole, float)[:, ::-1], shape)
            mask |= outer
        return mask
    array, _ = read_label_image(path)
    if array.ndim == 3:
        array = array[..., 0]
    if array.shape != tuple(shape):
        raise ClassMapError(f"ROI mask {path.name} has shape {array.shape}, class map {shape}")
    return array != 0


def _geojson_polygons(data):
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        for feature in data.get("features", []):
            yield from _geojson_polygons(feature)
    elif kind == "Feature":
        yield from _geojson_polygons(data.get("geometry") or {})
    elif kind == "GeometryCollection":
        for geometry in data.get("geometries", []):
            yield from _geojson_polygons(geometry)
    elif kind == "Polygon":
        yield data["coordinates"]
    elif kind == "MultiPolygon":
        yield from data["coordinates"]


# --------------------------------------------------------------------------- running


def measure_file(path: Path, args: argparse.Namespace, ranges) -> tuple[dict, object]:
    """Measure one class map: (indices.csv row, Measurement)."""
    from histo.measure import measure, validate_pixel_size
    from histo.phenotype import call_phenotype

    cmap, oc, ot, file_px = load_class_map(path, instances=not args.no_instances)
    if args.pixel_size is not None:
        pixel_size = validate_pixel_size(args.pixel_size)
    elif file_px is not None:
        pixel_size = validate_pixel_size(file_px)
    else:
        raise PixelSizeError(
            f"{path.name}: no pixel size in the file; give it with --pixel-size UM"
        )
    roi = read_roi(args.roi, cmap.shape[:2]) if args.roi else None
    m = measure(cmap, pixel_size, osteoclast_labels=oc, osteocyte_labels=ot, roi=roi)
    call = call_phenotype(m.indices, ranges)
    row = {
        "slide": slide_name_of(path),
        "phenotype": call.phenotype,
        **m.indices,
        "confidence": round(call.confidence, 4),
        "evidence": call.evidence,
        "pixel_size_um": pixel_size,
    }
    return row, m


def run(args: argparse.Namespace) -> int:
    from histo.io.tables import write_indices_csv, write_object_table
    from histo.measure import OSTEOCLAST_COLUMNS, OSTEOCYTE_COLUMNS
    from histo.phenotype import load_ranges

    ranges = load_ranges(args.ranges) if args.ranges else None
    if args.pixel_size is not None:
        from histo.measure import validate_pixel_size

        validate_pixel_size(args.pixel_size)
    out = Path(args.out)
    paths = [Path(p) for p in args.classmaps]
    rows, failures = [], []
    for path in paths:
        try:
            row, m = measure_file(path, args, ranges)
        except HistoError as exc:
            if len(paths) == 1:
                raise
            failures.append(
                {
                    "slide": slide_name_of(path),
                    "path": str(path),
                    "error": type(exc).__name__,
                    "reason": str(exc),
                }
            )
            print(f"histo measure: {path}: {exc}", file=sys.stderr)
            continue
        rows.append(row)
        slide_dir = out / row["slide"]
        write_object_table(slide_dir / "osteoclasts.csv", m.osteoclasts, OSTEOCLAST_COLUMNS)
        write_object_table(slide_dir / "osteocytes.csv", m.osteocytes, OSTEOCYTE_COLUMNS)
        print(
            f"{row['slide']}: {row['phenotype']} (confidence {row['confidence']:.2f}); "
            f"BV/TV {row['BV/TV']:.1f}%, N.Oc/B.Pm {row['N.Oc/B.Pm']:.2f}/mm"
        )
    write_indices_csv(out / "indices.csv", rows)
    if failures or (out / "failures.csv").exists():
        write_object_table(
            out / "failures.csv", failures, columns=["slide", "path", "error", "reason"]
        )
    return 1 if failures else 0
