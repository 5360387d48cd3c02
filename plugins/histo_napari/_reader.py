"""Reader: slides as multiscale image layers in µm; class maps and histo outputs as labels.

What it opens (``get_reader`` returns None for anything else):

- a slide or field that :func:`histo.io.open_slide` reads (pyramidal OME-TIFF, SVS, NDPI,
  TIFF, PNG, JPEG, OME-Zarr image): one RGB image layer, multiscale when the file has a
  pyramid, scaled in µm (nothing is read until napari displays it);
- a histo class map ``NAME.classes.tif`` (and ``NAME.osteoclasts.tif``,
  ``NAME.osteocytes.tif`` instance maps) as labels layers with the class colours;
- a histo output: ``DIR/<slide>/labels.ome.zarr``, the ``<slide>`` folder or the output
  ``DIR`` itself: the class map and instance labels of each slide as labels layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError

LayerData = tuple[Any, dict[str, Any], str]
PathLike = str | Sequence[str]

#: suffixes worth sniffing (the format itself is recognised from the content)
SLIDE_SUFFIXES = (
    ".tif",
    ".tiff",
    ".svs",
    ".ndpi",
    ".btf",
    ".tf8",
    ".tf2",
    ".png",
    ".jpg",
    ".jpeg",
    ".zarr",
)
#: histo's own label TIFFs (written by ``histo synth`` and by the widget's Save)
LABEL_TIFF_SUFFIXES = {
    ".classes.tif": "class_map",
    ".osteoclasts.tif": "osteoclasts",
    ".osteocytes.tif": "osteocytes",
}
UNIT = "micrometer"
#: class maps up to this many pixels are loaded into memory (editable); larger stay lazy
MAX_EDITABLE_PX = 64 * 2**20


def class_map_kwargs(name: str, pixel_size_um: float | None, **extra: Any) -> dict[str, Any]:
    """Layer keyword arguments of a class-map labels layer (colours, scale, metadata)."""
    from histo_napari._layers import class_colormap

    scale = pixel_size_um or 1.0
    meta = {"pixel_size_um": pixel_size_um, "histo_kind": "class_map"}
    meta.update(extra.pop("metadata", {}))
    return {
        "name": name,
        "scale": (scale, scale),
        "units": (UNIT, UNIT) if pixel_size_um else None,
        "colormap": class_colormap(),
        "opacity": 0.5,
        "metadata": meta,
        **extra,
    }


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


# --------------------------------------------------------------------------- discovery


def _labels_stores(path: Path) -> list[Path]:
    """The ``labels.ome.zarr`` stores of a histo output under ``path`` (may be empty)."""
    if not path.is_dir():
        return []
    if path.name.endswith("labels.ome.zarr"):
        return [path]
    own = path / "labels.ome.zarr"
    if own.is_dir():
        return [own]
    return sorted(p for p in path.glob("*/labels.ome.zarr") if p.is_dir())


def _label_tiff_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in LABEL_TIFF_SUFFIXES.items():
        if name.endswith(suffix) or name.endswith(suffix + "f"):
            return kind
    return None


def get_reader(path: PathLike) -> Callable[[PathLike], list[LayerData]] | None:
    """napari reader contribution: a reader function for ``path``, or None if it is not ours."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        return None
    for p in paths:
        if not _readable(Path(p)):
            return None
    return read


def _readable(path: Path) -> bool:
    if _labels_stores(path):
        return True
    if _label_tiff_kind(path):
        return path.is_file()
    if path.suffix.lower() not in SLIDE_SUFFIXES and not path.is_dir():
        return False
    from histo.io import open_slide

    try:  # lazy: parses headers, reads no pixels
        open_slide(path).close()
    except HistoError:
        return False
    except Exception:  # noqa: BLE001 - a reader must never raise on a file it cannot read
        return False
    return True


# --------------------------------------------------------------------------- reading


