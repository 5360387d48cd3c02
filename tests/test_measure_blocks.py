"""measure_by_blocks: the same Measurement whatever the block size (one block: measure())."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zarr

from histo import classes
from histo.errors import ClassMapError
from histo.io.blocks import downsample_nearest, iter_blocks
from histo.io.geojson import write_label_geojson_by_blocks
from histo.measure import CountingRules, measure, measure_by_blocks

#: relative tolerance on lengths (B.Pm, Oc.S, ES, bone contact); the brief allows 0.5 %, the
#: decomposition is exact up to floating-point rounding
LENGTH_RTOL = 1e-9


def assert_same(a, b, rtol: float = LENGTH_RTOL) -> None:
    """Indices and object tables equal: counts and areas exactly, lengths within ``rtol``."""
    assert a.indices.keys() == b.indices.keys()
    for key, va in a.indices.items():
        vb = b.indices[key]
        if isinstance(va, int):
            assert va == vb, key
        elif isinstance(va, float) and math.isnan(va):
            assert math.isnan(vb), key
        else:
            assert vb == pytest.approx(va, rel=rtol, abs=1e-12), key
    for name in ("osteoclasts", "osteocytes", "trap_off_bone", "trap_rejected"):
        ra, rb = getattr(a, name), getattr(b, name)
        assert [r["label"] for r in ra] == [r["label"] for r in rb], name
        for x, y in zip(ra, rb, strict=True):
            assert x.keys() == y.keys()
            for key, vx in x.items():
                vy = y[key]
                if isinstance(vx, float):
                    assert vy == pytest.approx(vx, rel=rtol, abs=1e-12, nan_ok=True), (name, key)
                else:
                    assert vx == vy, (name, key)
    assert a.nuclei_resolved == b.nuclei_resolved


@pytest.fixture(scope="module")
def section(synthetic_section):
    return synthetic_section("oc-rich", 1200, 1.0, 3)


def _zarr(array: np.ndarray, chunk: int = 256):
    z = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=array.shape,
        chunks=(chunk, chunk),
        dtype=array.dtype,
    )
    z[:] = array
    return z


@pytest.mark.parametrize("block_px", [512, 333, 4096])
def test_blocks_equal_whole_with_instances_and_image(section, block_px):
    kw = {
        "osteoclast_labels": section.osteoclast_labels,
        "osteocyte_labels": section.osteocyte_labels,
        "image": section.image,
    }
    whole = measure(section.class_map, 1.0, **kw)
    assert whole.indices["N.Oc"] > 20 and whole.indices["N.Ot"] > 20
    assert_same(whole, measure_by_blocks(section.class_map, 1.0, block_px=block_px, **kw))


def test_objects_cut_by_seams_are_aggregated(section):
    """Many osteoclasts straddle the 256-px seams; each keeps one row with its whole area."""
    labels = section.osteoclast_labels
    cut = set()
    for seam in range(256, labels.shape[0], 256):
        cut |= set(np.unique(labels[seam - 1])) & set(np.unique(labels[seam]))
        cut |= set(np.unique(labels[:, seam - 1])) & set(np.unique(labels[:, seam]))
    cut.discard(0)
    assert len(cut) > 10
    kw = {"osteoclast_labels": labels, "osteocyte_labels": section.osteocyte_labels}
    whole = measure(section.class_map, 1.0, image=section.image, **kw)
    # a 16-px margin: most cut osteoclasts are larger, their nuclei come from a bounding-box crop
    blocks = measure_by_blocks(
        section.class_map, 1.0, image=section.image, block_px=256, margin_px=16, **kw
    )
    assert_same(whole, blocks)
    rows = {r["label"]: r for r in blocks.osteoclasts + blocks.trap_off_bone}
    for lab in cut:
        assert rows[int(lab)]["area_um2"] == np.count_nonzero(
            (labels == lab) & (section.class_map == classes.OSTEOCLAST)
        )


def test_connected_components_without_instance_maps(section):
    """Without instance maps, components are merged across seams and numbered as ndi.label."""
    whole = measure(section.class_map, 1.0)
    for block_px in (200, 512):
        assert_same(whole, measure_by_blocks(section.class_map, 1.0, block_px=block_px))


def test_zarr_inputs_and_image_reader(section):
    kw = {"osteoclast_labels": section.osteoclast_labels, "image": section.image}
    whole = measure(section.class_map, 1.0, **kw)
    image = section.image

    def read(y: int, x: int, h: int, w: int) -> np.ndarray:
        return image[y : y + h, x : x + w]

    blocks = measure_by_blocks(
        _zarr(section.class_map),
        1.0,
        osteoclast_labels=_zarr(section.osteoclast_labels.astype(np.uint32)),
        image=read,
        block_px=512,
    )
    assert_same(whole, blocks)
    # components from a zarr class map (the provisional labels go to a temporary zarr)
    assert_same(
        measure(section.class_map, 1.0),
        measure_by_blocks(_zarr(section.class_map), 1.0, block_px=400),
    )


def test_roi_and_rules(section):
    poly = np.array([[100, 50], [1100, 300], [1000, 1150], [200, 1100]], float)
    mask = np.zeros(section.class_map.shape, bool)
    mask[200:1000, 150:900] = True
    rules = CountingRules(
        eroded_closing_um=6.0,
        oc_surface_tolerance_px=2,
        min_nuclei=2,
        min_osteoclast_area_um2=300.0,
        min_osteocyte_area_um2=20.0,
    )
    kw = {
        "osteoclast_labels": section.osteoclast_labels,
        "osteocyte_labels": section.osteocyte_labels,
        "image": section.image,
    }
    cases = ({"roi": poly}, {"roi": mask}, {"rules": rules}, {"roi": mask, "rules": rules})
    for k, extra in enumerate(cases):
        whole = measure(section.class_map, 1.0, **kw, **extra)
        if k == 3:
            extra = {**extra, "roi": _zarr(mask)}  # a zarr mask, read block by block
        assert_same(whole, measure_by_blocks(section.class_map, 1.0, block_px=384, **kw, **extra))


def test_shapes_at_seams_and_edges():
    """Disks, rings, a one-pixel lamina and shapes touching the map's edge, cut by seams."""
    cm = np.ones((700, 650), np.uint8)
    yy, xx = np.mgrid[:700, :650]
    cm[(yy - 256) ** 2 + (xx - 256) ** 2 < 90**2] = classes.BONE  # centred on a seam corner
    ring = ((yy - 500) ** 2 + (xx - 450) ** 2 < 70**2) & ((yy - 500) ** 2 + (xx - 450) ** 2 > 40**2)
    cm[ring] = classes.BONE
    cm[100:600, 600] = classes.BONE  # one-pixel lamina
    cm[0:40, 300:420] = classes.BONE  # touches the top edge
    cm[660:700, 0:50] = classes.BONE  # touches a corner
    cm[(yy - 256) ** 2 + (xx - 256) ** 2 < 10**2] = classes.OSTEOCYTE
    cm[(yy - 256) ** 2 + (xx - 350) ** 2 < 12**2] = classes.OSTEOCLAST  # on the disk's edge
    cm[40:46, 300:420] = classes.OSTEOCLAST  # a long cell under the edge bone, across a seam
    cm[:, :5] = classes.BACKGROUND
    whole = measure(cm, 0.8)
    for block_px in (128, 256, 100):
        blocks = measure_by_blocks(cm, 0.8, block_px=block_px, margin_px=20)
        assert_same(whole, blocks)
    assert whole.indices["N.Oc"] == 2


