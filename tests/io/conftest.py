"""Fixtures that write real slide files of every supported kind into a temporary folder."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import zarr


def make_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-noise RGB test image (uint8) whose downsamples are not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(yy / 17.0),
            128 + 100 * np.cos(xx / 23.0),
            128 + 60 * np.sin((xx + yy) / 31.0),
        ],
        axis=-1,
    )
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def area_pyramid(image: np.ndarray, n: int) -> list[np.ndarray]:
    """``image`` and n-1 successive 2x INTER_AREA downsamples."""
    levels = [image]
    for _ in range(n - 1):
        prev = levels[-1]
        levels.append(
            cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA)
        )
    return levels


def write_ome_pyramid(
    path: Path,
    image: np.ndarray,
    pixel_size: float,
    unit: str = "µm",
    n_levels: int = 3,
    compression: str = "zlib",
    tile: int = 128,
) -> Path:
    """Pyramidal OME-TIFF with the reduced levels in SubIFDs."""
    levels = area_pyramid(image, n_levels)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        opts = dict(tile=(tile, tile), photometric="rgb", compression=compression)
        tif.write(
            levels[0],
            subifds=n_levels - 1,
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": pixel_size,
                "PhysicalSizeXUnit": unit,
                "PhysicalSizeY": pixel_size,
                "PhysicalSizeYUnit": unit,
            },
            **opts,
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **opts)
    return path


def write_svs(path: Path, image: np.ndarray, mpp: float = 0.499) -> Path:
    """Aperio-like SVS: tiled baseline, strip thumbnail, tiled reduced level, label."""
    h, w = image.shape[:2]
    head = "Aperio Image Library v12.0.15\r\n"
    desc = f"{head}{w}x{h} [0,0 {w}x{h}] (128x128) RAW/RGB|AppMag = 20|MPP = {mpp:.4f}|Left = 1"
    low = area_pyramid(image, 3)[2]
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            image,
            tile=(128, 128),
            photometric="rgb",
            compression="zlib",
            description=desc,
            metadata=None,
        )
        tif.write(image[::8, ::8], photometric="rgb", description=f"{head}thumb", metadata=None)
        tif.write(
            low,
            tile=(128, 128),
            photometric="rgb",
            compression="zlib",
            description=f"{head}{low.shape[1]}x{low.shape[0]}",
            metadata=None,
        )
        tif.write(
            image[:40, :60],
            photometric="rgb",
            subfiletype=1,
            description=f"{head}label 60x40",
            metadata=None,
        )
    return path


def write_ndpi_like(path: Path, image: np.ndarray, um: float = 0.4567) -> Path:
    """Classic TIFF with Hamamatsu tags (FileFormat 65420, Magnification 65421, Make) and
    resolution in pixels per cm, levels as successive pages (as NDPI stores them)."""
    tmp = path.with_suffix(".tmp.tif")
    extratags = [
        (65420, "I", 1, 1, True),
        (65421, "f", 1, 20.0, True),
        (271, "s", 0, "Hamamatsu", True),
    ]
    with tifffile.TiffWriter(tmp) as tif:
        for k, level in enumerate(area_pyramid(image, 3)):
            ppcm = 1e4 / (um * 2**k)
            tif.write(
                level,
                photometric="rgb",
                compression="zlib",
                rowsperstrip=16,
                resolution=(ppcm, ppcm),
                resolutionunit="CENTIMETER",
                extratags=extratags,
                metadata=None,
                software="NDP.scan",
            )
    os.replace(tmp, path)
    return path


def write_ngff(
    path: Path,
    image: np.ndarray,
    pixel_size: float,
    unit: str = "micrometer",
    version: str = "0.5",
    n_levels: int = 2,
) -> Path:
    """OME-Zarr image (c, y, x) written directly with zarr-python (NGFF 0.5 on zarr v3 or
    NGFF 0.4 on zarr v2)."""
    zarr_format = 3 if version == "0.5" else 2
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    datasets = []
    for k, level in enumerate(area_pyramid(image, n_levels)):
        planes = np.ascontiguousarray(np.moveaxis(level, -1, 0))
        root.create_array(str(k), data=planes, chunks=(3, 64, 64))
        s = pixel_size * 2**k
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1, s, s]}]}
        )
    ms = {
        "name": "img",
        "datasets": datasets,
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": unit},
            {"name": "x", "type": "space", "unit": unit},
        ],
    }
    if version == "0.5":
        root.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}})
    else:
        root.attrs.update({"multiscales": [{"version": "0.4", **ms}]})
    return path


def patch_tag(path: Path, code: int, values: tuple[int, ...], fmt: str) -> None:
    """Overwrite the inline value of tag ``code`` of the first page of a classic TIFF."""
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages.first.tags[code].offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 8)
        fh.write(struct.pack("<" + fmt, *values))


@pytest.fixture(name="patch_tag")
def patch_tag_fixture():
    """:func:`patch_tag`, for tests that corrupt a TIFF header."""
    return patch_tag


@pytest.fixture(scope="session")
def rgb() -> np.ndarray:
    return make_rgb(512, 768)


@pytest.fixture(scope="session")
def rgb_levels(rgb: np.ndarray) -> list[np.ndarray]:
    """``rgb`` and its 2x and 4x INTER_AREA downsamples (the levels the fixtures write)."""
    return area_pyramid(rgb, 3)


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory, rgb: np.ndarray) -> dict[str, Path]:
    """One small file of each kind (written once per test session)."""
    d = tmp_path_factory.mktemp("slides")
    out = {
        "ome": write_ome_pyramid(d / "pyr.ome.tif", rgb, 0.5),
        "ome_nm": write_ome_pyramid(d / "nm.ome.tif", rgb, 250.0, unit="nm", n_levels=1),
        "svs": write_svs(d / "aperio.svs", rgb),
        "ndpi": write_ndpi_like(d / "hama.ndpi", rgb),
        "zarr3": write_ngff(d / "img.ome.zarr", rgb, 0.8, version="0.5"),
        "zarr2": write_ngff(d / "img2.zarr", rgb, 800.0, unit="nanometer", version="0.4"),
    }
    tifffile.imwrite(
        d / "tiled.tif",
        rgb,
        tile=(128, 128),
        photometric="rgb",
        compression="zlib",
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    out["tiled"] = d / "tiled.tif"
    tifffile.imwrite(
        d / "strip.tif",
        rgb,
        photometric="rgb",
        resolution=(25400 / 2.0,) * 2,
        resolutionunit="INCH",
    )
    out["strip"] = d / "strip.tif"
    tifffile.imwrite(
        d / "dpi72.tif", rgb, photometric="rgb", resolution=(72, 72), resolutionunit="INCH"
    )
    out["dpi72"] = d / "dpi72.tif"
    cv2.imwrite(str(d / "field.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out["png"] = d / "field.png"
    cv2.imwrite(
        str(d / "field.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    out["jpeg"] = d / "field.jpg"
    return out


@pytest.fixture(scope="session")
def big_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16384 x 16384 RGB tiled TIFF written from an iterator of tiles (each tile a
    different flat colour, so any tile can be checked; deflate keeps the file small)."""
    path = tmp_path_factory.mktemp("big") / "big.tif"
    n, tile = 16384, 512
    per_row = n // tile

    def tiles():
        block = np.empty((tile, tile, 3), np.uint8)
        for i in range(per_row):
            for j in range(per_row):
                block[:] = (i % 256, j % 256, (i * per_row + j) % 251)
                yield block

    tifffile.imwrite(
        path,
        tiles(),
        shape=(n, n, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="zlib",
        compressionargs={"level": 1},
        bigtiff=True,
        resolution=(1e4, 1e4),
        resolutionunit="CENTIMETER",
    )
    return path
