"""Format readers behind :func:`histo.io.open_slide`: TIFF family, OME-Zarr, PNG/JPEG.

Each reader returns an :class:`Opened`: lazy levels, the pixel size found in the metadata (µm
per pixel at level 0, or None) and where it came from. Every failure is a
:class:`~histo.errors.SlideReadError` with a one-line reason.
"""

from __future__ import annotations

import math
import os
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import SlideReadError
from histo.io._levels import Layout, LevelArray, layout_from_axes, one_line, to_rgb8

#: largest single TIFF strip or tile histo will decode (bytes); a larger one is a file that
#: declares an absurd size or must be re-saved tiled
MAX_CHUNK_BYTES = 1 << 30
#: largest PNG/JPEG field (pixels): these formats are decoded whole
MAX_FIELD_PIXELS = 1 << 29

#: length units to micrometres (OME-XML symbols and NGFF names)
UNIT_TO_UM = {
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micrometer": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "pm": 1e-6,
    "picometer": 1e-6,
    "Å": 1e-4,
    "angstrom": 1e-4,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}


@dataclass
class Opened:
    """What a format reader found."""

    levels: list[LevelArray]
    pixel_size_um: float | None = None
    pixel_size_source: str | None = None
    level_pixel_sizes_um: list[float] | None = None
    handle: Any = None
    fmt: str = ""
    extra: dict = field(default_factory=dict)


