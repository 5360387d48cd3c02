"""A corrected region of a slide exported as the image and class-map pair histo finetune reads."""

from __future__ import annotations

import numpy as np
import pytest

from histo import classes
from histo.finetune import load_labelled
from histo.io.ome_zarr import LabelsWriter
from histo.io.region_edit import (
    PixelBox,
    correction_example,
    correction_name,
    read_labels_region,
    write_correction_pair,
    write_labels_region,
)

SIZE_PX = 512
PIXEL_SIZE_UM = 2.0  # coarser than the working resolution: load_labelled reads it unresampled
BOX = PixelBox(100, 140, 300, 380)


@pytest.fixture(scope="module")
def section():
    from histo.synth import make_section

    return make_section("oc-rich", size=SIZE_PX, pixel_size_um=PIXEL_SIZE_UM, seed=5)


@pytest.fixture
def corrected(tmp_path, section):
    """A store of the section's truth with the region's osteoclasts painted bone, and the
    region's training example."""
    store = tmp_path / "labels.ome.zarr"
    with LabelsWriter(store, (SIZE_PX, SIZE_PX), PIXEL_SIZE_UM, chunk_px=128) as writer:
        writer.write_tile("class_map", 0, 0, section.class_map)
        writer.write_tile("osteoclasts", 0, 0, section.osteoclast_labels)
        writer.write_tile("osteocytes", 0, 0, section.osteocyte_labels)
    cm = read_labels_region(store, BOX).class_map.copy()
    assert (cm == classes.OSTEOCLAST).any()  # something to correct
    cm[cm == classes.OSTEOCLAST] = classes.BONE
    write_labels_region(store, BOX, cm)
    return correction_example(section.image, store, BOX, slide_pixel_size_um=PIXEL_SIZE_UM), cm


def test_an_exported_correction_reads_back_through_load_labelled(tmp_path, corrected, section):
    example, cm = corrected
    name = correction_name("S1", BOX)
    assert name == "S1-region-y100-x140-240x200"
    files = write_correction_pair(example, tmp_path / "corrections", name)
    assert files.image.name == f"{name}.ome.tif" and files.class_map.is_file()
    assert files.class_map == files.image.with_name(f"{name}.classes.tif")
    assert sorted(p.name for p in files.image.parent.iterdir()) == sorted(
        [files.image.name, files.class_map.name]
    )  # no temporary file left behind

    (field,) = load_labelled([tmp_path / "corrections"])  # the folder, as `histo finetune` takes
    assert field.pixel_size_um == PIXEL_SIZE_UM
    np.testing.assert_array_equal(field.class_map, cm)
    np.testing.assert_array_equal(field.image, section.image[BOX.slices])  # lossless
    assert not (field.class_map == classes.OSTEOCLAST).any()


def test_pairs_of_several_regions_are_each_one_field(tmp_path, corrected):
    example, _ = corrected
    folder = tmp_path / "corrections"
    other = PixelBox(0, 0, 64, 96)
    write_correction_pair(example, folder, correction_name("S1", BOX))
    part = example._replace(image=example.image[:64, :96], class_map=example.class_map[:64, :96])
    write_correction_pair(part, folder, correction_name("S1", other))
    fields = sorted(load_labelled([folder]), key=lambda f: f.class_map.size)
    assert [f.class_map.shape for f in fields] == [(64, 96), BOX.shape]
    np.testing.assert_array_equal(fields[0].image, example.image[:64, :96])
