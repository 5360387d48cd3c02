"""Correcting a region of a slide's ``labels.ome.zarr`` in place, atomically.

A whole slide's label images are too large to hold, let alone paint. A correction works on a
region: :func:`read_labels_region` reads its full-resolution class map and instance maps,
the user edits the class map, and :func:`write_labels_region` writes it back:

- the instance maps follow the edited class map (:func:`edited_instances`): a cell left alone
  keeps its label, pixels painted onto a cell join it, a region painted apart from any cell
  becomes a new cell with a label no other cell of the slide has, cells painted over vanish.
  The region is read with a margin so that a cell reaching into it from outside is seen;
- every pyramid level of the three label images is rewritten where it samples the region
  (level k holds the level-0 pixel at ``2**k * i + 2**k // 2``), and nothing outside it;
- the write is atomic with a write-ahead copy (an undo journal): the chunk files the edit will
  touch are copied to ``labels.ome.zarr.edit`` and listed in a manifest written last, then the
  chunks are written, then the manifest is removed. An edit killed half-way is rolled back
  (:func:`recover_interrupted_edit`, called by every read and write here), so the store holds
  either the old region or the new one, never a mix.

:func:`correction_example` gives an edited region with the slide's pixels at the labels'
resolution, for fine-tuning from whole-slide corrections; :func:`write_correction_pair` writes
it as the slide and ``NAME.classes.tif`` pair that ``histo finetune`` reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from histo import classes
from histo.errors import OutputError, SlideReadError
from histo.io.ome_zarr import MAX_LABEL_ATTR, write_in_pieces

__all__ = [
    "PixelBox",
    "RegionLabels",
    "CorrectionFiles",
    "RegionWrite",
    "TrainingExample",
    "correction_example",
    "correction_name",
    "edited_instances",
    "read_labels_region",
    "recover_interrupted_edit",
    "write_correction_pair",
    "write_labels_region",
]

#: the instance images and the class each one labels
INSTANCE_CODES = {"osteoclasts": classes.OSTEOCLAST, "osteocytes": classes.OSTEOCYTE}
#: context read around a region (px) to find the cells that reach into it from outside
CONTEXT_PX = 2
#: block side (px) of the one-off scan for the largest label
SCAN_BLOCK_PX = 2048


class PixelBox(NamedTuple):
    """Rows [y0, y1) and columns [x0, x1) in pixels of the label images' full resolution."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def clipped(self, shape: tuple[int, int]) -> PixelBox:
        """The box clipped to an image of ``shape`` (may be empty)."""
        h, w = shape
        y0, x0 = min(max(self.y0, 0), h), min(max(self.x0, 0), w)
        return PixelBox(y0, x0, max(min(self.y1, h), y0), max(min(self.x1, w), x0))

    def grown(self, margin: int, shape: tuple[int, int]) -> PixelBox:
        """The box grown by ``margin`` pixels each way, clipped to ``shape``."""
        m = int(margin)
        return PixelBox(self.y0 - m, self.x0 - m, self.y1 + m, self.x1 + m).clipped(shape)


class RegionLabels(NamedTuple):
    """The label images of a region at full resolution (numpy copies)."""

    box: PixelBox
    class_map: np.ndarray  #: uint8 codes (histo.classes)
    osteoclasts: np.ndarray | None  #: uint32 instance labels (None: the store has none)
    osteocytes: np.ndarray | None
    pixel_size_um: float | None  #: µm per pixel of the label images


class RegionWrite(NamedTuple):
    """What :func:`write_labels_region` changed."""

    box: PixelBox
    changed_px: int  #: class-map pixels whose code changed
    chunks_written: int  #: chunk files rewritten, over every label image and level
    seconds: float


class TrainingExample(NamedTuple):
    """An image and its (corrected) class map at the same resolution, for fine-tuning."""

    image: np.ndarray  #: (H, W, 3) uint8 RGB
    class_map: np.ndarray  #: (H, W) uint8 codes
    pixel_size_um: float


class CorrectionFiles(NamedTuple):
    """The files of an exported correction (:func:`write_correction_pair`)."""

    image: Path  #: ``NAME.ome.tif``: the region's RGB pixels
    class_map: Path  #: ``NAME.classes.tif`` beside it


# --------------------------------------------------------------------------- the store


class _Level(NamedTuple):
    array: Any  #: zarr array
    factor: int  #: level-0 pixels per pixel of this level


