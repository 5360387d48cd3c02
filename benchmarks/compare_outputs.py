"""Compare two ``histo analyze`` output folders slide by slide (before/after a change).

For each slide folder present in both: the row of indices.csv (every column, relative
difference), the object tables (rows and values), the GeoJSON features (names and areas), the
label images of labels.ome.zarr (pixel equality) and overlay.png (pixels that differ).

    .venv/bin/python benchmarks/compare_outputs.py OLD_DIR NEW_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _compare_values(a: dict, b: dict, where: str, rtol: float) -> list[str]:
    out = []
    if list(a) != list(b):
        out.append(f"{where}: columns differ: {list(a)} vs {list(b)}")
    for key in a.keys() & b.keys():
        va, vb = a[key], b[key]
        na, nb = _number(va), _number(vb)
        if na is None or nb is None:
            if va != vb:
                out.append(f"{where}: {key}: {va!r} vs {vb!r}")
        elif not (math.isclose(na, nb, rel_tol=rtol, abs_tol=1e-12) or na == nb):
            out.append(
                f"{where}: {key}: {na!r} vs {nb!r} (rel {abs(na - nb) / max(abs(na), 1e-300):.2e})"
            )
    return out


def _compare_tables(old: Path, new: Path, rtol: float) -> list[str]:
    out = []
    for name in ("osteoclasts.csv", "osteocytes.csv"):
        ra, rb = _rows(old / name), _rows(new / name)
        if len(ra) != len(rb):
            out.append(f"{old.name}/{name}: {len(ra)} rows vs {len(rb)}")
            continue
        for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
            out += _compare_values(x, y, f"{old.name}/{name} row {i}", rtol)[:3]
    return out


def _compare_geojson(old: Path, new: Path) -> list[str]:
    out = []
    for name in ("osteoclasts.geojson", "osteocytes.geojson"):
        fa = json.loads((old / name).read_text())["features"]
        fb = json.loads((new / name).read_text())["features"]
        if fa == fb:
            continue
        key = lambda f: f["properties"].get("name")  # noqa: E731
        same_set = sorted(map(json.dumps, fa)) == sorted(map(json.dumps, fb))
        out.append(
            f"{old.name}/{name}: {len(fa)} vs {len(fb)} features"
            + ("; the same features in another order" if same_set else "")
            + ("" if same_set else f"; names equal: {sorted(map(key, fa)) == sorted(map(key, fb))}")
        )
    return out


def _compare_labels(old: Path, new: Path) -> list[str]:
    import numpy as np

    from histo.io.ome_zarr import read_labels

    out = []
    la, lb = read_labels(old / "labels.ome.zarr"), read_labels(new / "labels.ome.zarr")
    for key in ("class_map", "osteoclasts", "osteocytes"):
        a, b = np.asarray(la[key][0]), np.asarray(lb[key][0])
        if a.shape != b.shape or not np.array_equal(a, b):
            n = int((a != b).sum()) if a.shape == b.shape else -1
            out.append(f"{old.name}/labels.ome.zarr/{key}: {n} pixels differ")
    return out


def _compare_overlay(old: Path, new: Path) -> list[str]:
    import cv2

    a = cv2.imread(str(old / "overlay.png"))
    b = cv2.imread(str(new / "overlay.png"))
    if a.shape != b.shape:
        return [f"{old.name}/overlay.png: shape {a.shape} vs {b.shape}"]
    n = int((a != b).any(axis=2).sum())
    return [f"{old.name}/overlay.png: {n} pixels differ"] if n else []


def compare(old: Path, new: Path, rtol: float = 1e-9) -> list[str]:
    """Differences between two output folders (empty when the outputs are the same)."""
    out = []
    rows_a = {r["slide"]: r for r in _rows(old / "indices.csv")}
    rows_b = {r["slide"]: r for r in _rows(new / "indices.csv")}
    if rows_a.keys() != rows_b.keys():
        out.append(f"slides differ: {sorted(rows_a)} vs {sorted(rows_b)}")
    for slide in sorted(rows_a.keys() & rows_b.keys()):
        out += _compare_values(rows_a[slide], rows_b[slide], f"indices.csv {slide}", rtol)
        out += _compare_tables(old / slide, new / slide, rtol)
        out += _compare_geojson(old / slide, new / slide)
        out += _compare_labels(old / slide, new / slide)
        out += _compare_overlay(old / slide, new / slide)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance (1e-9)")
    args = parser.parse_args()
    diffs = compare(args.old, args.new, args.rtol)
    for line in diffs:
        print(line)
    print("identical" if not diffs else f"{len(diffs)} differences", file=sys.stderr)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