def sniff(path: Path) -> str:
    """The container format of ``path``: 'tiff', 'zarr', 'png' or 'jpeg'."""
    if path.is_dir():
        if any((path / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup", ".zarray")):
            return "zarr"
        raise SlideReadError(f"{path.name}: a folder, not an OME-Zarr image")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise SlideReadError(f"{path}: no such file") from None
    except OSError as exc:
        raise SlideReadError(f"{path.name}: cannot open ({one_line(exc.strerror)})") from None
    if size == 0:
        raise SlideReadError(f"{path.name}: empty file (0 bytes)")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    raise SlideReadError(
        f"{path.name}: not a supported image (TIFF, SVS, NDPI, OME-TIFF, OME-Zarr, PNG, JPEG)"
    )


# --------------------------------------------------------------------------- TIFF family


def _ome_physical_size(xml: str, series_index: int) -> tuple[float | None, str]:
    """PhysicalSizeX of the OME Image ``series_index``, in µm (None if absent)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, ""
    images = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None, ""
    image = images[series_index] if series_index < len(images) else images[0]
    pixels = next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None, ""
    unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")
    try:
        value = float(pixels.attrib["PhysicalSizeX"])
    except ValueError:
        return math.nan, "OME PhysicalSizeX"
    if unit not in UNIT_TO_UM:
        return None, ""
    return value * UNIT_TO_UM[unit], "OME PhysicalSizeX"


def _aperio_mpp(description: str) -> float | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if not match:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return math.nan


def _tiff_resolution(page: Any) -> float | None:
    """µm per pixel from XResolution/ResolutionUnit, ignoring meaningless defaults."""
    tags = page.tags
    if 282 not in tags:
        return None
    unit = tags.valueof(296, default=2)
    per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(int(unit))
    if per_unit is None:  # 1 = no absolute unit
        return None
    try:
        num, den = tags.valueof(282)
        ppu = num / den if den else 0.0
    except Exception:
        return None
    if ppu <= 0:
        return None
    if unit == 2 and round(ppu, 3) in (1.0, 72.0, 96.0):
        return None  # the defaults of image editors, not a scale
    if unit == 3 and round(ppu, 3) in (1.0, round(72 / 2.54, 3), round(96 / 2.54, 3)):
        return None
    return per_unit / ppu


def _check_tiff_page(page: Any, name: str, fsize: int) -> None:
    """Raise SlideReadError if ``page`` cannot be decoded or points outside the file."""
    import tifffile

    try:
        tifffile.TIFF.DECOMPRESSORS[page.compression]
    except Exception:
        comp = getattr(page.compression, "name", page.compression)
        raise SlideReadError(
            f"{name}: unsupported TIFF compression {comp} (install imagecodecs or re-save)"
        ) from None
    itemsize = np.dtype(page.dtype).itemsize if page.dtype is not None else 1
    chunk_bytes = int(np.prod(page.chunks, dtype=np.int64)) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise SlideReadError(
            f"{name}: declares a {page.imagelength}x{page.imagewidth} image in "
            f"{chunk_bytes / 2**20:.0f} MiB strips; corrupt, or re-save it as a tiled TIFF"
        )
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    expected = int(np.prod(page.chunked, dtype=np.int64))
    if len(offsets) < expected or len(counts) < expected:
        raise SlideReadError(
            f"{name}: declares {expected} tiles or strips but lists {len(offsets)}; corrupt file"
        )
    if len(offsets) and int((offsets + counts).max()) > fsize:
        raise SlideReadError(f"{name}: truncated (image data runs past the end of the file)")
    if page.compression == 1 and int(counts.sum()) < page.nbytes * 0.999 and counts.all():
        raise SlideReadError(f"{name}: truncated (less uncompressed data than the image needs)")


def _open_tifffile(path: Path) -> Any:
    """A ``tifffile.TiffFile`` of ``path``; SlideReadError if it is not a readable TIFF."""
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
        if len(tf.pages) == 0 and path.suffix.lower() == ".ndpi":
            # tifffile reads *.ndpi with NDPI's 64-bit offsets; a classic TIFF named .ndpi
            # (written by converters) reads as classic TIFF
            tf.close()
            tf = tifffile.TiffFile(path, is_ndpi=False)
    except Exception as exc:
        raise SlideReadError(f"{path.name}: not a readable TIFF ({one_line(exc, 120)})") from None
    return tf


def _tiff_level(series: Any, k: int, name: str, fsize: int) -> LevelArray:
    """Level ``k`` of a tifffile series as a lazy zarr array, its pages checked first."""
    import zarr

    level = series.levels[k]
    page = level.keyframe
    where = f"{name} level {k}"
    _check_tiff_page(page, name, fsize)
    if hasattr(page, "init_decode"):
        page.init_decode()  # not thread-safe on first use: do it here, once
    try:
        array = zarr.open(series.aszarr(level=k), mode="r")
    except SlideReadError:
        raise
    except Exception as exc:
        raise SlideReadError(f"{where}: cannot read ({one_line(exc, 120)})") from None
    axes = level.get_axes(True) if hasattr(level, "get_axes") else level.axes
    shape = tuple(array.shape)
    if len(axes) != len(shape):
        axes = level.axes
    # an alpha sample (extrasamples) stays in the layout: it is composited on white
    layout = layout_from_axes(axes, shape, array.dtype, page.bitspersample, where)
    return LevelArray(array, layout, where)


def _tiff_pixel_size(tf: Any, series: Any, is_ndpi: bool) -> tuple[float | None, str | None]:
    """µm per pixel at level 0 and its source: OME-XML, then Aperio MPP, then the resolution."""
    ps, source = None, None
    if tf.is_ome and tf.ome_metadata:
        ps, source = _ome_physical_size(tf.ome_metadata, 0)
    if ps is None and tf.is_svs:
        ps = _aperio_mpp(tf.pages[0].description)
        source = "Aperio MPP" if ps is not None else None
    if ps is None:
        ps = _tiff_resolution(series.levels[0].keyframe)
        if ps is not None:
            source = "NDPI resolution" if is_ndpi else "TIFF resolution"
    return ps, source


def open_tiff(path: Path) -> Opened:
    """Open a TIFF-family file (OME-TIFF, SVS, NDPI, generic tiled or strip TIFF)."""
    import logging

    name = path.name
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    tf = _open_tifffile(path)
    try:
        try:
            series_list = tf.series
        except Exception as exc:
            raise SlideReadError(f"{name}: corrupt TIFF ({one_line(exc, 120)})") from None
        if not series_list:
            raise SlideReadError(f"{name}: no image in the TIFF (truncated or corrupt)")
        series = series_list[0]
        is_ndpi = 65420 in tf.pages.first.tags  # Hamamatsu FileFormat tag
        fmt = "NDPI" if is_ndpi else "SVS" if tf.is_svs else "OME-TIFF" if tf.is_ome else "TIFF"
        fsize = os.path.getsize(path)
        levels = [_tiff_level(series, k, name, fsize) for k in range(len(series.levels))]
        if levels and levels[0].shape[0] * levels[0].shape[1] == 0:
            raise SlideReadError(f"{name}: image has zero size")
        ps, source = _tiff_pixel_size(tf, series, is_ndpi)
        return Opened(levels=levels, pixel_size_um=ps, pixel_size_source=source, handle=tf, fmt=fmt)
    except BaseException:
        tf.close()
        raise


# --------------------------------------------------------------------------- OME-Zarr


def _ngff_axes(ms: dict, ndim: int) -> tuple[str, list[str | None]]:
    axes = ms.get("axes")
    if axes is None:
        letters = "tczyx"[-ndim:]
        return letters.upper(), [None] * ndim
    names, units = [], []
    for ax in axes:
        if isinstance(ax, str):
            names.append(ax)
            units.append(None)
        else:
            names.append(str(ax.get("name", "")))
            units.append(ax.get("unit"))
    return "".join(n[:1].upper() for n in names), units


def _ngff_scale(transforms: list | None, ndim: int) -> list[float]:
    scale = [1.0] * ndim
    for t in transforms or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=False)]
    return scale


def _ngff_level_pixel_size(
    ms: dict, ds: dict, axes: str, units: list[str | None], ndim: int
) -> tuple[float | None, str | None]:
    """µm per pixel along X of one NGFF dataset and its source; None without a scale
    transform or with a unit histo does not know."""
    ix = axes.index("X")
    own, top = ds.get("coordinateTransformations"), ms.get("coordinateTransformations")
    if not (own or top):
        return None, None
    unit = units[ix]
    if unit is None:
        factor, source = 1.0, "NGFF scale (no unit, taken as micrometer)"
    elif unit in UNIT_TO_UM:
        factor, source = UNIT_TO_UM[unit], "NGFF scale"
    else:
        return None, None
    return _ngff_scale(own, ndim)[ix] * _ngff_scale(top, ndim)[ix] * factor, source


def _zarr_array_image(node: Any, name: str) -> Opened:
    """A bare zarr array (no NGFF metadata): (Y, X), (Y, X, S) or (C, Y, X)."""
    shape = tuple(node.shape)
    axes = {2: "YX", 3: "YXS" if shape[-1] <= 4 else "CYX"}.get(len(shape))
    if axes is None:
        raise SlideReadError(f"{name}: zarr array of shape {shape} is not an image")
    layout = layout_from_axes(axes, shape, node.dtype, None, name)
    return Opened(levels=[LevelArray(node, layout, name)], fmt="zarr")


def open_zarr(path: Path) -> Opened:
    """Open an OME-Zarr image (NGFF multiscales, zarr v2 or v3) or a bare zarr array."""
    import zarr

    name = path.name
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise SlideReadError(f"{name}: not a readable zarr store ({one_line(exc, 120)})") from None
    if isinstance(node, zarr.Array):
        return _zarr_array_image(node, name)
    attrs = dict(node.attrs)
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        raise SlideReadError(f"{name}: zarr group without NGFF 'multiscales' metadata")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise SlideReadError(f"{name}: NGFF multiscales lists no datasets")
    levels, sizes, source = [], [], None
    for k, ds in enumerate(datasets):
        where = f"{name} level {k}"
        try:
            array = node[ds["path"]]
        except Exception:
            raise SlideReadError(f"{where}: dataset {ds.get('path')!r} missing") from None
        shape = tuple(array.shape)
        axes, units = _ngff_axes(ms, len(shape))
        levels.append(
            LevelArray(array, layout_from_axes(axes, shape, array.dtype, None, where), where)
        )
        size, size_source = _ngff_level_pixel_size(ms, ds, axes, units, len(shape))
        if size is not None:
            sizes.append(size)
            source = size_source
    ps = sizes[0] if sizes and len(sizes) == len(levels) else None
    return Opened(
        levels=levels,
        pixel_size_um=ps,
        pixel_size_source=source if ps else None,
        level_pixel_sizes_um=sizes if ps else None,
        handle=node,
        fmt="OME-Zarr",
    )


# --------------------------------------------------------------------------- PNG / JPEG


def _png_header(data: bytes, name: str) -> tuple[int, int, int, float | None]:
    """(width, height, bytes per pixel, µm/px from pHYs or None) from a PNG's chunks."""
    pos, width, height, bpp, um = 8, 0, 0, 3, None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if ctype == b"IHDR" and len(body) >= 10:
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, 4)
            bpp = max(1, channels * depth // 8)
        elif ctype == b"pHYs" and len(body) == 9:
            ppx, _ppy, unit = struct.unpack(">IIB", body)
            if unit == 1 and ppx > 0 and ppx not in (2834, 2835, 3779, 3780):  # 72/96 dpi
                um = 1e6 / ppx
        elif ctype in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    if width == 0 or height == 0:
        raise SlideReadError(f"{name}: PNG without a valid header")
    return width, height, bpp, um


def _jpeg_header(data: bytes, name: str) -> tuple[int, int, float | None]:
    """(width, height, µm/px from the JFIF density or None)."""
    pos, um = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            pos += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xE0 and body[:5] == b"JFIF\x00" and len(body) >= 12:
            units, xd = body[7], struct.unpack(">H", body[8:10])[0]
            if units == 1 and xd not in (0, 1, 72, 96):
                um = 25400.0 / xd
            elif units == 2 and xd not in (0, 1, 28, 38):
                um = 10000.0 / xd
        if (
            marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
            and len(body) >= 5
        ):
            height, width = struct.unpack(">HH", body[1:5])
            return width, height, um
        pos += 2 + length
    raise SlideReadError(f"{name}: JPEG without a frame header (truncated or corrupt)")


def open_raster(path: Path, fmt: str) -> Opened:
    """Open a PNG or JPEG field (decoded whole: these formats have no tiles)."""
    import cv2

    name = path.name
    data = path.read_bytes()
    if fmt == "png":
        width, height, bpp, um = _png_header(data, name)
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            raise SlideReadError(f"{name}: truncated PNG (no IEND chunk)")
        raw = width * height * bpp
        if raw > 1100 * len(data):  # deflate cannot compress more than ~1032:1
            raise SlideReadError(
                f"{name}: declares {width}x{height} pixels in {len(data)} bytes; "
                "truncated or corrupt"
            )
    else:
        width, height, um = _jpeg_header(data, name)
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise SlideReadError(f"{name}: truncated JPEG (no end-of-image marker)")
    if width * height > MAX_FIELD_PIXELS:
        raise SlideReadError(
            f"{name}: {width}x{height} is too large for a {fmt.upper()} field; "
            "convert it to a tiled (pyramidal) TIFF"
        )
    buf = np.frombuffer(data, np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise SlideReadError(f"{name}: cannot decode {fmt.upper()} data (corrupt or truncated)")
    if image.ndim == 3:
        code = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}.get(image.shape[2])
        if code is not None:
            image = cv2.cvtColor(image, code)
        axes = "YXS"
    else:
        axes = "YX"
    layout = layout_from_axes(axes, image.shape, image.dtype, None, name)
    rgb = to_rgb8(image, layout)
    level = LevelArray(rgb, Layout(), name)
    return Opened(
        levels=[level],
        pixel_size_um=um,
        pixel_size_source=f"{fmt.upper()} density" if um else None,
        fmt=fmt.upper(),
    )