def _unwrap(attrs: dict[str, Any]) -> dict[str, Any]:
    return attrs.get("ome", attrs)


def _open_levels(store: Path, mode: str) -> tuple[dict[str, list[_Level]], float | None]:
    """Every label image of ``store`` as its levels (full resolution first), and µm/px."""
    import zarr

    try:
        group = zarr.open_group(str(store), mode=mode)["labels"]
    except Exception as exc:  # noqa: BLE001 - any zarr/OS error: one line
        raise SlideReadError(f"{store.name}: not an OME-Zarr labels store ({exc})") from None
    out: dict[str, list[_Level]] = {}
    pixel_size = None
    for name in _unwrap(dict(group.attrs)).get("labels", []):
        sub = group[name]
        ms = _unwrap(dict(sub.attrs))["multiscales"][0]
        scales = [_scale_x(d) for d in ms["datasets"]]
        pixel_size = pixel_size or scales[0]
        out[name] = [
            _Level(sub[d["path"]], _factor(s, scales[0], k))
            for k, (d, s) in enumerate(zip(ms["datasets"], scales, strict=True))
        ]
    if "class_map" not in out:
        raise SlideReadError(f"{store.name}: no class_map label image")
    return out, pixel_size


def _scale_x(dataset: dict[str, Any]) -> float | None:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return float(t["scale"][-1])
    return None


def _factor(scale: float | None, scale0: float | None, k: int) -> int:
    if scale and scale0:
        return max(1, int(round(scale / scale0)))
    return 2**k


