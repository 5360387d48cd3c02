"""The reader: slides at their physical scale, class maps and histo outputs as labels."""

from __future__ import annotations

import numpy as np
import pytest

from histo import classes

pytestmark = pytest.mark.gui


def test_get_reader_declines_what_it_cannot_read(tmp_path):
    from histo_napari._reader import get_reader

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "broken.tif")) is None
    assert get_reader(str(tmp_path / "empty.png")) is None
    assert get_reader(str(tmp_path)) is None  # a folder holding no slide or histo output


def test_reader_opens_ome_tiff_with_its_scale(make_napari_viewer, synthetic_slide, slide_section):
    viewer = make_napari_viewer()
    layers = viewer.open(str(synthetic_slide), plugin="histo")
    image = next(layer for layer in layers if layer.name == "rich")
    assert image.rgb
    assert tuple(image.scale) == (0.5, 0.5)
    assert [str(u) for u in image.units] == ["micrometer", "micrometer"]
    assert image.metadata["pixel_size_um"] == 0.5
    assert image.multiscale and len(image.data) >= 2
    assert image.data[0].shape == (768, 768, 3)
    assert image.data[1].shape == (384, 384, 3)
    np.testing.assert_array_equal(
        image.data[0][100:110, 200:220], slide_section.image[100:110, 200:220]
    )


def test_reader_opens_class_map_as_labels(make_napari_viewer, synthetic_slide):
    viewer = make_napari_viewer()
    classes_tif = synthetic_slide.with_name("rich.classes.tif")
    (layer,) = viewer.open(str(classes_tif), plugin="histo")
    assert layer._type_string == "labels"
    assert layer.metadata["histo_kind"] == "class_map"
    assert tuple(layer.scale) == (0.5, 0.5)
    assert layer.data.dtype == np.uint8 and layer.data.max() <= classes.OSTEOCYTE


def test_reader_without_pixel_size_warns(make_napari_viewer, tmp_path, monkeypatch):
    import napari.utils.notifications as notifications
    import skimage.io

    warnings: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", warnings.append)
    path = tmp_path / "field.png"
    skimage.io.imsave(path, np.full((64, 80, 3), 200, np.uint8), check_contrast=False)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="histo")
    assert tuple(layer.scale) == (1.0, 1.0)
    assert layer.metadata["pixel_size_um"] is None
    assert len(warnings) == 1 and "pixel size unknown" in warnings[0]


def test_reader_opens_histo_output_folder(make_napari_viewer, tmp_path):
    from histo.io.ome_zarr import LabelsWriter

    cmap = np.ones((96, 128), np.uint8)
    cmap[40:, :] = classes.BONE
    cmap[30:40, 10:30] = classes.OSTEOCLAST
    oc = np.zeros(cmap.shape, np.uint32)
    oc[30:40, 10:30] = 1
    writer = LabelsWriter(tmp_path / "S1" / "labels.ome.zarr", cmap.shape, 2.0)
    writer.write_tile("class_map", 0, 0, cmap)
    writer.write_tile("osteoclasts", 0, 0, oc)
    writer.finalize()
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path), plugin="histo")
    by_name = {layer.name: layer for layer in layers}
    assert {"S1 classes", "S1 osteoclasts", "S1 osteocytes"} <= set(by_name)
    classes_layer = by_name["S1 classes"]
    assert tuple(classes_layer.scale) == (2.0, 2.0)
    np.testing.assert_array_equal(np.asarray(classes_layer.data), cmap)
