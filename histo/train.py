"""Training of the segmentation network on synthetic sections generated on the fly.

Data: a pool of synthetic sections (:func:`histo.synth.make_section`), each rendered at a
random *source* pixel size in 0.25-2 µm/px (log-uniform), JPEG-compressed at that resolution
like a scanner would, then resampled to the working resolution (1.0 µm/px) the way slides are at
inference. Phenotypes and counterstains (hematoxylin, fast green, methyl green) are drawn
uniformly. The pool is refreshed gradually (one section replaced every ``refresh_every`` steps)
and random crops are augmented: flips, rot90s, optical-density stain-vector and stain-strength
jitter, HSV/brightness/contrast jitter, Gaussian blur and noise.

Reproducibility: everything random is a pure function of ``(seed, step)`` (section seeds, crop
positions, augmentations) or of ``seed`` (network initialisation), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.

Seeds: the synthetic sections of a training run with seed ``s`` use generator seeds
``100_000 + 10_000 * s + i`` (i < 10_000), i.e. the range 100 000-199 999 for s < 10.
Evaluation (:mod:`histo.evaluate`) uses 900 000 and above, never seen in training.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from histo.classes import (
    BONE,
    CARTILAGE,
    MARROW,
    N_ALL_CLASSES,
    N_CLASSES,
    OSTEOCLAST,
    OSTEOCYTE,
    SOFT_TISSUE,
    UNLABELLED,
)
from histo.errors import HistoError
from histo.segment.instances import centre_target
from histo.segment.network import HistoUNet, NetworkConfig, count_parameters

log = logging.getLogger("histo.train")

PHENOTYPES = ("normal", "oc-rich", "oc-poor")
COUNTERSTAINS = ("hematoxylin", "fast-green", "methyl-green")

#: first synthetic seed of training run ``s`` is TRAIN_SEED_BASE + TRAIN_SEED_STRIDE * s
TRAIN_SEED_BASE = 100_000
TRAIN_SEED_STRIDE = 10_000
#: first long-bone seed of training run ``s`` is LONG_BONE_SEED_BASE + TRAIN_SEED_STRIDE * s
LONG_BONE_SEED_BASE = 300_000


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (saved in the checkpoint and the model card)."""

    seed: int = 0
    steps: int = 900
    batch_size: int = 8
    crop_px: int = 192
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pool_size: int = 24
    refresh_every: int = 6
    field_px: int = 768  #: size of a pool section at the working resolution
    max_source_px: int = 1536  #: largest rendered section (limits 0.25 µm/px sections)
    working_pixel_size_um: float = 1.0
    min_source_pixel_size_um: float = 0.25
    max_source_pixel_size_um: float = 2.0
    class_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 4.0, 4.0])
    dice_weight: float = 1.0
    centre_weight: float = 1.0
    checkpoint_every: int = 100
    threads: int = 2
    widths: list[int] = field(default_factory=lambda: NetworkConfig().widths)
    init_weights: str | None = None  #: start from these weights (.safetensors): fine-tuning
    #: share of crops centred on the bone surface (marrow touching bone), where osteoclasts sit
    #: and where clusters of marrow cells are mistaken for them (hard negatives on oc-poor bone)
    surface_crop_fraction: float = 0.0
    #: classes the network learns: 5 (codes 0-4, field sections) or 7 (with cartilage and soft
    #: tissue outside bone, codes 5 and 6, learnt from long-bone sections)
    n_classes: int = N_CLASSES
    #: share of the crops taken from long-bone sections (needs ``n_classes`` 7)
    long_bone_fraction: float = 0.0
    long_bone_pool_size: int = 4  #: long-bone sections held
    long_bone_refresh_every: int = 40  #: steps per replaced long-bone section
    #: largest extent of a long-bone pool section (µm, along and across the bone); a section is
    #: drawn smaller when its source pixel size would need more than ``long_bone_max_source_px``
    long_bone_um: list[float] = field(default_factory=lambda: [3000.0, 2000.0])
    long_bone_max_source_px: int = 3000
    #: finest source pixel size of a long-bone pool section (µm/px; 0: as fine as the range
    #: and ``long_bone_max_source_px`` allow)
    long_bone_min_source_px_um: float = 0.0


