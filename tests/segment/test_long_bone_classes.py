"""Segmentation with 8 outputs (7 classes + centre map): codes 5 and 6 pass through tiling and
instance labelling, and chondrocyte lacunae (cartilage) never become osteocytes."""

import numpy as np

from histo import classes
from histo.segment import segment_slide
from histo.segment.instances import centre_target


class _TruthEncoded:
    """A 7-class segmenter that reads its answer from the image: red holds the class code,
    green the centre map (x 255). It runs the real tiling, blending and labelling."""

    working_pixel_size_um = 2.0
    n_outputs = 8

    def predict_scores(self, rgb):
        codes = rgb[..., 0].astype(np.int64)
        scores = np.zeros((8,) + codes.shape, np.float32)
        for c in range(7):
            scores[c] = codes == c
        scores[7] = rgb[..., 1] / 255.0
        return scores


def test_cartilage_and_soft_tissue_survive_and_lacunae_in_cartilage_are_not_osteocytes(tibia):
    cm = tibia.class_map
    centre = centre_target(tibia.osteoclast_labels)
    rgb = np.zeros(cm.shape + (3,), np.uint8)
    rgb[..., 0] = cm
    rgb[..., 1] = np.round(np.clip(centre, 0, 1) * 255)
    res = segment_slide(rgb, _TruthEncoded(), tile_px=256, overlap_px=32)
    got = np.asarray(res.class_map)
    assert (got == classes.CARTILAGE).sum() == (cm == classes.CARTILAGE).sum()
    assert (got == classes.SOFT_TISSUE).sum() == (cm == classes.SOFT_TISSUE).sum()
    # every osteocyte is a class-4 region: none lies on cartilage, though the growth plate is
    # full of lacunae
    ot = np.asarray(res.osteocyte_labels)
    assert ot.max() > 100
    assert not (ot > 0)[cm == classes.CARTILAGE].any()
    # TRAP+ cells on calcified cartilage at the junction are kept (it is a resorbed surface)
    n_true = len(np.unique(tibia.osteoclast_labels[tibia.osteoclast_labels > 0]))
    n_found = len(
        np.unique(np.asarray(res.osteoclast_labels)[np.asarray(res.osteoclast_labels) > 0])
    )
    assert n_found >= 0.9 * n_true


def _blobs_inside(cm: np.ndarray, code: int, n: int, rng) -> list[tuple[int, int]]:
    """Centres of ``n`` 5x5 blobs whose 9x9 surroundings are all ``code``."""
    from scipy import ndimage as ndi

    inner = ndi.binary_erosion(cm == code, np.ones((9, 9), bool))
    ys, xs = np.nonzero(inner[::12, ::12])
    pick = rng.choice(len(ys), n, replace=False)
    return [(int(ys[i]) * 12, int(xs[i]) * 12) for i in pick]


def test_a_lacuna_in_cartilage_is_not_an_osteocyte_but_one_in_bone_is(tibia):
    """Class-4 blobs (100 µm² at 2 µm/px) painted inside cartilage are chondrocyte lacunae
    and are dropped; the same blobs inside bone are counted, one osteocyte each."""
    rng = np.random.default_rng(0)
    cm = tibia.class_map.copy()
    cm[cm == classes.OSTEOCYTE] = classes.BONE  # only the painted lacunae remain
    in_cart = _blobs_inside(cm, classes.CARTILAGE, 20, rng)
    in_bone = _blobs_inside(cm, classes.BONE, 20, rng)
    for y, x in in_cart + in_bone:
        cm[y - 2 : y + 3, x - 2 : x + 3] = classes.OSTEOCYTE
    rgb = np.zeros(cm.shape + (3,), np.uint8)
    rgb[..., 0] = cm
    res = segment_slide(rgb, _TruthEncoded(), tile_px=256, overlap_px=32)
    ot = np.asarray(res.osteocyte_labels)
    assert sum(ot[y, x] > 0 for y, x in in_bone) == 20
    assert sum(ot[y, x] > 0 for y, x in in_cart) == 0
    assert len(np.unique(ot[ot > 0])) == 20


def _in_cartilage_whole_window(cc, classes_w, n_cc):
    """The rim rule counted on the whole window (the oracle of ``_in_cartilage``)."""
    import cv2

    out = np.zeros(n_cc, bool)
    near = cv2.dilate(cc.astype(np.float32), np.ones((5, 5), np.uint8)).astype(np.int64)
    rim = cc == 0
    n_cart = np.bincount(near[rim & (classes_w == classes.CARTILAGE)], minlength=n_cc)
    n_bone = np.bincount(near[rim & (classes_w == classes.BONE)], minlength=n_cc)
    out[1:] = n_cart[1:] > n_bone[1:]
    return out


