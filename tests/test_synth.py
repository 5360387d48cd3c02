"""The synthetic generator: its truth must agree with its own class map and phenotypes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from histo import classes
from histo.synth import make_section, truth_paths, write_synthetic_slide


@pytest.mark.parametrize("pixel_size_um", [0.5, 1.0])
@pytest.mark.parametrize("phenotype", ["normal", "oc-rich", "oc-poor"])
def test_truth_matches_class_map(synthetic_section, phenotype, pixel_size_um):
    size = int(800 / pixel_size_um)
    s = synthetic_section(phenotype, size, pixel_size_um, seed=11)
    cm, t, p = s.class_map, s.truth, pixel_size_um
    assert cm.dtype == np.uint8 and set(np.unique(cm)) <= {0, 1, 2, 3, 4}
    mm2 = (p / 1000) ** 2
    assert t["T.Ar"] == pytest.approx((cm > 0).sum() * mm2)
    assert t["B.Ar"] == pytest.approx(np.isin(cm, [2, 4]).sum() * mm2)
    # counts: every instance is one connected region of its class, none touch
    oc_ids = np.unique(s.osteoclast_labels[s.osteoclast_labels > 0])
    assert t["N.Oc"] == len(oc_ids)
    assert np.array_equal(s.osteoclast_labels > 0, cm == classes.OSTEOCLAST)
    _, n_oc_components = ndi.label(cm == classes.OSTEOCLAST, structure=np.ones((3, 3)))
    assert n_oc_components == len(oc_ids)
    ot_ids = np.unique(s.osteocyte_labels[s.osteocyte_labels > 0])
    assert np.array_equal(s.osteocyte_labels > 0, cm == classes.OSTEOCYTE)
    _, n_ot_components = ndi.label(cm == classes.OSTEOCYTE, structure=np.ones((3, 3)))
    assert n_ot_components == len(ot_ids) == len(s.occupied)
    assert t["N.Ot"] == sum(s.occupied.values())
    assert t["Empty lacunae (non-standard)"] == len(s.occupied) - t["N.Ot"]
    # every osteoclast touches bone; every lacuna lies inside bone
    bone = np.isin(cm, [2, 4])
    near_bone = ndi.binary_dilation(bone, np.ones((3, 3)))
    touching = np.unique(s.osteoclast_labels[near_bone & (s.osteoclast_labels > 0)])
    assert len(touching) == len(oc_ids)
    lac_ring = ndi.binary_dilation(cm == 4, np.ones((3, 3))) & (cm != 4)
    assert np.all(np.isin(cm[lac_ring], [2, 4]))
    # the sub-pixel perimeter is close to a pixel-count estimate (edge pixels, Crofton-like)
    edge = bone & ~ndi.binary_erosion(bone, np.ones((3, 3)))
    assert t["B.Pm"] == pytest.approx(edge.sum() * p / 1000 / 1.12, rel=0.12)
    assert t["N.Oc/B.Pm"] == pytest.approx(t["N.Oc"] / t["B.Pm"]) if t["N.Oc"] else True


def _flat_field(pixel_size_um: float):
    """Bone below 120 µm, three 60 µm osteoclasts lying on it, one 20 µm off it (µm geometry)."""
    from histo.synth._geometry import Field

    p = pixel_size_um
    h, w = int(240 / p), int(400 / p)
    y = (np.arange(h)[:, None] + 0.5) * p
    sdf = np.broadcast_to((y - 120.0).astype(np.float32), (h, w)).copy()
    cm = np.where(sdf > 0, classes.BONE, classes.MARROW).astype(np.uint8)
    oc = np.zeros((h, w), np.int32)
    for k, x0 in enumerate((40, 140, 240)):
        oc[int(100 / p) : int(120 / p), int(x0 / p) : int((x0 + 60) / p)] = k + 1
    oc[int(40 / p) : int(60 / p), int(340 / p) : int(360 / p)] = 4  # in the marrow
    cm[oc > 0] = classes.OSTEOCLAST
    zeros = np.zeros((h, w), np.float32)
    return Field(
        (h, w), p, "normal", np.ones((h, w), bool), sdf, zeros, cm, oc,
        np.zeros((h, w), np.int32), {}, np.zeros((h, w), bool),
        zeros, zeros, zeros, zeros, zeros, {"n_osteoclasts": 3},
    )  # fmt: skip


def test_truth_osteoclast_surface_is_the_contact_at_any_pixel_size():
    from histo.synth import _truth_parts, truth_indices

    for p in (0.5, 1.0, 2.0):
        t = truth_indices(_truth_parts(_flat_field(p)), p)
        oc_s_um = t["Oc.S/BS"] / 100 * t["B.Pm"] * 1000
        # the bone's outline, closed along the image edges: 2 x 400 + 2 x 120 µm
        assert t["B.Pm"] * 1000 == pytest.approx(1040.0, rel=2e-3)
        assert oc_s_um == pytest.approx(180.0, abs=0.5 * p), p


def test_phenotypes_differ_in_the_stated_direction():
    rows = {
        ph: [make_section(ph, 700, 1.0, seed=100 + i).truth for i in range(3)]
        for ph in ("normal", "oc-rich", "oc-poor")
    }
    for t in rows["normal"]:
        assert 8 <= t["BV/TV"] <= 28
        assert 0.5 <= t["N.Oc/B.Pm"] <= 8
    for ph in ("oc-rich", "oc-poor"):
        for t in rows[ph]:
            assert 35 <= t["BV/TV"] <= 75
    for t in rows["oc-poor"]:
        assert t["N.Oc"] == 0 and t["Oc.S/BS"] == 0
    normal_noc = np.median([t["N.Oc/B.Pm"] for t in rows["normal"]])
    rich_noc = np.median([t["N.Oc/B.Pm"] for t in rows["oc-rich"]])
    assert rich_noc > 2 * normal_noc
    assert min(t["Ma.Ar/T.Ar"] for t in rows["normal"]) > max(
        t["Ma.Ar/T.Ar"] for t in rows["oc-rich"] + rows["oc-poor"]
    )


def test_same_seed_same_section_and_different_seeds_differ():
    a = make_section("normal", 400, 1.0, seed=5)
    b = make_section("normal", 400, 1.0, seed=5)
    c = make_section("normal", 400, 1.0, seed=6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.class_map, b.class_map)
    assert not np.array_equal(a.class_map, c.class_map)
    assert a.params["bv_tv_target"] != c.params["bv_tv_target"]


@pytest.mark.parametrize("counterstain", ["hematoxylin", "fast-green", "methyl-green"])
def test_counterstains_colour_bone_differently_and_trap_is_red(counterstain):
    s = make_section("oc-rich", 600, 1.0, seed=3, counterstain=counterstain)
    img = s.image.astype(float)
    oc = img[s.class_map == classes.OSTEOCLAST].mean(axis=0)
    bone = img[s.class_map == classes.BONE].mean(axis=0)
    assert oc[0] > oc[1] + 20, "TRAP+ osteoclasts are red: more red than green"
    if counterstain == "fast-green":
        assert bone[1] > bone[0] + 15, "fast green bone is green-blue"
    glass = img[s.class_map == classes.BACKGROUND].mean(axis=0)
    assert glass.mean() > bone.mean()


def test_write_slide_carries_pixel_size_pyramid_and_truth(tmp_path):
    path = tmp_path / "slide.ome.tif"
    truth = write_synthetic_slide(path, "normal", size=(1300, 2100), pixel_size_um=0.5, seed=1)
    files = truth_paths(path)
    assert all(f.exists() for f in files.values())
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        series = tf.series[0]
        assert series.shape == (1300, 2100, 3)
        assert len(series.levels) == 3  # 2100 -> 1050 -> 525
        assert 'PhysicalSizeX="0.5"' in tf.ome_metadata
    cm = tifffile.imread(files["classes"])
    assert cm.shape == (1300, 2100) and cm.dtype == np.uint8
    saved = json.loads(files["truth"].read_text())
    assert saved["indices"]["T.Ar"] == pytest.approx((cm > 0).sum() * 0.5**2 / 1e6)
    ocl = tifffile.imread(files["osteoclasts"])
    assert len(np.unique(ocl[ocl > 0])) == truth["indices"]["N.Oc"]
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".synth-*"))


def test_mosaic_of_fields_keeps_instances_unique(tmp_path, monkeypatch):
    import histo.synth as synth

    monkeypatch.setattr(synth, "FIELD_MAX_PX", 512)  # force a 2 x 2 mosaic at small size
    path = tmp_path / "mosaic.ome.tif"
    truth = write_synthetic_slide(path, "oc-rich", size=1024, pixel_size_um=2.0, seed=4)
    assert truth["fields"] == 4
    ocl = tifffile.imread(truth_paths(path)["osteoclasts"])
    ids = np.unique(ocl[ocl > 0])
    assert len(ids) == truth["indices"]["N.Oc"] > 0
    assert ids.max() == len(ids)  # labels are consecutive across fields
    cm = tifffile.imread(truth_paths(path)["classes"])
    # each field keeps a glass margin: the field borders are background
    assert (cm[510:514, :] == 0).all() and (cm[:, 510:514] == 0).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="phenotype"):
        make_section("osteoporosis", 100)
    with pytest.raises(ValueError, match="pixel size"):
        make_section("normal", 100, pixel_size_um=0)
    assert math.isfinite(make_section("normal", 128, 2.0, seed=0).truth["T.Ar"])


# --------------------------------------------------------------------------- long-bone sections


@pytest.fixture(scope="module")
def long_bones():
    """One quick long-bone section per phenotype (2 µm/px, 3 mm x 2 mm)."""
    return {
        ph: make_section(ph, pixel_size_um=2.0, seed=1, anatomy="long-bone", counterstain=cs)
        for ph, cs in (
            ("normal", "hematoxylin"),
            ("oc-rich", "fast-green"),
            ("oc-poor", "methyl-green"),
        )
    }


def test_long_bone_holds_every_class_and_region(long_bones):
    from histo.regions import Region

    s = long_bones["normal"]
    assert s.class_map.shape == (1500, 1000)
    assert set(np.unique(s.class_map)) == set(range(7))
    assert set(np.unique(s.regions)) == {int(r) for r in Region}
    cm, reg = s.class_map, s.regions
    # the growth plate is cartilage; the cortex is bone; soft tissue lies outside bone
    assert (cm[reg == Region.GROWTH_PLATE] == classes.CARTILAGE).mean() > 0.95
    assert np.isin(cm[reg == Region.CORTEX], [classes.BONE, classes.OSTEOCYTE]).mean() > 0.9
    assert (cm[reg == Region.SOFT_TISSUE] == classes.SOFT_TISSUE).all()
    # the standard region lies in the secondary spongiosa
    assert (reg[s.standard_region] == Region.SECONDARY_SPONGIOSA).all()
    # TRAP+ cells crowd at the junction: more osteoclasts per area in the primary spongiosa
    oc = cm == classes.OSTEOCLAST
    assert oc[reg == Region.PRIMARY_SPONGIOSA].mean() > 2 * oc[s.standard_region].mean()


def test_chondrocyte_lacunae_are_cartilage_never_osteocytes():
    from histo.synth._longbone import build_long_bone

    lb = build_long_bone("normal", (1500, 1000), 2.0, np.random.default_rng(3))
    cm = lb.field.class_map
    assert lb.chondrocytes.sum() > 500
    assert (cm[lb.chondrocytes] == classes.CARTILAGE).all()
    # no osteocyte lacuna touches cartilage
    near_cartilage = ndi.binary_dilation(cm == classes.CARTILAGE, np.ones((3, 3)))
    assert not (near_cartilage & (cm == classes.OSTEOCYTE)).any()
    # osteocytes lie in bone, the osteoclasts touch bone or cartilage
    ring = ndi.binary_dilation(cm == 4, np.ones((3, 3))) & (cm != 4)
    assert np.isin(cm[ring], [2, 3, 4]).all()


def test_long_bone_phenotypes_differ_as_biology_does(long_bones):
    t = {ph: s.truth for ph, s in long_bones.items()}
    assert 10 <= t["normal"]["BV/TV"] <= 21
    for ph in ("oc-rich", "oc-poor"):
        assert t[ph]["BV/TV"] > t["normal"]["BV/TV"] + 15
        # unresorbed calcified-cartilage cores persist deep in the shaft
        assert t[ph]["Cg.Ar/B.Ar"] > 5 > t["normal"]["Cg.Ar/B.Ar"]
    assert t["oc-poor"]["N.Oc"] == 0 and t["oc-poor"]["N.Oc/B.Pm"] == 0
    assert t["oc-rich"]["N.Oc/B.Pm"] > 2 * t["normal"]["N.Oc/B.Pm"] > 0
    # truth areas are the class map's in the region, cartilage counted in B.Ar
    s = long_bones["oc-poor"]
    in_region = s.class_map[s.standard_region]
    mm2 = (s.pixel_size_um / 1000) ** 2
    assert t["oc-poor"]["T.Ar"] == pytest.approx(in_region.size * mm2)
    assert t["oc-poor"]["B.Ar"] == pytest.approx(np.isin(in_region, [2, 4, 5]).sum() * mm2)


def test_long_bone_geometry_is_in_micrometres():
    """The same seed at two pixel sizes: the standard region lies at the same place (µm)."""
    a = make_section("oc-poor", pixel_size_um=2.0, seed=5, anatomy="long-bone")
    b = make_section("oc-poor", size=1000, pixel_size_um=3.0, seed=5, anatomy="long-bone")
    assert np.allclose(a.region_box_um.edges(), b.region_box_um.edges(), atol=15)
    assert a.truth["BV/TV"] == pytest.approx(b.truth["BV/TV"], abs=4)


def test_write_long_bone_slide_with_region_truth(tmp_path):
    from histo.synth import region_paths

    path = tmp_path / "tibia.ome.tif"
    truth = write_synthetic_slide(path, "normal", pixel_size_um=2.0, seed=2, anatomy="long-bone")
    cm = tifffile.imread(truth_paths(path)["classes"])
    assert cm.shape == (1500, 1000) and truth["size_px"] == [1500, 1000]
    standard = tifffile.imread(region_paths(path)["standard"]).astype(bool)
    regions = tifffile.imread(region_paths(path)["regions"])
    assert regions.shape == cm.shape and regions.max() == 6
    saved = json.loads(truth_paths(path)["truth"].read_text())
    assert saved["anatomy"] == "long-bone"
    assert saved["indices"]["T.Ar"] == pytest.approx(standard.sum() * 2.0**2 / 1e6)
    box = saved["standard_region_um"]
    assert box["top"] - saved["junction_um"] == pytest.approx(250.0)
    with pytest.raises(ValueError, match="too small"):
        make_section("normal", size=400, pixel_size_um=2.0, anatomy="long-bone")


def test_cli_synth_long_bone(tmp_path, capsys):
    from histo.cli import main
    from histo.synth import region_paths

    out = tmp_path / "poor.ome.tif"
    args = ["synth", "--phenotype", "oc-poor", "--anatomy", "long-bone", "--pixel-size", "2"]
    assert main([*args, "--seed", "4", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["truth"]["N.Oc"] == 0 and printed["truth"]["BV/TV"] > 35
    assert region_paths(out)["standard"].exists()
    with pytest.raises(SystemExit, match="too small"):
        main([*args, "--size", "300", "--out", str(tmp_path / "small.ome.tif")])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_howships_lacuna_stays_open_to_the_marrow_on_a_curved_surface(seed):
    """A pit lies under its osteoclast, no deeper than its depth: no channel under the bone.

    A marrow cavity of radius 25 µm in bone; a 50-µm osteoclast on its wall with a 1.5-µm pit.
    A pit cut as a flat ellipse along the tangent would reach ~10 µm into the bone at its ends.
    """
    from dataclasses import replace

    from histo.synth._cells import _osteoclast_at, bone_surface
    from histo.synth._geometry import PHENOTYPE_PARAMS

    yy, xx = np.mgrid[:160, :160]
    sdf = (np.hypot(yy - 80.0, xx - 80.0) - 25.0).astype(np.float32)  # µm at 1 µm/px
    pp = replace(PHENOTYPE_PARAMS["oc-rich"], oc_length_um=(50.0, 50.0), pit_depth_um=(1.5, 1.5))
    oc = _osteoclast_at(
        np.random.default_rng(seed),
        105,
        80,
        bone_surface(sdf, 1.0),
        sdf,
        np.ones_like(sdf, bool),
        pp,
        1.0,
    )
    carved = np.zeros(sdf.shape, bool)
    carved[oc.window] = oc.carved
    depth_px = ndi.distance_transform_edt(sdf > 0)  # from the marrow before the pit
    assert carved.sum() > 20
    assert depth_px[carved].max() <= 1.5 + 1.0
