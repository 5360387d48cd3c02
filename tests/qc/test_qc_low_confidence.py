"""The low-confidence map: blocks whose mean margin is below the model's reference."""

from __future__ import annotations

import numpy as np

from histo.qc._confidence import ConfidenceSummary, low_confidence_map


def _summary(margin_map: np.ndarray) -> ConfidenceSummary:
    return ConfidenceSummary(np.zeros((5, 20), np.int64), margin_map, 8, 1.0)


def test_blocks_below_the_reference_low_margin_are_marked():
    # mean margins 0.1, 0.49, 0.51, 0.9 stored as rint(255 m)
    means = np.array([[0.1, 0.49], [0.51, 0.9]])
    s = _summary(np.rint(means * 255).astype(np.uint8))
    unsure = low_confidence_map(s, {"low_margin": 0.5})
    np.testing.assert_array_equal(unsure.mask, [[1, 1], [0, 0]])
    assert (unsure.block_px, unsure.pixel_size_um, unsure.low_margin) == (8, 1.0, 0.5)
    # a stricter reference marks fewer blocks; no reference: the default 0.5
    np.testing.assert_array_equal(low_confidence_map(s, {"low_margin": 0.3}).mask, [[1, 0], [0, 0]])
    np.testing.assert_array_equal(low_confidence_map(s, None).mask, [[1, 1], [0, 0]])


def test_a_large_map_is_cut_to_coarser_blocks_keeping_every_unsure_one():
    margin = np.full((10, 7), 255, np.uint8)
    margin[0, 0] = margin[9, 6] = margin[4, 3] = 0
    unsure = low_confidence_map(_summary(margin), None, max_side=4)
    # 10 blocks a side -> factor 3 (ceil(10 / 4)): 4 x 3 coarse blocks of 24 working px
    assert unsure.mask.shape == (4, 3) and unsure.block_px == 24
    expected = np.zeros((4, 3), np.uint8)
    expected[0, 0] = expected[3, 2] = expected[1, 1] = 1
    np.testing.assert_array_equal(unsure.mask, expected)


def test_no_map_no_layer():
    assert low_confidence_map(_summary(None), {"low_margin": 0.5}) is None
    assert low_confidence_map(None, None) is None


def test_tally_map_of_a_huge_slide_has_larger_blocks():
    from histo.qc._confidence import MAX_MAP_SIDE, MarginTally

    # 10 x 40000 working px: 8-px blocks would make 5000 a side, so blocks of 10 px
    tally = MarginTally(3, (10, 40_000), 1.0)
    assert tally.block == -(-40_000 // MAX_MAP_SIDE) == 10
    margin = np.linspace(0.0, 1.0, 40_000, dtype=np.float32)[None].repeat(10, axis=0)
    tally.add(np.ones((10, 40_000), np.uint8), margin, 0, 0)
    s = tally.summary()
    assert s.margin_map.shape == (1, 4000) and s.map_block_px == 10
    expected = margin[:, 3990:4000].mean()
    assert abs(int(s.margin_map[0, 399]) - expected * 255) <= 0.5 + 1e-6
    expected = margin[:, :10].mean()
    assert abs(int(s.margin_map[0, 0]) - expected * 255) <= 0.5 + 1e-6
    assert max(s.margin_map.shape) <= MAX_MAP_SIDE
