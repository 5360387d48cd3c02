"""Fine-tuning the network on a lab's own slides, from corrected class maps or scribbles.

A labelled field is an RGB image with a class map on its pixel grid: codes of
:mod:`histo.classes`, 255 (``UNLABELLED``) where nothing is said. Full corrections and a few
brush strokes per class (scribbles) are alike: the loss only looks at labelled pixels.

Training starts from the shipped network (or ``base``) and runs on crops at the network's
working resolution, with the augmentation of :mod:`histo.train`; part of each batch replays
synthetic sections (:class:`histo.train.SectionPool`) so that what the network knew is kept.
A spatial block split of the labelled pixels holds part of them out for validation; the weights
with the best validation Dice are kept, also when the run is cancelled. Everything random is a
pure function of the seed and the step; with a time budget (the default) the number of steps
depends on the machine, with ``max_steps`` it does not.

Public surface::

    fields = load_labelled(["S1.ome.tif", "folder/"])     # NAME.classes.tif beside each slide
    result = finetune(fields, "my-model", FinetuneConfig(minutes=5), progress=..., cancel=...)
    load_model("my-model")                                  # or --model my-model
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from histo.classes import ALL_NAMES, N_ALL_CLASSES, N_CLASSES, UNLABELLED
from histo.errors import ClassMapError, HistoError, ModelError, OutputError, PixelSizeError

log = logging.getLogger("histo.finetune")

__all__ = [
    "FinetuneConfig",
    "FinetuneProgress",
    "FinetuneResult",
    "LabelledField",
    "finetune",
    "load_labelled",
]

#: suffix of the class map beside a slide (the name the napari plugin's Save writes)
CLASS_MAP_SUFFIX = ".classes.tif"
#: physical extents of a slide and a class map with its own pixel size may differ by this
#: much (relative) and still be one grid: rounding of a resampled map's size
EXTENT_RTOL = 0.02
#: first generator seed of the held-out synthetic sections that measure forgetting (training
#: uses 100 000-399 999, evaluation 800 000 and above; these sit apart from both)
FORGETTING_SEED_BASE = 650_000
#: what ``FinetuneConfig.trainable`` may name
TRAINABLE = ("all", "decoder", "head")


@dataclass
class LabelledField:
    """An RGB field with a (partial) class map on the same pixel grid.

    Attributes
    ----------
    image
        (H, W, 3) uint8 RGB.
    class_map
        (H, W) uint8 class codes, 255 = unlabelled.
    pixel_size_um
        µm per pixel of both arrays.
    name
        What the field is called in messages and in ``model.json``.
    source
        The slide file, when read from disk.
    sha256
        Checksum of the data files (slide and class map), when read from disk.
    """

    image: np.ndarray
    class_map: np.ndarray
    pixel_size_um: float
    name: str
    source: str | None = None
    sha256: str | None = None
    #: the class map file and each data file's sha256, when read from disk
    class_map_source: str | None = None
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class FinetuneConfig:
    """What a fine-tuning run trains, how long and on what (recorded in ``model.json``).

    The defaults are those that forgot least of the in-domain osteoclasts at no cost on a new
    stain in ``benchmarks/bench_adapt.py`` (experiments in docs/performance.md): three quarters
    of each batch replayed from sections of every counterstain and phenotype, half the
    labelled crops centred on osteoclasts, every layer trained at a low rate.
    """

    base: str | None = None  #: registry name, MODEL_DIR or .safetensors; None = shipped model
    minutes: float = 5.0  #: wall-time budget, preparation and saving included
    seed: int = 0
    #: "all" (every layer), "decoder" (decoder and head; the encoder and its batch-norm
    #: statistics frozen) or "head" (the last 1x1 convolution)
    trainable: str = "all"
    lr: float = 1e-3  #: peak learning rate (AdamW), cosine decay over the budget
    weight_decay: float = 1e-4
    crop_px: int = 192  #: crop side at the working resolution
    batch_size: int = 8
    #: share of each batch cropped from synthetic sections (0.75 forgot less of the in-domain
    #: osteoclasts than 0.5, at no cost on the new stain: docs/performance.md)
    replay_share: float = 0.75
    replay_sections: int = 9  #: synthetic sections held for replay
    replay_field_px: int = 512  #: side of a replayed section at the working resolution
    #: replayed sections cover every counterstain and phenotype of training before repeating
    stratified_replay: bool = True
    #: weight of the distillation term on replayed crops (learning without forgetting: the
    #: base's own outputs there are soft targets); off, since with stratified replay it kept
    #: no more and its teacher pass costs steps
    distill_weight: float = 0.0
    #: batch-norm running statistics kept as the base's (the layers' weights still learn); off,
    #: since the statistics of mixed-stain batches turned out not to be what is forgotten
    freeze_norm_stats: bool = False
    #: share of the labelled crops centred on a labelled osteoclast (the rest on a class drawn
    #: uniformly): osteoclasts are the class a stain shift confuses most
    osteoclast_crops: float = 0.5
    #: share of the replayed crops centred on the bone surface (hard negatives for osteoclasts)
    replay_surface_crops: float = 0.0
    val_share: float = 0.2  #: share of each field's labelled pixels held out (whole blocks)
    val_block_px: int = 128  #: side of the validation blocks (working pixels)
    val_max_blocks: int = 16  #: validation blocks scored at each validation (seeded choice)
    val_every: int = 10  #: steps between validations
    #: keep the weights of the best validation Dice (else the last weights, validation still
    #: measured and reported)
    keep_best: bool = True
    max_steps: int | None = None  #: stop after this many steps (None: the budget decides)
    forgetting_sections: int = 2  #: held-out synthetic sections scored before and after
    grow_head: bool = True  #: codes 5/6 on a 5-class base: grow its head to 7 classes
    device: str | None = "cpu"
    #: in-domain synthetic slides segmented after training for the model's own confidence
    #: reference (histo.qc, stored in model.json); 0: none (quality control then warns that the
    #: model's confidence was not checked)
    qc_reference_slides: int = 6


@dataclass
class FinetuneProgress:
    """One report of a running fine-tune."""

    step: int
    steps: int | None  #: ``max_steps``, or None when the time budget decides
    loss: float
    val_dice: float | None  #: mean validation Dice over the classes held out (None: not yet)
    elapsed_s: float
    best: bool  #: these weights are the best so far
    budget_s: float | None = None  #: the time budget (for a bar when ``steps`` is None)


@dataclass
class FinetuneResult:
    """What a fine-tuning run wrote."""

    model_dir: Path
    sha256: str
    steps: int
    wall_s: float
    val_dice: dict[str, float]  #: per class, of the kept weights, on the held-out pixels
    cancelled: bool
    best_step: int = 0
    base_val_dice: dict[str, float] = field(default_factory=dict)  #: of the base model
    forgetting: dict[str, dict[str, float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def _data_sha256(paths: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """sha256 of the data files together, and each file's (a folder: its files, sorted)."""
    from histo.segment.registry import file_sha256

    each: dict[str, str] = {}
    for p in paths:
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                h.update(f"{f.relative_to(p)}\0{file_sha256(f)}\n".encode())
            each[str(p.resolve())] = h.hexdigest()
        else:
            each[str(p.resolve())] = file_sha256(p)
    joint = hashlib.sha256("".join(each.values()).encode()).hexdigest()
    return joint, each


