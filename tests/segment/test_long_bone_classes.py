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
