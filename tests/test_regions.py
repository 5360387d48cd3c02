"""histo.regions: the standard region placed on long-bone class maps, None on fields."""

from __future__ import annotations

import numpy as np
import pytest

from histo.regions import RegionRules, find_regions
from histo.synth import make_section


def _bbox_um(mask: np.ndarray, p: float) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.min(), ys.max() + 1, xs.min(), xs.max() + 1]) * p


@pytest.fixture(scope="module")
def sections():
    """Long-bone truth maps: 3 phenotypes at 2 µm/px (3 mm) and at 1 µm/px (2 mm)."""
    out = {}
    for ph in ("normal", "oc-rich", "oc-poor"):
        out[ph, 2.0] = make_section(ph, pixel_size_um=2.0, seed=7, anatomy="long-bone")
        out[ph, 1.0] = make_section(ph, size=2000, pixel_size_um=1.0, seed=8, anatomy="long-bone")
    return out


@pytest.mark.parametrize("pixel_size_um", [2.0, 1.0])
@pytest.mark.parametrize("phenotype", ["normal", "oc-rich", "oc-poor"])
def test_standard_region_within_50_um_of_the_truth(sections, phenotype, pixel_size_um):
    s = sections[phenotype, pixel_size_um]
    found = find_regions(s.class_map, pixel_size_um)
    assert found.regions is not None, found.reason
    r = found.regions
    assert r.growth_plate_side == "top"
    truth = _bbox_um(s.standard_region, pixel_size_um)
    assert np.abs(_bbox_um(r.standard, pixel_size_um) - truth).max() <= 50
    assert np.abs(np.array(r.box.edges()) - np.array(s.region_box_um.edges())).max() <= 50
    # the masks do not overlap the standard region
    for other in (r.primary_spongiosa, r.cortex, r.growth_plate):
        assert not (other & r.standard).any()


@pytest.mark.parametrize("turns,flip", [(1, False), (2, True), (3, False)])
def test_any_orientation(sections, turns, flip):
    s = sections["oc-rich", 2.0]
    cm, truth = np.rot90(s.class_map, turns), np.rot90(s.standard_region, turns)
    if flip:
        cm, truth = cm[:, ::-1], truth[:, ::-1]
    found = find_regions(np.ascontiguousarray(cm), 2.0)
    assert found.regions is not None
    expected = {1: "left", 2: "bottom", 3: "right"}[turns]
    assert found.regions.growth_plate_side == expected
    assert np.abs(_bbox_um(found.regions.standard, 2.0) - _bbox_um(truth, 2.0)).max() <= 50


def test_rules_move_the_region(sections):
    s = sections["normal", 2.0]
    base = find_regions(s.class_map, 2.0).regions
    moved = find_regions(s.class_map, 2.0, RegionRules(offset_um=400, depth_um=600)).regions
    assert moved.box.top - base.box.top == pytest.approx(150, abs=1)
    assert moved.box.bottom - moved.box.top == pytest.approx(600, abs=1)


def test_field_has_no_growth_plate():
    s = make_section("normal", 600, 1.0, seed=1)
    found = find_regions(s.class_map, 1.0)
    assert found.regions is None
    assert found.reason == "no growth plate found: measuring the whole field"


def test_patches_of_cartilage_on_a_field_are_no_growth_plate():
    """Blobs of cartilage of 50 x 100 µm (over 0.01 mm² together, each thicker than a
    calcified core) on a trabecular field, as a network reads them, make no growth plate; a
    band 60 x 400 µm does."""
    from histo import classes

    s = make_section("normal", 1500, 1.0, seed=2)
    cm = s.class_map.copy()
    for y, x in ((200, 200), (700, 900), (1200, 400), (300, 1200)):
        cm[y : y + 50, x : x + 100] = classes.CARTILAGE
    found = find_regions(cm, 1.0)
    assert found.regions is None
    assert found.reason == "no growth plate found: measuring the whole field"
    cm[100:160, 500:900] = classes.CARTILAGE
    assert find_regions(cm, 1.0).reason != "no growth plate found: measuring the whole field"


def test_cartilage_apart_from_the_section_is_no_growth_plate_of_it():
    """A cartilage band far above the section (the standard region's rows hold no bone of
    the section) leaves the field measured whole instead of failing."""
    from histo import classes

    cm = np.zeros((3000, 1500), np.uint8)  # 1 µm/px
    cm[100:250, 200:1300] = classes.CARTILAGE
    cm[2000:2900, 100:1400] = classes.MARROW
    cm[2000:2900, 100:200] = cm[2000:2900, 1300:1400] = classes.BONE
    found = find_regions(cm, 1.0)
    assert found.regions is None
    assert "measuring the whole field" in found.reason


