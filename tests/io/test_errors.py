"""Bad input gives a SlideReadError or PixelSizeError with a one-line reason."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tifffile

from histo.errors import HistoError, PixelSizeError, SlideReadError
from histo.io import open_slide, read_region


def _one_line(exc: HistoError) -> str:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message
    assert len(message) < 300
    return message


def test_missing_file(tmp_path):
    with pytest.raises(SlideReadError) as err:
        open_slide(tmp_path / "nope.svs")
    assert "no such file" in _one_line(err.value)


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(SlideReadError) as err:
        open_slide(tmp_path / "empty.tif")
    assert _one_line(err.value) == "empty.tif: empty file (0 bytes)"


def test_not_an_image(tmp_path):
    (tmp_path / "notes.tif").write_text("sample 12, tibia\n" * 20)
    with pytest.raises(SlideReadError) as err:
        open_slide(tmp_path / "notes.tif")
    assert "not a supported image" in _one_line(err.value)


def test_folder_that_is_not_zarr(tmp_path):
    (tmp_path / "d.zarr").mkdir()
    with pytest.raises(SlideReadError) as err:
        open_slide(tmp_path / "d.zarr")
    _one_line(err.value)


def test_zarr_group_without_multiscales(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(SlideReadError, match="multiscales") as err:
        open_slide(tmp_path / "g.zarr")
    _one_line(err.value)


@pytest.mark.parametrize("keep", [8, 100, 0.6])
def test_truncated_tiff(files, tmp_path, keep):
    data = files["tiled"].read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    path = tmp_path / "cut.tif"
    path.write_bytes(data[:n])
    with pytest.raises(SlideReadError) as err:
        open_slide(path)
    _one_line(err.value)


def test_truncated_strip_tiff_uncompressed(files, tmp_path):
    data = files["strip"].read_bytes()  # uncompressed, data before the IFD? check both ends
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError) as err:
        open_slide(path)
    _one_line(err.value)


def test_unsupported_compression(tmp_path, rgb, patch_tag):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, rgb[:16, :16], photometric="rgb")
    patch_tag(path, 259, (4242,), "H")  # no such compression scheme
    with pytest.raises(SlideReadError, match="compression") as err:
        open_slide(path)
    _one_line(err.value)


def test_huge_declared_size_in_tiny_tiff(tmp_path, rgb, patch_tag):
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, rgb[:16, :16], photometric="rgb", compression="zlib")
    patch_tag(path, 256, (100_000,), "I")  # ImageWidth
    patch_tag(path, 257, (100_000,), "I")  # ImageLength
    with pytest.raises(SlideReadError) as err:
        open_slide(path)
    _one_line(err.value)


def test_corrupt_tile_data_fails_on_read(tmp_path, rgb):
    path = tmp_path / "garbled.tif"
    tifffile.imwrite(path, rgb[:64, :64], photometric="rgb", compression="zlib", tile=(32, 32))
    with tifffile.TiffFile(path) as tf:
        offset = int(tf.pages.first.dataoffsets[0])
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00garbage" * 4)
    slide = open_slide(path, pixel_size_um=1.0)
    with pytest.raises(SlideReadError, match="cannot decode") as err:
        read_region(slide, 0, 0, 8, 8, 1.0)
    _one_line(err.value)


def test_truncated_png_and_jpeg(files, tmp_path):
    for key, name in (("png", "cut.png"), ("jpeg", "cut.jpg")):
        data = files[key].read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(SlideReadError) as err:
            open_slide(tmp_path / name)
        _one_line(err.value)


def test_png_declaring_huge_size(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    idat = zlib.compress(b"\x00" * 1000)
    body = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", 0)
    body += struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + body)
    with pytest.raises(SlideReadError, match="200000x200000") as err:
        open_slide(tmp_path / "bomb.png")
    _one_line(err.value)


def test_too_many_channels(tmp_path):
    tifffile.imwrite(tmp_path / "multi.tif", np.zeros((6, 16, 16), np.uint8))
    # six planes read as a stack of gray images: the first is used
    slide = open_slide(tmp_path / "multi.tif")
    assert slide.shape == (16, 16, 3)
    tifffile.imwrite(
        tmp_path / "fluo.ome.tif", np.zeros((6, 16, 16), np.uint8), metadata={"axes": "CYX"}
    )
    with pytest.raises(SlideReadError, match="6 channels") as err:
        open_slide(tmp_path / "fluo.ome.tif")
    _one_line(err.value)


def test_pixel_size_errors_are_one_line(files):
    slide = open_slide(files["dpi72"])
    for bad in (0.0, float("nan"), 1e6):
        with pytest.raises(PixelSizeError) as err:
            read_region(slide, 0, 0, 4, 4, bad)
        _one_line(err.value)
