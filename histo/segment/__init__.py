"""Segmentation: the network, the classical baseline, tiled inference and instances.

Public surface::

    model = load_model("default")            # the shipped network ("unet"), or "classical"
    pred = model.predict(rgb_tile)           # one tile/field at model.working_pixel_size_um
    result = segment_slide(slide, model, tile_px=768, overlap_px=64, progress=..., cancel=...)

Every segmenter has ``name``, ``working_pixel_size_um`` (µm/px of its input and output),
``n_outputs`` (``n_outputs - 1`` class scores + 1 osteoclast centre map: 6 for networks of
codes 0-4, 8 for networks that also segment cartilage 5 and soft tissue 6) and
``predict_scores(rgb) -> (n_outputs, h, w)`` float32 (class probabilities summing to 1, then the
centre map in [0, 1]). Osteocytes are class-4 regions only: chondrocyte lacunae, which a
7-class network labels cartilage, never become osteocytes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo.device import cpu_name, device_name
from histo.errors import ModelError
from histo.segment.tiled import SegmentationResult, segment_slide

__all__ = [
    "ClassicalSegmenter",
    "NetworkSegmenter",
    "PROVENANCE_KEYS",
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


#: what :meth:`Segmenter.provenance` records (in each slide's indices.json)
PROVENANCE_KEYS = ("histo_version", "model_name", "model_sha256", "device", "device_name")


class Segmenter:
    """Base class: subclasses implement :meth:`predict_scores`."""

    name: str = "segmenter"
    working_pixel_size_um: float = 1.0
    n_outputs: int = 6
    #: the model-confidence reference stored with the model (None: not measured)
    qc_reference: dict | None = None

    def predict_scores(self, rgb: np.ndarray) -> np.ndarray:
        """(n_outputs, h, w) float32: class probabilities, then the osteoclast centre map."""
        raise NotImplementedError

    def predict(self, rgb: np.ndarray, tile_px: int = 1024, overlap_px: int = 64) -> Prediction:
        """Segment an RGB array at the working resolution (tiled when larger than ``tile_px``)."""
        rgb = np.asarray(rgb)
        res = segment_slide(rgb, self, tile_px=tile_px, overlap_px=overlap_px)
        return Prediction(
            res.class_map, res.osteoclast_labels, res.osteocyte_labels, None, res.pixel_size_um
        )

    def provenance(self) -> dict:
        """What produced a result, for its indices.json and report: histo's version, the
        model's name and weights' sha256 (None for the classical baseline), the device."""
        from histo import __version__

        device = getattr(self, "device", None)
        kind, name = ("cpu", cpu_name()) if device is None else (str(device), device_name(device))
        values = (__version__, self.name, getattr(self, "sha256", None), kind, name)
        return dict(zip(PROVENANCE_KEYS, values, strict=True))

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
    """The compact U-Net (:class:`histo.segment.network.HistoUNet`) on the CPU or a GPU.

    Inference uses BatchNorm folded into the convolutions, channels-last memory and
    ``torch.inference_mode``; tiles are reflect-padded to a multiple of 16 px.

    ``precision`` (CPU): "float32", "bfloat16" (convolutions in bfloat16 under autocast, about
    3x faster where the CPU has native bfloat16 instructions, e.g. AVX512-BF16 or AMX) or "auto"
    (bfloat16 when the CPU supports it, else float32). ``None`` reads the ``HISTO_PRECISION``
    environment variable (default "auto"). Scores are float32 either way. In bfloat16 on a CPU
    the folded network runs as :class:`histo.segment.network.FusedCPUNetwork` (the same
    logits, fewer passes over the activations).

    Torch's thread count is process-wide: the entry points set it (``torch.set_num_threads``),
    never the segmenter.

    ``device``: "auto" (CUDA, then MPS, then the CPU), "cpu", "cuda" or "mps"
    (:func:`histo.device.resolve_device`). On CUDA the convolutions run in float16 under
    autocast (:func:`histo.device.half_precision`) and :attr:`tiles_per_batch` tiles fit one
    forward pass (:meth:`predict_scores_batch`); ``precision`` is then ignored and
    :attr:`precision` says what the device runs ("float16" on CUDA, "float32" on MPS).
    """

    def __init__(
        self,
        net,
        working_pixel_size_um: float = 1.0,
        name: str = "unet",
        precision: str | None = None,
        device: str | None = None,
    ):
        import torch

        from histo.device import half_precision, resolve_device
        from histo.segment.network import (
            FusedCPUNetwork,
            fuse_for_inference,
            onednn_fusion_available,
        )

        self.device = resolve_device(device)
        if self.device.type == "cpu":
            self.precision = resolve_precision(precision)
        else:
            self.precision = str(half_precision(self.device) or torch.float32).removeprefix(
                "torch."
            )
        self.name = name
        self.working_pixel_size_um = float(working_pixel_size_um)
        self.n_outputs = int(net.config.n_outputs)
        self.parameters = sum(p.numel() for p in net.parameters())  # as trained
        self.net = fuse_for_inference(net.eval()).to(memory_format=torch.channels_last)
        if self.device.type != "cpu":
            self.net = self.net.to(self.device)
        self._fused_cpu = None
        if self.device.type == "cpu" and self.precision == "bfloat16" and onednn_fusion_available():
            self._fused_cpu = FusedCPUNetwork(self.net)

    def predict_scores(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        from histo.segment.network import scores_from_logits

        if self.device.type != "cpu":
            return self.predict_scores_batch([rgb])[0]
        rgb, h, w = _pad16(rgb)
        rgb = np.ascontiguousarray(rgb)
        if self._fused_cpu is not None and rgb.dtype == np.uint8:
            with torch.inference_mode():
                logits = self._fused_cpu.logits(rgb)
        else:
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div_(255.0)
            x = x.contiguous(memory_format=torch.channels_last)
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"),
            ):
                logits = self.net(x)
        with torch.inference_mode():
            scores = scores_from_logits(logits, self.n_outputs - 1)[0, :, :h, :w]
        return np.ascontiguousarray(scores.numpy())

    @property
    def tiles_per_batch(self) -> int:
        """Tiles of 768 px one forward pass takes on this device (1 on the CPU)."""
        from histo.device import tiles_per_batch

        return tiles_per_batch(self.device, 768)

    def predict_scores_batch(self, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        """Scores of several tiles in one forward pass (tiles of one shape; else one by one).

        The tiles go to the device as uint8 (4x less to copy than float32); the convolutions
        run in float16 on CUDA, in bfloat16 on a CPU that has it (:attr:`precision`), else in
        float32. :attr:`tiles_per_batch` says how many fit the device's memory.
        """
        import torch

        if len({np.shape(r)[:2] for r in rgbs}) > 1:
            return [self.predict_scores_batch([r])[0] for r in rgbs]
        padded = [_pad16(r) for r in rgbs]
        h, w = padded[0][1], padded[0][2]
        x = torch.from_numpy(np.stack([p[0] for p in padded])).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            out = self.net(x).float()
            n_cls = self.n_outputs - 1
            probs = torch.softmax(out[:, :n_cls], dim=1)
            centre = torch.sigmoid(out[:, n_cls:])
            scores = torch.cat([probs, centre], 1)[:, :, :h, :w].cpu().numpy()
        return [np.ascontiguousarray(s, dtype=np.float32) for s in scores]

    def _autocast(self):
        """The autocast context of this device and precision (none at all where the
        convolutions stay float32: older torch refuses an autocast context for "mps")."""
        import torch

        from histo.device import half_precision

        half = half_precision(self.device)
        if half is None and self.device.type == "cpu" and self.precision == "bfloat16":
            half = torch.bfloat16
        return torch.autocast(self.device.type, dtype=half) if half is not None else nullcontext()


def _pad16(rgb: np.ndarray) -> tuple[np.ndarray, int, int]:
    """RGB padded to multiples of 16 px (reflected; edge-repeated when too small), with the
    original height and width."""
    rgb = np.asarray(rgb)[..., :3]
    h, w = rgb.shape[:2]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        mode = "reflect" if h > ph and w > pw else "edge"
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode=mode)
    return rgb, h, w


def _load_safetensors(
    path: Path,
    entry: dict | None,
    name: str,
    precision: str | None = None,
    device: str | None = None,
) -> NetworkSegmenter:
    from histo.segment.network import network_with_weights, read_stored_network

    stored = read_stored_network(path, entry)
    net = network_with_weights(stored.config, stored.state, f"weights {path} ({name!r})")
    px = stored.working_pixel_size_um
    return NetworkSegmenter(net, px, name=name, precision=precision, device=device)


def load_model(
    name_or_path: str | Path = "default",
    registry: str | Path | None = None,
    precision: str | None = None,
    device: str | None = None,
) -> Segmenter:
    """Load a segmenter by name ("default", "unet", "classical", a user model) or path.

    Registered weights and model folders are checked against their sha256 before loading.

    Parameters
    ----------
    name_or_path
        A name in the registry (aliases such as "default" allowed), the name of a model folder
        in the user model folder (:func:`histo.segment.registry.user_models_dir`), a model
        folder holding ``model.safetensors`` and ``model.json`` (checked against the sha256
        in it), a path to a registry JSON file (its default model is loaded), a folder holding
        ``registry.json``, or a ``.safetensors`` file (its architecture config is read from
        the file's metadata; no checksum to compare against unless the file is listed in the
        shipped registry). See :func:`histo.segment.registry.locate_model`.
    registry
        Registry file to use instead of the shipped one.
    precision
        CPU arithmetic: "auto", "float32" or "bfloat16" (:class:`NetworkSegmenter`);
        ``None`` reads ``HISTO_PRECISION``. Ignored by the classical baseline.
    device
        "auto" (default), "cpu", "cuda" or "mps" (:func:`histo.device.resolve_device`).
        The classical baseline runs on the CPU whatever is asked.

    Returns
    -------
    Segmenter
        With ``sha256`` set to the weights' checksum (None for the classical baseline) and
        ``qc_reference`` to the model-confidence reference stored with it (None when it has
        none; :func:`histo.segment.registry.read_qc_reference`).

    Raises
    ------
    histo.errors.ModelError
        Unknown name, missing/corrupt/tampered weights (sha256 mismatch).
    histo.device.DeviceError
        The device asked for is not available.
    """
    from histo.segment.classical import ClassicalSegmenter
    from histo.segment.registry import locate_model

    if isinstance(name_or_path, Segmenter):
        return name_or_path
    if str(name_or_path) == "classical":
        return ClassicalSegmenter()
    source = locate_model(name_or_path, registry)
    arch = source.entry.get("architecture", "HistoUNet")
    if arch == "classical":
        return ClassicalSegmenter(**source.entry.get("config", {}))
    if arch != "HistoUNet":
        raise ModelError(f"model {source.name!r} has an unknown architecture {arch!r}")
    return _network(source, source.verify(), precision, device)


def _network(source, sha256: str, precision: str | None, device: str | None) -> NetworkSegmenter:
    """The network of a located model whose weights have ``sha256``: built once per process
    and settings (:data:`_LOADED`)."""
    from histo.segment.registry import read_qc_reference

    key = _loaded_key(source, sha256, precision, device)
    model = _LOADED.get(key)
    if model is None:
        entry = source.entry if source.entry.get("config") else None
        model = _load_safetensors(source.weights, entry, source.name, precision, device)
        model.sha256 = sha256
        model.qc_reference = read_qc_reference(source)
        _LOADED[key] = model
        while len(_LOADED) > MAX_LOADED:
            _LOADED.pop(next(iter(_LOADED)))
    return model


#: networks built in this process, kept for the next slide (a segmenter is not changed by
#: its use): the weights file, its sha256 (checked on every load) and the settings
_LOADED: dict[tuple, NetworkSegmenter] = {}
#: at most this many kept (the oldest is dropped)
MAX_LOADED = 4


def _loaded_key(source, sha256: str, precision: str | None, device: str | None) -> tuple:
    import json

    from histo.device import resolve_device

    settings = json.dumps(source.entry, sort_keys=True, default=str)
    where = str(resolve_device(device))
    return (str(source.weights), sha256, source.name, settings, resolve_precision(precision), where)
