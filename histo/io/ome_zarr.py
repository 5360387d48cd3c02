"""OME-Zarr (NGFF) output: class map and instance labels, written tile by tile.

Layout of ``DIR/<slide>/labels.ome.zarr`` (NGFF 0.5 on zarr v3 by default, or NGFF 0.4 on
zarr v2 with ``ngff_version="0.4"``)::

    labels.ome.zarr/             multiscales: an RGB overview (c, y, x) for display
      0/                         the overview (colours of the class map unless one was given)
      labels/                    "labels": ["class_map", "osteoclasts", "osteocytes"]
        class_map/               multiscales (y, x) + image-label colours of histo.classes
          0/ 1/ 2/               full working resolution, 2x and 4x coarser
        osteoclasts/  osteocytes/  (uint32 instance labels, same levels)

Every array has a physical scale in micrometer (``coordinateTransformations``). Coarser levels
are nearest-neighbour samples taken at the centre of each block (label values are never
averaged) and are filled as the tiles arrive, so nothing is read back.

Writing is atomic at the slide level: everything goes to ``labels.ome.zarr.partial`` and
:meth:`LabelsWriter.finalize` renames it; a killed run leaves only the ``.partial`` folder,
which the next writer removes.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from histo.classes import COLORS, NAMES
from histo.errors import OutputError

#: the label images a slide's result holds, with their types
DEFAULT_LABELS: dict[str, str] = {
    "class_map": "uint8",
    "osteoclasts": "uint32",
    "osteocytes": "uint32",
}

#: chunks of a write handed to zarr at once (:func:`write_in_pieces`): zarr encodes the chunks
#: of one call concurrently, each copied and compressed in a buffer of its own (a tile of
#: 1024 x 4096 uint32 labels is four chunks); two at a time halve that transient at the same
#: speed. zarr (3.1) has no per-array or per-call concurrency, and its process-wide
#: ``async.concurrency`` is not changed here: napari or another thread may be reading
WRITE_CONCURRENCY = 2
#: the coarsest level of the label pyramid is at most this long on its long side (px), so that
#: a viewer shows a whole slide from one small level
COARSEST_MAX_PX = 1024
#: levels at least (full resolution, 2x and 4x coarser), however small the image
MIN_LEVELS = 3
#: attribute of an instance image's group: its largest label (a region edit numbers new cells
#: above it without reading the whole image)
MAX_LABEL_ATTR = "histo_max_label"


def _axes(channel: bool) -> list[dict[str, str]]:
    axes = [{"name": "c", "type": "channel"}] if channel else []
    return axes + [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]


def _multiscales(name: str, sizes_um: list[float], channel: bool, version: str) -> list[dict]:
    lead = [1.0] if channel else []
    entry: dict[str, Any] = {
        "name": name,
        "axes": _axes(channel),
        "datasets": [
            {
                "path": str(k),
                "coordinateTransformations": [{"type": "scale", "scale": lead + [s, s]}],
            }
            for k, s in enumerate(sizes_um)
        ],
    }
    if version == "0.4":
        entry = {"version": "0.4", **entry}
    return [entry]


class LabelsWriter:
    """Write a slide's label images to OME-Zarr as tiles are computed.

    Parameters
    ----------
    path : str or Path
        Final location, usually ``DIR/<slide>/labels.ome.zarr``.
    shape : (int, int)
        (height, width) of the label images in pixels at ``pixel_size_um``.
    pixel_size_um : float
        Pixel size of the label images (the working resolution) in µm per pixel.
    labels : dict, optional
        Label image names and dtypes (default: class_map uint8, osteoclasts and osteocytes
        uint32).
    n_levels : int, optional
        Number of resolution levels (1 = full resolution only; each further level is 2x
        coarser). Default: enough for the coarsest to be at most ``COARSEST_MAX_PX`` on its
        long side, and at least ``MIN_LEVELS``.
    chunk_px : int
        Chunk side in pixels at full resolution; level k (2**k coarser) has chunks
        ``chunk_px / 2**k`` rows high and ``chunk_px`` wide, so that a band of ``chunk_px``
        full-resolution rows fills whole rows of chunks at every level (see ``block_px``).
    ngff_version : {'0.5', '0.4'}
        NGFF version: 0.5 is written as zarr v3, 0.4 as zarr v2.
    buffer_mb : float
        Memory (MiB) for tiles held back until they complete rows of chunks (each chunk is
        then compressed once); tiles that do not fit are written at once (0: all of them).
        Tiles aligned to ``block_px`` are never held: histo's streaming segmentation and
        :func:`histo.io.label_store.copy_labels` write such tiles, so they need no buffer.

    Examples
    --------
    >>> with LabelsWriter(out / "labels.ome.zarr", (h, w), 1.0) as writer:  # doctest: +SKIP
    ...     writer.write_tile("class_map", y, x, class_tile)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, int],
        pixel_size_um: float,
        *,
        labels: dict[str, str] | None = None,
        n_levels: int | None = None,
        chunk_px: int = 1024,
        ngff_version: str = "0.5",
        buffer_mb: float = 48.0,
    ) -> None:
        if ngff_version not in ("0.4", "0.5"):
            raise ValueError(f"ngff_version must be '0.4' or '0.5', not {ngff_version!r}")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.shape = (int(shape[0]), int(shape[1]))
        if min(self.shape) < 1:
            raise ValueError(f"label image shape must be positive, got {shape}")
        self.pixel_size_um = float(pixel_size_um)
        self.version = ngff_version
        self.labels = dict(DEFAULT_LABELS if labels is None else labels)
        if n_levels is None:
            n_levels = pyramid_levels(self.shape)
        self.factors = [2**k for k in range(max(1, int(n_levels)))]
        #: tiles whose edges lie on multiples of block_px (rows, columns) or on the image's
        #: end cover whole chunks at every level: they are written at once, never held back
        #: nor read back (a tile that only partly covers a chunk means decoding it again)
        self.block_px = (int(chunk_px), int(chunk_px) * self.factors[-1])
        self._overview: tuple[np.ndarray, float] | None = None
        self._max_label: dict[str, int] = {}
        self._finalized = False
        # tiles written in raster order (row bands, left to right) are held back per level
        # until they fill whole rows of chunks, so that each chunk is compressed once instead
        # of being read back, merged and compressed again; at most buffer_mb are held
        self._held: dict[tuple[str, int], _HeldRows] = {}
        self._held_budget = int(buffer_mb * 2**20)
        self._arrays: dict[str, list[Any]] = {}
        self._create_store(chunk_px)

    def _create_store(self, chunk_px: int) -> None:
        """The empty ``.partial`` store: a label group of ``self.labels`` with its levels."""
        import zarr

        zarr_format = 3 if self.version == "0.5" else 2
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self._root = zarr.open_group(str(self.partial), mode="w", zarr_format=zarr_format)
            group = self._root.create_group("labels")
            self._set_attrs(group, {"labels": list(self.labels)})
            for name, dtype in self.labels.items():
                self._arrays[name] = self._create_label(group, name, dtype, chunk_px, zarr_format)
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from None

    def _create_label(
        self, group: Any, name: str, dtype: str, chunk_px: int, zarr_format: int
    ) -> list[Any]:
        """The label image ``name``'s group in ``group``: its levels and NGFF metadata."""
        sub = group.create_group(name)
        kwargs: dict[str, Any] = {"dimension_names": ["y", "x"]} if zarr_format == 3 else {}
        arrays = []
        for k, f in enumerate(self.factors):
            shape_k = tuple(self._level_len(n, f) for n in self.shape)
            chunks = (min(max(1, chunk_px // f), shape_k[0]), min(chunk_px, shape_k[1]))
            arrays.append(
                sub.create_array(
                    str(k),
                    shape=shape_k,
                    chunks=chunks,
                    dtype=dtype,
                    fill_value=0,
                    # no all-zero test per chunk (slower than compressing the chunk)
                    config={"write_empty_chunks": True},
                    **kwargs,
                )
            )
        meta: dict[str, Any] = {
            "multiscales": _multiscales(
                name, [self.pixel_size_um * f for f in self.factors], False, self.version
            ),
            "image-label": self._image_label(name),
        }
        self._set_attrs(sub, meta)
        return arrays

    @property
    def coarsest_shape(self) -> tuple[int, int]:
        """(H, W) of the coarsest level of the label images."""
        f = self.factors[-1]
        return self._level_len(self.shape[0], f), self._level_len(self.shape[1], f)

    @staticmethod
    def _level_len(n: int, f: int) -> int:
        """Length of an axis of ``n`` pixels at factor ``f`` (samples at f*i + f//2)."""
        return max(1, math.ceil((n - f // 2) / f))

    def _set_attrs(self, group: Any, meta: dict[str, Any]) -> None:
        if self.version == "0.5":
            group.attrs.update({"ome": {"version": "0.5", **meta}})
        else:
            group.attrs.update(meta)

    def _image_label(self, name: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"source": {"image": "../../"}}
        if self.version == "0.4":
            meta["version"] = "0.4"
        if name == "class_map":
            meta["colors"] = [
                {"label-value": code, "rgba": [*rgb, 0 if code == 0 else 255]}
                for code, rgb in COLORS.items()
            ]
            meta["properties"] = [
                {"label-value": code, "class": cname} for code, cname in NAMES.items()
            ]
        return meta

    def write_tile(self, name: str, y: int, x: int, array: np.ndarray) -> None:
        """Write a tile of label image ``name`` with its top-left corner at (y, x).

        Parameters
        ----------
        name : str
            One of the label names (``class_map``, ``osteoclasts``, ``osteocytes``).
        y, x : int
            Top-left corner in pixels of the working resolution; parts outside the image are
            dropped.
        array : ndarray
            2-D label values.

        Notes
        -----
        Not thread-safe for tiles that share a chunk: write from one thread (tiles that
        overlap should write only their core, see :class:`histo.io.Tile`).
        """
        if self._finalized:
            raise RuntimeError("LabelsWriter already finalized")
        if name not in self._arrays:
            raise KeyError(f"unknown label image {name!r}; expected one of {list(self.labels)}")
        array = np.asarray(array)
        if array.ndim != 2:
            raise ValueError(f"a label tile is 2-D, got shape {array.shape}")
        arrays = self._arrays[name]
        dtype = arrays[0].dtype
        if array.dtype != dtype:
            if array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
                raise ValueError(f"{name}: values outside the range of {dtype}")
            array = array.astype(dtype)
        y, x = int(y), int(x)
        h, w = self.shape
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + array.shape[0], h), min(x + array.shape[1], w)
        if y1 <= y0 or x1 <= x0:
            return
        array = array[y0 - y : y1 - y, x0 - x : x1 - x]
        if name != "class_map" and array.size:
            self._max_label[name] = max(self._max_label.get(name, 0), int(array.max()))
        try:
            self._write_levels(name, arrays, array, y0, y1, x0, x1)
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from None

    def _write_levels(
        self, name: str, arrays: list, array: np.ndarray, y0: int, y1: int, x0: int, x1: int
    ) -> None:
        """Write ``array`` (level-0 rows [y0, y1), columns [x0, x1)) into every level."""
        for k, (f, target) in enumerate(zip(self.factors, arrays, strict=True)):
            # level rows i hold level-0 rows f*i + f//2
            i0, i1 = self._level_rows(f, y0, y1, target.shape[0])
            j0, j1 = self._level_rows(f, x0, x1, target.shape[1])
            if i1 <= i0 or j1 <= j0:
                continue
            oy, ox = f * i0 + f // 2 - y0, f * j0 + f // 2 - x0
            tile = array[oy::f, ox::f][: i1 - i0, : j1 - j0]
            held = self._held.get((name, k))
            if (held is None or held.empty) and _whole_chunks(target, i0, i1, j0, j1):
                write_in_pieces(target, i0, j0, tile)
                if held is not None:
                    held.next_row = i1 if j1 == held.width else None
                continue
            if held is None:
                held = self._held[name, k] = _HeldRows(target)
            if not held.add(i0, j0, tile, self._held_budget - self._held_bytes()):
                held.flush()
                write_in_pieces(target, i0, j0, tile)
                held.next_row = i1 if j1 == target.shape[1] else None

    @staticmethod
    def _level_rows(f: int, start: int, stop: int, size: int) -> tuple[int, int]:
        """Rows [i0, i1) of a level of factor ``f`` sampled from level-0 rows [start, stop)."""
        i0, i1 = math.ceil((start - f // 2) / f), math.ceil((stop - f // 2) / f)
        return max(i0, 0), min(i1, size)

    def _held_bytes(self) -> int:
        return sum(held.nbytes for held in self._held.values())

    def flush(self) -> None:
        """Write every tile held back (done by :meth:`finalize`; call before reading the
        partial store directly)."""
        if self._finalized:
            return
        try:
            for held in self._held.values():
                held.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from None

    def write_overview(self, rgb: np.ndarray, pixel_size_um: float) -> None:
        """Set the root image shown under the labels (RGB uint8, ``pixel_size_um`` µm/px).

        Without one, :meth:`finalize` renders the class map's coarsest level in the class
        colours.
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"overview must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        self._overview = (rgb, float(pixel_size_um))

    def _write_root(self) -> None:
        if self._overview is not None:
            rgb, size = self._overview
            planes = np.moveaxis(rgb, -1, 0)
        else:
            f = self.factors[-1]
            size = self.pixel_size_um * f
            if "class_map" in self._arrays:
                codes = np.asarray(self._arrays["class_map"][-1][:])
            else:
                codes = np.zeros(tuple(self._level_len(n, f) for n in self.shape), np.uint8)
            lut = np.zeros((256, 3), np.uint8)
            for code, color in COLORS.items():
                lut[code] = color
            planes = np.moveaxis(lut[codes], -1, 0)
        kwargs: dict[str, Any] = {}
        if self.version == "0.5":
            kwargs["dimension_names"] = ["c", "y", "x"]
        self._root.create_array(
            "0",
            data=np.ascontiguousarray(planes),
            chunks=(3, min(1024, planes.shape[1]), min(1024, planes.shape[2])),
            **kwargs,
        )
        meta = {"multiscales": _multiscales("overview", [size], True, self.version)}
        if self.version == "0.4":
            meta["omero"] = {
                "rdefs": {"model": "color"},
                "channels": [
                    {
                        "label": c,
                        "color": col,
                        "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                        "active": True,
                    }
                    for c, col in zip("RGB", ("FF0000", "00FF00", "0000FF"), strict=True)
                ],
            }
        self._set_attrs(self._root, meta)

    def finalize(self) -> Path:
        """Write the root metadata and move the store to its final name (atomically).

        Returns
        -------
        Path
            The final ``labels.ome.zarr`` path. An existing store there is replaced.
        """
        if self._finalized:
            return self.path
        self.flush()
        try:
            self._write_root()
            for name in self.labels:
                if name != "class_map":
                    group = self._root["labels"][name]
                    group.attrs[MAX_LABEL_ATTR] = self._max_label.get(name, 0)
            old = self.path.with_name(self.path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(self.partial, self.path)
            if old.exists():
                shutil.rmtree(old)
        except OSError as exc:
            raise OutputError(f"cannot finalize {self.path}: {exc.strerror or exc}") from None
        self._finalized = True
        return self.path

    def abort(self) -> None:
        """Remove the partial store (after a failure or cancel)."""
        self._finalized = True
        self._held.clear()
        if self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> LabelsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def pyramid_levels(shape: tuple[int, int]) -> int:
    """Levels of a label pyramid of ``shape`` (H, W) whose coarsest is at most
    :data:`COARSEST_MAX_PX` on its long side (at least :data:`MIN_LEVELS`)."""
    k = 0
    while max(LabelsWriter._level_len(int(n), 2**k) for n in shape) > COARSEST_MAX_PX:
        k += 1
    return max(MIN_LEVELS, k + 1)


def write_in_pieces(target: Any, i0: int, j0: int, tile: np.ndarray) -> None:
    """``target[i0:, j0:] = tile`` in calls of one row of at most :data:`WRITE_CONCURRENCY`
    chunks each (pieces aligned to the chunk grid), so that zarr encodes that many at once."""
    ch, cw = (int(n) for n in target.chunks)
    group = cw * WRITE_CONCURRENCY
    i1, j1 = i0 + tile.shape[0], j0 + tile.shape[1]
    rows = [i0, *range((i0 // ch + 1) * ch, i1, ch), i1]
    cols = [j0, *range((j0 // group + 1) * group, j1, group), j1]
    for y, y_end in zip(rows[:-1], rows[1:], strict=True):
        for x, x_end in zip(cols[:-1], cols[1:], strict=True):
            target[y:y_end, x:x_end] = tile[y - i0 : y_end - i0, x - j0 : x_end - j0]


def _whole_chunks(target: Any, i0: int, i1: int, j0: int, j1: int) -> bool:
    """True when rows [i0, i1) and columns [j0, j1) of ``target`` cover whole chunks (edge
    chunks up to the array's end)."""
    (h, w), (ch, cw) = target.shape, target.chunks
    return i0 % ch == 0 and j0 % cw == 0 and (i1 % ch == 0 or i1 == h) and (j1 % cw == 0 or j1 == w)


class _HeldRows:
    """Tiles of one zarr array held back until they complete rows of chunks.

    Complete rows (``rows``, from row ``start``) are written as soon as they fill rows of
    chunks; the band in progress (tiles of the same rows arriving left to right from column 0)
    joins them when its last tile arrives. Only tiles that follow on are taken (see
    :meth:`add`); :meth:`flush` writes whatever is held.
    """

    def __init__(self, target: Any) -> None:
        self.target = target
        self.height, self.width = (int(n) for n in target.shape)
        self.chunk = int(target.chunks[0])
        self.next_row: int | None = 0  # the band that may start next (None: none)
        self.start = 0
        self.rows: list[np.ndarray] = []  # complete rows start, start + 1, ...
        self.band: tuple[int, int, int] | None = None  # (i0, i1, next column)
        self.pieces: list[np.ndarray] = []  # tiles of the band in progress
        self.nbytes = 0

    @property
    def empty(self) -> bool:
        return not self.rows and not self.pieces

    def add(self, i0: int, j0: int, tile: np.ndarray, room: int) -> bool:
        """Hold ``tile`` (rows from i0, columns from j0) if it follows on and fits in ``room``
        bytes; False if it was not taken (write it, after :meth:`flush`)."""
        i1, j1 = i0 + tile.shape[0], j0 + tile.shape[1]
        if self.band is not None:
            if self.band[:2] != (i0, i1) or self.band[2] != j0:
                return False
        elif j0 != 0 or i0 != self.next_row:
            return False
        if tile.nbytes > room:
            return False
        self.pieces.append(tile.copy())  # the caller may reuse its buffer
        self.nbytes += tile.nbytes
        self.band = (i0, i1, j1)
        if j1 == self.width:  # the band is complete
            rows = np.concatenate(self.pieces, axis=1) if len(self.pieces) > 1 else self.pieces[0]
            self.pieces, self.band, self.next_row = [], None, i1
            if not self.rows:
                self.start = i0
            self.rows.append(rows)
            end = i1 if i1 >= self.height else i1 // self.chunk * self.chunk
            if end > self.start:
                self._write(end)
        return True

    def _write(self, end: int) -> None:
        """Write the complete rows before ``end`` and keep the rest."""
        data = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
        write_in_pieces(self.target, self.start, 0, data[: end - self.start])
        rest = data[end - self.start :]
        self.rows = [rest.copy()] if len(rest) else []
        self.start = end
        self.nbytes = sum(a.nbytes for a in self.rows) + sum(a.nbytes for a in self.pieces)

    def flush(self) -> None:
        """Write everything held (rows of chunks left partial)."""
        if self.rows:
            self._write(self.start + sum(len(a) for a in self.rows))
        if self.pieces:
            i0, i1, j1 = self.band  # type: ignore[misc]
            write_in_pieces(self.target, i0, 0, np.concatenate(self.pieces, axis=1))
            # the rest of the band is written as it comes; the next band may be held again
            self.pieces, self.band, self.next_row = [], None, None
        self.nbytes = 0


def _unwrap(attrs: dict[str, Any]) -> dict[str, Any]:
    return attrs.get("ome", attrs)


def _scale_x(dataset: dict[str, Any], axes: list[Any]) -> float | None:
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    ix = names.index("x") if "x" in names else -1
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return float(t["scale"][ix])
    return None


def read_labels(
    path: str | os.PathLike, level: int = 0, lazy: bool = False
) -> dict[str, tuple[Any, float | None]]:
    """Read the label images of an OME-Zarr store written by :class:`LabelsWriter`.

    Parameters
    ----------
    path : str or Path
        The ``labels.ome.zarr`` folder (NGFF 0.4 or 0.5).
    level : int
        Resolution level (0 = full resolution).
    lazy : bool
        Return zarr arrays (read on indexing) instead of numpy arrays.

    Returns
    -------
    dict
        label name -> (array (H, W), pixel size in µm per pixel or None).
    """
    import zarr

    from histo.errors import SlideReadError

    try:
        root = zarr.open_group(str(path), mode="r")
        labels_group = root["labels"]
    except Exception as exc:
        raise SlideReadError(f"{Path(path).name}: not an OME-Zarr labels store ({exc})") from None
    names = _unwrap(dict(labels_group.attrs)).get("labels", [])
    out: dict[str, tuple[Any, float | None]] = {}
    for name in names:
        group = labels_group[name]
        ms = _unwrap(dict(group.attrs))["multiscales"][0]
        dataset = ms["datasets"][level]
        array = group[dataset["path"]]
        out[name] = (array if lazy else np.asarray(array[:]), _scale_x(dataset, ms["axes"]))
    return out
