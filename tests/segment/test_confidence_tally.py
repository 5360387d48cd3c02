"""The margin tally of tiled segmentation: histograms and map against a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from histo.qc._confidence import MarginTally
from histo.segment import Segmenter, segment_slide


class _MarginFromColour(Segmenter):
    """Scores read off the pixel's colour: red ``v`` gives a margin of ``v / 255`` between
    the top class and the second; green picks the top class (0: background, < 128: marrow
    1, else bone 2). Blending identical per-pixel scores gives them back unchanged."""

    working_pixel_size_um = 1.0
    n_outputs = 6

    def predict_scores(self, rgb):
        v = rgb[..., 0].astype(np.float32) / 255.0
        g = rgb[..., 1]
        top = np.where(g == 0, 0, np.where(g < 128, 1, 2))
        scores = np.zeros((6, *v.shape), np.float32)
        for c in range(3):
            scores[c] = np.where(
                top == c, 0.5 + v / 2, np.where(top == (c + 1) % 3, 0.5 - v / 2, 0)
            )
        return scores


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    red = rng.integers(0, 256, shape)
    # margins on a bin edge (v = 51 k) could fall either side by rounding
    red = np.where(red % 51 == 0, red + 1, red).clip(0, 255).astype(np.uint8)
    green = rng.choice(np.array([0, 60, 200], np.uint8), shape, p=[0.2, 0.4, 0.4])
    return np.dstack([red, green, np.zeros(shape, np.uint8)]), red, green


def test_margin_histogram_and_map_match_the_known_margins():
    # two column strips and several rows of overlapping tiles: each pixel counted once
    image, red, green = _image((300, 2200))
    model = _MarginFromColour()
    res = segment_slide(image, model, tile_px=256, overlap_px=64, strip_cols=1100, margin_map=True)
    hist = res.confidence.class_histograms
    assert hist.shape == (5, 20)
    margin = red / 255.0
    bins = np.minimum((margin * 20).astype(int), 19)
    top = np.where(green == 0, 0, np.where(green < 128, 1, 2))
    for c in range(3):
        expected = np.bincount(bins[top == c], minlength=20)
        np.testing.assert_array_equal(hist[c], expected)
    assert hist[3:].sum() == 0
    # the unsure share of tissue (classes 1-2) below 0.5
    tissue = top > 0
    assert res.confidence.unsure_share() == pytest.approx((margin[tissue] < 0.5).mean())
    # the 1/8 map: mean margin of each 8 x 8 block (the last row of blocks is 4 px high)
    m = res.confidence.margin_map
    assert m.shape == (38, 275)
    padded = np.pad(margin, ((0, 4), (0, 0)), constant_values=np.nan)
    block_mean = np.nanmean(padded.reshape(38, 8, 275, 8), axis=(1, 3))
    np.testing.assert_allclose(m / 255.0, block_mean, atol=1 / 255 + 1e-6)
    # without the map (the default): the same histograms
    plain = segment_slide(image, model, tile_px=256, overlap_px=64, strip_cols=1100)
    assert plain.confidence.margin_map is None
    np.testing.assert_array_equal(plain.confidence.class_histograms, hist)


def test_tally_without_map_counts_only():
    tally = MarginTally(3, (4, 4), 1.0, bins=4, block_px=0)
    classes = np.array([[0, 1], [2, 2]], np.uint8)
    margin = np.array([[0.1, 0.3], [0.6, 1.0]], np.float32)
    tally.add(classes, margin, 0, 0)
    s = tally.summary()
    assert s.margin_map is None
    np.testing.assert_array_equal(s.class_histograms, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]])
    assert s.unsure_share() == pytest.approx(1 / 3)
    assert s.mean_margin() == pytest.approx((0.375 + 0.625 + 0.875) / 3)