# --------------------------------------------------------------------------- data


@dataclass
class PoolSection:
    """One pool section at the working resolution, ready for cropping."""

    image: np.ndarray  #: (H, W, 3) uint8
    class_map: np.ndarray  #: (H, W) uint8
    centre: np.ndarray  #: (H, W) float16 centre-map target
    meta: dict


def section_spec(config: TrainConfig, section_id: int) -> dict:
    """Generator parameters of pool section ``section_id`` (pure function of seed and id)."""
    rng = np.random.default_rng([config.seed, section_id, 7])
    lo, hi = math.log(config.min_source_pixel_size_um), math.log(config.max_source_pixel_size_um)
    source_px = float(math.exp(rng.uniform(lo, hi)))
    return {
        "phenotype": PHENOTYPES[int(rng.integers(len(PHENOTYPES)))],
        "counterstain": COUNTERSTAINS[int(rng.integers(len(COUNTERSTAINS)))],
        "source_pixel_size_um": source_px,
        "synth_seed": TRAIN_SEED_BASE + TRAIN_SEED_STRIDE * config.seed + section_id,
        "jpeg_quality": int(rng.integers(55, 100)) if rng.random() < 0.7 else None,
    }


#: smallest long-bone section the generator draws (µm): growth plate, spongiosa and cortices
LONG_BONE_MIN_UM = (1500.0, 1000.0)


def _px_at_least(extent_um: float, pixel_size_um: float) -> int:
    """``extent_um`` in pixels, rounded, but never below the extent (the generator's minimum)."""
    n = round(extent_um / pixel_size_um)
    return n if n * pixel_size_um >= extent_um else n + 1


def long_bone_spec(config: TrainConfig, section_id: int) -> dict:
    """Generator parameters of long-bone pool section ``section_id`` (pure function of seed, id).

    The source pixel size is log-uniform in the training range, but no finer than the size at
    which the smallest section (1.5 mm x 1 mm) fits ``long_bone_max_source_px`` (0.5 µm/px at
    3000 px): the finer textures are learnt from the field sections.
    """
    rng = np.random.default_rng([config.seed, section_id, 13])
    finest = max(
        config.min_source_pixel_size_um,
        LONG_BONE_MIN_UM[0] / config.long_bone_max_source_px,
        config.long_bone_min_source_px_um,
    )
    lo, hi = math.log(finest), math.log(max(finest, config.max_source_pixel_size_um))
    source_px = float(math.exp(rng.uniform(lo, hi)))
    long_um = min(config.long_bone_um[0], config.long_bone_max_source_px * source_px)
    long_um = float(rng.uniform(LONG_BONE_MIN_UM[0], max(LONG_BONE_MIN_UM[0], long_um)))
    across_um = max(LONG_BONE_MIN_UM[1], long_um * config.long_bone_um[1] / config.long_bone_um[0])
    return {
        "phenotype": PHENOTYPES[int(rng.integers(len(PHENOTYPES)))],
        "counterstain": COUNTERSTAINS[int(rng.integers(len(COUNTERSTAINS)))],
        "source_pixel_size_um": source_px,
        "shape": [_px_at_least(long_um, source_px), _px_at_least(across_um, source_px)],
        "synth_seed": LONG_BONE_SEED_BASE + TRAIN_SEED_STRIDE * config.seed + section_id,
        "jpeg_quality": int(rng.integers(55, 100)) if rng.random() < 0.7 else None,
        "anatomy": "long-bone",
    }


