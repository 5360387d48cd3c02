"""Which device the network runs on: ``auto``, ``cpu``, ``cuda`` or ``mps``.

One place for the choice, used by analyze, batch (each worker), train, evaluate and the napari
widget. ``auto`` takes a CUDA GPU, then Apple's MPS, then the CPU. A device asked for by name
that this machine (or this torch build) lacks is a :class:`DeviceError`: one line, exit
status 2 (the command line asked for something impossible), never a silent fall-back.

torch is imported only when a device is resolved, so that ``histo --help`` stays fast.
"""

from __future__ import annotations

import platform

from histo.errors import HistoError

#: the names ``--device`` accepts
DEVICES = ("auto", "cpu", "cuda", "mps")

#: device memory one pixel of a tile takes during inference, bytes: the network's largest
#: live activations are at full resolution (input, 8-channel stem and decoder maps, the
#: 4 x 8-channel upsampling phases, 6 float32 scores and their softmax), ~150 B together in
#: float16; rounded up for the convolution workspace and allocator slack
INFERENCE_BYTES_PER_PX = 256
#: share of the device's free memory the tiles of one batch may take
DEVICE_MEMORY_SHARE = 0.5
#: at most this many tiles per batch: beyond it a GPU is busy anyway, and every tile of a batch
#: must be read before any is scored
MAX_TILES_PER_BATCH = 16


class DeviceError(HistoError):
    """The device asked for is not available here (no GPU, or a torch built without it)."""

    exit_status = 2


def available_devices() -> list[str]:
    """The device kinds this machine and torch build can use, best first ("cpu" always last)."""
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(name: str | None = "auto"):
    """The :class:`torch.device` for ``name`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    Parameters
    ----------
    name
        ``None`` or "auto": CUDA, then MPS, then the CPU.

    Raises
    ------
    DeviceError
        An unknown name, or a device this machine or torch build does not have.
    """
    import torch

    text = (name or "auto").strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"device {name!r}: choose one of {', '.join(DEVICES)}")
    available = available_devices()
    if kind == "auto":
        return torch.device(available[0])
    if kind not in available:
        raise DeviceError(
            f"device {kind!r} is not available here (torch {torch.__version__} sees: "
            f"{', '.join(available)}); use --device auto or cpu"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(
            f"device {text!r} is not available here: {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device(text)


def device_name(device) -> str:
    """A readable name of the device, for provenance: the GPU's model, or the CPU's."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_name()


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the architecture elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def tiles_per_batch(device, tile_px: int) -> int:
    """How many tiles of ``tile_px`` x ``tile_px`` one forward pass may take on ``device``.

    1 on the CPU (tiles overlap reading in other threads there; a batch gains nothing). On a
    GPU: :data:`DEVICE_MEMORY_SHARE` of the free device memory at
    :data:`INFERENCE_BYTES_PER_PX`, between 1 and :data:`MAX_TILES_PER_BATCH`.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    elif device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        free = torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    else:
        return 1
    per_tile = INFERENCE_BYTES_PER_PX * tile_px * tile_px
    return int(max(1, min(MAX_TILES_PER_BATCH, DEVICE_MEMORY_SHARE * free // per_tile)))


def half_precision(device) -> object | None:
    """The float type the network's convolutions run in on a GPU (autocast), or None.

    float16 on CUDA: convolutions and matrix products in float16 with float32 accumulation
    (autocast keeps softmax and reductions in float32; histo turns the logits to float32
    before its softmax). MPS stays float32: autocast on MPS is recent and its float16
    convolutions were not checked. The CPU's own choice (bfloat16 where the CPU has it) is
    :func:`histo.segment.resolve_precision`'s.
    """
    import torch

    return torch.float16 if torch.device(device).type == "cuda" else None