def level_span(f: int, start: int, stop: int, size: int) -> tuple[int, int]:
    """Pixels [i0, i1) of a level ``f`` times coarser that sample level-0 pixels
    [start, stop) (pixel i samples level-0 pixel ``f * i + f // 2``), clipped to ``size``."""
    i0, i1 = math.ceil((start - f // 2) / f), math.ceil((stop - f // 2) / f)
    return max(i0, 0), min(max(i1, 0), size)


def _shape(level: _Level) -> tuple[int, int]:
    return int(level.array.shape[0]), int(level.array.shape[1])


def read_labels_region(store: str | os.PathLike, box: PixelBox) -> RegionLabels:
    """The full-resolution class map and instance maps of a region of a labels store.

    Parameters
    ----------
    store : path-like
        A ``labels.ome.zarr`` written by :class:`histo.io.ome_zarr.LabelsWriter`.
    box : PixelBox
        The region in pixels of the label images' full resolution; clipped to the image.

    Returns
    -------
    RegionLabels

    Raises
    ------
    SlideReadError
        Not a labels store, or the region lies outside it.
    """
    store = Path(store)
    recover_interrupted_edit(store)
    levels, pixel_size = _open_levels(store, "r")
    box = _checked_box(box, _shape(levels["class_map"][0]), store)
    read = {name: np.asarray(lv[0].array[box.slices]) for name, lv in levels.items()}
    return RegionLabels(
        box, read["class_map"], read.get("osteoclasts"), read.get("osteocytes"), pixel_size
    )


def _checked_box(box: PixelBox, shape: tuple[int, int], store: Path) -> PixelBox:
    clipped = PixelBox(*(int(v) for v in box)).clipped(shape)
    if clipped.shape[0] < 1 or clipped.shape[1] < 1:
        raise SlideReadError(f"{store.name}: region {tuple(box)} lies outside {shape}")
    return clipped


# --------------------------------------------------------------------------- instances


def edited_instances(
    class_map: np.ndarray, instances: np.ndarray, code: int, next_label: int | None = None
) -> np.ndarray:
    """Instance labels consistent with an edited class map.

    Pixels of class ``code`` keep their instance; pixels painted onto an instance (connected
    to it, 8-connectivity) join the nearest one; a region painted as ``code`` that touches no
    instance becomes a new instance; instances whose pixels were painted over vanish.

    Parameters
    ----------
    class_map : ndarray (H, W)
        The edited class codes.
    instances : ndarray (H, W)
        The instance labels before the edit.
    code : int
        The class the instances label (:data:`histo.classes.OSTEOCLAST` or ``OSTEOCYTE``).
    next_label : int, optional
        The first label new instances get (the slide's largest label + 1 when ``instances``
        is a crop of a slide). Default: above the largest label kept.

    Returns
    -------
    ndarray of int64 (H, W)
    """
    from scipy import ndimage as ndi

    member = np.asarray(class_map) == code
    lab = np.where(member, np.asarray(instances), 0).astype(np.int64)
    unlabeled = member & (lab == 0)
    if not unlabeled.any():
        return lab
    eight = np.ones((3, 3), bool)
    comp, n = ndi.label(member, structure=eight)
    has_instance = np.zeros(n + 1, bool)
    has_instance[np.unique(comp[lab > 0])] = True
    has_instance[0] = False
    fresh = unlabeled & ~has_instance[comp]
    start = int(lab.max()) if next_label is None else int(next_label) - 1
    if fresh.any():  # regions painted away from any instance: one new instance each
        new, _ = ndi.label(fresh, structure=eight)
        lab[fresh] = new[fresh] + start
    grow = unlabeled & has_instance[comp]
    if grow.any():  # pixels added to an instance: nearest instance pixel
        _, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
        lab[grow] = lab[iy[grow], ix[grow]]
    return lab


def _max_label(store: Path, name: str, level0: Any) -> int:
    """The largest label of an instance image (its group's attribute, written by
    :class:`histo.io.ome_zarr.LabelsWriter`; a store without it is scanned once)."""
    import zarr

    group = zarr.open_group(str(store / "labels" / name), mode="r+")
    cached = group.attrs.get(MAX_LABEL_ATTR)
    if cached is not None:
        return int(cached)
    h, w = (int(n) for n in level0.shape)
    top = 0
    for y in range(0, h, SCAN_BLOCK_PX):
        for x in range(0, w, SCAN_BLOCK_PX):
            top = max(top, int(np.max(level0[y : y + SCAN_BLOCK_PX, x : x + SCAN_BLOCK_PX])))
    group.attrs[MAX_LABEL_ATTR] = top
    return top


def _set_max_label(store: Path, name: str, value: int) -> None:
    import zarr

    zarr.open_group(str(store / "labels" / name), mode="r+").attrs[MAX_LABEL_ATTR] = int(value)


# --------------------------------------------------------------------------- writing


#: suffix of the undo journal beside the store, and its manifest (written last)
JOURNAL_SUFFIX = ".edit"
MANIFEST = "manifest.json"


def write_labels_region(
    store: str | os.PathLike, box: PixelBox, class_map: np.ndarray
) -> RegionWrite:
    """Write an edited region's class map into a labels store, with its instances and pyramid.

    Parameters
    ----------
    store : path-like
        A ``labels.ome.zarr`` written by :class:`histo.io.ome_zarr.LabelsWriter`.
    box : PixelBox
        The region, in pixels of the full resolution, as :func:`read_labels_region` gave it.
    class_map : ndarray (h, w)
        The edited class codes of the region (0-6; the shape of ``box``).

    Returns
    -------
    RegionWrite

    Raises
    ------
    SlideReadError
        Not a labels store, or the region lies outside it.
    ValueError
        ``class_map`` does not have the region's shape or holds codes above 6.
    OutputError
        The store cannot be written (the region is rolled back to what it was).
    """
    t0 = time.perf_counter()
    store = Path(store)
    recover_interrupted_edit(store)
    levels, _ = _open_levels(store, "r+")
    box = _checked_box(box, _shape(levels["class_map"][0]), store)
    edited = np.asarray(class_map)
    if edited.shape != box.shape:
        raise ValueError(f"class map of shape {edited.shape} for a region of shape {box.shape}")
    if edited.size and (edited.min() < 0 or edited.max() > max(classes.NAMES)):
        raise ValueError(f"class codes must be 0-{max(classes.NAMES)}")
    maps, changed = _new_maps(store, levels, box, edited)
    writes = [
        (level.array, span, tile)
        for name, new in maps.items()
        for level, span, tile in _level_tiles(levels[name], box, new)
    ]
    files = [f for array, span, _ in writes for f in _chunk_files(array, span)]
    journal = _begin_journal(store, files)
    try:
        for array, (i0, _, j0, _), tile in writes:
            write_in_pieces(array, i0, j0, tile)
    except BaseException as exc:
        recover_interrupted_edit(store)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {store}: {exc.strerror or exc}") from None
        raise
    _end_journal(journal)
    return RegionWrite(box, changed, len(files), time.perf_counter() - t0)


def _new_maps(
    store: Path, levels: dict[str, list[_Level]], box: PixelBox, edited: np.ndarray
) -> tuple[dict[str, np.ndarray], int]:
    """The region's new class map and instance maps, and how many codes changed."""
    ctx = box.grown(CONTEXT_PX, _shape(levels["class_map"][0]))
    inner = (slice(box.y0 - ctx.y0, box.y1 - ctx.y0), slice(box.x0 - ctx.x0, box.x1 - ctx.x0))
    cm = np.asarray(levels["class_map"][0].array[ctx.slices])
    changed = int(np.count_nonzero(cm[inner] != edited))
    cm[inner] = edited
    maps = {"class_map": edited.astype(levels["class_map"][0].array.dtype)}
    for name, code in INSTANCE_CODES.items():
        if name not in levels:
            continue
        level0 = levels[name][0].array
        top = _max_label(store, name, level0)
        lab = edited_instances(cm, np.asarray(level0[ctx.slices]), code, top + 1)[inner]
        new_top = int(lab.max(initial=0))
        if new_top > np.iinfo(level0.dtype).max:
            raise OutputError(f"{name}: more cells than {level0.dtype} labels")
        if new_top > top:
            _set_max_label(store, name, new_top)
        maps[name] = lab.astype(level0.dtype)
    return maps, changed


def _level_tiles(levels: list[_Level], box: PixelBox, new: np.ndarray):
    """(level, (i0, i1, j0, j1), tile) of every level that samples the region."""
    for level in levels:
        f = level.factor
        h, w = _shape(level)
        i0, i1 = level_span(f, box.y0, box.y1, h)
        j0, j1 = level_span(f, box.x0, box.x1, w)
        if i1 <= i0 or j1 <= j0:
            continue
        oy, ox = f * i0 + f // 2 - box.y0, f * j0 + f // 2 - box.x0
        yield level, (i0, i1, j0, j1), new[oy::f, ox::f][: i1 - i0, : j1 - j0]


def _chunk_files(array: Any, span: tuple[int, int, int, int]) -> list[str]:
    """Paths (relative to the store) of the chunk files a write of ``span`` touches."""
    i0, i1, j0, j1 = span
    ch, cw = (int(n) for n in array.chunks)
    return [
        f"{array.path}/{array.metadata.encode_chunk_key((a, b))}"
        for a in range(i0 // ch, math.ceil(i1 / ch))
        for b in range(j0 // cw, math.ceil(j1 / cw))
    ]


def _journal_dir(store: Path) -> Path:
    return store.with_name(store.name + JOURNAL_SUFFIX)


def _begin_journal(store: Path, files: list[str]) -> Path:
    """Copy the chunk files an edit will touch beside the store; the manifest comes last."""
    from histo.io.atomic import write_text_atomic

    journal = _journal_dir(store)
    try:
        if journal.exists():  # no manifest (recovery removed it): a copy never finished
            shutil.rmtree(journal)
        journal.mkdir()
        entries = []
        for n, rel in enumerate(files):
            backup = None
            if (store / rel).is_file():
                backup = f"{n:06d}"
                shutil.copyfile(store / rel, journal / backup)
            entries.append({"path": rel, "backup": backup})
    except OSError as exc:
        shutil.rmtree(journal, ignore_errors=True)
        raise OutputError(f"cannot write {journal}: {exc.strerror or exc}") from None
    write_text_atomic(journal / MANIFEST, json.dumps(entries))
    return journal


def _end_journal(journal: Path) -> None:
    (journal / MANIFEST).unlink()  # from here on the edit stands
    shutil.rmtree(journal, ignore_errors=True)


def recover_interrupted_edit(store: str | os.PathLike) -> bool:
    """Roll back an edit of ``store`` that was killed half-way (its journal is beside it).

    Returns whether there was one to roll back.
    """
    store = Path(store)
    journal = _journal_dir(store)
    if not journal.exists():
        return False
    manifest = journal / MANIFEST
    rolled_back = manifest.is_file()
    if rolled_back:
        for entry in json.loads(manifest.read_text(encoding="utf-8")):
            target = store / entry["path"]
            if entry["backup"] is None:  # the chunk did not exist (all fill value)
                target.unlink(missing_ok=True)
                continue
            tmp = target.with_name(target.name + ".restore")
            shutil.copyfile(journal / entry["backup"], tmp)
            os.replace(tmp, target)
        manifest.unlink()
    shutil.rmtree(journal, ignore_errors=True)
    return rolled_back


# --------------------------------------------------------------------------- fine-tuning


def correction_example(
    slide: Any, store: str | os.PathLike, box: PixelBox, *, slide_pixel_size_um: float | None = None
) -> TrainingExample:
    """A region of a slide with its (corrected) class map, at the labels' resolution.

    Parameters
    ----------
    slide : path-like or ndarray
        The slide the store was computed from (a file :func:`histo.io.open_slide` reads, or
        its RGB array at ``slide_pixel_size_um``).
    store : path-like
        The slide's ``labels.ome.zarr``.
    box : PixelBox
        The region in pixels of the label images.
    slide_pixel_size_um : float, optional
        The slide's level-0 pixel size when its file does not give it (µm/px).

    Returns
    -------
    TrainingExample
        The slide's pixels resampled to the label images' pixel size, as the pipeline reads
        them, and the region's class map.
    """
    from histo.io.slide import open_slide, read_region, slide_from_array

    region = read_labels_region(store, box)
    px = region.pixel_size_um
    if not px:
        raise SlideReadError(f"{Path(store).name}: no pixel size in the store")
    if isinstance(slide, np.ndarray):
        opened = slide_from_array(slide, pixel_size_um=slide_pixel_size_um)
    else:
        opened = open_slide(slide, pixel_size_um=slide_pixel_size_um)
    h, w = region.box.shape
    with opened:
        image = read_region(opened, region.box.y0 * px, region.box.x0 * px, h, w, px)
    return TrainingExample(np.asarray(image, np.uint8), region.class_map, float(px))


def correction_name(slide_name: str, box: PixelBox) -> str:
    """The file name stem of a slide's corrected region: ``S1-region-y900-x700-500x400``
    (its top-left pixel, then width x height, in pixels of the label images)."""
    h, w = box.shape
    return f"{slide_name}-region-y{box.y0}-x{box.x0}-{w}x{h}"


def write_correction_pair(
    example: TrainingExample, folder: str | os.PathLike, name: str
) -> CorrectionFiles:
    """Write a corrected region as the pair ``histo finetune`` reads.

    ``folder/NAME.ome.tif`` holds the region's pixels and ``folder/NAME.classes.tif`` its
    class map beside it (:func:`histo.finetune.load_labelled`), both lossless, tiled, with the
    pixel size in the OME metadata and the TIFF resolution tags; each file is written under a
    temporary name and renamed. The class map is written last, so a run killed half-way
    leaves no pair for ``histo finetune`` to find.

    Parameters
    ----------
    example : TrainingExample
        A region and its class map (:func:`correction_example`).
    folder : path-like
        Where the pair goes (created when missing).
    name : str
        The stem of both files (:func:`correction_name`).

    Returns
    -------
    CorrectionFiles

    Raises
    ------
    OutputError
        A file cannot be written.
    """
    from histo.io.atomic import write_atomic

    folder = Path(folder)
    image = np.ascontiguousarray(example.image, np.uint8)
    class_map = np.ascontiguousarray(example.class_map, np.uint8)
    if image.shape[:2] != class_map.shape or image.ndim != 3:
        raise OutputError(
            f"{name}: image {image.shape} and class map {class_map.shape} do not match"
        )
    px = float(example.pixel_size_um)
    image_path = write_atomic(folder / f"{name}.ome.tif", lambda tmp: _write_tiff(tmp, image, px))
    map_path = write_atomic(
        folder / f"{name}.classes.tif", lambda tmp: _write_tiff(tmp, class_map, px)
    )
    return CorrectionFiles(image_path, map_path)


def _write_tiff(path: Path, array: np.ndarray, pixel_size_um: float) -> None:
    """One-level tiled OME-TIFF, zlib (lossless: these pixels are training data)."""
    import tifffile

    rgb = array.ndim == 3
    tile = 256 if min(array.shape[:2]) >= 256 else None
    metadata = {
        "axes": "YXS" if rgb else "YX",
        "PhysicalSizeX": pixel_size_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_size_um,
        "PhysicalSizeYUnit": "µm",
    }
    tifffile.imwrite(
        path,
        array,
        ome=True,
        photometric="rgb" if rgb else "minisblack",
        tile=(tile, tile) if tile else None,
        compression="zlib",
        resolution=(1e4 / pixel_size_um, 1e4 / pixel_size_um),
        resolutionunit="CENTIMETER",
        metadata=metadata,
    )