def resample(image: np.ndarray, scale: float, labels: bool = False) -> np.ndarray:
    """Resample by ``scale`` (output/input size) as slide reading does: area when shrinking,
    linear when enlarging; nearest for labels."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if labels:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def make_pool_section(config: TrainConfig, section_id: int, long_bone: bool = False) -> PoolSection:
    """Render one synthetic section (a field, or a long-bone section) and bring it to the
    working resolution."""
    from histo.synth import make_section

    spec = long_bone_spec(config, section_id) if long_bone else section_spec(config, section_id)
    p = spec["source_pixel_size_um"]
    scale = p / config.working_pixel_size_um  # source px -> working px
    if long_bone:
        size, anatomy = tuple(spec["shape"]), "long-bone"
    else:
        size, anatomy = int(min(config.max_source_px, round(config.field_px / scale))), "field"
    sec = make_section(
        spec["phenotype"],
        size=size,
        pixel_size_um=p,
        seed=spec["synth_seed"],
        counterstain=spec["counterstain"],
        anatomy=anatomy,
    )
    image = sec.image
    if spec["jpeg_quality"]:
        ok, buf = cv2.imencode(
            ".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, spec["jpeg_quality"]]
        )
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    centre = centre_target(sec.osteoclast_labels)
    if abs(scale - 1) > 1e-6:
        image = resample(np.ascontiguousarray(image), scale)
        class_map = resample(sec.class_map, scale, labels=True)
        labels = resample(sec.osteoclast_labels.astype(np.float32), scale, labels=True).astype(
            np.int32
        )
        centre = centre_target(labels)
    else:
        class_map = sec.class_map
    return PoolSection(np.ascontiguousarray(image), class_map, centre.astype(np.float16), spec)


class SectionPool:
    """A pool of sections replaced gradually; its content is a pure function of the step.

    With ``long_bone`` the pool holds ``long_bone_pool_size`` long-bone sections, one replaced
    every ``long_bone_refresh_every`` steps.
    """

    def __init__(
        self,
        config: TrainConfig,
        step: int = 0,
        progress: Callable | None = None,
        long_bone: bool = False,
    ):
        self.config = config
        self.long_bone = long_bone
        if long_bone:
            self.size, self.refresh = config.long_bone_pool_size, config.long_bone_refresh_every
        else:
            self.size, self.refresh = config.pool_size, config.refresh_every
        self.ids = [self.slot_id(j, step) for j in range(self.size)]
        self.sections: list[PoolSection] = []
        for j, sid in enumerate(self.ids):
            self.sections.append(make_pool_section(config, sid, long_bone))
            if progress:
                progress(j + 1, self.size)

    def slot_id(self, slot: int, step: int) -> int:
        """Section id held by ``slot`` at ``step``."""
        p, r = self.size, self.refresh
        n = step // r  # replacements done so far; replacement k (1-based) fills slot (k-1) % p
        if n <= slot:
            return slot
        last_k = slot + 1 + ((n - slot - 1) // p) * p
        return p + last_k - 1

    def advance(self, step: int) -> None:
        """Bring the pool to the state of ``step`` (replaces at most a few sections)."""
        for j in range(self.size):
            sid = self.slot_id(j, step)
            if sid != self.ids[j]:
                self.sections[j] = make_pool_section(self.config, sid, self.long_bone)
                self.ids[j] = sid


def _stain_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Optical-density mixing: perturbs stain vectors and strengths (Beer-Lambert space)."""
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    mix = np.eye(3, dtype=np.float32) + rng.normal(0, 0.06, (3, 3)).astype(np.float32)
    mix *= rng.uniform(0.75, 1.3)  # overall stain strength
    mix = mix * rng.uniform(0.85, 1.15, (1, 3)).astype(np.float32)
    od = od @ mix
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation of one uint8 RGB crop; returns float32 in [0, 1]."""
    x = image
    if rng.random() < 0.8:
        x = _stain_jitter(x, rng)
    x = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < 0.8:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-6, 6)) % 180
        hsv[..., 1] *= rng.uniform(0.75, 1.25)
        hsv[..., 2] *= rng.uniform(0.85, 1.15)
        x = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    y = x.astype(np.float32) / 255.0
    if rng.random() < 0.5:
        c = rng.uniform(0.8, 1.2)
        y = (y - y.mean()) * c + y.mean() + rng.uniform(-0.06, 0.06)
    if rng.random() < 0.3:
        y = cv2.GaussianBlur(y, (0, 0), rng.uniform(0.4, 1.2))
    if rng.random() < 0.5:
        y = y + rng.normal(0, rng.uniform(0.005, 0.03), y.shape).astype(np.float32)
    return np.clip(y, 0, 1).astype(np.float32)


def bone_surface_points(class_map: np.ndarray, step: int = 4) -> np.ndarray:
    """(n, 2) row/column points on a ``step``-px grid where marrow meets bone."""
    g = class_map[::step, ::step]
    marrow, bone = g == MARROW, g == BONE
    hit = np.zeros(g.shape, bool)
    hit[:, :-1] |= marrow[:, :-1] & bone[:, 1:]
    hit[:, 1:] |= marrow[:, 1:] & bone[:, :-1]
    hit[:-1] |= marrow[:-1] & bone[1:]
    hit[1:] |= marrow[1:] & bone[:-1]
    return np.argwhere(hit) * step


#: shares of long-bone crops centred on cartilage (a few percent of a section's area) and on
#: soft tissue outside bone (muscle and periosteum, which the field sections never show)
LONG_BONE_TISSUE_CROPS = {CARTILAGE: 0.3, SOFT_TISSUE: 0.2}


def _long_bone_tissue(rng: np.random.Generator) -> int | None:
    """The tissue a long-bone crop is centred on (``LONG_BONE_TISSUE_CROPS``), or None."""
    u = rng.random()
    for code, share in LONG_BONE_TISSUE_CROPS.items():
        if u < share:
            return code
        u -= share
    return None


def _pick_centre(
    cm: np.ndarray, config: TrainConfig, rng: np.random.Generator, long_bone: bool
) -> tuple[int, int] | None:
    """Where to centre a crop: on an osteoclast or lacuna half of the time; on the bone surface
    ``surface_crop_fraction`` of the time; else None. On a long-bone section
    ``LONG_BONE_TISSUE_CROPS`` of the crops are first centred on cartilage (growth plate,
    calcified cores: where lacunae must not become osteocytes) or soft tissue."""
    w = cm.shape[1]
    if long_bone:
        tissue = _long_bone_tissue(rng)
        if tissue is not None:
            hits = np.flatnonzero(cm.ravel()[::97] == tissue)
            if hits.size:
                return divmod(int(hits[int(rng.integers(hits.size))]) * 97, w)
    u = rng.random()
    if u < 0.5:
        rare = np.flatnonzero(np.isin(cm.ravel()[::97], (OSTEOCLAST, OSTEOCYTE)))
        if rare.size:
            return divmod(int(rare[int(rng.integers(rare.size))]) * 97, w)
    elif u < 0.5 + config.surface_crop_fraction:
        surface = bone_surface_points(cm)
        if len(surface):
            return tuple(surface[int(rng.integers(len(surface)))])
    return None


def _crop(
    sec: PoolSection, config: TrainConfig, rng: np.random.Generator, long_bone: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented crop of a pool section: image (3, c, c), classes (c, c), centre (c, c)."""
    c = config.crop_px
    h, w = sec.class_map.shape
    if h < c or w < c:  # pad small sections with glass-like white / background
        ph, pw = max(0, c - h), max(0, c - w)
        img = np.pad(sec.image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        cm = np.pad(sec.class_map, ((0, ph), (0, pw)), mode="reflect")
        ce = np.pad(sec.centre, ((0, ph), (0, pw)), mode="reflect")
        h, w = cm.shape
    else:
        img, cm, ce = sec.image, sec.class_map, sec.centre
    y0, x0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    centre = _pick_centre(cm, config, rng, long_bone)
    if centre is not None:
        cy, cx = centre
        y0 = int(np.clip(cy - c // 2 + rng.integers(-c // 4, c // 4 + 1), 0, h - c))
        x0 = int(np.clip(cx - c // 2 + rng.integers(-c // 4, c // 4 + 1), 0, w - c))
    crop = img[y0 : y0 + c, x0 : x0 + c]
    cmc = cm[y0 : y0 + c, x0 : x0 + c]
    cec = ce[y0 : y0 + c, x0 : x0 + c].astype(np.float32)
    k = int(rng.integers(4))
    flip = rng.random() < 0.5
    crop, cmc, cec = (np.rot90(a, k) for a in (crop, cmc, cec))
    if flip:
        crop, cmc, cec = crop[:, ::-1], cmc[:, ::-1], cec[:, ::-1]
    image = augment(np.ascontiguousarray(crop), rng).transpose(2, 0, 1)
    return image, np.ascontiguousarray(cmc), np.ascontiguousarray(cec)


def sample_batch(
    pool: SectionPool,
    config: TrainConfig,
    step: int,
    long_bone_pool: SectionPool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random augmented crops: images (N,3,h,w) float, classes (N,h,w) long, centre (N,h,w).

    With ``long_bone_pool`` each crop comes from it with probability ``long_bone_fraction``.
    """
    rng = np.random.default_rng([config.seed, step, 11])
    xs, ys, zs = [], [], []
    for _ in range(config.batch_size):
        long_bone = long_bone_pool is not None and rng.random() < config.long_bone_fraction
        source = long_bone_pool if long_bone else pool
        sec = source.sections[int(rng.integers(len(source.sections)))]
        x, y, z = _crop(sec, config, rng, long_bone)
        xs.append(x)
        ys.append(y)
        zs.append(z)
    return (
        torch.from_numpy(np.stack(xs)),
        torch.from_numpy(np.stack(ys).astype(np.int64)),
        torch.from_numpy(np.stack(zs)),
    )


# --------------------------------------------------------------------------- loss


def segmentation_loss(
    out: torch.Tensor,
    classes: torch.Tensor,
    centre: torch.Tensor,
    config: TrainConfig,
    centre_known: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy + soft Dice over the classes present + centre-map BCE.

    The centre map is weighted 5x inside osteoclasts, where the split of touching cells is
    decided. Pixels of class ``UNLABELLED`` (255: corrections and scribbles) add nothing to any
    term; ``centre_known`` (broadcast to ``centre``, 1 or 0) leaves out the centre map where no
    instance truth exists (scribbles). Without either, the loss is that of a fully labelled batch.
    """
    n = config.n_classes
    logits = out[:, :n]
    labelled = classes != UNLABELLED
    known = classes.where(labelled, 0)
    weights = torch.tensor(config.class_weights, dtype=out.dtype, device=out.device)
    if bool(labelled.any()):
        ce = F.cross_entropy(logits, classes, weight=weights, ignore_index=UNLABELLED)
    else:
        ce = logits.sum() * 0.0
    mask = labelled.unsqueeze(1).to(out.dtype)
    probs = logits.softmax(1) * mask
    onehot = F.one_hot(known, n).permute(0, 3, 1, 2).to(out.dtype) * mask
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = 1 - (2 * inter + 1.0) / (denom + 1.0)
    # classes absent from the batch are left out: their Dice term would only push their
    # probabilities down (on field crops, cartilage and soft tissue never appear)
    present = onehot.sum((0, 2, 3)) > 0
    dice = dice[present].mean() if bool(present.any()) else logits.sum() * 0.0
    pix_w = (1.0 + 4.0 * (classes == OSTEOCLAST).to(out.dtype)) * labelled.to(out.dtype)
    if centre_known is not None:
        pix_w = pix_w * centre_known.to(out.dtype)
    bce = F.binary_cross_entropy_with_logits(out[:, n], centre, weight=pix_w)
    loss = ce + config.dice_weight * dice + config.centre_weight * bce
    return loss, {"ce": ce.item(), "dice": dice.item(), "centre": bce.item()}


# --------------------------------------------------------------------------- loop


def _lr_at(step: int, config: TrainConfig) -> float:
    warm = max(1, min(100, config.steps // 20))
    if step < warm:
        return config.lr * (step + 1) / warm
    t = (step - warm) / max(1, config.steps - warm)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def network_config(config: TrainConfig) -> NetworkConfig:
    """The architecture a run trains: its widths, ``n_classes`` class logits + the centre map."""
    return NetworkConfig(widths=list(config.widths), n_outputs=config.n_classes + 1)


#: logits a grown class channel starts below its parent (2 left cartilage unlearnt in 400 steps)
GROWN_BIAS_OFFSET = 0.5


def grow_head(state: dict[str, torch.Tensor], n_classes: int) -> dict[str, torch.Tensor]:
    """Weights of a network with ``n_classes`` classes from those of one with fewer.

    The old class channels and the centre channel keep their weights (moved to their new
    places: the centre map is always the last output). A new cartilage channel starts from
    bone's weights and a new soft-tissue channel from marrow's (the tissues they were taken for),
    each with its bias lowered by ``GROWN_BIAS_OFFSET`` so the old classes still win at step 0
    but the new ones are a small step away.
    Everything but the head is returned as is.
    """
    w, b = state["head.weight"], state["head.bias"]
    old = w.shape[0] - 1
    if old == n_classes:
        return state
    if old > n_classes:
        raise HistoError(f"cannot shrink a {old}-class network to {n_classes} classes")
    like = {CARTILAGE: BONE, SOFT_TISSUE: MARROW}
    rows = list(range(old)) + [like.get(c, MARROW) for c in range(old, n_classes)] + [old]
    new_w, new_b = w[rows].clone(), b[rows].clone()
    new_b[old:n_classes] -= GROWN_BIAS_OFFSET
    return {**state, "head.weight": new_w, "head.bias": new_b}


def _check_config(config: TrainConfig) -> None:
    if not 0.0 <= config.surface_crop_fraction <= 0.5:
        raise HistoError(
            f"surface crop fraction {config.surface_crop_fraction:g} is outside 0-0.5 "
            "(half of the crops are already centred on osteoclasts and lacunae)"
        )
    if config.n_classes not in (N_CLASSES, N_ALL_CLASSES):
        raise HistoError(f"n_classes is {config.n_classes}; 5 (fields) or 7 (long bones)")
    if len(config.class_weights) != config.n_classes:
        raise HistoError(
            f"{len(config.class_weights)} class weights for {config.n_classes} classes"
        )
    if config.long_bone_fraction > 0 and config.n_classes != N_ALL_CLASSES:
        raise HistoError("long-bone crops need 7 classes (cartilage and soft tissue)")


def save_weights(model: HistoUNet, path: Path, meta: dict) -> str:
    """Write the network weights (safetensors, with the config in its metadata); return sha256."""
    import hashlib

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.chmod(0o644)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _MixedPrecision:
    """One optimiser step: float32 on the CPU and MPS, float16 autocast with a gradient scaler
    on CUDA (the loss itself in float32)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda else None

    def step(self, model, opt, x, y, z, config) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.cuda:
            loss, parts = segmentation_loss(model(x), y, z, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss, parts
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        loss, parts = segmentation_loss(out.float(), y, z, config)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()
        return loss, parts


@dataclass
class TrainResult:
    """What a training run produced."""

    weights: Path
    sha256: str
    steps: int
    final_loss: float
    wall_time_s: float
    parameters: int
    history: list[dict]


@dataclass
class _TrainState:
    """What a run carries from step to step, and what its checkpoint holds."""

    config: TrainConfig
    model: Any
    optimizer: Any
    step: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed0: float = 0.0  #: seconds of the run before this process resumed it
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0

    def save_checkpoint(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "config": asdict(self.config),
                "history": self.history,
                "elapsed_s": self.elapsed(),
            },
            tmp,
        )
        tmp.replace(path)


def _start(ckpt_path: Path, config: TrainConfig, resume: bool, dev) -> _TrainState:
    """The network and optimiser: from the checkpoint (``resume``), ``--init`` or scratch."""
    saved = None
    if resume and ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        config = TrainConfig(**saved["config"])
    torch.manual_seed(config.seed)
    model = HistoUNet(network_config(config)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = _TrainState(config, model, opt)
    if saved is None and config.init_weights:
        from safetensors.torch import load_file

        model.load_state_dict(grow_head(load_file(config.init_weights), config.n_classes))
        log.info("initialised from %s", config.init_weights)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state.step = int(saved["step"])
        state.history = list(saved["history"])
        state.elapsed0 = float(saved.get("elapsed_s", 0.0))
        log.info("resumed from %s at step %d", ckpt_path, state.step)
    state.model = model.to(memory_format=torch.channels_last)
    return state


def _pools(config: TrainConfig, step: int, t0: float) -> tuple[SectionPool, SectionPool | None]:
    """The pool of field sections and, when long-bone crops are asked for, of long bones."""

    def ready(kind: str):
        return lambda i, n: log.info(
            "%s %d/%d ready (%.0f s)", kind, i, n, time.perf_counter() - t0
        )

    pool = SectionPool(config, step, progress=ready("pool section"))
    long_bone_pool = None
    if config.long_bone_fraction > 0:
        long_bone_pool = SectionPool(
            config, step, progress=ready("long-bone section"), long_bone=True
        )
    return pool, long_bone_pool


def _log_step(state: _TrainState, loss: float, running: float, parts: dict, progress) -> None:
    """Record and report one logged step (every 10 steps and the last)."""
    config, step = state.config, state.step
    state.history.append(
        {"step": step, "loss": loss, "smoothed": running, **parts, "lr": _lr_at(step - 1, config)}
    )
    msg = (
        f"step {step}/{config.steps} loss {loss:.4f} (smoothed {running:.4f}) "
        f"ce {parts['ce']:.3f} dice {parts['dice']:.3f} centre {parts['centre']:.3f} "
        f"{state.elapsed() / 60:.1f} min"
    )
    log.info(msg)
    if progress:
        progress(step / config.steps, msg)


def _finish(state: _TrainState, out: Path, last_loss: float) -> TrainResult:
    """Write the final weights, history and model.json; the run's result."""
    config, step, wall = state.config, state.step, state.elapsed()
    model = state.model.to("cpu").eval()
    meta = {
        "architecture": "HistoUNet",
        "config": network_config(config).to_dict(),
        "working_pixel_size_um": config.working_pixel_size_um,
        "train_config": asdict(config),
        "steps": step,
        "wall_time_s": round(wall, 1),
    }
    weights = out / "model.safetensors"
    sha = save_weights(model.to(memory_format=torch.contiguous_format), weights, meta)
    (out / "history.json").write_text(json.dumps(state.history, indent=1))
    (out / "model.json").write_text(json.dumps({**meta, "sha256": sha}, indent=1))
    log.info("wrote %s (sha256 %s) after %d steps, %.1f min", weights, sha, step, wall / 60)
    parameters = count_parameters(model)
    return TrainResult(weights, sha, step, last_loss, wall, parameters, state.history)


def train(
    out_dir: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: Callable[[float, str], None] | None = None,
    time_limit_s: float | None = None,
    stop_at_step: int | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train the network, checkpointing to ``out_dir/checkpoint.pt``; write the final weights.

    An interrupted run continues from its last checkpoint with ``resume``.

    Parameters
    ----------
    out_dir
        Output folder: ``checkpoint.pt`` (resumable), ``model.safetensors`` (final weights),
        ``history.json`` (loss per logged step), ``train.log``.
    config
        Hyper-parameters; with ``resume`` the checkpoint's config wins.
    resume
        Continue from ``out_dir/checkpoint.pt`` if present.
    progress
        ``progress(fraction, message)`` called every few steps.
    time_limit_s
        Stop early (checkpoint and final weights still written) after this many seconds.
    stop_at_step
        Stop (with a checkpoint) when this step is reached, as an interrupted run would.
    device
        "auto" (default: CUDA, then MPS, then the CPU), "cpu", "cuda" or "mps"
        (:func:`histo.device.resolve_device`). On CUDA the forward pass runs under float16
        autocast with a gradient scaler; on the CPU and MPS in float32. Checkpoints and
        weights are saved from CPU copies, so a run can resume on another device.

    Notes
    -----
    Torch's thread count is process-wide: the entry point sets it (``histo train`` uses
    ``config.threads``), not this function.
    """
    from histo.device import device_name, resolve_device

    dev = resolve_device(device)
    _check_config(config or TrainConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    state = _start(ckpt_path, config or TrainConfig(), resume, dev)
    config = state.config
    log.info("config %s", json.dumps(asdict(config)))
    log.info("network parameters: %d", count_parameters(state.model))
    log.info("device %s (%s)", dev, device_name(dev))
    last_loss = _run_steps(state, ckpt_path, dev, progress, _StopRule(time_limit_s, stop_at_step))
    state.save_checkpoint(ckpt_path)
    return _finish(state, out, last_loss)


class _StopRule(NamedTuple):
    """When a run stops before its configured steps (None: no such limit)."""

    time_limit_s: float | None
    stop_at_step: int | None

    def reached(self, state: _TrainState) -> bool:
        """Whether the run stops now (logged)."""
        if self.time_limit_s is not None and time.perf_counter() - state.t0 > self.time_limit_s:
            log.info("time limit reached at step %d", state.step)
            return True
        if self.stop_at_step is not None and state.step >= self.stop_at_step:
            log.info("stopping at step %d as asked", state.step)
            return True
        return False


def _run_steps(
    state: _TrainState,
    ckpt_path: Path,
    dev,
    progress: Callable[[float, str], None] | None,
    stop: _StopRule,
) -> float:
    """Train up to the configured steps or an early stop, logging every 10 steps and
    checkpointing every ``checkpoint_every``; returns the last step's loss."""
    config = state.config
    pool, long_bone_pool = _pools(config, state.step, state.t0)
    amp = _MixedPrecision(dev)
    state.model.train()
    running, last_loss = None, float("nan")
    while state.step < config.steps:
        if stop.reached(state):
            break
        last_loss, parts = _train_step(state, pool, long_bone_pool, amp, dev)
        running = last_loss if running is None else 0.95 * running + 0.05 * last_loss
        if state.step % 10 == 0 or state.step == config.steps:
            _log_step(state, last_loss, running, parts, progress)
        if state.step % config.checkpoint_every == 0:
            state.save_checkpoint(ckpt_path)
    return last_loss


def _train_step(state: _TrainState, pool, long_bone_pool, amp, dev) -> tuple[float, dict]:
    """One optimiser step on a fresh batch; advances ``state.step``."""
    config, step = state.config, state.step
    pool.advance(step)
    if long_bone_pool is not None:
        long_bone_pool.advance(step)
    x, y, z = sample_batch(pool, config, step, long_bone_pool)
    if dev.type != "cpu":
        x, y, z = (t.to(dev, non_blocking=True) for t in (x, y, z))
    x = x.to(memory_format=torch.channels_last)
    for g in state.optimizer.param_groups:
        g["lr"] = _lr_at(step, config)
    loss, parts = amp.step(state.model, state.optimizer, x, y, z, config)
    state.step += 1
    return loss.item(), parts


def export_checkpoint(out_dir: str | Path) -> tuple[Path, str]:
    """Write ``out_dir/model.safetensors`` from ``out_dir/checkpoint.pt`` (e.g. mid-run).

    Returns the weights path and its sha256.
    """
    out = Path(out_dir)
    state = torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")
    config = TrainConfig(**state["config"])
    model = HistoUNet(network_config(config))
    model.load_state_dict(state["model"])
    meta = {
        "architecture": "HistoUNet",
        "config": model.config.to_dict(),
        "working_pixel_size_um": config.working_pixel_size_um,
        "train_config": asdict(config),
        "steps": int(state["step"]),
        "wall_time_s": round(float(state.get("elapsed_s", 0.0)), 1),
    }
    weights = out / "model.safetensors"
    sha = save_weights(model.eval(), weights, meta)
    (out / "model.json").write_text(json.dumps({**meta, "sha256": sha}, indent=1))
    return weights, sha