def class_map_path(slide: str | Path) -> Path:
    """``NAME.classes.tif`` beside the slide ``NAME.<suffix>``."""
    from histo.io.slide import slide_name

    slide = Path(slide)
    return slide.with_name(slide_name(slide) + CLASS_MAP_SUFFIX)


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    """Slides named, and the slides in the folders named (class maps themselves skipped)."""
    from histo.batch import find_slides
    from histo.io.formats import slide_suffix

    slides: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and slide_suffix(p.name, folder=True) is None:
            found = [s for s in find_slides(p) if class_map_path(s).is_file()]
            if not found:
                raise HistoError(f"{p}: no slide with a {CLASS_MAP_SUFFIX} beside it")
            slides.extend(found)
        elif not p.exists():
            raise HistoError(f"{p}: no such file or folder")
        else:
            slides.append(p)
    return slides


def _check_codes(class_map: np.ndarray, label: str) -> None:
    """One line on unknown codes or a map with nothing labelled."""
    codes = np.unique(class_map)
    bad = [int(c) for c in codes if c != UNLABELLED and c >= N_ALL_CLASSES]
    if bad:
        shown = ", ".join(map(str, bad[:6])) + (", ..." if len(bad) > 6 else "")
        raise ClassMapError(
            f"{label}: unknown class codes {shown} (codes are 0-{N_ALL_CLASSES - 1}, "
            f"{UNLABELLED} = unlabelled)"
        )
    if codes.size == 1 and codes[0] == UNLABELLED:
        raise ClassMapError(f"{label}: nothing labelled (every pixel is {UNLABELLED})")


def _map_pixel_size(slide, cmap: np.ndarray, map_px: float | None, label: str) -> float:
    """The class map's pixel size: the slide's when it is on the slide's level-0 grid, else
    its own, when both cover the same extent."""
    h0, w0 = slide.shape[:2]
    slide_px = slide.pixel_size_um
    if cmap.shape == (h0, w0):
        px = slide_px or map_px
        if px is None:
            raise PixelSizeError(f"{label}: no pixel size in the slide or its class map")
        return float(px)
    if map_px is None or slide_px is None:
        missing = "its class map" if map_px is None else "the slide"
        raise ClassMapError(
            f"{label}: class map is {cmap.shape[1]}x{cmap.shape[0]} px, slide {w0}x{h0} px, "
            f"and {missing} has no pixel size to match them"
        )
    for n_map, n_slide in ((cmap.shape[0], h0), (cmap.shape[1], w0)):
        if abs(n_map * map_px - n_slide * slide_px) > EXTENT_RTOL * n_slide * slide_px:
            raise ClassMapError(
                f"{label}: class map covers {cmap.shape[1] * map_px:.0f}x"
                f"{cmap.shape[0] * map_px:.0f} µm, slide {w0 * slide_px:.0f}x"
                f"{h0 * slide_px:.0f} µm: sizes disagree"
            )
    return float(map_px)


