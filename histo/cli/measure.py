"""``histo measure``: ASBMR indices and object tables from class maps alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histo.cli._options import add_pixel_size, add_roi_and_ranges
from histo.errors import HistoError, PixelSizeError
from histo.io.class_maps import load_class_map

HELP = "ASBMR indices and object tables from class maps alone"
DESCRIPTION = """\
Compute the ASBMR histomorphometry indices and the osteopetrosis phenotype call from class maps
(codes 0 background, 1 marrow, 2 bone, 3 osteoclast, 4 osteocyte lacuna), without segmenting.

Class maps: .tif/.tiff (tifffile), .png, .npy, .zarr (an array, or a labels.ome.zarr written by
'histo analyze'). Instance maps are picked up beside a class map by the synthetic naming
convention: NAME.classes.tif -> NAME.osteoclasts.tif and NAME.osteocytes.tif. The pixel size
comes from --pixel-size, else from the file (OME PhysicalSizeX, TIFF resolution tags, OME-Zarr
scale); with neither the slide fails: indices without a scale are meaningless.

Writes DIR/indices.csv (the columns of 'histo analyze': slide, phenotype, the indices,
confidence, evidence), and per slide
DIR/<slide>/osteoclasts.csv and osteocytes.csv; slides that fail go to DIR/failures.csv.

examples:
  histo measure demo/oc-rich.classes.tif --out measured
  histo measure maps/*.npy --pixel-size 0.5 --out measured --ranges lab_ranges.json
  histo measure S1.classes.tif --pixel-size 1 --roi trabecular.geojson --out measured
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("classmaps", nargs="+", metavar="CLASSMAP", help="class map files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_pixel_size(parser, "µm per pixel (wins over the file's metadata)")
    add_roi_and_ranges(
        parser,
        "region of interest: a mask image of the class map's shape (non-zero = inside) or "
        "GeoJSON polygons in pixel coordinates (x, y)",
    )
    parser.add_argument(
        "--no-instances",
        action="store_true",
        help="ignore instance maps beside the class maps (objects = connected components)",
    )


# --------------------------------------------------------------------------- running


def measure_file(path: Path, args: argparse.Namespace, ranges) -> tuple[dict, object]:
    """Measure one class map: (indices.csv row, Measurement)."""
    from histo.io.class_maps import read_roi_mask, slide_name_of
    from histo.io.tables import indices_row
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
    from histo.measure.regional import measure_by_region

    roi = read_roi_mask(args.roi, cmap.shape[:2]) if args.roi else None

    def measure_roi(region):
        return measure(cmap, pixel_size, osteoclast_labels=oc, osteocyte_labels=ot, roi=region)

    # a long-bone map without --roi is measured in its standard region (histo.regions)
    found = measure_by_region(cmap, pixel_size, measure_roi, roi=roi)
    m, region = found.measurement, found.region
    call = call_phenotype(m.indices, ranges)
    return indices_row(slide_name_of(path), m.indices, call, region.name, region.extra), m


def run(args: argparse.Namespace) -> int:
    from histo.io.class_maps import slide_name_of
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
