"""The stain estimate on images made from known dye vectors, and the stain checks' verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb_from_hed

from histo.qc import PASS, check_image
from histo.qc._stain import angle_deg, estimate_stains, weighted_percentiles
from histo.qc.synthetic import ANILINE_BLUE_OD, make_case
from histo.synth._render import STAIN_OD

HEMATOXYLIN, EOSIN = rgb_from_hed[0], rgb_from_hed[1]
FAST_RED_VIOLET = np.asarray(STAIN_OD["trap"])


def _two_dye_image(counter, second, rng, faint_share=0.6, side=512) -> np.ndarray:
    """RGB (uint8) of two dyes by Beer-Lambert, with camera noise of 3 DN.

    Pure counterstain, pure second stain and mixed pixels at dye amounts 0.2-1, and a share
    of pale counterstain (amounts 0.08-0.15, as pale marrow) whose hue the noise scatters.
    """
    n = side * side
    kind = rng.choice(4, n, p=[0.15, 0.1, 0.75 - faint_share, faint_share])
    dense = rng.uniform(0.2, 1.0, n)
    mix = rng.uniform(0.0, 1.0, n)
    amounts = np.c_[mix, 1.0 - mix] * dense[:, None]
    amounts[kind == 0] = np.c_[dense, 0 * dense][kind == 0]
    amounts[kind == 1] = np.c_[0 * dense, dense][kind == 1]
    pale = rng.uniform(0.08, 0.15, n)
    amounts[kind == 3] = np.c_[pale, 0 * pale][kind == 3]
    basis = np.stack([counter / np.linalg.norm(counter), second / np.linalg.norm(second)])
    rgb = 255.0 * 10.0 ** (-amounts @ basis) + rng.normal(0.0, 3.0, (n, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8).reshape(side, side, 3)


def test_weighted_percentiles_count_each_value_by_its_weight():
    values = np.array([0.0, 1.0, 2.0, 3.0])
    weights = np.array([1.0, 1.0, 1.0, 97.0])
    np.testing.assert_array_equal(weighted_percentiles(values, weights, [1, 1.5, 50]), [0, 1, 3])
    np.testing.assert_array_equal(weighted_percentiles(values, np.ones(4), [50]), [1])


@pytest.mark.parametrize(
    ("counter", "second", "counter_name"),
    [
        (HEMATOXYLIN, FAST_RED_VIOLET, "hematoxylin"),
        (np.asarray(STAIN_OD["fast-green"]), FAST_RED_VIOLET, "fast-green"),
        (HEMATOXYLIN, EOSIN, "hematoxylin"),
        (np.asarray(ANILINE_BLUE_OD), FAST_RED_VIOLET, "hematoxylin"),
    ],
)
def test_estimate_recovers_both_dyes_of_a_two_dye_image(counter, second, counter_name):
    image = _two_dye_image(counter, second, np.random.default_rng(3))
    est = estimate_stains([image])
    # within 3.5 degrees although 60 % of the pixels are pale and their hues scattered
    assert angle_deg(est.counterstain_od, counter) < 3.5
    assert angle_deg(est.second_od, second) < 3.5
    assert est.counterstain == counter_name


def test_faint_noisy_pixels_do_not_pull_the_counterstain_towards_aniline_blue():
    # hematoxylin and TRAP: aniline blue lies 19 degrees beyond hematoxylin, away from TRAP
    # (the 1st percentile of the pixel count, not of the OD energy, reads 6 degrees off, 13
    # from aniline blue, on this image)
    image = _two_dye_image(HEMATOXYLIN, FAST_RED_VIOLET, np.random.default_rng(4))
    est = estimate_stains([image])
    assert angle_deg(est.counterstain_od, HEMATOXYLIN) < 3.5
    assert angle_deg(est.counterstain_od, ANILINE_BLUE_OD) > 15.5


def test_eosin_and_aniline_blue_are_read_as_unknown_stains():
    he = estimate_stains([_two_dye_image(HEMATOXYLIN, EOSIN, np.random.default_rng(5))])
    assert he.second_deg > 19.0  # eosin: 24 degrees from pararosaniline, the nearest
    ab = estimate_stains(
        [_two_dye_image(ANILINE_BLUE_OD, FAST_RED_VIOLET, np.random.default_rng(6))]
    )
    assert ab.counterstain_deg > 17.0  # aniline blue: 19 degrees from hematoxylin


def _stain_statuses(case) -> dict:
    report = check_image(case.image, case.stated_pixel_size_um)
    return {s.name: s.status for s in report.signals if s.name.startswith("stain.")}


@pytest.mark.parametrize("counterstain", ["hematoxylin", "fast-green", "methyl-green"])
def test_in_domain_section_passes_the_stain_checks(counterstain):
    case = make_case("in-domain", 21, 768, 1.0, counterstain=counterstain, phenotype="normal")
    assert set(_stain_statuses(case).values()) == {PASS}


def test_aniline_blue_counterstain_is_flagged():
    case = make_case("aniline-blue", 22, 768, 1.0, phenotype="normal")
    statuses = _stain_statuses(case)
    assert statuses["stain.counterstain_deg"] != PASS, statuses


@pytest.mark.parametrize("max_pixels", [10**9, 5000, 777])
def test_tissue_od_is_every_stained_pixel_at_a_fixed_stride(max_pixels):
    """The OD rows are those of the stained pixels of all tiles in order (summed OD above
    the floor), every k-th when there are more than ``max_pixels``: the stride runs on across
    tile borders, as over the concatenated tiles."""
    from histo.io.color import optical_density
    from histo.qc._stain import OD_FLOOR, tissue_od

    rng = np.random.default_rng(8)
    tiles = [rng.integers(60, 256, (h, 97, 3), dtype=np.uint8) for h in (50, 81, 33)]
    od = np.concatenate([optical_density(t).reshape(-1, 3) for t in tiles])
    expected = od[od.sum(axis=1) > OD_FLOOR]
    if len(expected) > max_pixels:
        expected = expected[:: int(np.ceil(len(expected) / max_pixels))]
    got = tissue_od(tiles, max_pixels)
    assert 0 < len(got) == len(expected) <= max_pixels
    np.testing.assert_array_equal(got, expected)


def test_white_balance_table_is_the_scaled_tile():
    """The per-channel table gives the tile scaled so that the glass colour becomes 255,
    rounded and clipped, as the float expression does."""
    from histo.qc._sample import _balance

    rng = np.random.default_rng(9)
    tile = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    white = np.float32([231.5, 244.0, 219.25])
    expected = np.clip(tile * (255.0 / white) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_balance(tile, white), expected)
    assert _balance(tile, white)[..., 2].max() == 255  # brighter than the glass: clipped
