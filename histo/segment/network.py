"""A compact, CPU-fast U-Net for TRAP-stained bone sections.

The network maps an RGB tile at the working resolution (1.0 µm/px by default) to

* 5 class logits (codes of :mod:`histo.classes`: background, marrow, bone, osteoclast,
  osteocyte lacuna), and
* 1 osteoclast *centre map* logit: the sigmoid of it regresses each osteoclast's distance to
  its own border normalised to 1 at the cell's centre (0 outside osteoclasts). Touching
  osteoclasts are split by a marker-controlled watershed on this map
  (:func:`histo.segment.instances.split_osteoclasts`).

Design for speed on a 2-core CPU: very few channels at full resolution (the full-resolution
path exists only for the small osteocyte lacunae, 4-6 µm wide), an early stride-2 stem, and
most of the capacity at 1/4-1/16 resolution where context (bone vs marrow, osteoclast shape)
is decided. Batch-norm is folded into the convolutions for inference, and the decoder's
upsample-concatenate-convolve steps are rewritten as convolutions at the coarser resolution
(:func:`fuse_for_inference`, :class:`UpsampleConcatConv`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from histo.errors import ModelError

#: outputs: 5 class logits then 1 centre-map logit
N_CLASS_OUTPUTS = 5
N_OUTPUTS = N_CLASS_OUTPUTS + 1


@dataclass
class NetworkConfig:
    """Architecture hyper-parameters (stored in the model registry, ``histo/models/registry.json``).

    Parameters
    ----------
    widths
        Channels at full resolution, then at 1/2, 1/4, 1/8 and 1/16 of the working resolution.
    n_outputs
        Class logits + 1 centre-map logit: 6 (codes 0-4) or 8 (with cartilage 5 and soft
        tissue 6, networks trained with long-bone sections).
    """

    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 96])
    n_outputs: int = N_OUTPUTS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        return cls(
            widths=list(d.get("widths", cls().widths)), n_outputs=int(d.get("n_outputs", N_OUTPUTS))
        )


class ConvBNAct(nn.Sequential):
    """3x3 (or kxk) convolution, batch norm, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, k: int = 3) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class HistoUNet(nn.Module):
    """Compact U-Net: full-res stem, four stride-2 stages, bilinear-upsampling decoder.

    Input: (N, 3, H, W) float in [0, 1] with H and W multiples of 16.
    Output: (N, n_outputs, H, W) logits (classes, then the centre map).
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetworkConfig()
        w = self.config.widths
        self.stem = ConvBNAct(3, w[0])  # full res
        self.down = nn.ModuleList()
        for i in range(1, len(w)):
            self.down.append(
                nn.Sequential(ConvBNAct(w[i - 1], w[i], stride=2), ConvBNAct(w[i], w[i]))
            )
        self.up = nn.ModuleList()
        for i in range(len(w) - 1, 0, -1):
            # fuse upsampled deeper features (w[i]) with the skip (w[i-1])
            self.up.append(ConvBNAct(w[i] + w[i - 1], w[i - 1]))
        self.head = nn.Conv2d(w[0], self.config.n_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise from [0, 1] to roughly zero-centred
        x = (x - 0.5) * 4.0
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            if isinstance(block, UpsampleConcatConv):
                y = block(y, skip)
            else:
                y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                y = block(torch.cat([y, skip], dim=1))
        return self.head(y)


#: 1-D weights of y[a-1], y[a], y[a+1] (rows) in the bilinear upsample by 2 (half-pixel
#: centres) at output row 2a+r-1, 2a+r, 2a+r+1 (columns), for r = 0 and r = 1
_PHASE_TAPS = (
    ((0.75, 0.25, 0.0), (0.25, 0.75, 0.75), (0.0, 0.0, 0.25)),
    ((0.25, 0.0, 0.0), (0.75, 0.75, 0.25), (0.0, 0.25, 0.75)),
)


def _interleave_phases(phases: torch.Tensor) -> torch.Tensor:
    """(N, C, 2H, 2W) from the (N, 4C, H, W) phases of a decoder block, channel
    ``(2 r + q) C + o`` holding output channel ``o`` at rows ``2a + r`` and columns ``2b + q``.

    A pixel shuffle with the phases outermost: in channels-last memory both tensors then hold
    each pixel's ``2C`` values of (q, o) together, and the copy moves them as runs rather than
    element by element (``F.pixel_shuffle`` on channels-last tensors does the latter).
    """
    n, c4, h, w = phases.shape
    c = c4 // 4
    channels_last = phases.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(
        (n, c, 2 * h, 2 * w), dtype=phases.dtype, device=phases.device, memory_format=fmt
    )
    out.view(n, c, h, 2, w, 2).copy_(phases.view(n, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2))
    return out


class UpsampleConcatConv(nn.Module):
    """``ReLU(conv3x3(cat(bilinear_up2(y), skip)))`` of a fused decoder block, computed without
    the upsampled or the concatenated tensor (inference only, same result).

    Upsampling by 2 (bilinear, half-pixel centres, edges clamped) then a 3x3 convolution is
    linear in ``y``: each of the four phases of the output (even or odd row, even or odd column)
    is a 3x3 convolution of ``y`` (padded with its edge values). The block computes those
    ``4 * c_out`` channels at ``y``'s resolution, interleaves them (a pixel shuffle,
    :func:`_interleave_phases`), adds the convolution of the skip (with the bias) and applies
    the ReLU: on a 768-px tile in bfloat16 ~2x faster than interpolate, cat and convolve (the
    upsampled and concatenated tensors are the largest of the network and their copies cost
    more than the convolution). The phases are
    convolved with zero padding, which is wrong only on the output's two outermost rows and
    columns (the upsample clamps at the edges; the original convolution pads its input with
    zeros): those are recomputed the original way from strips of ``y`` two pixels thick.

    Parameters
    ----------
    conv
        The block's 3x3 convolution (batch norm folded in), over ``c_up`` upsampled channels
        followed by the skip's channels.
    c_up
        Channels of ``y``.
    """

    def __init__(self, conv: nn.Conv2d, c_up: int) -> None:
        super().__init__()
        w = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0])
        c_out = w.shape[0]
        taps = torch.tensor(_PHASE_TAPS, dtype=w.dtype)
        # phase (r, q) kernel: sum over d, e of taps[r][t, d] * taps[q][u, e] * w[o, c, d, e];
        # phase-major channels ((r, q), then o): see _interleave_phases
        phases = torch.einsum("rtd,que,ocde->rqoctu", taps, taps, w[:, :c_up])
        self.register_buffer("phase_weight", phases.reshape(4 * c_out, c_up, 3, 3).contiguous())
        self.register_buffer("skip_weight", w[:, c_up:].contiguous())
        self.register_buffer("weight", w.clone())
        self.register_buffer("bias", bias.clone())

    def original(self, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The block as trained (before its ReLU): interpolate, concatenate, convolve."""
        y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return F.conv2d(torch.cat([y, skip], dim=1), self.weight, self.bias, padding=1)

    def forward(self, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h, w = y.shape[-2:]
        if h < 2 or w < 2 or tuple(skip.shape[-2:]) != (2 * h, 2 * w):
            return torch.relu_(self.original(y, skip))
        up = _interleave_phases(F.conv2d(y, self.phase_weight, padding=1))
        out = F.conv2d(skip, self.skip_weight, self.bias, padding=1)
        out.add_(up.to(out.dtype))
        del up
        # the ring: the first and last two rows from y's first and last two rows, and the
        # columns likewise
        out[..., :2, :] = self.original(y[..., :2, :], skip[..., :4, :])[..., :2, :]
        out[..., -2:, :] = self.original(y[..., -2:, :], skip[..., -4:, :])[..., -2:, :]
        out[..., :, :2] = self.original(y[..., :, :2], skip[..., :, :4])[..., :, :2]
        out[..., :, -2:] = self.original(y[..., :, -2:], skip[..., :, -4:])[..., :, -2:]
        return torch.relu_(out)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scores_from_logits(logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Scores of the network's logits: (N, n_outputs, H, W) float32, contiguous.

    Class probabilities (softmax over the first ``n_classes`` channels), then the centre
    map (sigmoid of the rest). ``logits`` may be of any floating dtype and memory format
    (the network's are bfloat16 and channels-last): they are converted and laid out as
    planes in one pass, and the softmax and sigmoid then run in place. Each image's class
    planes are contiguous, so the softmax is the one ``torch.softmax(..., dim=0)`` computes
    on a planar copy, bit for bit.
    """
    scores = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    scores.copy_(logits)
    for image in scores:
        probs = image[:n_classes]
        torch._softmax(probs, 0, False, out=probs)
    torch.sigmoid_(scores[:, n_classes:])
    return scores


def fuse_for_inference(model: HistoUNet) -> HistoUNet:
    """Fold each BatchNorm into its convolution and rewrite the decoder blocks as
    :class:`UpsampleConcatConv` (in place), for faster inference. Not for training.

    The model is put in eval mode; returns the same object.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module[1], nn.BatchNorm2d):
            conv, bn = module[0], module[1]
            # fuse_conv_bn_eval's arithmetic, on the convolution itself (it folds a deep copy)
            conv.weight, conv.bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            module[1] = nn.Identity()
    w = model.config.widths
    for k, block in enumerate(model.up):
        if isinstance(block, ConvBNAct):
            model.up[k] = UpsampleConcatConv(block[0], c_up=w[len(w) - 1 - k])
    return model


def onednn_fusion_available() -> bool:
    """True when torch has oneDNN's convolutions with fused post-ops (CPU builds with oneDNN)."""
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - torch builds without oneDNN
        return False


class _PackedConv(NamedTuple):
    """A convolution's weights for oneDNN: bfloat16, channels-last."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: list[int]
    padding: list[int]


def _packed(weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=1) -> _PackedConv:
    w = weight.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    b = None if bias is None else bias.detach().to(torch.bfloat16)
    return _PackedConv(w, b, [int(stride)] * 2, [int(padding)] * 2)


class FusedCPUNetwork:
    """A folded :class:`HistoUNet` (:func:`fuse_for_inference`) run on the CPU in bfloat16,
    with the logits of the network under bfloat16 autocast, bit for bit (inference only).

    Two passes over the activations are saved where that changes no bit: the encoder's
    convolutions apply their ReLU as they write their output (oneDNN's post-op; a ReLU
    commutes with rounding to bfloat16), and the input's scaling to [0, 1], normalisation
    and rounding to bfloat16 are one look-up of each 8-bit value in a table computed with
    the same float32 operations. The decoder (:class:`UpsampleConcatConv`) and the head run
    as they are under autocast: fusing the decoder's sum into its convolution would round
    the sum to bfloat16 once instead of twice, and so change the class maps.
    """

    def __init__(self, net: HistoUNet) -> None:
        blocks = [net.stem] + [block for stage in net.down for block in stage]
        if any(not isinstance(block[1], nn.Identity) for block in blocks):
            raise ValueError("FusedCPUNetwork: fold the network first (fuse_for_inference)")
        self.net = net
        self.encoder = [
            _packed(b[0].weight, b[0].bias, b[0].stride[0], b[0].padding[0]) for b in blocks
        ]
        self.stages = [len(stage) for stage in net.down]
        # the bfloat16 input of each 8-bit value: x / 255, then HistoUNet.forward's
        # normalisation, then autocast's rounding (bit patterns, for numpy's look-up)
        values = torch.arange(256, dtype=torch.float32).div_(255.0)
        rounded = ((values - 0.5) * 4.0).to(torch.bfloat16)
        self.input_table = rounded.view(torch.int16).numpy().copy()

    @staticmethod
    def _conv_relu(x: torch.Tensor, conv: _PackedConv) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, [1, 1], 1, "relu", [], ""
        )

    def logits(self, rgb: np.ndarray) -> torch.Tensor:
        """(1, n_outputs, H, W) bfloat16 logits (channels-last) of an (H, W, 3) uint8 RGB
        tile, H and W multiples of 16."""
        x = torch.from_numpy(self.input_table[rgb]).view(torch.bfloat16)
        x = x.permute(2, 0, 1)[None]  # channels-last, as the tile's pixels are
        skips = [self._conv_relu(x, self.encoder[0])]
        k = 1
        for n_convs in self.stages:
            h = skips[-1]
            for conv in self.encoder[k : k + n_convs]:
                h = self._conv_relu(h, conv)
            k += n_convs
            skips.append(h)
        y = skips.pop()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for block in self.net.up:
                y = block(y, skips.pop())
            return self.net.head(y)


class StoredNetwork(NamedTuple):
    """Weights read from a safetensors file, with the architecture and resolution they need."""

    state: dict[str, torch.Tensor]
    config: NetworkConfig
    working_pixel_size_um: float  #: µm/px the network was trained at


def read_stored_network(path: str | os.PathLike, entry: dict | None = None) -> StoredNetwork:
    """The weights in the safetensors file ``path``, their :class:`NetworkConfig` and working
    pixel size: those of the registry ``entry`` when it has them, else the file's metadata.

    Raises
    ------
    histo.errors.ModelError
        The file cannot be read as safetensors.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"weights {path} are not a readable safetensors file: {exc}") from None
    entry = entry or {}
    config = NetworkConfig.from_dict(entry.get("config") or meta.get("config") or {})
    px = float(entry.get("working_pixel_size_um") or meta.get("working_pixel_size_um") or 1.0)
    return StoredNetwork(state, config, px)


def network_with_weights(
    config: NetworkConfig, state: dict[str, torch.Tensor], weights: str
) -> HistoUNet:
    """A :class:`HistoUNet` of ``config`` holding ``state``.

    Raises
    ------
    histo.errors.ModelError
        ``state`` does not fit the architecture; the message names the ``weights``
        (e.g. "weights of 'lab-a'").
    """
    net = HistoUNet(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{weights} do not fit the HistoUNet architecture: {first}") from None
    return net