def test_errors_are_the_same():
    cm = np.ones((64, 64), np.uint8)
    cm[40, 40] = 9
    with pytest.raises(ClassMapError, match="codes"):
        measure_by_blocks(cm, 1.0, block_px=32)
    with pytest.raises(ClassMapError, match="integer"):
        measure_by_blocks(cm.astype(float), 1.0)
    with pytest.raises(ClassMapError, match="shape"):
        measure_by_blocks(np.ones((64, 64), np.uint8), 1.0, osteoclast_labels=np.zeros((8, 8), int))


def test_iter_blocks_tile_the_map_once():
    seen = np.zeros((100, 70), int)
    for b in iter_blocks((100, 70), 32, 8):
        seen[b.y0 : b.y1, b.x0 : b.x1] += 1
        assert b.wy0 == max(b.y0 - 8, 0) and b.wx1 == min(b.x1 + 8, 70)
    assert (seen == 1).all()


def test_downsample_nearest_matches_cv2():
    import cv2

    a = np.random.default_rng(0).integers(0, 5, (1000, 777), dtype=np.uint8)
    for shape in ((100, 78), (333, 259), (1000, 777)):
        expected = cv2.resize(a, shape[::-1], interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(downsample_nearest(_zarr(a), shape, band_px=128), expected)


def test_geojson_by_blocks_matches_whole(section, tmp_path):
    from histo.io.geojson import label_features

    labels = np.where(section.class_map == classes.OSTEOCLAST, section.osteoclast_labels, 0).astype(
        np.uint32
    )
    whole = label_features(labels, 1.0, "osteoclast", slide_pixel_size_um=0.5)
    n, skipped = write_label_geojson_by_blocks(
        tmp_path / "oc.geojson",
        _zarr(labels),
        1.0,
        "osteoclast",
        slide_pixel_size_um=0.5,
        block_px=300,
        margin_px=128,
    )
    assert (n, skipped) == (len(whole), 0)
    got = json.loads((tmp_path / "oc.geojson").read_text())["features"]
    key = {f["properties"]["measurements"]["label"]: f for f in whole}
    for f in got:
        ref = key[f["properties"]["measurements"]["label"]]
        assert f["properties"] == ref["properties"]
        assert f["geometry"] == ref["geometry"]
    # a margin smaller than the cells: large cells cut by seams are skipped, never duplicated
    n2, skipped2 = write_label_geojson_by_blocks(
        tmp_path / "oc2.geojson", labels, 1.0, "osteoclast", block_px=300, margin_px=4
    )
    assert skipped2 > 0 and n2 + skipped2 == len(whole)


def test_geojson_by_blocks_large_label_values(section, tmp_path):
    """Label values far above the number of pixels (renumbered per window): same outlines."""
    from histo.io.geojson import label_features

    labels = np.where(section.class_map == classes.OSTEOCLAST, section.osteoclast_labels, 0)
    whole = label_features(labels.astype(np.uint32), 1.0, "osteoclast")
    big = np.where(labels > 0, labels.astype(np.int64) + 3_000_000_000, 0).astype(np.uint32)
    n, skipped = write_label_geojson_by_blocks(
        tmp_path / "big.geojson", _zarr(big), 1.0, "osteoclast", block_px=300, margin_px=128
    )
    assert (n, skipped) == (len(whole), 0)
    got = json.loads((tmp_path / "big.geojson").read_text())["features"]
    key = {f["properties"]["measurements"]["label"] + 3_000_000_000: f for f in whole}
    for f in got:
        label = f["properties"]["measurements"]["label"]
        assert f["properties"]["name"] == f"osteoclast {label}"
        assert f["geometry"] == key[label]["geometry"]
