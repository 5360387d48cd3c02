"""OME-Zarr labels written tile by tile, and GeoJSON outlines, read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from histo.classes import BONE, COLORS, MARROW, OSTEOCLAST
from histo.io import LabelsWriter, open_slide, read_labels, write_geojson


def _maps(h: int = 300, w: int = 420) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    class_map = np.where((yy // 50 + xx // 70) % 2 == 0, MARROW, BONE).astype(np.uint8)
    class_map[:10] = 0
    osteoclasts = np.zeros((h, w), np.uint32)
    osteoclasts[100:120, 200:230] = 7
    osteoclasts[250:260, 10:15] = 70000  # beyond uint16
    class_map[osteoclasts > 0] = OSTEOCLAST
    return {
        "class_map": class_map,
        "osteoclasts": osteoclasts,
        "osteocytes": np.zeros((h, w), np.uint32),
    }


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_labels_writer_tiles_round_trip(tmp_path, version):
    maps = _maps()
    path = tmp_path / "S1" / "labels.ome.zarr"
    writer = LabelsWriter(path, (300, 420), 2.0, chunk_px=64, ngff_version=version)
    for y in range(0, 300, 128):  # tiles of 128, the last ones cut by the border
        for x in range(0, 420, 128):
            for name, array in maps.items():
                writer.write_tile(name, y, x, array[y : y + 128, x : x + 128])
    assert writer.partial.exists() and not path.exists()
    assert writer.finalize() == path
    assert path.exists() and not writer.partial.exists()

    labels = read_labels(path)
    assert set(labels) == {"class_map", "osteoclasts", "osteocytes"}
    for name, (array, size) in labels.items():
        np.testing.assert_array_equal(array, maps[name])
        assert size == pytest.approx(2.0)
    coarse, size = read_labels(path, level=2)["class_map"]
    assert size == pytest.approx(8.0)
    np.testing.assert_array_equal(coarse, maps["class_map"][2::4, 2::4])

    root = zarr.open_group(str(path), mode="r")
    assert root.metadata.zarr_format == (3 if version == "0.5" else 2)
    attrs = dict(root["labels/class_map"].attrs)
    meta = attrs["ome"] if version == "0.5" else attrs
    colors = {c["label-value"]: c["rgba"] for c in meta["image-label"]["colors"]}
    assert colors[OSTEOCLAST] == [*COLORS[OSTEOCLAST], 255]
    ms = meta["multiscales"][0]
    assert [a["unit"] for a in ms["axes"]] == ["micrometer", "micrometer"]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [4.0, 4.0]
    # the root image is an RGB overview that open_slide reads as an OME-Zarr slide
    overview = open_slide(path)
    assert overview.pixel_size_um == pytest.approx(8.0)
    assert overview.shape == (75, 105, 3)
    assert overview.levels[0][30, 0].tolist() == list(COLORS[maps["class_map"][122, 2]])


def test_labels_writer_is_atomic(tmp_path):
    path = tmp_path / "labels.ome.zarr"
    with pytest.raises(RuntimeError), LabelsWriter(path, (64, 64), 1.0) as writer:
        writer.write_tile("class_map", 0, 0, np.ones((64, 64), np.uint8))
        raise RuntimeError("killed")
    assert not path.exists() and not writer.partial.exists()
    # a leftover .partial from a killed run is replaced; a finished store is replaced whole
    (tmp_path / "labels.ome.zarr.partial").mkdir()
    for value in (1, 2):
        with LabelsWriter(path, (64, 64), 1.0, n_levels=1) as writer:
            writer.write_tile("class_map", -8, 60, np.full((20, 20), value, np.uint8))
        array, _ = read_labels(path)["class_map"]
        assert array[:12, 60:].min() == value and array[12:].max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.zarr"]


def test_labels_writer_hands_zarr_few_chunks_a_call_and_leaves_its_config(tmp_path, monkeypatch):
    import math

    from histo.io import ome_zarr

    calls = []
    setitem = zarr.Array.__setitem__

    def spy(self, key, value):
        rows, cols = key
        ch, cw = self.chunks
        n_chunks = (math.ceil(rows.stop / ch) - rows.start // ch) * (
            math.ceil(cols.stop / cw) - cols.start // cw
        )
        calls.append((n_chunks, zarr.config.get("async.concurrency")))
        setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    before = zarr.config.get("async.concurrency")
    tile = np.arange(64 * 256, dtype=np.uint32).reshape(64, 256)
    with LabelsWriter(tmp_path / "l.ome.zarr", (64, 256), 1.0, chunk_px=64) as writer:
        writer.write_tile("osteocytes", 0, 0, tile)
        # half the width: the coarsest level's chunk is held back, then written by flush()
        writer.write_tile("class_map", 0, 0, np.ones((64, 128), np.uint8))
        n_before = len(calls)
        writer.flush()
        assert len(calls) > n_before
    assert calls and max(n for n, _ in calls) <= ome_zarr.WRITE_CONCURRENCY
    assert {c for _, c in calls} == {before}  # zarr's process-wide setting is never touched
    array, _ = read_labels(tmp_path / "l.ome.zarr")["osteocytes"]
    assert np.array_equal(np.asarray(array), tile)


def test_labels_pyramid_goes_down_to_1024_px(tmp_path):
    from histo.io.ome_zarr import pyramid_levels

    assert pyramid_levels((64, 64)) == 3
    assert pyramid_levels((8192, 8192)) == 4  # 8192, 4096, 2048, 1024
    assert pyramid_levels((30000, 40000)) == 7  # 40000 / 64 = 625
    writer = LabelsWriter(tmp_path / "l.ome.zarr", (300, 5000), 1.0)
    assert len(writer.factors) == 4 and max(writer.coarsest_shape) <= 1024
    writer.abort()


def test_labels_writer_rejects_bad_tiles(tmp_path):
    writer = LabelsWriter(tmp_path / "l.ome.zarr", (32, 32), 1.0)
    with pytest.raises(KeyError):
        writer.write_tile("nuclei", 0, 0, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        writer.write_tile("class_map", 0, 0, np.full((4, 4), 300))
    writer.abort()
    assert not writer.partial.exists()


def _features(path):
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    return data["features"]


def test_geojson_instances_in_level0_pixels(tmp_path):
    labels = np.zeros((100, 120), np.int32)
    labels[10:20, 30:50] = 1  # a 10 x 20 rectangle
    labels[60:90, 60:90] = 2
    labels[70:80, 70:80] = 0  # with a hole
    labels[5, 5] = 3  # one pixel
    n = write_geojson(tmp_path / "oc.geojson", labels, 2.0, "osteoclast", slide_pixel_size_um=0.5)
    assert n == 3
    feats = {
        f["properties"]["measurements"]["label"]: f for f in _features(tmp_path / "oc.geojson")
    }
    props = feats[1]["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "osteoclast", "color": list(COLORS[OSTEOCLAST])}
    ring = np.array(feats[1]["geometry"]["coordinates"][0])
    assert (ring[0] == ring[-1]).all()
    # boundary pixel centres, scaled by 4 to level 0: x 30.5..49.5, y 10.5..19.5
    assert (ring[:, 0].min(), ring[:, 0].max()) == pytest.approx((30.5 * 4, 49.5 * 4))
    assert (ring[:, 1].min(), ring[:, 1].max()) == pytest.approx((10.5 * 4, 19.5 * 4))
    assert props["measurements"]["area_um2"] == pytest.approx(200 * 4.0)
    assert len(feats[2]["geometry"]["coordinates"]) == 2  # outer ring and the hole
    assert len(feats[3]["geometry"]["coordinates"][0]) == 5  # a closed square


def test_geojson_class_map_regions_and_multipolygon(tmp_path):
    class_map = np.zeros((50, 50), np.uint8)
    class_map[5:15, 5:15] = BONE
    class_map[30:40, 30:45] = BONE
    class_map[20:25, 0:50] = MARROW
    n = write_geojson(tmp_path / "regions.geojson", class_map, 1.0, None, object_type="annotation")
    feats = _features(tmp_path / "regions.geojson")
    assert n == len(feats) == 3
    names = sorted(f["properties"]["classification"]["name"] for f in feats)
    assert names == ["bone", "bone", "marrow"]
    assert {f["properties"]["objectType"] for f in feats} == {"annotation"}
    # one instance label in two pieces is a MultiPolygon
    split = np.zeros((20, 20), np.int32)
    split[2:5, 2:5] = 1
    split[10:15, 10:15] = 1
    write_geojson(tmp_path / "split.geojson", split, 1.0, "osteocyte")
    (feat,) = _features(tmp_path / "split.geojson")
    assert feat["geometry"]["type"] == "MultiPolygon"
    assert len(feat["geometry"]["coordinates"]) == 2


def _shoelace(ring) -> float:
    a = np.asarray(ring, float)
    return 0.5 * abs(np.dot(a[:-1, 0], a[1:, 1]) - np.dot(a[1:, 0], a[:-1, 1]))


def test_geojson_known_outlines(tmp_path):
    from histo.io.geojson import mask_polygons

    rect = np.zeros((30, 60), bool)
    rect[10:20, 30:50] = True  # a 10 x 20 rectangle: its boundary pixel centres
    (rings,) = mask_polygons(rect)
    assert rings == [[[30.5, 10.5], [30.5, 19.5], [49.5, 19.5], [49.5, 10.5], [30.5, 10.5]]]
    assert _shoelace(rings[0]) == 19 * 9
    # a line one pixel wide and a single pixel: the outline of their pixel squares
    line = np.zeros((8, 8), bool)
    line[2, 1:5] = True
    assert mask_polygons(line) == [[[[1.0, 2.0], [5.0, 2.0], [5.0, 3.0], [1.0, 3.0], [1.0, 2.0]]]]
    dot = np.zeros((8, 8), bool)
    dot[3, 3] = True
    # offset (row 100, col 200) and 0.4 level-0 pixels per pixel, rounded to 3 decimals
    ((square,),) = mask_polygons(dot, 0.4, (100, 200))
    assert square == [[81.2, 41.2], [81.6, 41.2], [81.6, 41.6], [81.2, 41.6], [81.2, 41.2]]
    assert _shoelace(square) == pytest.approx(0.16)
    # a ring with a hole: outer ring then the hole
    ring = np.zeros((20, 20), bool)
    ring[2:12, 3:13] = True
    ring[5:9, 6:10] = False
    ((outer, hole),) = mask_polygons(ring)
    assert _shoelace(outer) == 9 * 9
    # the hole's ring joins the centres of the pixels around the 4 x 4 hole, cutting the
    # corners (8-connected): a 5 x 5 square less four half-pixel triangles
    assert _shoelace(hole) == 25 - 4 * 0.5


def test_geojson_text_is_json_of_label_features(tmp_path):
    from scipy import ndimage as ndi

    from histo.io.geojson import label_features

    rng = np.random.default_rng(3)
    labels, _ = ndi.label(ndi.gaussian_filter(rng.random((160, 200)), 3) > 0.52)
    labels[labels == 3] = 0  # a gap in the numbering
    kw = dict(slide_pixel_size_um=0.37)  # a scale with rounding: 0.5 / 0.37
    n = write_geojson(tmp_path / "o.geojson", labels, 0.5, "osteocyte", **kw)
    features = label_features(labels, 0.5, "osteocyte", **kw)
    assert n == len(features) > 5
    expected = json.dumps(
        {"type": "FeatureCollection", "features": features}, separators=(",", ":")
    )
    assert (tmp_path / "o.geojson").read_text() == expected
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "version, cols, buffer_mb",
    [("0.5", 420, 128), ("0.4", 420, 128), ("0.5", 100, 128), ("0.5", 100, 0.1)],
)
def test_labels_writer_bands_held_back_until_chunks_fill(tmp_path, version, cols, buffer_mb):
    from histo.io.label_store import LabelsSink

    maps = _maps()
    h, w = maps["class_map"].shape
    expected = {k: a.copy() for k, a in maps.items()}
    expected["osteocytes"][40:70, 90:150] = 5
    writer = LabelsWriter(
        tmp_path / "l.ome.zarr", (h, w), 1.0, chunk_px=64, ngff_version=version, buffer_mb=buffer_mb
    )
    sink = LabelsSink(writer, "class_map")
    band = 37  # bands of a height that is no multiple of the chunks, in tiles of `cols`

    def write_band(y):
        for x in range(0, w, cols):
            for name, array in maps.items():
                writer.write_tile(name, y, x, array[y : y + band, x : x + cols])

    for y in range(0, 111, band):
        write_band(y)
    # rows held back are written before the sink reads
    assert np.array_equal(sink[0:111, :], maps["class_map"][:111])
    for y in range(111, h, band):
        write_band(y)
        if y == 185:  # a tile among the bands
            writer.write_tile("osteocytes", 40, 90, expected["osteocytes"][40:70, 90:150])
    writer.finalize()
    for level, f in enumerate((1, 2, 4)):
        back = read_labels(tmp_path / "l.ome.zarr", level=level)
        for name, array in expected.items():
            got = back[name][0]
            assert got.dtype == array.dtype
            assert np.array_equal(got, array[f // 2 :: f, f // 2 :: f]), (name, level)
