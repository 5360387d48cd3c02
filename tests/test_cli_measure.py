"""``histo measure`` and ``histo calibrate`` end to end on small class maps."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from histo import classes
from histo.cli import main
from histo.io.tables import read_indices_csv, write_indices_csv, write_object_table
from histo.measure import INDEX_COLUMNS


def class_map(bone_rows=60, osteoclast=True):
    cmap = np.full((120, 160), classes.MARROW, np.uint8)
    cmap[:5] = classes.BACKGROUND
    cmap[120 - bone_rows :, :] = classes.BONE
    cmap[100:104, 20:26] = classes.OSTEOCYTE
    if osteoclast:
        cmap[120 - bone_rows - 8 : 120 - bone_rows, 40:80] = classes.OSTEOCLAST
    return cmap


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_measure_npy_writes_tables(tmp_path, capsys):
    np.save(tmp_path / "s1.npy", class_map())
    out = tmp_path / "out"
    assert (
        main(["measure", str(tmp_path / "s1.npy"), "--pixel-size", "0.5", "--out", str(out)]) == 0
    )
    rows = read_csv(out / "indices.csv")
    header = list(rows[0])
    assert header[:2] == ["slide", "phenotype"]
    assert header[2 : 2 + len(INDEX_COLUMNS)] == list(INDEX_COLUMNS)
    assert {"confidence", "evidence"} <= set(header)
    assert rows[0]["slide"] == "s1" and rows[0]["phenotype"] == "oc-rich"
    assert float(rows[0]["N.Oc"]) == 1
    oc = read_csv(out / "s1" / "osteoclasts.csv")
    assert len(oc) == 1 and float(oc[0]["area_um2"]) == pytest.approx(320 * 0.25)
    ot = read_csv(out / "s1" / "osteocytes.csv")
    assert len(ot) == 1
    assert "s1: oc-rich" in capsys.readouterr().out


def test_measure_tiff_with_resolution_and_instances(tmp_path):
    cmap = class_map()
    labels = np.zeros(cmap.shape, np.uint32)
    labels[52:60, 40:60] = 5
    labels[52:60, 60:80] = 6
    res = (1e4 / 2.0, 1e4 / 2.0)  # 2 µm per pixel, in pixels per cm
    tifffile.imwrite(tmp_path / "A.classes.tif", cmap, resolution=res, resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "A.osteoclasts.tif", labels)
    out = tmp_path / "out"
    assert main(["measure", str(tmp_path / "A.classes.tif"), "--out", str(out)]) == 0
    row = read_indices_csv(out / "indices.csv")[0]
    assert row["slide"] == "A"
    assert row["N.Oc"] == 2
    assert row["T.Ar"] == pytest.approx((cmap > 0).sum() * 4e-6)


def test_measure_png_and_geojson_roi(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "p.png"), class_map())
    roi = {
        "type": "Feature",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[10, 10], [110, 10], [110, 110], [10, 110], [10, 10]]],
        },
    }
    (tmp_path / "roi.geojson").write_text(json.dumps(roi))
    out = tmp_path / "out"
    argv = [
        "measure",
        str(tmp_path / "p.png"),
        "--pixel-size",
        "1",
        "--out",
        str(out),
        "--roi",
        str(tmp_path / "roi.geojson"),
    ]
    assert main(argv) == 0
    row = read_indices_csv(out / "indices.csv")[0]
    assert row["B.Pm"] * 1000 == pytest.approx(100, rel=0.03)


def test_no_pixel_size_is_a_one_line_error(tmp_path, capsys):
    np.save(tmp_path / "s.npy", class_map())
    status = main(["measure", str(tmp_path / "s.npy"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 3
    assert "--pixel-size" in err and len(err.splitlines()) == 1


def test_bad_class_map_among_many_goes_to_failures(tmp_path):
    np.save(tmp_path / "good.npy", class_map())
    np.save(tmp_path / "bad.npy", np.full((10, 10), 9, np.uint8))
    out = tmp_path / "out"
    argv = [
        "measure",
        str(tmp_path / "good.npy"),
        str(tmp_path / "bad.npy"),
        "--pixel-size",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 1
    assert [r["slide"] for r in read_csv(out / "indices.csv")] == ["good"]
    failures = read_csv(out / "failures.csv")
    assert failures[0]["slide"] == "bad" and failures[0]["error"] == "ClassMapError"


def test_calibrate_from_indices_and_use_ranges(tmp_path):
    rows = [
        {"slide": f"c{i}", "phenotype": "normal", "BV/TV": bv, "N.Oc/B.Pm": 3.0 + i / 10}
        for i, bv in enumerate([12.0, 14.0, 16.0, 18.0, 20.0])
    ]
    write_indices_csv(tmp_path / "controls.csv", rows)
    ranges = tmp_path / "ranges.json"
    assert main(["calibrate", str(tmp_path / "controls.csv"), "--out", str(ranges)]) == 0
    data = json.loads(ranges.read_text())
    assert data["n_controls"] == 5 and 20 < data["bv_tv_upper"] < 35
    np.save(tmp_path / "s.npy", class_map(bone_rows=20, osteoclast=False))
    out = tmp_path / "out"
    argv = [
        "measure",
        str(tmp_path / "s.npy"),
        "--pixel-size",
        "1",
        "--out",
        str(out),
        "--ranges",
        str(ranges),
    ]
    assert main(argv) == 0
    row = read_indices_csv(out / "indices.csv")[0]
    assert row["phenotype"] == "normal"
    assert str(data["bv_tv_upper"])[:4] in row["evidence"]


def test_calibrate_from_class_maps(tmp_path):
    paths = []
    for i, rows in enumerate([20, 24, 28]):
        np.save(tmp_path / f"c{i}.npy", class_map(bone_rows=rows))
        paths.append(str(tmp_path / f"c{i}.npy"))
    out = tmp_path / "r.json"
    assert main(["calibrate", *paths, "--pixel-size", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_controls"] == 3


def test_tables_are_atomic_and_format_cells(tmp_path):
    path = write_object_table(tmp_path / "t.csv", [{"a": 1.0, "b": float("nan"), "c": True}])
    assert path.read_text() == "a,b,c\n1,,true\n"
    assert not list(tmp_path.glob(".*partial"))
    write_object_table(tmp_path / "empty.csv", [], columns=["label", "area_um2"])
    assert (tmp_path / "empty.csv").read_text() == "label,area_um2\n"
