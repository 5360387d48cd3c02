"""open_slide on real files of each format: pixel sizes, shapes, pixel values, laziness."""

from __future__ import annotations

import time
import tracemalloc

import cv2
import numpy as np
import pytest
import tifffile

from histo.errors import PixelSizeError
from histo.io import (
    iter_tiles,
    open_slide,
    read_region,
    read_tile,
    require_pixel_size,
    slide_from_array,
    slide_name,
    working_shape,
)


def test_ome_tiff_pyramid_levels_sizes_and_values(files, rgb, rgb_levels):
    with open_slide(files["ome"]) as slide:
        assert slide.name == "pyr"
        assert slide.format == "OME-TIFF"
        assert slide.shape == (512, 768, 3)
        assert slide.pixel_size_um == pytest.approx(0.5)
        assert slide.pixel_size_source == "OME PhysicalSizeX"
        assert slide.level_pixel_sizes == pytest.approx([0.5, 1.0, 2.0])
        assert [lvl.shape for lvl in slide.levels] == [(512, 768, 3), (256, 384, 3), (128, 192, 3)]
        expected = rgb_levels
        np.testing.assert_array_equal(slide.levels[0][100:300, 50:400], rgb[100:300, 50:400])
        np.testing.assert_array_equal(np.asarray(slide.levels[2]), expected[2])
        assert slide.levels[1][5, 7].tolist() == expected[1][5, 7].tolist()


def test_ome_physical_size_unit_conversion(files):
    slide = open_slide(files["ome_nm"])
    assert slide.pixel_size_um == pytest.approx(0.25)
    assert len(slide.levels) == 1


def test_svs_mpp_and_levels(files, rgb):
    slide = open_slide(files["svs"])
    assert slide.format == "SVS"
    assert slide.name == "aperio"
    assert slide.pixel_size_source == "Aperio MPP"
    assert slide.pixel_size_um == pytest.approx(0.499)
    # baseline and the tiled 4x level; thumbnail and label are not pyramid levels
    assert [lvl.shape[:2] for lvl in slide.levels] == [(512, 768), (128, 192)]
    assert slide.level_pixel_sizes[1] == pytest.approx(0.499 * 4)
    np.testing.assert_array_equal(slide.levels[0][:64, -64:], rgb[:64, -64:])


def test_ndpi_like_resolution_and_levels(files, rgb):
    slide = open_slide(files["ndpi"])
    assert slide.format == "NDPI"
    assert slide.pixel_size_source == "NDPI resolution"
    assert slide.pixel_size_um == pytest.approx(0.4567)
    assert len(slide.levels) == 3
    assert slide.level_pixel_sizes[2] == pytest.approx(0.4567 * 4)
    np.testing.assert_array_equal(slide.levels[0][33:77, 10:20], rgb[33:77, 10:20])


def test_tiled_and_strip_tiff_resolution_tags(files, rgb):
    tiled = open_slide(files["tiled"])
    assert tiled.pixel_size_um == pytest.approx(0.25)
    assert tiled.pixel_size_source == "TIFF resolution"
    np.testing.assert_array_equal(tiled.levels[0][:], rgb)
    strip = open_slide(files["strip"])
    assert strip.pixel_size_um == pytest.approx(2.0)
    np.testing.assert_array_equal(strip.levels[0][200:210, ::3], rgb[200:210, ::3])


def test_72_dpi_default_is_not_a_pixel_size(files):
    slide = open_slide(files["dpi72"])
    assert slide.pixel_size_um is None
    with pytest.raises(PixelSizeError) as err:
        require_pixel_size(slide)
    assert str(err.value) == "no pixel size in dpi72.tif and none given: pass --pixel-size UM"


def test_argument_wins_over_metadata(files):
    slide = open_slide(files["ome"], pixel_size_um=0.3)
    assert slide.pixel_size_um == 0.3
    assert slide.pixel_size_source == "argument"
    assert slide.level_pixel_sizes == pytest.approx([0.3, 0.6, 1.2])


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), 250.0, "abc"])
def test_absurd_pixel_size_argument(files, value):
    with pytest.raises(PixelSizeError) as err:
        open_slide(files["png"], pixel_size_um=value)
    assert "\n" not in str(err.value)