def read(path: PathLike) -> list[LayerData]:
    """Read one or several paths into napari layer data."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers.extend(read_one(Path(p)))
    return layers


def read_one(path: Path) -> list[LayerData]:
    """Layers of one path (slide, label TIFF or histo output)."""
    stores = _labels_stores(path)
    if stores:
        out: list[LayerData] = []
        for store in stores:
            out.extend(read_labels_store(store))
        return out
    kind = _label_tiff_kind(path)
    if kind:
        return [read_label_tiff(path, kind)]
    return [read_slide(path)]


def slide_layer(path: Path) -> tuple[LayerData, Any]:
    """The image layer data of a slide and the opened :class:`histo.io.Slide` (kept open)."""
    from histo.io import open_slide

    slide = open_slide(path)
    px = slide.pixel_size_um
    levels = list(slide.levels)
    multiscale = len(levels) > 1
    meta = {
        "pixel_size_um": px,
        "pixel_size_source": slide.pixel_size_source,
        "histo_path": str(path),
        "slide_name": slide.name,
        "format": slide.format,
        "level_pixel_sizes_um": list(slide.level_pixel_sizes),
    }
    scale = px if px else 1.0
    kwargs = _clean_kwargs(
        {
            "name": slide.name,
            "rgb": True,
            "multiscale": multiscale,
            "contrast_limits": (0, 255),
            "scale": (scale, scale),
            "units": (UNIT, UNIT) if px else None,
            "metadata": meta,
        }
    )
    data = levels if multiscale else levels[0]
    if not multiscale and max(levels[0].shape[:2]) > LAZY_PYRAMID_MIN_PX:
        data = lazy_pyramid(levels[0])
        kwargs["multiscale"] = True
    return (data, kwargs, "image"), slide


#: a slide without a pyramid larger than this on its long side (px) is shown through one
#: built on demand (:func:`lazy_pyramid`)
LAZY_PYRAMID_MIN_PX = 4096
#: the coarsest level built is at most this long on its long side (px)
LAZY_PYRAMID_COARSEST_PX = 1024
#: side (px) of the tiles a built level computes and caches
LAZY_TILE_PX = 512
#: memory (bytes) of the computed tiles each built level keeps (least recently used go)
LAZY_CACHE_BYTES = 24 * 2**20


class DownsampledLevel:
    """An RGB level 2x coarser than ``finer`` (area average), computed tile by tile on demand.

    napari indexes it like an array (``level[y0:y1, x0:x1]``); each tile of
    :data:`LAZY_TILE_PX` reads a window twice its size from the finer level (itself such a
    level, or the file's) and is kept in a small LRU cache.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, finer: Any) -> None:
        import threading
        from collections import OrderedDict

        self.finer = finer
        h, w = (int(n) for n in finer.shape[:2])
        self.shape = ((h + 1) // 2, (w + 1) // 2, 3)
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * 3

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        import cv2

        with self._lock:
            tile = self._tiles.get((ty, tx))
            if tile is not None:
                self._tiles.move_to_end((ty, tx))
                return tile
        t = LAZY_TILE_PX
        y0, x0 = ty * t, tx * t
        y1, x1 = min(y0 + t, self.shape[0]), min(x0 + t, self.shape[1])
        src = np.asarray(self.finer[2 * y0 : 2 * y1, 2 * x0 : 2 * x1])
        tile = cv2.resize(src, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        with self._lock:
            self._tiles[ty, tx] = tile
            while len(self._tiles) * tile.nbytes > LAZY_CACHE_BYTES and len(self._tiles) > 1:
                self._tiles.popitem(last=False)
        return tile

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        if not all(isinstance(k, slice) for k in key[:2]):
            return np.asarray(self[:, :])[key]
        (y0, y1, sy), (x0, x1, sx) = (
            k.indices(n) for k, n in zip(key[:2], self.shape[:2], strict=True)
        )
        if sy < 1 or sx < 1:
            return np.asarray(self[:, :])[key]
        ys, xs = slice(y0, max(y1, y0)), slice(x0, max(x1, x0))
        out = np.empty((max(ys.stop - ys.start, 0), max(xs.stop - xs.start, 0), 3), np.uint8)
        t = LAZY_TILE_PX
        for ty in range(ys.start // t, -(-ys.stop // t)):
            for tx in range(xs.start // t, -(-xs.stop // t)):
                tile = self._tile(ty, tx)
                ry0, rx0 = max(ys.start, ty * t), max(xs.start, tx * t)
                ry1, rx1 = (
                    min(ys.stop, ty * t + tile.shape[0]),
                    min(xs.stop, tx * t + tile.shape[1]),
                )
                out[ry0 - ys.start : ry1 - ys.start, rx0 - xs.start : rx1 - xs.start] = tile[
                    ry0 - ty * t : ry1 - ty * t, rx0 - tx * t : rx1 - tx * t
                ]
        return out[::sy, ::sx, key[2]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


def lazy_pyramid(level0: Any) -> list[Any]:
    """``level0`` and levels 2x, 4x, ... coarser computed on demand, down to at most
    :data:`LAZY_PYRAMID_COARSEST_PX` on the long side (for napari's multiscale layers)."""
    levels = [level0]
    while max(levels[-1].shape[:2]) > LAZY_PYRAMID_COARSEST_PX:
        levels.append(DownsampledLevel(levels[-1]))
    return levels


def read_slide(path: Path) -> LayerData:
    """One slide as an RGB (multiscale) image layer scaled in µm."""
    from napari.utils.notifications import show_warning

    layer, slide = slide_layer(path)
    if slide.pixel_size_um is None:
        why = slide.pixel_size_problem or "the file does not say"
        show_warning(
            f"{path.name}: pixel size unknown ({why}); shown in pixels. "
            "Enter the pixel size in the Histomorphometry widget to measure."
        )
    return layer


def _tiff_pixel_size(path: Path) -> float | None:
    """Pixel size (µm) of a label TIFF from OME PhysicalSizeX or its resolution tags."""
    from histo.io import open_slide

    try:
        with open_slide(path) as slide:
            return slide.pixel_size_um
    except HistoError:
        return None


def read_label_tiff(path: Path, kind: str) -> LayerData:
    """A histo class map or instance TIFF as a labels layer."""
    import tifffile

    data = tifffile.imread(path)
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    px = _tiff_pixel_size(path)
    name = path.name
    meta = {"histo_path": str(path)}
    if kind == "class_map":
        kwargs = class_map_kwargs(name, px, metadata=meta)
    else:
        scale = px or 1.0
        kwargs = {
            "name": name,
            "scale": (scale, scale),
            "units": (UNIT, UNIT) if px else None,
            "opacity": 0.6,
            "metadata": {"pixel_size_um": px, "histo_kind": kind, **meta},
        }
    return data, _clean_kwargs(kwargs), "labels"


def store_levels(store: str | Path) -> dict[str, tuple[list[Any], float | None]]:
    """Every label image of a ``labels.ome.zarr`` as its pyramid of lazy zarr arrays.

    Returns label name -> (arrays from full resolution down, level-0 pixel size in µm);
    nothing is read until napari indexes an array.
    """
    from histo.io.ome_zarr import read_labels

    levels: list[dict[str, tuple[Any, float | None]]] = []
    while True:
        try:
            levels.append(read_labels(store, level=len(levels), lazy=True))
        except (IndexError, KeyError):
            break
    if not levels:
        levels.append(read_labels(store, level=0, lazy=True))
    return {
        name: ([lv[name][0] for lv in levels if name in lv], levels[0][name][1])
        for name in levels[0]
    }


def read_labels_store(store: Path) -> list[LayerData]:
    """The label images of a ``labels.ome.zarr`` store as (multiscale, lazy) labels layers."""
    slide = store.parent.name if store.name == "labels.ome.zarr" else store.name
    stacks = store_levels(store)
    out: list[LayerData] = []
    order = ["class_map", "osteocytes", "osteoclasts"]
    names = sorted(stacks, key=lambda n: order.index(n) if n in order else len(order))
    for name in names:
        arrays, px = stacks[name]
        data: Any = arrays if len(arrays) > 1 else arrays[0]
        meta = {"histo_path": str(store), "slide_name": slide}
        if name == "class_map":
            if np.prod(arrays[0].shape) <= MAX_EDITABLE_PX:
                data = np.asarray(arrays[0][:])  # in memory, so that it can be painted
            kwargs = class_map_kwargs(
                f"{slide} classes", px, metadata=meta, multiscale=isinstance(data, list)
            )
        else:
            scale = px or 1.0
            kwargs = {
                "name": f"{slide} {name}",
                "scale": (scale, scale),
                "units": (UNIT, UNIT) if px else None,
                "multiscale": isinstance(data, list),
                "opacity": 0.6,
                "metadata": {"pixel_size_um": px, "histo_kind": name, **meta},
            }
        out.append((data, _clean_kwargs(kwargs), "labels"))
    return out


def instance_maps(path: str | Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Osteoclast and osteocyte instances stored with a class map (None where there are none).

    Beside ``NAME.classes.tif``: ``NAME.osteoclasts.tif`` and ``NAME.osteocytes.tif``; in a
    ``labels.ome.zarr``: its ``osteoclasts`` and ``osteocytes`` label images (as
    ``histo measure`` reads them).
    """
    import tifffile

    path = Path(path)
    kinds = ("osteoclasts", "osteocytes")
    stores = _labels_stores(path)
    if stores:
        from histo.io.ome_zarr import read_labels

        labels = read_labels(stores[0])
        return tuple(np.asarray(labels[k][0]) if k in labels else None for k in kinds)
    if _label_tiff_kind(path) != "class_map":
        return None, None
    name = path.name
    stem, suffix = name[: name.lower().rindex(".classes.")], name[name.lower().rindex(".tif") :]
    beside = [path.with_name(f"{stem}.{kind}{suffix}") for kind in kinds]
    return tuple(tifffile.imread(p) if p.is_file() else None for p in beside)