def _labelled_box(cmap: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """Rows y0:y1 and columns x0:x1 holding every labelled pixel, with ``margin`` around."""
    rows = np.flatnonzero((cmap != UNLABELLED).any(1))
    cols = np.flatnonzero((cmap != UNLABELLED).any(0))
    h, w = cmap.shape
    y0, y1 = max(0, rows[0] - margin), min(h, rows[-1] + 1 + margin)
    x0, x1 = max(0, cols[0] - margin), min(w, cols[-1] + 1 + margin)
    return int(y0), int(y1), int(x0), int(x1)


def read_labelled(
    slide_path: str | Path, working_pixel_size_um: float = 1.0, margin_um: float = 96.0
) -> LabelledField:
    """One slide and its ``NAME.classes.tif`` as a field at ``working_pixel_size_um``.

    Only the box around the labelled pixels (with ``margin_um`` of context) is read, with the
    pipeline's resampling (:func:`histo.io.slide.read_region`); the class map is resampled by
    nearest neighbour onto the same grid. A slide coarser than ``working_pixel_size_um`` is
    read at its own pixel size.
    """
    import cv2

    from histo.io.class_maps import read_label_image
    from histo.io.slide import open_slide, read_region

    slide_path = Path(slide_path)
    map_path = class_map_path(slide_path)
    label = slide_path.name
    if not map_path.is_file():
        raise HistoError(f"{label}: no class map {map_path.name} beside it")
    cmap, map_px = read_label_image(map_path)
    if cmap.ndim != 2 or cmap.dtype.kind not in "ui":
        raise ClassMapError(f"{map_path.name}: not a 2-D integer class map ({cmap.shape})")
    _check_codes(cmap, map_path.name)
    with open_slide(slide_path) as slide:
        px = _map_pixel_size(slide, cmap, map_px, label)
        slide.pixel_size_um = slide.pixel_size_um or px
        if slide.level_pixel_sizes[0] is None:
            slide.level_pixel_sizes = [px * slide.shape[1] / lv.shape[1] for lv in slide.levels]
        out_px = max(float(working_pixel_size_um), float(slide.pixel_size_um))
        y0, y1, x0, x1 = _labelled_box(cmap, int(round(margin_um / px)))
        h = max(1, round((y1 - y0) * px / out_px))
        w = max(1, round((x1 - x0) * px / out_px))
        image = read_region(slide, y0 * px, x0 * px, h, w, out_px)
    crop = np.ascontiguousarray(cmap[y0:y1, x0:x1].astype(np.uint8))
    crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_NEAREST)
    joint, each = _data_sha256([slide_path, map_path])
    return LabelledField(
        image, crop, out_px, slide_path.name, str(slide_path.resolve()), joint,
        str(map_path.resolve()), each,
    )  # fmt: skip


def load_labelled(
    paths: Sequence[str | Path], working_pixel_size_um: float = 1.0
) -> list[LabelledField]:
    """The labelled fields of slides (or folders of slides) with ``NAME.classes.tif`` beside.

    Parameters
    ----------
    paths
        Slides in any format :func:`histo.io.slide.open_slide` reads, or folders searched for
        slides that have a class map beside them.
    working_pixel_size_um
        Resolution the fields are read at (µm/px): the network's working resolution.

    Raises
    ------
    HistoError
        One line per bad pair: no class map, sizes that disagree, unknown codes, no pixel
        size, nothing labelled. Every slide is read first; the message holds one line per
        bad pair.
    """
    slides = _expand(paths)
    fields, problems = [], []
    for s in slides:
        try:
            fields.append(read_labelled(s, working_pixel_size_um))
        except HistoError as exc:
            problems.append(str(exc))
    if problems:
        raise ClassMapError("\n".join(problems))
    if not fields:
        raise HistoError("no slides given")
    return fields


# --------------------------------------------------------------------------- base model


@dataclass
class _Base:
    """The network fine-tuning starts from, and what ``model.json`` says about it."""

    net: object  #: HistoUNet with the weights loaded (head grown when asked)
    name: str
    sha256: str
    weights: str
    base_classes: int  #: classes of the base as shipped
    n_classes: int  #: classes trained (7 when the head was grown)
    working_pixel_size_um: float


def _load_base(config: FinetuneConfig, codes: set[int]) -> _Base:
    """The base network, checked against its sha256; its head grown to 7 classes when the
    labels hold cartilage or soft tissue (codes 5, 6) and ``grow_head`` allows it."""
    from histo.segment.network import NetworkConfig, network_with_weights, read_stored_network
    from histo.segment.registry import locate_model
    from histo.train import grow_head

    source = locate_model(config.base or "default")
    if source.weights is None:
        raise ModelError(f"model {source.name!r} has no weights to fine-tune")
    sha = source.verify()
    state, net_config, px = read_stored_network(source.weights, source.entry)
    base_classes = n_classes = net_config.n_outputs - 1
    if codes and max(codes) >= n_classes:
        if not config.grow_head or n_classes != N_CLASSES:
            raise ClassMapError(
                f"the labels hold codes {sorted(c for c in codes if c >= n_classes)} "
                f"(cartilage, soft tissue) but model {source.name!r} knows {n_classes} classes"
            )
        n_classes = N_ALL_CLASSES
        state = grow_head(state, n_classes)
        net_config = NetworkConfig(widths=net_config.widths, n_outputs=n_classes + 1)
    net = network_with_weights(net_config, state, f"weights of {source.name!r}")
    return _Base(net, source.name, sha, str(source.weights), base_classes, n_classes, px)


# --------------------------------------------------------------------------- data