def test_absurd_pixel_size_in_file_is_rejected(tmp_path, rgb):
    path = tmp_path / "coarse.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(10, 10), resolutionunit="INCH")
    slide = open_slide(path)  # 2540 µm/px: not a slide scan
    assert slide.pixel_size_um is None
    with pytest.raises(PixelSizeError, match="implausible.*pass --pixel-size UM"):
        require_pixel_size(slide)
    assert open_slide(path, pixel_size_um=1.0).pixel_size_um == 1.0


def test_png_and_jpeg_fields(files, rgb):
    png = open_slide(files["png"], pixel_size_um=1.0)
    assert png.format == "PNG"
    np.testing.assert_array_equal(np.asarray(png.levels[0]), rgb)
    assert open_slide(files["png"]).pixel_size_um is None
    jpeg = open_slide(files["jpeg"])
    assert jpeg.shape == rgb.shape
    decoded = cv2.cvtColor(cv2.imread(str(files["jpeg"])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(np.asarray(jpeg.levels[0]), decoded)
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 12  # lossy, but the image


def test_png_phys_chunk_gives_pixel_size(tmp_path, rgb):
    ok, buf = cv2.imencode(".png", rgb[:32, :32])
    data = buf.tobytes()
    import struct
    import zlib

    body = struct.pack(">IIB", 2_000_000, 2_000_000, 1)  # 2e6 px/m = 0.5 µm/px
    chunk = struct.pack(">I", len(body)) + b"pHYs" + body
    chunk += struct.pack(">I", zlib.crc32(b"pHYs" + body) & 0xFFFFFFFF)
    at = 8 + 25  # after the signature and IHDR
    (tmp_path / "p.png").write_bytes(data[:at] + chunk + data[at:])
    slide = open_slide(tmp_path / "p.png")
    assert slide.pixel_size_um == pytest.approx(0.5)
    assert slide.pixel_size_source == "PNG density"


@pytest.mark.parametrize(
    "key, size, source", [("zarr3", 0.8, "NGFF scale"), ("zarr2", 0.8, "NGFF scale")]
)
def test_ome_zarr_images(files, rgb, key, size, source):
    slide = open_slide(files[key])
    assert slide.format == "OME-Zarr"
    assert slide.pixel_size_um == pytest.approx(size)
    assert slide.pixel_size_source == source
    assert slide.level_pixel_sizes == pytest.approx([size, 2 * size])
    np.testing.assert_array_equal(slide.levels[0][10:20, 30:45], rgb[10:20, 30:45])
    assert slide.levels[1].shape == (256, 384, 3)


def test_normalisation_gray_rgba_16bit_planar(tmp_path, rgb):
    gray = rgb[..., 1]
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    np.testing.assert_array_equal(
        open_slide(tmp_path / "gray.tif").levels[0][:4, :4],
        np.repeat(gray[:4, :4, None], 3, axis=2),
    )

    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent: white
    rgba[10:20, :10, 3] = 128
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples="unassalpha")
    out = open_slide(tmp_path / "rgba.tif").levels[0][:20, :10]
    assert (out[:10] == 255).all()
    half = np.rint(rgb[10:20, :10] * (128 / 255) + 255 * (127 / 255))
    np.testing.assert_allclose(out[10:20], half, atol=1)

    wide = rgb.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "u16.tif", wide, photometric="rgb")
    np.testing.assert_array_equal(open_slide(tmp_path / "u16.tif").levels[0][:], rgb)

    planar = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    slide = open_slide(tmp_path / "planar.tif")
    assert slide.shape == rgb.shape
    np.testing.assert_array_equal(slide.levels[0][5:50, 7:9], rgb[5:50, 7:9])


def test_one_pixel_image(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.array([[[10, 20, 30]]], np.uint8), photometric="rgb")
    slide = open_slide(tmp_path / "one.tif", pixel_size_um=1.0)
    assert slide.shape == (1, 1, 3)
    assert slide.levels[0][0, 0].tolist() == [10, 20, 30]
    assert working_shape(slide, 16.0) == (1, 1)
    region = read_region(slide, 0, 0, 2, 2, 1.0)
    assert region[0, 0].tolist() == [10, 20, 30]
    assert (region[1, 1] == 255).all()