def test_truth_counts_cartilage_with_bone_and_soft_tissue_outside(sections):
    """The generator's truth is histo.measure on the true map in the true region: B.Ar is the
    pixels of bone, osteocytes and cartilage there, T.Ar leaves soft tissue out."""
    s = sections["oc-poor", 2.0]
    cm, mm2 = s.class_map[s.standard_region], 4e-6  # mm² of a 2 µm pixel
    bone_px = np.isin(cm, (2, 4, 5)).sum()
    assert s.truth["B.Ar"] == pytest.approx(bone_px * mm2)
    assert s.truth["T.Ar"] == pytest.approx(np.isin(cm, (1, 2, 3, 4, 5)).sum() * mm2)
    cartilage = 100.0 * (cm == 5).sum() / bone_px
    assert s.truth["Cg.Ar/B.Ar"] == pytest.approx(cartilage) and cartilage > 5


def test_measured_regions_are_the_found_regions_as_um_polygons(sections):
    """What viewers draw (MeasuredRegion.rois, µm): the standard box within half a pixel, the
    growth plate, cortices and primary spongiosa within a search-grid pixel of their masks."""
    import cv2

    from histo.io.blocks import downsample_nearest
    from histo.io.roi import polygons_mask
    from histo.measure import measure
    from histo.measure.regional import measure_by_region, search_grid

    s, p = sections["normal", 2.0], 2.0
    found = measure_by_region(s.class_map, p, lambda roi: measure(s.class_map, p, roi=roi))
    rois = found.region.rois
    small_shape, grid = search_grid(s.class_map.shape, p)
    regions = find_regions(downsample_nearest(s.class_map, small_shape), grid).regions
    ring = rois["standard"].polygons[0][0]
    t, b, left, right = regions.box.edges()
    # Roi vertices sit on pixel centres (pixel i centred on i p): edges move by half a pixel
    got = [ring[:, 0].min(), ring[:, 0].max(), ring[:, 1].min(), ring[:, 1].max()]
    assert got == pytest.approx([t - p / 2, b - p / 2, left - p / 2, right - p / 2], abs=1e-9)
    r = int(round(grid / p)) + 1
    band_disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    for key, mask in (
        ("growth_plate", regions.growth_plate),
        ("cortex", regions.cortex),
        ("primary", regions.primary_spongiosa),
    ):
        full = cv2.resize(
            mask.astype(np.uint8), s.class_map.shape[::-1], interpolation=cv2.INTER_NEAREST
        )
        drawn = polygons_mask(rois[key].in_pixels(p), s.class_map.shape)
        band = cv2.dilate(full, band_disk) > cv2.erode(full, band_disk)
        assert not ((drawn ^ (full > 0)) & ~band).any(), key
        assert (drawn & (full > 0)).sum() / (drawn | (full > 0)).sum() > 0.9, key


def _periosteal_columns(cm: np.ndarray, rows: range) -> list[int]:
    """Per row, the column of the left cortex's outermost bone pixel."""
    return [int(np.flatnonzero(np.isin(cm[r], (2, 4)))[0]) for r in rows]


def test_cartilage_specks_in_the_cortex_do_not_thin_it(sections):
    """Specks of cartilage a segmenter leaves in the cortex are crossed; a septum as long as a
    persisting calcified-cartilage core still ends the cortical run."""
    p = 2.0
    s = sections["normal", p]
    base = find_regions(s.class_map, p).regions.box
    top, bottom = int(base.top / p), int(base.bottom / p)
    specked = s.class_map.copy()
    rows = range(top - 100, bottom + 100, 20)  # every 40 µm
    for r, c in zip(rows, _periosteal_columns(specked, rows), strict=True):
        specked[r : r + 8, c + 5 : c + 15] = 5  # 16 x 20 µm, 10 µm inside the periosteum
    got = find_regions(specked, p).regions.box
    assert np.abs(np.subtract(got.edges(), base.edges())).max() <= 8
    cored = s.class_map.copy()
    rows = range(top - 100, bottom + 100)
    for r, c in zip(rows, _periosteal_columns(cored, rows), strict=True):
        cored[r, c + 5 : c + 7] = 5  # a 4 µm wide septum 10 µm inside the periosteum
    assert find_regions(cored, p).regions.box.left < base.left - 20