@dataclass
class _Field:
    """A labelled field at the working resolution, split into training and validation."""

    name: str
    image: np.ndarray  #: (H, W, 3) uint8
    train_map: np.ndarray  #: (H, W) uint8, held-out blocks set to UNLABELLED
    val_map: np.ndarray  #: (H, W) uint8, only the held-out blocks labelled
    centre: np.ndarray  #: (H, W) float32 centre-map target of the labelled osteoclasts
    points: dict[int, np.ndarray]  #: class -> (n, 2) training pixels to centre crops on
    val_blocks: list[tuple[int, int, int, int]]  #: y0, y1, x0, x1 of the held-out blocks


def _at_resolution(fld: LabelledField, working_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Image and class map of ``fld`` at ``working_px`` (the pipeline's resampling)."""
    from histo.train import resample

    image, cmap = np.asarray(fld.image)[..., :3], np.asarray(fld.class_map)
    if image.shape[:2] != cmap.shape:
        raise ClassMapError(
            f"{fld.name}: image {image.shape[1]}x{image.shape[0]} px, class map "
            f"{cmap.shape[1]}x{cmap.shape[0]} px: sizes disagree"
        )
    _check_codes(cmap, fld.name)
    scale = float(fld.pixel_size_um) / working_px
    if abs(scale - 1) > 1e-6:
        image = resample(np.ascontiguousarray(image), scale)
        cmap = resample(np.ascontiguousarray(cmap.astype(np.uint8)), scale, labels=True)
    return np.ascontiguousarray(image.astype(np.uint8)), cmap.astype(np.uint8)


def _held_out_blocks(
    cmap: np.ndarray, share: float, block: int, rng: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """Whole blocks holding about ``share`` of the labelled pixels (at least one block stays
    for training)."""
    h, w = cmap.shape
    blocks, counts = [], []
    for y in range(0, h, block):
        for x in range(0, w, block):
            n = int((cmap[y : y + block, x : x + block] != UNLABELLED).sum())
            if n:
                blocks.append((y, min(h, y + block), x, min(w, x + block)))
                counts.append(n)
    chosen, total, taken = [], sum(counts), 0
    for i in rng.permutation(len(blocks))[: max(0, len(blocks) - 1)]:
        if taken >= share * total:
            break
        chosen.append(blocks[i])
        taken += counts[i]
    return chosen


def _prepare(fld: LabelledField, working_px: float, config: FinetuneConfig, k: int) -> _Field:
    """Resample, split into training and held-out blocks, find where crops may centre."""
    from skimage.measure import label

    from histo.classes import OSTEOCLAST
    from histo.segment.instances import centre_target

    image, cmap = _at_resolution(fld, working_px)
    rng = np.random.default_rng([config.seed, k, 31])
    blocks = _held_out_blocks(cmap, config.val_share, config.val_block_px, rng)
    train_map = cmap.copy()
    val_map = np.full_like(cmap, UNLABELLED)
    for y0, y1, x0, x1 in blocks:
        val_map[y0:y1, x0:x1] = cmap[y0:y1, x0:x1]
        train_map[y0:y1, x0:x1] = UNLABELLED
    centre = centre_target(label(cmap == OSTEOCLAST)).astype(np.float32)
    points = {}
    for c in np.unique(train_map):
        if c != UNLABELLED:
            pts = np.argwhere(train_map == c)
            if len(pts) > 20_000:
                pts = pts[rng.choice(len(pts), 20_000, replace=False)]
            points[int(c)] = pts
    return _Field(fld.name, image, train_map, val_map, centre, points, blocks)


def _labelled_crop(
    fld: _Field, crop_px: int, rng: np.random.Generator, osteoclast_share: float = 0.0
):
    """One augmented crop centred near a training pixel of a class drawn uniformly (of an
    osteoclast ``osteoclast_share`` of the time): image (3, c, c) float32, classes (c, c)
    uint8, centre (c, c), centre known (bool)."""
    from histo.classes import OSTEOCLAST
    from histo.train import augment

    c = crop_px
    img, cm, ce = fld.image, fld.train_map, fld.centre
    h, w = cm.shape
    if h < c or w < c:
        pad = ((0, max(0, c - h)), (0, max(0, c - w)))
        img = np.pad(img, (*pad, (0, 0)), mode="reflect")
        cm = np.pad(cm, pad, constant_values=UNLABELLED)
        ce = np.pad(ce, pad)
        h, w = cm.shape
    classes = sorted(fld.points)
    chosen = classes[int(rng.integers(len(classes)))]
    if OSTEOCLAST in fld.points and rng.random() < osteoclast_share:
        chosen = OSTEOCLAST
    pts = fld.points[chosen]
    cy, cx = pts[int(rng.integers(len(pts)))]
    y0 = int(np.clip(cy - c // 2 + rng.integers(-c // 4, c // 4 + 1), 0, h - c))
    x0 = int(np.clip(cx - c // 2 + rng.integers(-c // 4, c // 4 + 1), 0, w - c))
    crops = [a[y0 : y0 + c, x0 : x0 + c] for a in (img, cm, ce)]
    k, flip = int(rng.integers(4)), rng.random() < 0.5
    crops = [np.rot90(a, k) for a in crops]
    if flip:
        crops = [a[:, ::-1] for a in crops]
    image = augment(np.ascontiguousarray(crops[0]), rng).transpose(2, 0, 1)
    classes_crop = np.ascontiguousarray(crops[1])
    known = not bool((classes_crop == UNLABELLED).any())
    return image, classes_crop, np.ascontiguousarray(crops[2]), known


@dataclass
class _ReplayPool:
    """Synthetic sections replayed during fine-tuning (what ``sample_batch`` crops from)."""

    sections: list


def replay_section_ids(train_config, n: int, stratified: bool) -> list[int]:
    """Ids of the ``n`` training-generator sections replayed (:func:`histo.train.section_spec`):
    with ``stratified``, every counterstain and phenotype pair before any pair repeats (a stain
    never replayed is the first to be forgotten); else the first ``n`` ids."""
    from histo.train import COUNTERSTAINS, PHENOTYPES, section_spec

    if not stratified:
        return list(range(n))
    ids, seen, pairs = [], set(), len(COUNTERSTAINS) * len(PHENOTYPES)
    for sid in range(64 * max(1, n)):
        if len(ids) == n:
            break
        spec = section_spec(train_config, sid)
        pair = (spec["phenotype"], spec["counterstain"])
        if pair not in seen:
            ids.append(sid)
            seen.add(pair)
            if len(seen) == pairs:  # every pair held: the next ones may repeat
                seen.clear()
    return ids


def _replay_pool(train_config, config: FinetuneConfig) -> _ReplayPool:
    """The synthetic sections replayed, at the working resolution."""
    from histo.train import make_pool_section

    ids = replay_section_ids(train_config, config.replay_sections, config.stratified_replay)
    return _ReplayPool([make_pool_section(train_config, sid) for sid in ids])


class _Batches:
    """Training batches: labelled crops plus replayed synthetic crops, a pure function of
    (seed, step)."""

    def __init__(self, fields: list[_Field], config: FinetuneConfig, n_classes: int) -> None:
        from histo.train import TrainConfig

        self.fields, self.config = fields, config
        self.n_replay = int(round(config.batch_size * config.replay_share))
        weights = [1.0, 1.0, 1.0, 4.0, 4.0, 1.0, 1.0][:n_classes]
        self.train_config = TrainConfig(
            seed=config.seed, batch_size=max(1, self.n_replay), crop_px=config.crop_px,
            pool_size=max(1, config.replay_sections), refresh_every=1 << 30,
            field_px=config.replay_field_px, max_source_px=2 * config.replay_field_px,
            n_classes=n_classes, class_weights=weights,
            surface_crop_fraction=config.replay_surface_crops,
        )  # fmt: skip
        self.pool = _replay_pool(self.train_config, config) if self.n_replay else None

    def batch(self, step: int):
        """Images (N, 3, c, c), classes (N, c, c) long, centre (N, c, c), centre known
        (N, 1, 1)."""
        import torch

        from histo.train import sample_batch

        rng = np.random.default_rng([self.config.seed, step, 29])
        n_lab = self.config.batch_size - self.n_replay
        crops = [
            _labelled_crop(
                self.fields[int(rng.integers(len(self.fields)))],
                self.config.crop_px,
                rng,
                self.config.osteoclast_crops,
            )  # fmt: skip
            for _ in range(n_lab)
        ]
        x = torch.from_numpy(np.stack([c[0] for c in crops]))
        y = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.int64))
        z = torch.from_numpy(np.stack([c[2] for c in crops]).astype(np.float32))
        known = torch.tensor([c[3] for c in crops], dtype=torch.float32)
        if self.pool is not None:
            rx, ry, rz = sample_batch(self.pool, self.train_config, step)
            x, y, z = torch.cat([x, rx]), torch.cat([y, ry]), torch.cat([z, rz])
            known = torch.cat([known, torch.ones(len(rx))])
        return x, y, z, known[:, None, None]


# --------------------------------------------------------------------------- validation


@dataclass
class _Window:
    """A held-out block with context around it, ready for the network."""

    image: object  #: (1, 3, H, W) float tensor, padded to multiples of 16
    labels: np.ndarray  #: (h, w) uint8 labels of the block (UNLABELLED where none)
    block: tuple[slice, slice]  #: where the block lies in the window


def _window(image: np.ndarray, labels: np.ndarray, box, margin: int) -> _Window:
    import torch

    from histo.segment import _pad16

    y0, y1, x0, x1 = box
    h, w = image.shape[:2]
    wy0, wy1, wx0, wx1 = (
        max(0, y0 - margin),
        min(h, y1 + margin),
        max(0, x0 - margin),
        min(w, x1 + margin),
    )
    padded, _, _ = _pad16(image[wy0:wy1, wx0:wx1])
    x = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].float() / 255.0
    block = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
    return _Window(x, np.ascontiguousarray(labels[y0:y1, x0:x1]), block)


def _validation_windows(fields: list[_Field], config: FinetuneConfig) -> list[_Window]:
    """Up to ``val_max_blocks`` held-out blocks (seeded choice), with 32 px of context."""
    boxes = [(k, b) for k, f in enumerate(fields) for b in f.val_blocks]
    rng = np.random.default_rng([config.seed, 37])
    keep = sorted(rng.permutation(len(boxes))[: config.val_max_blocks])
    return [
        _window(fields[k].image, fields[k].val_map, box, 32) for k, box in (boxes[i] for i in keep)
    ]


def _synthetic_windows(config: FinetuneConfig, working_px: float) -> list[_Window]:
    """Held-out synthetic sections (full truth, codes 0-4): what forgetting is measured on."""
    from histo.synth import make_section
    from histo.train import COUNTERSTAINS, PHENOTYPES

    windows = []
    for i in range(config.forgetting_sections):
        sec = make_section(
            PHENOTYPES[i % 3], size=384, pixel_size_um=working_px,
            seed=FORGETTING_SEED_BASE + i, counterstain=COUNTERSTAINS[(i // 3 + i) % 3],
        )  # fmt: skip
        box = (0, sec.class_map.shape[0], 0, sec.class_map.shape[1])
        windows.append(_window(sec.image, sec.class_map, box, 0))
    return windows


def dice_scores(net, windows: Sequence[_Window], n_classes: int, device=None) -> dict[str, float]:
    """Dice per class (pooled over the windows, labelled pixels only) of ``net``'s argmax.

    Only classes present in the labels are scored. The network is left in eval mode.
    """
    import torch

    inter, sizes, truth = (np.zeros(n_classes) for _ in range(3))
    net.eval()
    with torch.inference_mode():
        for w in windows:
            x = w.image if device is None else w.image.to(device)
            pred = net(x)[0, :n_classes].argmax(0).cpu().numpy()[w.block]
            lab = w.labels
            known = lab != UNLABELLED
            for c in range(n_classes):
                p, t = (pred == c) & known, lab == c
                inter[c] += (p & t).sum()
                sizes[c] += p.sum() + t.sum()
                truth[c] += t.sum()
    return {ALL_NAMES[c]: float(2 * inter[c] / sizes[c]) for c in range(n_classes) if truth[c] > 0}


def _mean(scores: dict[str, float]) -> float:
    return float(np.mean(list(scores.values()))) if scores else float("nan")


# --------------------------------------------------------------------------- training


def _frozen_modules(net, trainable: str) -> list:
    """Modules kept as they are (weights and batch-norm statistics) for ``trainable``."""
    if trainable == "all":
        return []
    if trainable == "decoder":
        return [net.stem, net.down]
    return [net.stem, net.down, net.up]


def _set_train_mode(net, config: FinetuneConfig) -> None:
    """Training mode, except frozen modules and (``freeze_norm_stats``) every batch norm."""
    from torch import nn

    net.train()
    for m in _frozen_modules(net, config.trainable):
        m.eval()
    if config.freeze_norm_stats:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


@dataclass
class _Run:
    """What a fine-tuning run carries from step to step."""

    net: object
    optimizer: object
    config: FinetuneConfig
    batches: _Batches
    windows: list[_Window]
    n_classes: int
    device: object
    t0: float
    budget_s: float
    teacher: object = None  #: the base network, frozen, when replayed crops are distilled
    step: int = 0
    loss: float = float("nan")
    val: dict[str, float] = field(default_factory=dict)
    best_val: dict[str, float] = field(default_factory=dict)
    best_score: float = -1.0
    best_step: int = 0
    best_state: dict = field(default_factory=dict)
    step_s: float = 0.0  #: running estimate of one step's wall time
    reserve_s: float = 0.0  #: time kept for the last validation, scoring and saving

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fraction(self) -> float:
        """How far through the run (steps or budget), 0-1: drives the learning rate."""
        if self.config.max_steps:
            return self.step / self.config.max_steps
        return min(1.0, self.elapsed() / self.budget_s)

    def out_of_time(self) -> bool:
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            return True
        return self.elapsed() + self.step_s + self.reserve_s > self.budget_s

    def validate(self) -> bool:
        """Score the held-out blocks; keep the weights when they are the best. True if so."""
        self.val = dice_scores(self.net, self.windows, self.n_classes, self.device)
        _set_train_mode(self.net, self.config)
        # no held-out pixels (a single labelled block), or keep_best off: the latest weights
        score = _mean(self.val) if self.windows and self.config.keep_best else float(self.step)
        # a tie goes to the later weights: held-out scribbles, inside their classes, are soon
        # all right (Dice 1), and the weights that got there first have learnt least
        if score >= self.best_score or not self.best_state:
            self.best_score, self.best_step, self.best_val = score, self.step, dict(self.val)
            self.best_state = copy.deepcopy(self.net.state_dict())
            return True
        return False


def _lr_at(config: FinetuneConfig, step: int, fraction: float) -> float:
    """A 5-step warm-up, then cosine decay to a tenth of ``lr`` at the end of the run."""
    warm = min(1.0, (step + 1) / 5)
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, fraction))))


def distillation_loss(student, teacher, n_classes: int, temperature: float = 2.0):
    """Learning without forgetting: KL divergence of the student's class probabilities from
    the teacher's (both softened by ``temperature``, scaled by its square as usual) plus the
    binary cross-entropy of the centre map against the teacher's, per pixel.

    Parameters
    ----------
    student, teacher
        (N, n_classes + 1, H, W) logits: classes, then the centre map.
    """
    import torch.nn.functional as F

    t = temperature
    log_p = F.log_softmax(student[:, :n_classes] / t, 1)
    q = F.softmax(teacher[:, :n_classes] / t, 1)
    kl = F.kl_div(log_p, q, reduction="none").sum(1).mean() * t * t
    centre = F.binary_cross_entropy_with_logits(
        student[:, n_classes], teacher[:, n_classes].sigmoid()
    )
    return kl + centre


def _train_step(run: _Run) -> None:
    import torch

    from histo.train import segmentation_loss

    t = time.perf_counter()
    x, y, z, known = run.batches.batch(run.step)
    if run.device.type != "cpu":
        x, y, z, known = (a.to(run.device) for a in (x, y, z, known))
    for g in run.optimizer.param_groups:
        g["lr"] = _lr_at(run.config, run.step, run.fraction())
    out = run.net(x)
    loss, _ = segmentation_loss(out, y, z, run.batches.train_config, known)
    n_replay = run.batches.n_replay
    if run.teacher is not None and n_replay:
        with torch.no_grad():
            soft = run.teacher(x[-n_replay:])
        loss = loss + run.config.distill_weight * distillation_loss(
            out[-n_replay:], soft, run.n_classes
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.step += 1
    run.loss = float(loss.item())
    dt = time.perf_counter() - t
    run.step_s = dt if run.step == 1 else 0.8 * run.step_s + 0.2 * dt


def _train(run: _Run, progress, cancel) -> bool:
    """Steps until the budget (or ``max_steps``) is spent; True when cancelled (``cancel()``
    or Ctrl-C), the best weights so far kept."""
    config = run.config
    try:
        while not run.out_of_time():
            if cancel is not None and cancel():
                return True
            _train_step(run)
            best = False
            if run.step % config.val_every == 0 or run.out_of_time():
                best = run.validate()
            if progress is not None:
                val = _mean(run.val) if run.val else None
                progress(
                    FinetuneProgress(
                        run.step, config.max_steps, run.loss, val, run.elapsed(), best,
                        None if config.max_steps else run.budget_s,
                    )
                )  # fmt: skip
    except KeyboardInterrupt:
        log.info("interrupted at step %d: keeping the weights of step %d", run.step, run.best_step)
        return True
    return False


# --------------------------------------------------------------------------- writing


def _check_out_dir(out_dir: str | Path) -> Path:
    """The model folder: new, empty, or an earlier model folder (overwritten)."""
    from histo.segment.registry import MODEL_JSON

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MODEL_JSON).is_file():
        raise OutputError(f"{out}: a folder that is not a model folder; choose a new name")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create ({exc.strerror or exc})") from None
    return out


#: time kept back per confidence-reference slide (1024 px at its own pixel size), seconds
QC_REFERENCE_S = 4.0


def _store_qc_reference(out: Path, config: FinetuneConfig) -> None:
    """Measure the fine-tuned model's own in-domain confidence reference and keep it in its
    model.json, so quality control judges its slides against what this model does."""
    from histo.qc._confidence import build_confidence_reference
    from histo.segment import load_model
    from histo.segment.registry import locate_model, write_qc_reference

    if config.qc_reference_slides <= 0:
        return
    model = load_model(str(out), device=config.device)
    reference = build_confidence_reference(model, n_slides=config.qc_reference_slides)
    write_qc_reference(locate_model(str(out)), reference)


def _labelled_pixels(cmap: np.ndarray) -> dict[str, int]:
    counts = np.bincount(cmap.ravel(), minlength=256)
    return {ALL_NAMES[c]: int(counts[c]) for c in range(N_ALL_CLASSES) if counts[c]}


def _model_record(run: _Run, base: _Base, fields, prepared, wall_s: float, extra: dict) -> dict:
    """``model.json`` beyond what the registry reads (architecture, config, sha256)."""
    from histo import __version__

    data = [
        {
            "name": f.name, "slide": f.source, "class_map": f.class_map_source,
            "sha256": f.sha256, "files": f.files, "pixel_size_um": float(f.pixel_size_um),
            "labelled_px": _labelled_pixels(np.asarray(f.class_map)),
            "held_out_px": _labelled_pixels(p.val_map),
        }
        for f, p in zip(fields, prepared, strict=True)
    ]  # fmt: skip
    totals: dict[str, int] = {}
    for d in data:
        for k, v in d["labelled_px"].items():
            totals[k] = totals.get(k, 0) + v
    return {
        "kind": "finetune",
        "histo_version": __version__,
        "base": {"name": base.name, "sha256": base.sha256, "classes": base.base_classes},
        "classes": run.n_classes,
        "data": data,
        "labelled_px": totals,
        "steps": run.step,
        "best_step": run.best_step,
        "wall_time_s": round(wall_s, 1),
        "validation": {"dice": run.best_val, "mean_dice": _mean(run.best_val), **extra},
        "finetune_config": asdict(run.config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _save(out: Path, run: _Run, base: _Base, record: dict, fields) -> str:
    """Write ``model.safetensors`` and ``model.json`` (each atomically); return the sha256."""
    from histo.io.atomic import write_text_atomic
    from histo.segment.network import HistoUNet
    from histo.segment.registry import MODEL_FILE, MODEL_JSON
    from histo.train import save_weights

    net = HistoUNet(run.net.config)
    net.load_state_dict(run.best_state)
    net.eval()
    meta = {
        "architecture": "HistoUNet",
        "config": net.config.to_dict(),
        "working_pixel_size_um": base.working_pixel_size_um,
    }
    sha = save_weights(net, out / MODEL_FILE, meta)
    full = {**meta, "sha256": sha, **record}
    write_text_atomic(out / MODEL_JSON, json.dumps(full, indent=1) + "\n")
    return sha


# --------------------------------------------------------------------------- entry point


def _check_config(config: FinetuneConfig) -> None:
    if config.trainable not in TRAINABLE:
        raise HistoError(f"trainable is {config.trainable!r}; one of {', '.join(TRAINABLE)}")
    if not config.minutes > 0:
        raise HistoError(f"the budget must be positive, got {config.minutes:g} min")
    if not 0 <= config.replay_share < 1:
        raise HistoError(f"replay share {config.replay_share:g} is outside 0-1")
    if not 0 <= config.val_share < 1:
        raise HistoError(f"validation share {config.val_share:g} is outside 0-1")


def _start(fields, config: FinetuneConfig, t0: float) -> tuple[_Base, list[_Field], _Run]:
    """The base network, the prepared fields and the run, before its first step."""
    import torch

    from histo.device import resolve_device

    codes = set()
    for f in fields:
        codes |= {int(c) for c in np.unique(f.class_map)} - {UNLABELLED}
    base = _load_base(config, codes)
    prepared = [_prepare(f, base.working_pixel_size_um, config, k) for k, f in enumerate(fields)]
    if not any(p.points for p in prepared):
        raise ClassMapError("nothing labelled to train on")
    device = resolve_device(config.device)
    net = base.net.to(device)
    frozen = {id(p) for m in _frozen_modules(net, config.trainable) for p in m.parameters()}
    params = [p for p in net.parameters() if id(p) not in frozen]
    for p in net.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = _Batches(prepared, config, base.n_classes)
    windows = _validation_windows(prepared, config)
    run = _Run(net, opt, config, batches, windows, base.n_classes, device, t0, config.minutes * 60)
    if config.distill_weight > 0 and batches.n_replay:
        run.teacher = copy.deepcopy(net).eval().requires_grad_(False)
    return base, prepared, run


def _score_base(run: _Run, synthetic: list[_Window]) -> tuple[dict, dict]:
    """The base's Dice on the forgetting sections and on the held-out blocks; keeps back the
    time the last scoring, saving and confidence reference will need."""
    t_score = time.perf_counter()
    before = _synthetic_dice(run, synthetic)
    run.validate()
    qc_s = QC_REFERENCE_S * run.config.qc_reference_slides
    run.reserve_s = 2 * (time.perf_counter() - t_score) + 2.0 + qc_s
    return before, dict(run.val)


def _check_trained(run: _Run, config: FinetuneConfig, cancelled: bool) -> None:
    """Raise if the budget was spent before the first training step of a run not cancelled."""
    if run.step == 0 and not cancelled:
        raise HistoError(
            f"the budget of {config.minutes:g} min was spent before the first training step "
            f"({run.elapsed():.0f} s preparing the fields and scoring the base): give more minutes"
        )


def _synthetic_dice(run: _Run, synthetic: list[_Window]) -> dict:
    """Dice per class of the run's network on the synthetic windows (how much it forgot)."""
    return dice_scores(run.net, synthetic, min(run.n_classes, N_CLASSES), run.device)


def finetune(
    fields: Sequence[LabelledField],
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),  # noqa: B008 - a frozen-in-practice default
    progress: Callable[[FinetuneProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune the network on labelled fields and write a model folder.

    Parameters
    ----------
    fields
        Labelled fields (:func:`load_labelled`, or arrays from the napari plugin).
    out_dir
        The model folder: ``model.safetensors`` and ``model.json`` (base model and its sha256,
        data files and their sha256, labelled pixels per class, steps, wall time, validation
        Dice, forgetting, histo version, the weights' sha256). New, empty or a model folder.
    config
        Base model, budget (minutes of wall time, everything included), seed, what is trained.
    progress
        Called after every step with a :class:`FinetuneProgress`.
    cancel
        Polled before every step; True stops the run. The best weights so far are written
        (as on Ctrl-C) and the result says ``cancelled``.

    Raises
    ------
    HistoError
        Bad fields (sizes, codes, nothing labelled), a bad config; ``OutputError`` for an
        unusable ``out_dir``; ``ModelError`` for a missing or tampered base.
    """
    t0 = time.perf_counter()
    _check_config(config)
    if not fields:
        raise HistoError("no labelled fields to fine-tune on")
    out = _check_out_dir(out_dir)
    base, prepared, run = _start(fields, config, t0)
    synthetic = _synthetic_windows(config, base.working_pixel_size_um)
    before, base_val = _score_base(run, synthetic)
    log.info("base %s: validation Dice %s", base.name, base_val)
    cancelled = _train(run, progress, cancel)
    _check_trained(run, config, cancelled)
    run.net.load_state_dict(run.best_state)
    after = {} if cancelled else _synthetic_dice(run, synthetic)
    forgetting = {"synthetic_dice_before": before, "synthetic_dice_after": after}
    extra = {"base_dice": base_val, "forgetting": forgetting}
    record = _model_record(run, base, fields, prepared, run.elapsed(), extra)
    sha = _save(out, run, base, record, fields)
    _store_qc_reference(out, config)
    wall = run.elapsed()
    log.info("wrote %s (sha256 %s): %d steps, best %d, %.0f s", out, sha[:12], run.step,
             run.best_step, wall)  # fmt: skip
    return FinetuneResult(
        out, sha, run.step, wall, dict(run.best_val), cancelled, run.best_step, base_val,
        {"before": before, "after": after},
    )  # fmt: skip