def test_slide_name():
    assert slide_name("/a/S-12.ome.tif") == "S-12"
    assert slide_name("x.ome.zarr") == "x"
    assert slide_name("case.v2.svs") == "case.v2"


def test_read_region_coarser_matches_cv2_downsample(files, rgb):
    slide = open_slide(files["tiled"])  # single level, 0.25 µm/px
    full = read_region(slide, 0, 0, 256, 384, 0.5)
    np.testing.assert_array_equal(full, cv2.resize(rgb, (384, 256), interpolation=cv2.INTER_AREA))
    # an aligned sub-region equals the same part of the full downsample
    part = read_region(slide, 40 * 0.5, 60 * 0.5, 32, 48, 0.5)
    np.testing.assert_array_equal(part, full[40:72, 60:108])


def test_read_region_uses_pyramid_level_and_pads_white(files, rgb, rgb_levels):
    slide = open_slide(files["ome"])  # 0.5, 1, 2 µm/px
    expected = rgb_levels
    np.testing.assert_array_equal(read_region(slide, 0, 0, 256, 384, 1.0), expected[1])
    # 1.5 µm/px comes from the 1 µm/px level, not the 2 µm/px one
    r = read_region(slide, 0, 0, 100, 100, 1.5)
    np.testing.assert_array_equal(
        r, cv2.resize(expected[1][:150, :150], (100, 100), interpolation=cv2.INTER_AREA)
    )
    # outside the slide: white
    edge = read_region(slide, -10.0, 380.0, 20, 20, 1.0)
    assert (edge[:10] == 255).all()
    assert (edge[:, 4:] == 255).all()
    np.testing.assert_array_equal(edge[10:, :4], expected[1][:10, 380:384])
    # finer than level 0: upsampled
    up = read_region(slide, 0, 0, 20, 20, 0.25)
    np.testing.assert_array_equal(
        up, cv2.resize(rgb[:10, :10], (20, 20), interpolation=cv2.INTER_LINEAR)
    )


def test_read_region_without_pixel_size_fails(files):
    slide = open_slide(files["dpi72"])
    with pytest.raises(PixelSizeError):
        read_region(slide, 0, 0, 8, 8, 1.0)


def test_iter_tiles_cores_partition_the_slide(files):
    slide = open_slide(files["ome"])  # working shape at 1 µm/px: 256 x 384
    tiles = list(iter_tiles(slide, 1.0, 128, 32))
    h, w = working_shape(slide, 1.0)
    assert (h, w) == (256, 384)
    owner = np.zeros((h, w), int)
    for t in tiles:
        assert (t.h, t.w) == (128, 128)
        assert 0 <= t.y and t.y + t.h <= h and 0 <= t.x and t.x + t.w <= w
        owner[t.core] += 1
        ys, xs = t.core_in_tile
        assert 0 <= ys.start < ys.stop <= t.h and 0 <= xs.start < xs.stop <= t.w
    assert (owner == 1).all()
    tile = tiles[-1]
    np.testing.assert_array_equal(
        read_tile(slide, tile), read_region(slide, tile.y, tile.x, 128, 128, 1.0)
    )


def test_slide_from_array():
    image = np.zeros((10, 12), np.uint16)
    image[2, 3] = 65535
    slide = slide_from_array(image, 0.5, name="field")
    assert slide.shape == (10, 12, 3)
    assert slide.levels[0][2, 3].tolist() == [255, 255, 255]
    assert slide.pixel_size_source == "argument"


def test_small_region_of_large_file_reads_little(big_tiff):
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        slide = open_slide(big_tiff)
        assert slide.shape == (16384, 16384, 3)
        assert slide.pixel_size_um == pytest.approx(1.0)
        patch = slide.levels[0][9000:9016, 3000:3016]
        region = read_region(slide, 9000.0, 3000.0, 16, 16, 1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    i, j = 9000 // 512, 3000 // 512
    assert (patch == (i, j, (i * 32 + j) % 251)).all()
    np.testing.assert_array_equal(region, patch)
    # the whole level is 768 MiB decoded; one tile is 0.75 MiB
    assert peak < 32 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"
    assert elapsed < 5.0
