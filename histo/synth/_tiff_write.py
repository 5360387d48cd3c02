"""Write tiled, pyramidal OME-TIFF from any array-like, a row of tiles at a time.

The source may be a numpy array or a zarr array on disk: only one row of tiles (and one level
of the pyramid being built) is in memory at a time, so writing a 32k slide stays in bounded memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr

TILE = 512
#: arrays larger than this many pixels are staged on disk (zarr) rather than in memory
IN_MEMORY_MAX_PX = 4096 * 4096


def new_canvas(shape: tuple[int, ...], dtype, workdir: str | os.PathLike | None, name: str):
    """A writable array of ``shape``: numpy when small, a chunked zarr array on disk otherwise."""
    if int(np.prod(shape[:2])) <= IN_MEMORY_MAX_PX or workdir is None:
        return np.zeros(shape, dtype)
    chunks = (TILE, TILE) + tuple(shape[2:])
    return zarr.open_array(
        str(Path(workdir) / f"{name}.zarr"), mode="w", shape=shape, chunks=chunks, dtype=dtype
    )


def _row_tiles(arr, tile: int) -> Iterator[np.ndarray]:
    h, w = arr.shape[:2]
    for y in range(0, h, tile):
        block = np.asarray(arr[y : y + tile])
        for x in range(0, w, tile):
            yield block[:, x : x + tile]


def _downsample(arr, workdir, name: str, label: bool):
    """Half-resolution copy of ``arr`` built in row blocks (area for images, mode-free
    nearest for labels)."""
    h, w = arr.shape[:2]
    oh, ow = (h + 1) // 2, (w + 1) // 2
    out = new_canvas((oh, ow) + tuple(arr.shape[2:]), arr.dtype, workdir, name)
    step = TILE * 2
    for y in range(0, h, step):
        block = np.asarray(arr[y : y + step])
        bh = (block.shape[0] + 1) // 2
        if label:
            small = block[::2, ::2]
        else:
            small = cv2.resize(block, (ow, bh), interpolation=cv2.INTER_AREA)
        out[y // 2 : y // 2 + small.shape[0]] = small.reshape((small.shape[0], ow) + arr.shape[2:])
    return out


def _ome_metadata(pixel_size_um: float, rgb: bool) -> dict:
    return {
        "axes": "YXS" if rgb else "YX",
        "PhysicalSizeX": float(pixel_size_um),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(pixel_size_um),
        "PhysicalSizeYUnit": "µm",
    }


def write_pyramidal_tiff(
    path: str | os.PathLike,
    arr,
    pixel_size_um: float,
    *,
    label: bool = False,
    compression: str | None = None,
    min_level_px: int = 1024,
    workdir: str | os.PathLike | None = None,
) -> Path:
    """Write ``arr`` ((H, W, 3) uint8 RGB or (H, W) labels) as a tiled pyramidal OME-TIFF.

    Parameters
    ----------
    path
        Output file; written to a temporary name and renamed, so a killed run leaves no
        half-written file.
    arr
        numpy or zarr array, read a row of tiles at a time.
    pixel_size_um
        Physical pixel size of level 0 in µm, stored as OME PhysicalSizeX/Y and as TIFF
        resolution tags (pixels per centimetre).
    label
        Labels are downsampled by taking every second pixel (never blended) and stored
        losslessly.
    compression
        TIFF compression; default JPEG (quality 90) for RGB like a scanner, zlib for labels.
    min_level_px
        Halve the resolution until the longer side is below this.
    """
    path = Path(path)
    rgb = arr.ndim == 3
    if compression is None:
        compression = "zlib" if (label or not rgb) else "jpeg"
    compressionargs = {"level": 90} if compression == "jpeg" else None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        levels = [arr]
        while max(levels[-1].shape[:2]) > min_level_px:
            levels.append(_downsample(levels[-1], tmp, f"level{len(levels)}", label))
        metadata = _ome_metadata(pixel_size_um, rgb)
        partial = path.with_name(path.name + ".partial")
        with tifffile.TiffWriter(partial, bigtiff=True, ome=True) as tif:
            for i, level in enumerate(levels):
                px = float(pixel_size_um) * 2**i
                tif.write(
                    data=_row_tiles(level, TILE),
                    shape=level.shape,
                    dtype=level.dtype,
                    tile=(TILE, TILE),
                    photometric="rgb" if rgb else "minisblack",
                    compression=compression,
                    compressionargs=compressionargs,
                    resolution=(1e4 / px, 1e4 / px),
                    resolutionunit="CENTIMETER",
                    subifds=len(levels) - 1 if i == 0 else None,
                    subfiletype=1 if i > 0 else 0,
                    metadata=metadata if i == 0 else None,
                )
        os.replace(partial, path)
    return path
