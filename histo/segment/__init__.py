"""Segmentation: the network, the classical baseline, tiled inference and instances.

Public surface::

    model = load_model("default")            # the shipped network ("unet"), or "classical"
    pred = model.predict(rgb_tile)           # one tile/field at model.working_pixel_size_um
    result = segment_slide(slide, model, tile_px=768, overlap_px=64, progress=..., cancel=...)

Every segmenter has ``name``, ``working_pixel_size_um`` (µm/px of its input and output),
``n_outputs`` (5 class scores + 1 osteoclast centre map) and ``predict_scores(rgb) -> (6, h, w)``
float32 (class probabilities summing to 1, then the centre map in [0, 1]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo.errors import ModelError
from histo.segment.registry import DEFAULT_REGISTRY, read_registry, resolve, verified_path
from histo.segment.tiled import SegmentationResult, segment_slide

__all__ = [
    "ClassicalSegmenter",
    "NetworkSegmenter",
    "Prediction",
    "SegmentationResult",
    "Segmenter",
    "bfloat16_supported",
    "load_model",
    "resolve_precision",
    "segment_slide",
]


@dataclass
class Prediction:
    """Segmentation of one tile or field at the model's working resolution.

    Attributes
    ----------
    class_map
        (H, W) uint8 class codes.
    osteoclast_labels, osteocyte_labels
        (H, W) int32 instance labels (0 = none).
    centre
        (H, W) float32 osteoclast centre map in [0, 1] (the hint used to split touching cells).
    pixel_size_um
        µm per pixel.
    """

    class_map: np.ndarray
    osteoclast_labels: np.ndarray
    osteocyte_labels: np.ndarray
    centre: np.ndarray | None
    pixel_size_um: float


class Segmenter:
    """Base class: subclasses implement :meth:`predict_scores`."""

    name: str = "segmenter"
    working_pixel_size_um: float = 1.0
    n_outputs: int = 6

    def predict_scores(self, rgb: np.ndarray) -> np.ndarray:
        """(6, h, w) float32: 5 class probabilities, then the osteoclast centre map."""
        raise NotImplementedError

    def predict(self, rgb: np.ndarray, tile_px: int = 1024, overlap_px: int = 64) -> Prediction:
        """Segment an RGB array at the working resolution (tiled when larger than ``tile_px``)."""
        rgb = np.asarray(rgb)
        res = segment_slide(rgb, self, tile_px=tile_px, overlap_px=overlap_px)
        return Prediction(
            res.class_map, res.osteoclast_labels, res.osteocyte_labels, None, res.pixel_size_um
        )

    def __repr__(self) -> str:
        px = self.working_pixel_size_um
        return f"{type(self).__name__}(name={self.name!r}, working_pixel_size_um={px})"


PRECISIONS = ("auto", "float32", "bfloat16")


def bfloat16_supported() -> bool:
    """True when this CPU runs bfloat16 convolutions natively (oneDNN: AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - torch builds without oneDNN
        return False


def resolve_precision(precision: str | None = None) -> str:
    """The network's arithmetic: "float32" or "bfloat16" (see :class:`NetworkSegmenter`)."""
    import os

    value = (precision or os.environ.get("HISTO_PRECISION") or "auto").strip().lower()
    if value not in PRECISIONS:
        raise ModelError(f"precision {value!r}: choose one of {', '.join(PRECISIONS)}")
    if value == "auto":
        return "bfloat16" if bfloat16_supported() else "float32"
    return value


class NetworkSegmenter(Segmenter):
    """The compact U-Net (:class:`histo.segment.network.HistoUNet`) on CPU.

    Inference uses BatchNorm folded into the convolutions, channels-last memory and
    ``torch.inference_mode``; tiles are reflect-padded to a multiple of 16 px.

    ``precision``: "float32", "bfloat16" (convolutions in bfloat16 under autocast, about 3x
    faster where the CPU has native bfloat16 instructions, e.g. AVX512-BF16 or AMX) or "auto"
    (bfloat16 when the CPU supports it, else float32). ``None`` reads the ``HISTO_PRECISION``
    environment variable (default "auto"). Scores are float32 either way.

    Torch's thread count is process-wide: the entry points set it (``torch.set_num_threads``),
    never the segmenter.
    """

    def __init__(
        self,
        net,
        working_pixel_size_um: float = 1.0,
        name: str = "unet",
        precision: str | None = None,
    ):
        import torch

        from histo.segment.network import fuse_for_inference

        self.precision = resolve_precision(precision)
        self.name = name
        self.working_pixel_size_um = float(working_pixel_size_um)
        self.n_outputs = int(net.config.n_outputs)
        self.parameters = sum(p.numel() for p in net.parameters())  # as trained
        self.net = fuse_for_inference(net.eval()).to(memory_format=torch.channels_last)

    def predict_scores(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        rgb = np.asarray(rgb)[..., :3]
        h, w = rgb.shape[:2]
        ph, pw = (-h) % 16, (-w) % 16
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "edge"
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode=mode)
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div_(255.0)
        x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"),
        ):
            out = self.net(x)[0].float()
            n_cls = self.n_outputs - 1
            probs = torch.softmax(out[:n_cls], dim=0)
            centre = torch.sigmoid(out[n_cls:])
            scores = torch.cat([probs, centre], 0)[:, :h, :w]
        return np.ascontiguousarray(scores.numpy(), dtype=np.float32)


