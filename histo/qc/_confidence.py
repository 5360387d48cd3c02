"""Model confidence: how sure the network is of its classes over a slide's tissue.

The margin of a pixel is the difference between its two highest blended class probabilities
(0: a tie between two classes, 1: certain). :class:`MarginTally` counts margins in a histogram
per predicted class while :func:`histo.segment.segment_slide` blends its tiles (no extra
full-resolution array), together with a coarse map of the mean margin;
:class:`ConfidenceSummary` is what it gives back.

A network is unsure in places on every slide (cell borders, thin seams), so a slide's share of
unsure tissue is judged against the shares on held-out in-domain synthetic slides, measured
for that very model (:func:`build_confidence_reference`) and stored with it (the registry
entry or the model folder's ``model.json``, key ``qc_reference``): a retrained or fine-tuned
model carries its own reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from histo.qc._signals import Range, Signal, grade

#: histogram bins of the margin over [0, 1]
MARGIN_BINS = 20
#: a tissue pixel whose margin is below this is "unsure" (a multiple of 1 / MARGIN_BINS)
LOW_MARGIN = 0.5
#: side of the blocks of the coarse margin map (working px)
MAP_BLOCK_PX = 8
#: the margin map has at most this many blocks a side, its blocks larger on a larger slide
#: (64 MB of sums, a viewer layer of 16 MB: 4096² blocks of 8 px is a 32768² px slide)
MAX_MAP_SIDE = 4096
#: rows counted at a time (bounds the tally's temporaries)
TALLY_ROWS = 128
#: the reference's warn and fail limits on the unsure share: the largest share over its
#: in-domain slides times these (chosen on validation slides, docs/qc.md; a factor rather
#: than a fixed slack, so a model unsure on more pixels in-domain gets limits to match)
WARN_FACTOR = 2.0
FAIL_FACTOR = 4.0
#: the limits are never set below these factors times this share (a model sure of nearly
#: every pixel on a dozen slides would otherwise fail slides for a few unsure cells)
MIN_SHARE = 0.01
#: format of the stored reference
REFERENCE_VERSION = 1
SIGNAL_NAME = "model.unsure_share"


@dataclass
class ConfidenceSummary:
    """The network's margins over one slide (the slide's owned pixels, each counted once).

    Attributes
    ----------
    class_histograms : ndarray
        (n_classes, bins) int64: pixels by predicted class (the blended argmax, before small
        specks are removed) and margin bin (bin ``i`` holds margins in
        ``[i / bins, (i + 1) / bins)``, the last bin includes 1).
    margin_map : ndarray or None
        (ceil(H / block), ceil(W / block)) uint8: the mean margin of each block of
        ``map_block_px`` x ``map_block_px`` working pixels, times 255 (glass is near 255);
        None unless asked for (``segment_slide(..., margin_map=True)``).
    map_block_px : int
        Block side of ``margin_map`` in working pixels.
    pixel_size_um : float
        Working resolution, µm/px (``margin_map`` is at ``pixel_size_um * map_block_px``).
    """

    class_histograms: np.ndarray
    margin_map: np.ndarray | None = None
    map_block_px: int = MAP_BLOCK_PX
    pixel_size_um: float = 1.0

    @property
    def bins(self) -> int:
        return int(self.class_histograms.shape[1])

    @property
    def tissue_histogram(self) -> np.ndarray:
        """(bins,) int64: margins of the tissue pixels (every class but background 0)."""
        return self.class_histograms[1:].sum(axis=0)

    @property
    def tissue_pixels(self) -> int:
        return int(self.class_histograms[1:].sum())

    def unsure_share(self, low_margin: float = LOW_MARGIN) -> float:
        """Share of tissue pixels whose margin is below ``low_margin`` (NaN: no tissue)."""
        return _low_share(self.tissue_histogram, low_margin)

    def class_unsure_shares(self, low_margin: float = LOW_MARGIN) -> list[float]:
        """Per predicted class, the share of its pixels below ``low_margin`` (NaN: none)."""
        return [_low_share(h, low_margin) for h in self.class_histograms]

    def mean_margin(self) -> float:
        """Mean margin over the tissue pixels (bin centres; NaN: no tissue)."""
        h = self.tissue_histogram
        if h.sum() == 0:
            return math.nan
        centres = (np.arange(h.size) + 0.5) / h.size
        return float((h * centres).sum() / h.sum())

    def to_dict(self) -> dict:
        """JSON-ready: the unsure share overall and per class, the histograms (no map)."""
        return {
            "low_margin": LOW_MARGIN,
            "tissue_pixels": self.tissue_pixels,
            "unsure_share": _finite_or_none(self.unsure_share()),
            "mean_margin": _finite_or_none(self.mean_margin()),
            "class_unsure_shares": [_finite_or_none(v) for v in self.class_unsure_shares()],
            "class_histograms": self.class_histograms.tolist(),
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _low_share(hist: np.ndarray, low_margin: float) -> float:
    total = int(hist.sum())
    if total == 0:
        return math.nan
    k = int(round(low_margin * hist.size))
    return float(hist[:k].sum() / total)


class MarginTally:
    """Counts margins per predicted class and sums them per block while tiles are blended.

    Parameters
    ----------
    n_classes : int
        Class scores of the network.
    shape : tuple of int
        (H, W) of the slide at the working resolution.
    pixel_size_um : float
        Working resolution, µm/px.
    bins, block_px : int
        Histogram bins over [0, 1]; block side of the margin map (0: no map), raised on a
        slide of more than ``MAX_MAP_SIDE * block_px`` px a side so the map has at most
        :data:`MAX_MAP_SIDE` blocks a side.
    """

    def __init__(
        self,
        n_classes: int,
        shape: tuple[int, int],
        pixel_size_um: float,
        bins: int = MARGIN_BINS,
        block_px: int = MAP_BLOCK_PX,
    ) -> None:
        self.n_classes, self.bins, self.block = int(n_classes), int(bins), int(block_px)
        self.shape, self.px = (int(shape[0]), int(shape[1])), float(pixel_size_um)
        if self.block > 0:  # larger blocks on a huge slide: the map's memory stays bounded
            self.block = max(self.block, -(-max(self.shape) // MAX_MAP_SIDE))
        self.counts = np.zeros(self.n_classes * self.bins, np.int64)
        self.sums = None
        if self.block > 0:
            h, w = (-(-n // self.block) for n in self.shape)
            self.sums = np.zeros((h, w), np.float32)

    def add(self, classes: np.ndarray, margin: np.ndarray, y0: int, x0: int) -> None:
        """Count a block of pixels: ``classes`` (h, w) class codes, ``margin`` (h, w) float32
        in [0, 1]; their top-left pixel is slide row ``y0``, column ``x0`` (working px)."""
        # a few rows at a time: the temporaries stay small beside the blender's
        for r in range(0, margin.shape[0], TALLY_ROWS):
            rows = slice(r, r + TALLY_ROWS)
            self._add_rows(classes[rows], margin[rows], y0 + r, x0)

    def _add_rows(self, classes: np.ndarray, margin: np.ndarray, y0: int, x0: int) -> None:
        code = np.multiply(margin, self.bins - 1e-3, dtype=np.float32).astype(np.uint8)
        if self.n_classes * self.bins < 256:
            code += classes * np.uint8(self.bins)
            # OpenCV's histogram of a uint8 image: 8x faster than np.bincount, which
            # converts to intp first; float32 counts are exact below 2**24 px per call
            hist = cv2.calcHist([np.ascontiguousarray(code)], [0], None, [256], [0, 256])
            self.counts += hist.ravel()[: self.counts.size].astype(np.int64)
        else:  # pragma: no cover - networks of more than 12 classes
            code = code.astype(np.intp) + classes.astype(np.intp) * self.bins
            self.counts += np.bincount(code.ravel(), minlength=self.counts.size)
        if self.sums is not None:
            self._add_blocks(margin, y0, x0)

    def _add_blocks(self, margin: np.ndarray, y0: int, x0: int) -> None:
        """Add the margins' sums per map block (a block cut by the band's edges gets the
        rest of its sum from the neighbouring band)."""
        b = self.block
        h, w = margin.shape
        oy, ox = y0 % b, x0 % b
        # zero-padded to whole blocks: two reshaped sums are ~4x faster than np.add.reduceat
        hb, wb = -(-(oy + h) // b), -(-(ox + w) // b)
        padded = np.zeros((hb * b, wb * b), np.float32)
        padded[oy : oy + h, ox : ox + w] = margin
        sums = padded.reshape(hb, b, wb * b).sum(axis=1).reshape(hb, wb, b).sum(axis=2)
        r0, c0 = y0 // b, x0 // b
        self.sums[r0 : r0 + hb, c0 : c0 + wb] += sums

    def summary(self) -> ConfidenceSummary:
        """The counts so far, and the map of mean margins (x 255, uint8)."""
        hist = self.counts.reshape(self.n_classes, self.bins).copy()
        margin_map = None
        if self.sums is not None:
            b = self.block
            h, w = self.shape
            area_r = np.minimum(b, h - np.arange(self.sums.shape[0]) * b).astype(np.float32)
            area_c = np.minimum(b, w - np.arange(self.sums.shape[1]) * b).astype(np.float32)
            mean = self.sums / (area_r[:, None] * area_c[None, :])
            margin_map = np.clip(np.rint(mean * 255.0), 0, 255).astype(np.uint8)
        return ConfidenceSummary(hist, margin_map, self.block, self.px)


@dataclass(frozen=True)
class LowConfidenceMap:
    """Where the network is unsure: blocks of the slide whose mean margin is low.

    Attributes
    ----------
    mask : ndarray
        (h, w) uint8: 1 where the mean margin (top class probability minus the second) of the
        block is below ``low_margin``, else 0.
    block_px : int
        Block side in working pixels: block (i, j) covers working pixels
        ``[i * block_px, (i + 1) * block_px)`` by ``[j * block_px, (j + 1) * block_px)``.
    pixel_size_um : float
        Working resolution of the segmentation, µm/px (a block is ``block_px`` of these).
    low_margin : float
        The margin below which the model's in-domain reference counts a pixel as unsure.
    """

    mask: np.ndarray
    block_px: int
    pixel_size_um: float
    low_margin: float


def low_confidence_map(
    summary: ConfidenceSummary | None, reference: dict | None, max_side: int = MAX_MAP_SIDE
) -> LowConfidenceMap | None:
    """The blocks of a slide on which the network is unsure, for a viewer to show.

    Parameters
    ----------
    summary : ConfidenceSummary or None
        With its ``margin_map`` (``segment_slide(..., margin_map=True)``).
    reference : dict or None
        The model's in-domain reference: its ``low_margin`` marks a block (the default
        :data:`LOW_MARGIN` for a model without one).
    max_side : int
        A larger map is cut to at most this many blocks a side, a coarse block marked when
        any of the blocks it joins is.

    Returns
    -------
    LowConfidenceMap or None
        None without a margin map.
    """
    if summary is None or summary.margin_map is None:
        return None
    low = LOW_MARGIN if reference is None else reference_low_margin(reference)
    # the map holds rint(255 * mean margin): below 255 * low is a mean below low
    mask = (summary.margin_map < low * 255.0).astype(np.uint8)
    factor = -(-max(mask.shape) // int(max_side))
    if factor > 1:
        h, w = (-(-n // factor) * factor for n in mask.shape)
        padded = np.zeros((h, w), np.uint8)
        padded[: mask.shape[0], : mask.shape[1]] = mask
        mask = padded.reshape(h // factor, factor, w // factor, factor).max(axis=(1, 3))
    block = summary.map_block_px * factor
    return LowConfidenceMap(mask, block, summary.pixel_size_um, low)


# ----------------------------------------------------------------------------- the signal


def reference_limits(reference: dict) -> Range:
    """The accepted and tolerated unsure shares a reference gives (fractions of tissue)."""
    warn = float(reference["warn_above"])
    fail = float(reference["fail_above"])
    return Range((0.0, warn), (0.0, fail))


def confidence_signal(summary: ConfidenceSummary | None, reference: dict | None) -> Signal:
    """``model.unsure_share``: the share of the slide's tissue on which the network is unsure,
    judged against the in-domain reference stored with the model.

    Parameters
    ----------
    summary : ConfidenceSummary or None
        From the slide's segmentation (``SegmentationResult.confidence``).
    reference : dict or None
        The model's reference (:func:`histo.segment.registry.read_qc_reference`). Without
        one (a model nobody measured), or without a summary, the signal warns with a reason
        that says so.

    Returns
    -------
    Signal
        Value: the share (fraction) of tissue pixels whose margin (top class probability
        minus the second) is below the reference's ``low_margin``.
    """
    if reference is None or summary is None:
        missing = "model" if reference is None else "segmentation"
        reason = (
            "model confidence not checked: this model has no in-domain reference "
            "(run histo qc-reference --model ...)"
            if reference is None
            else "model confidence not checked: no confidence summary from the segmentation"
        )
        return Signal(SIGNAL_NAME, math.nan, "fraction", missing, "warn", reason)
    return unsure_share_signal(summary.unsure_share(reference_low_margin(reference)), reference)


def reference_low_margin(reference: dict) -> float:
    """The margin below which a reference counts a pixel as unsure."""
    return float(reference.get("low_margin", LOW_MARGIN))


def unsure_share_signal(value: float, reference: dict) -> Signal:
    """``model.unsure_share`` for an unsure share ``value`` (fraction of tissue, measured
    with the reference's ``low_margin``) against the reference's limits."""
    most = float(reference["max_share"])
    return grade(SIGNAL_NAME, value, "fraction", reference_limits(reference), _why(most))


def _why(most: float) -> Callable[[float], str]:
    def why(value: float) -> str:
        return (
            f"the network is unsure on {100 * value:.0f} % of tissue (in-domain slides: at most "
            f"{100 * most:.0f} %): its classes, and the indices from them, are not to be trusted"
        )

    return why


# ----------------------------------------------------------------------------- the reference

#: held-out reference slides: seeds from here (training uses 100000-399999, the QC thresholds'
#: validation and test sections 700000+ and 800000+, histo evaluate 800000+)
REFERENCE_SEED = 600_000
REFERENCE_PIXEL_SIZES = (1.0, 0.5, 2.0, 0.25)
#: a reference slide spans at least this (µm): fine pixel sizes get more pixels
MIN_FIELD_UM = 512.0


def slide_summary(
    image: np.ndarray, pixel_size_um: float, model, tile_px: int = 768
) -> ConfidenceSummary:
    """Segment one in-memory RGB image as the pipeline does (tissue mask, working
    resolution) and return its :class:`ConfidenceSummary`."""
    from histo.io import detect_tissue, slide_from_array
    from histo.segment import segment_slide

    slide = slide_from_array(image, pixel_size_um)
    tissue = detect_tissue(slide)
    return segment_slide(slide, model, tile_px=tile_px, tissue=tissue).confidence


def build_confidence_reference(
    model,
    n_slides: int = 12,
    seed: int = REFERENCE_SEED,
    size: int = 1024,
    progress: Callable[[float, str], None] | None = None,
) -> dict:
    """The in-domain confidence reference of a model, from held-out synthetic slides.

    Slides of :func:`histo.qc.synthetic.make_case` (kind ``in-domain``) cycle through every
    counterstain and the pixel sizes of :data:`REFERENCE_PIXEL_SIZES`, with seeds
    ``seed, seed + 1, ...``.

    Parameters
    ----------
    model
        A segmenter or a model name/path (:func:`histo.segment.load_model`).
    n_slides, seed, size
        Number of slides, first seed, side of each slide (px at its own pixel size; at least
        :data:`MIN_FIELD_UM` µm).
    progress
        ``progress(fraction, message)`` after every slide.

    Returns
    -------
    dict
        JSON-ready: ``low_margin``, the per-slide unsure shares and their maximum
        (``max_share``), ``warn_above`` and ``fail_above`` (the signal's limits), the pooled
        tissue margin histogram, per-class unsure shares, what was measured (slides, seed,
        size, pixel sizes) and the model's weights' sha256.
    """
    from histo.qc.synthetic import make_case
    from histo.segment import load_model
    from histo.synth._render import COUNTERSTAINS

    model = load_model(model) if isinstance(model, str) else model
    shares, pooled = [], None
    for i in range(int(n_slides)):
        px = REFERENCE_PIXEL_SIZES[i % len(REFERENCE_PIXEL_SIZES)]
        stain = COUNTERSTAINS[i % len(COUNTERSTAINS)]
        side = max(int(size), round(MIN_FIELD_UM / px))
        case = make_case("in-domain", seed + i, side, px, counterstain=stain)
        s = slide_summary(case.image, px, model)
        shares.append(s.unsure_share())
        pooled = s.class_histograms if pooled is None else pooled + s.class_histograms
        if progress is not None:
            progress((i + 1) / n_slides, f"reference slide {i + 1}/{n_slides}")
    return _reference_dict(model, shares, pooled, n_slides, seed, size)


def _reference_dict(model, shares, pooled, n_slides, seed, size) -> dict:
    pooled_summary = ConfidenceSummary(pooled)
    finite = [v for v in shares if math.isfinite(v)]
    most = max(finite) if finite else 0.0
    return {
        "version": REFERENCE_VERSION,
        "signal": SIGNAL_NAME,
        "low_margin": LOW_MARGIN,
        "max_share": round(most, 4),
        "warn_above": round(WARN_FACTOR * max(most, MIN_SHARE), 4),
        "fail_above": round(FAIL_FACTOR * max(most, MIN_SHARE), 4),
        "shares": [_finite_or_none(round(v, 4)) for v in shares],  # None: no tissue found
        "tissue_histogram": (pooled_summary.tissue_histogram / max(1, pooled[1:].sum()))
        .round(5)
        .tolist(),
        "class_unsure_shares": [
            _finite_or_none(round(v, 4)) for v in pooled_summary.class_unsure_shares()
        ],
        "slides": int(n_slides),
        "seed": int(seed),
        "size_px": int(size),
        "pixel_sizes_um": list(REFERENCE_PIXEL_SIZES),
        "model_sha256": getattr(model, "sha256", None),
    }
