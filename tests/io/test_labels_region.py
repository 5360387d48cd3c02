"""Correcting a region of a labels store: only the region changes, at every level, atomically."""

from __future__ import annotations

import numpy as np
import pytest

from histo import classes
from histo.io.ome_zarr import LabelsWriter, read_labels
from histo.io.region_edit import (
    PixelBox,
    correction_example,
    edited_instances,
    read_labels_region,
    recover_interrupted_edit,
    write_labels_region,
)
from tests.helpers import store_levels

SIZE_PX = 512
BOX = PixelBox(100, 140, 300, 380)  # not aligned to the 128 px chunks


@pytest.fixture(scope="module")
def section():
    from histo.synth import make_section

    return make_section("oc-rich", size=SIZE_PX, pixel_size_um=1.0, seed=3)


@pytest.fixture
def store(tmp_path, section):
    path = tmp_path / "labels.ome.zarr"
    with LabelsWriter(path, (SIZE_PX, SIZE_PX), 1.0, chunk_px=128, n_levels=3) as writer:
        writer.write_tile("class_map", 0, 0, section.class_map)
        writer.write_tile("osteoclasts", 0, 0, section.osteoclast_labels)
        writer.write_tile("osteocytes", 0, 0, section.osteocyte_labels)
    return path


def _edit(region, section):
    """Paint bone over the region's osteoclasts and a new osteoclast on its bone."""
    cm = region.class_map.copy()
    gone = np.unique(region.osteoclasts[region.osteoclasts > 0])
    cm[cm == classes.OSTEOCLAST] = classes.BONE
    ys, xs = np.nonzero(cm == classes.BONE)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    yy, xx = np.ogrid[: cm.shape[0], : cm.shape[1]]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2
    cm[disk] = classes.OSTEOCLAST
    return cm, gone, disk


def test_a_region_edit_changes_the_store_only_inside_the_region(store, section):
    before = store_levels(store)
    region = read_labels_region(store, BOX)
    np.testing.assert_array_equal(region.class_map, section.class_map[BOX.slices])
    cm, gone, disk = _edit(region, section)
    assert len(gone) > 0  # the region holds osteoclasts to erase
    written = write_labels_region(store, BOX, cm)
    assert written.changed_px == np.count_nonzero(cm != region.class_map)
    after = store_levels(store)
    assert {k for _, k in after} == {0, 1, 2}
    full = after["class_map", 0]
    np.testing.assert_array_equal(full[BOX.slices], cm)
    outside = np.ones(full.shape, bool)
    outside[BOX.slices] = False
    for name in ("class_map", "osteoclasts", "osteocytes"):
        np.testing.assert_array_equal(after[name, 0][outside], before[name, 0][outside])
        for k in (1, 2):  # every level samples level 0 at f*i + f//2, nothing else moved
            f = 2**k
            np.testing.assert_array_equal(after[name, k], after[name, 0][f // 2 :: f, f // 2 :: f])
            unchanged = outside[f // 2 :: f, f // 2 :: f]
            np.testing.assert_array_equal(after[name, k][unchanged], before[name, k][unchanged])
    oc = after["osteoclasts", 0]
    new = np.unique(oc[BOX.slices][disk])
    assert len(new) == 1 and new[0] > section.osteoclast_labels.max()  # one new, unique cell
    kept = set(np.unique(section.osteoclast_labels[outside])) - {0}
    assert not (set(gone) - kept) & set(np.unique(oc))  # erased cells are gone
    assert (oc > 0).sum() == (full == classes.OSTEOCLAST).sum()  # instances follow the codes
    assert not store.with_name(store.name + ".edit").exists()


def test_the_writer_records_the_largest_label_so_an_edit_reads_no_whole_image(store, section):
    import zarr

    from histo.io.ome_zarr import MAX_LABEL_ATTR

    for name, labels in (
        ("osteoclasts", section.osteoclast_labels),
        ("osteocytes", section.osteocyte_labels),
    ):
        group = zarr.open_group(str(store / "labels" / name), mode="r")
        assert group.attrs[MAX_LABEL_ATTR] == labels.max() > 0


def test_an_edit_that_fails_half_way_is_rolled_back(store, monkeypatch):
    import zarr

    before = store_levels(store)
    region = read_labels_region(store, BOX)
    calls = {"n": 0}
    original = zarr.Array.__setitem__

    def failing(self, key, value):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing)
    from histo.errors import OutputError

    with pytest.raises(OutputError, match="No space left"):
        write_labels_region(store, BOX, np.full(region.class_map.shape, classes.MARROW, np.uint8))
    monkeypatch.undo()
    after = store_levels(store)
    for key, array in before.items():
        np.testing.assert_array_equal(after[key], array, err_msg=str(key))
    assert not recover_interrupted_edit(store)  # nothing left to roll back


def test_a_killed_edit_is_rolled_back_by_the_next_reader(store, monkeypatch):
    import histo.io.region_edit as edit

    before = store_levels(store)
    monkeypatch.setattr(edit, "_end_journal", lambda journal: None)  # killed before the end
    write_labels_region(store, BOX, np.zeros(BOX.shape, np.uint8))
    assert (read_labels(store)["class_map"][0][BOX.slices] == 0).all()  # raw store: edited
    region = read_labels_region(store, BOX)  # recovers first
    np.testing.assert_array_equal(region.class_map, before["class_map", 0][BOX.slices])
    assert not store.with_name(store.name + ".edit").exists()


def test_edited_instances_new_cells_go_above_the_slide_largest_label():
    cm = np.zeros((20, 20), np.uint8)
    inst = np.zeros((20, 20), np.int64)
    cm[2:6, 2:6], inst[2:6, 2:6] = classes.OSTEOCLAST, 7
    cm[6, 2:6] = classes.OSTEOCLAST  # painted onto cell 7: joins it
    cm[12:15, 12:15] = classes.OSTEOCLAST  # painted apart: a new cell
    out = edited_instances(cm, inst, classes.OSTEOCLAST, next_label=100)
    assert (out[2:7, 2:6] == 7).all()
    assert (out[12:15, 12:15] == 100).all()
    assert set(np.unique(out)) == {0, 7, 100}


def test_correction_example_pairs_the_slide_pixels_with_the_corrected_map(store, section):
    cm = read_labels_region(store, BOX).class_map.copy()
    cm[:10] = classes.MARROW
    write_labels_region(store, BOX, cm)
    example = correction_example(section.image, store, BOX, slide_pixel_size_um=1.0)
    assert example.pixel_size_um == 1.0
    np.testing.assert_array_equal(example.class_map, cm)
    np.testing.assert_array_equal(example.image, section.image[BOX.slices])