def _load_safetensors(
    path: Path, entry: dict | None, name: str, precision: str | None = None
) -> NetworkSegmenter:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from histo.segment.network import HistoUNet, NetworkConfig

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"weights {path} are not a readable safetensors file: {exc}") from None
    config = NetworkConfig.from_dict((entry or {}).get("config") or meta.get("config") or {})
    px = float(
        (entry or {}).get("working_pixel_size_um") or meta.get("working_pixel_size_um") or 1.0
    )
    net = HistoUNet(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"weights {path} do not fit the {name!r} architecture: {first}") from None
    return NetworkSegmenter(net, px, name=name, precision=precision)


def load_model(
    name_or_path: str | Path = "default",
    registry: str | Path | None = None,
    precision: str | None = None,
) -> Segmenter:
    """Load a segmenter by registry name ("default", "unet", "classical") or weights path.

    Parameters
    ----------
    name_or_path
        A name in the registry (aliases such as "default" allowed), a path to a registry
        JSON file (its default model is loaded), a folder holding ``registry.json``, or a
        ``.safetensors`` file (its architecture config is read from the file's metadata; no
        checksum to compare against unless the file is listed in the shipped registry).
    registry
        Registry file to use instead of the shipped ``models/registry.json``.
    precision
        Network arithmetic: "auto", "float32" or "bfloat16" (:class:`NetworkSegmenter`);
        ``None`` reads ``HISTO_PRECISION``. Ignored by the classical baseline.

    Raises
    ------
    histo.errors.ModelError
        Unknown name, missing/corrupt/tampered weights (sha256 mismatch).
    """
    from histo.segment.classical import ClassicalSegmenter

    if isinstance(name_or_path, Segmenter):
        return name_or_path
    key = str(name_or_path)
    if key == "classical":
        return ClassicalSegmenter()
    path = Path(key)
    if path.suffix == ".json" or (path.is_dir() and (path / "registry.json").exists()):
        registry = path if path.suffix == ".json" else path / "registry.json"
        key = "default"
    elif path.suffix in (".safetensors", ".pt", ".pth") or path.exists():
        if not path.is_file():
            raise ModelError(f"model weights {path} not found")
        if path.suffix != ".safetensors":
            raise ModelError(f"model weights {path}: only .safetensors files are supported")
        # a file listed in the shipped registry is checked against its checksum
        try:
            reg = read_registry(DEFAULT_REGISTRY)
            root = DEFAULT_REGISTRY.parent
            for reg_name, entry in reg["models"].items():
                if "file" in entry and (root / entry["file"]).resolve() == path.resolve():
                    return _load_safetensors(
                        verified_path(entry, root, reg_name), entry, reg_name, precision
                    )
        except ModelError:
            pass
        return _load_safetensors(path, None, path.stem, precision)
    reg_path = Path(registry) if registry is not None else DEFAULT_REGISTRY
    reg = read_registry(reg_path)
    real, entry = resolve(key, reg)
    arch = entry.get("architecture", "HistoUNet")
    if arch == "classical":
        return ClassicalSegmenter(**entry.get("config", {}))
    if arch != "HistoUNet":
        raise ModelError(f"model {real!r} has an unknown architecture {arch!r}")
    weights = verified_path(entry, reg_path.resolve().parent, real)
    return _load_safetensors(weights, entry, real, precision)
