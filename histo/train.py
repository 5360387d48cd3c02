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

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from histo.classes import BONE, MARROW, N_CLASSES, OSTEOCLAST
from histo.errors import HistoError
from histo.segment.instances import centre_target
from histo.segment.network import HistoUNet, NetworkConfig, count_parameters

log = logging.getLogger("histo.train")

PHENOTYPES = ("normal", "oc-rich", "oc-poor")
COUNTERSTAINS = ("hematoxylin", "fast-green", "methyl-green")

#: first synthetic seed of training run ``s`` is TRAIN_SEED_BASE + TRAIN_SEED_STRIDE * s
TRAIN_SEED_BASE = 100_000
TRAIN_SEED_STRIDE = 10_000


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


def make_pool_section(config: TrainConfig, section_id: int) -> PoolSection:
    """Render one synthetic section and bring it to the working resolution."""
    from histo.synth import make_section

    spec = section_spec(config, section_id)
    p = spec["source_pixel_size_um"]
    scale = p / config.working_pixel_size_um  # source px -> working px
    source_size = int(min(config.max_source_px, round(config.field_px / scale)))
    sec = make_section(
        spec["phenotype"],
        size=source_size,
        pixel_size_um=p,
        seed=spec["synth_seed"],
        counterstain=spec["counterstain"],
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
    """A pool of sections replaced gradually; its content is a pure function of the step."""

    def __init__(self, config: TrainConfig, step: int = 0, progress: Callable | None = None):
        self.config = config
        self.ids = [self.slot_id(j, step) for j in range(config.pool_size)]
        self.sections: list[PoolSection] = []
        for j, sid in enumerate(self.ids):
            self.sections.append(make_pool_section(config, sid))
            if progress:
                progress(j + 1, config.pool_size)

    def slot_id(self, slot: int, step: int) -> int:
        """Section id held by ``slot`` at ``step``."""
        p, r = self.config.pool_size, self.config.refresh_every
        n = step // r  # replacements done so far; replacement k (1-based) fills slot (k-1) % p
        if n <= slot:
            return slot
        last_k = slot + 1 + ((n - slot - 1) // p) * p
        return p + last_k - 1

    def advance(self, step: int) -> None:
        """Bring the pool to the state of ``step`` (replaces at most a few sections)."""
        for j in range(self.config.pool_size):
            sid = self.slot_id(j, step)
            if sid != self.ids[j]:
                self.sections[j] = make_pool_section(self.config, sid)
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


def sample_batch(
    pool: SectionPool, config: TrainConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random augmented crops: images (N,3,h,w) float, classes (N,h,w) long, centre (N,h,w)."""
    rng = np.random.default_rng([config.seed, step, 11])
    c = config.crop_px
    xs, ys, zs = [], [], []
    for _ in range(config.batch_size):
        sec = pool.sections[int(rng.integers(len(pool.sections)))]
        h, w = sec.class_map.shape
        if h < c or w < c:  # pad small sections with glass-like white / background
            ph, pw = max(0, c - h), max(0, c - w)
            img = np.pad(sec.image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
            cm = np.pad(sec.class_map, ((0, ph), (0, pw)), mode="reflect")
            ce = np.pad(sec.centre, ((0, ph), (0, pw)), mode="reflect")
            h, w = cm.shape
        else:
            img, cm, ce = sec.image, sec.class_map, sec.centre
        # favour crops that contain osteoclasts or osteocytes half of the time, and (when
        # surface_crop_fraction > 0) crops centred on the bone surface
        y0, x0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        u = rng.random()
        centre = None
        if u < 0.5:
            rare = np.flatnonzero(cm.ravel()[::97] >= OSTEOCLAST)
            if rare.size:
                centre = divmod(int(rare[int(rng.integers(rare.size))]) * 97, w)
        elif u < 0.5 + config.surface_crop_fraction:
            surface = bone_surface_points(cm)
            if len(surface):
                centre = tuple(surface[int(rng.integers(len(surface)))])
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
        xs.append(augment(np.ascontiguousarray(crop), rng).transpose(2, 0, 1))
        ys.append(np.ascontiguousarray(cmc))
        zs.append(np.ascontiguousarray(cec))
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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy + soft Dice over classes + centre-map BCE.

    The centre map is weighted 5x inside osteoclasts, where the split of touching cells is
    decided.
    """
    logits = out[:, :N_CLASSES]
    weights = torch.tensor(config.class_weights, dtype=out.dtype, device=out.device)
    ce = F.cross_entropy(logits, classes, weight=weights)
    probs = logits.softmax(1)
    onehot = F.one_hot(classes, N_CLASSES).permute(0, 3, 1, 2).to(out.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = 1 - (2 * inter + 1.0) / (denom + 1.0)
    dice = dice.mean()
    pix_w = 1.0 + 4.0 * (classes == OSTEOCLAST).to(out.dtype)
    bce = F.binary_cross_entropy_with_logits(out[:, N_CLASSES], centre, weight=pix_w)
    loss = ce + config.dice_weight * dice + config.centre_weight * bce
    return loss, {"ce": ce.item(), "dice": dice.item(), "centre": bce.item()}


# --------------------------------------------------------------------------- loop


def _lr_at(step: int, config: TrainConfig) -> float:
    warm = max(1, min(100, config.steps // 20))
    if step < warm:
        return config.lr * (step + 1) / warm
    t = (step - warm) / max(1, config.steps - warm)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


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
    """
    from histo.device import device_name, resolve_device

    config = config or TrainConfig()
    dev = resolve_device(device)
    if not 0.0 <= config.surface_crop_fraction <= 0.5:
        raise HistoError(
            f"surface crop fraction {config.surface_crop_fraction:g} is outside 0-0.5 "
            "(half of the crops are already centred on osteoclasts and lacunae)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    state = None
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        config = TrainConfig(**state["config"])
    torch.set_num_threads(max(1, config.threads))
    torch.manual_seed(config.seed)
    model = HistoUNet(NetworkConfig(widths=list(config.widths))).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    amp = _MixedPrecision(dev)
    step = 0
    history: list[dict] = []
    elapsed0 = 0.0
    if state is None and config.init_weights:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(config.init_weights))
        log.info("initialised from %s", config.init_weights)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        history = list(state["history"])
        elapsed0 = float(state.get("elapsed_s", 0.0))
        log.info("resumed from %s at step %d", ckpt_path, step)
    model = model.to(memory_format=torch.channels_last)
    log.info("config %s", json.dumps(asdict(config)))
    log.info("network parameters: %d", count_parameters(model))
    log.info("device %s (%s)", dev, device_name(dev))
    t0 = time.perf_counter()
    pool = SectionPool(
        config,
        step,
        progress=lambda i, n: log.info(
            "pool section %d/%d ready (%.0f s)", i, n, time.perf_counter() - t0
        ),
    )

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "config": asdict(config),
                "history": history,
                "elapsed_s": elapsed0 + time.perf_counter() - t0,
            },
            tmp,
        )
        tmp.replace(ckpt_path)

    model.train()
    running = None
    last_loss = float("nan")
    while step < config.steps:
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            log.info("time limit reached at step %d", step)
            break
        if stop_at_step is not None and step >= stop_at_step:
            log.info("stopping at step %d as asked", step)
            break
        pool.advance(step)
        x, y, z = sample_batch(pool, config, step)
        if dev.type != "cpu":
            x, y, z = (t.to(dev, non_blocking=True) for t in (x, y, z))
        x = x.to(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, config)
        loss, parts = amp.step(model, opt, x, y, z, config)
        step += 1
        last_loss = loss.item()
        running = last_loss if running is None else 0.95 * running + 0.05 * last_loss
        if step % 10 == 0 or step == config.steps:
            rec = {
                "step": step,
                "loss": last_loss,
                "smoothed": running,
                **parts,
                "lr": _lr_at(step - 1, config),
            }
            history.append(rec)
            el = elapsed0 + time.perf_counter() - t0
            msg = (
                f"step {step}/{config.steps} loss {last_loss:.4f} (smoothed {running:.4f}) "
                f"ce {parts['ce']:.3f} dice {parts['dice']:.3f} centre {parts['centre']:.3f} "
                f"{el / 60:.1f} min"
            )
            log.info(msg)
            if progress:
                progress(step / config.steps, msg)
        if step % config.checkpoint_every == 0:
            save_checkpoint()
    save_checkpoint()
    wall = elapsed0 + time.perf_counter() - t0
    model = model.to("cpu").eval()
    meta = {
        "architecture": "HistoUNet",
        "config": NetworkConfig(widths=list(config.widths)).to_dict(),
        "working_pixel_size_um": config.working_pixel_size_um,
        "train_config": asdict(config),
        "steps": step,
        "wall_time_s": round(wall, 1),
    }
    weights = out / "model.safetensors"
    sha = save_weights(model.to(memory_format=torch.contiguous_format), weights, meta)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    (out / "model.json").write_text(json.dumps({**meta, "sha256": sha}, indent=1))
    log.info("wrote %s (sha256 %s) after %d steps, %.1f min", weights, sha, step, wall / 60)
    return TrainResult(weights, sha, step, last_loss, wall, count_parameters(model), history)


def export_checkpoint(out_dir: str | Path) -> tuple[Path, str]:
    """Write ``out_dir/model.safetensors`` from ``out_dir/checkpoint.pt`` (e.g. mid-run).

    Returns the weights path and its sha256.
    """
    out = Path(out_dir)
    state = torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")
    config = TrainConfig(**state["config"])
    model = HistoUNet(NetworkConfig(widths=list(config.widths)))
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
