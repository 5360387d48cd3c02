"""``histo calibrate``: learn phenotype reference ranges from a lab's normal control slides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from histo.cli._options import add_pixel_size
from histo.errors import HistoError

HELP = "learn reference ranges from a lab's own control slides"
DESCRIPTION = """\
Learn the reference ranges of the phenotype call (upper limit of normal BV/TV, the N.Oc/B.Pm
below which osteopetrotic bone is called oc-poor) from normal control slides of your lab, and
write them as JSON for 'histo measure --ranges' and 'histo analyze --ranges'.

Inputs are indices.csv tables (every row is a control slide) written by 'histo measure',
'histo analyze' or 'histo batch', or class maps of control slides (then --pixel-size or a pixel
size in the files is needed). At least 3 control slides.

examples:
  histo calibrate controls/indices.csv --out lab_ranges.json
  histo calibrate ctrl1.classes.tif ctrl2.classes.tif ctrl3.classes.tif --out lab_ranges.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "controls",
        nargs="+",
        metavar="CONTROL",
        help="indices.csv of control slides, or class maps of control slides",
    )
    parser.add_argument("--out", required=True, metavar="JSON", help="reference ranges to write")
    add_pixel_size(parser, "µm per pixel of control class maps (wins over the files' metadata)")
    parser.add_argument(
        "--k",
        type=float,
        default=3.0,
        help="upper limit of normal BV/TV = mean + k SD of the controls (3)",
    )


def run(args: argparse.Namespace) -> int:
    from histo.io.tables import read_indices_csv
    from histo.phenotype import calibrate, save_ranges

    controls: list[dict] = []
    for name in args.controls:
        path = Path(name)
        if path.suffix.lower() == ".csv":
            if not path.exists():
                raise HistoError(f"{path}: no such file")
            try:
                rows = read_indices_csv(path)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise HistoError(f"{path.name}: not a readable indices table ({exc})") from None
            if rows and "BV/TV" not in rows[0]:
                raise HistoError(f"{path.name}: no BV/TV column (not an indices.csv)")
            controls.extend(rows)
        else:
            controls.append(_measure_control(path, args.pixel_size))
    ranges = calibrate(controls, k=args.k)
    save_ranges(ranges, args.out)
    print(
        json.dumps(
            {
                "out": str(args.out),
                **{
                    key: getattr(ranges, key)
                    for key in ("bv_tv_upper", "n_oc_b_pm_lower", "n_controls")
                },
            }
        )
    )
    return 0


def _measure_control(path: Path, pixel_size: float | None) -> dict:
    from histo.errors import PixelSizeError
    from histo.io.class_maps import load_class_map
    from histo.measure import measure, validate_pixel_size

    cmap, oc, ot, file_px = load_class_map(path)
    chosen = pixel_size if pixel_size is not None else file_px
    if chosen is None:
        raise PixelSizeError(f"{path.name}: no pixel size in the file; give --pixel-size UM")
    m = measure(cmap, validate_pixel_size(chosen), osteoclast_labels=oc, osteocyte_labels=ot)
    return dict(m.indices)