def _speckled_map(rng, shape, cartilage_share):
    """Bone and marrow with cartilage patches and specks and many small lacunae, some touching
    the window's edges and each other's rims."""
    import cv2

    cm = np.where(rng.random(shape) < 0.6, classes.BONE, classes.MARROW).astype(np.uint8)
    cm = cv2.medianBlur(cm, 5)
    n_patches = int(cartilage_share * shape[0] * shape[1] / 400)
    for _ in range(n_patches):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = int(rng.integers(1, 12))
        cv2.circle(cm, (int(x), int(y)), r, int(classes.CARTILAGE), -1)
    for _ in range(shape[0] * shape[1] // 300):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(1, 5, size=2)
        cm[y : y + h, x : x + w] = classes.OSTEOCYTE
    return cm


def test_in_cartilage_on_the_boxes_equals_the_whole_window_count():
    """Lacunae in cartilage found on the boxes near cartilage are those the rim rule finds on
    the whole window: specks of cartilage on a field, patches on a long bone, none at all."""
    from histo.segment.instances import _components, _in_cartilage

    rng = np.random.default_rng(3)
    n_in = 0
    for share in (0.0, 0.002, 0.05, 0.5):
        for _ in range(3):
            cm = _speckled_map(rng, (300, 420), share)
            n_cc, cc, stats = _components(cm == classes.OSTEOCYTE)
            want = _in_cartilage_whole_window(cc, cm, n_cc)
            got = _in_cartilage(cc, stats, cm, np.arange(1, n_cc))
            np.testing.assert_array_equal(got, want)
            some = np.arange(1, n_cc, 3)
            got_some = _in_cartilage(cc, stats, cm, some)
            np.testing.assert_array_equal(np.flatnonzero(got_some), some[want[some]])
            n_in += int(want.sum())
    assert n_in > 50  # the maps hold lacunae in cartilage to find


def _holes_map(tibia, rng):
    """The tibia's class map with 5x5 marrow holes (100 µm² at 2 µm/px) inside cartilage and
    inside bone, and 13x13 marrow pools (676 µm²) inside cartilage."""
    cm = tibia.class_map.copy()
    spots = _blobs_inside(cm, classes.CARTILAGE, 40, rng)
    in_cart, pools = spots[:30], spots[30:]
    in_bone = _blobs_inside(cm, classes.BONE, 20, rng)
    for y, x in in_cart + in_bone:
        cm[y - 2 : y + 3, x - 2 : x + 3] = classes.MARROW
    for y, x in pools:
        cm[y - 6 : y + 7, x - 6 : x + 7] = classes.MARROW
    return cm, in_cart, in_bone, pools


def test_small_holes_in_cartilage_are_cartilage_those_in_bone_stay(tibia):
    """A lacuna of the cartilage read as marrow is given back to the cartilage, wherever the
    tiles, bands and strips cut it; a hole in bone and a marrow space stay marrow."""
    rng = np.random.default_rng(5)
    cm, in_cart, in_bone, pools = _holes_map(tibia, rng)
    rgb = np.zeros(cm.shape + (3,), np.uint8)
    rgb[..., 0] = cm
    plain = rgb.copy()
    plain[..., 0] = tibia.class_map
    for strip_cols in (None, 300):
        kw = {"tile_px": 256, "overlap_px": 32, "strip_cols": strip_cols}
        got = np.asarray(segment_slide(rgb, _TruthEncoded(), **kw).class_map)
        before = np.asarray(segment_slide(plain, _TruthEncoded(), **kw).class_map)
        for y, x in in_cart:
            assert (got[y - 2 : y + 3, x - 2 : x + 3] == classes.CARTILAGE).all(), (y, x)
        for y, x in in_bone:
            assert (got[y - 2 : y + 3, x - 2 : x + 3] == classes.MARROW).all(), (y, x)
        for y, x in pools:
            assert (got[y - 6 : y + 7, x - 6 : x + 7] == classes.MARROW).all(), (y, x)
        # elsewhere the map is what it is without the painted holes
        painted = cm != tibia.class_map
        assert (got == before)[~painted].all()


def test_lacunae_found_block_by_block_are_those_of_the_whole_window(tibia):
    """Column blocks narrower than the lacunae's spread find exactly the whole window's."""
    from histo.segment.cartilage import cartilage_lacunae

    cm, in_cart, _, _ = _holes_map(tibia, np.random.default_rng(6))

    def filled(block_cols: int, rows=(0, cm.shape[0]), cols=None) -> np.ndarray:
        out = np.zeros(cm.shape, bool)
        for fill in cartilage_lacunae(cm, 2.0, rows, cols, block_cols=block_cols):
            out[:, fill.cols] |= fill.mask
        return out

    whole = filled(10**6)
    assert all(whole[y - 2 : y + 3, x - 2 : x + 3].all() for y, x in in_cart)
    assert (filled(64) == whole).all()
    # owned rows and columns split the lacunae without loss or overlap
    h, w = cm.shape
    parts = [filled(64, (r0, r1), (c0, c1)) for r0, r1 in ((0, 700), (700, h))
             for c0, c1 in ((0, 450), (450, w))]  # fmt: skip
    assert (sum(p.astype(int) for p in parts) == whole).all()
