import cv2
import numpy as np

from histo.classes import BONE, OSTEOCLAST
from histo.segment.instances import centre_target, split_osteoclasts


def _touching_pair():
    labels = np.zeros((80, 120), np.int32)
    a = np.zeros_like(labels, np.uint8)
    cv2.circle(a, (40, 40), 20, 1, -1)
    b = np.zeros_like(a)
    cv2.circle(b, (76, 40), 20, 1, -1)
    labels[a > 0] = 1
    labels[(b > 0) & (labels == 0)] = 2
    return labels


def test_centre_target_peaks_at_cell_centres():
    labels = _touching_pair()
    c = centre_target(labels)
    assert c[40, 40] > 0.85 and c[40, 76] > 0.85
    # low on the border between the two cells
    border = (labels[:, :-1] == 1) & (labels[:, 1:] == 2)
    assert c[:, :-1][border].max() < 0.2


def test_touching_osteoclasts_are_split():
    labels = _touching_pair()
    class_map = np.where(labels > 0, OSTEOCLAST, BONE).astype(np.uint8)
    split = split_osteoclasts(class_map, centre_target(labels))
    assert len(np.unique(split[split > 0])) == 2
    # each true cell is mostly one predicted label
    for k in (1, 2):
        vals, counts = np.unique(split[labels == k], return_counts=True)
        assert counts.max() / counts.sum() > 0.95


def test_components_are_opencvs():
    """histo's connected components (labels from OpenCV, boxes and areas from the foreground
    pixels) equal cv2.connectedComponentsWithStats on random masks of every density."""
    from histo.segment.instances import _components

    rng = np.random.default_rng(5)
    for _ in range(100):
        h, w = rng.integers(1, 50, 2)
        mask = rng.random((h, w)) < rng.random()
        n, labels, stats = _components(mask)
        n_cv, labels_cv, stats_cv, _ = cv2.connectedComponentsWithStats(
            mask.view(np.uint8), connectivity=8
        )
        assert n == n_cv
        np.testing.assert_array_equal(labels, labels_cv)
        np.testing.assert_array_equal(stats[1:], stats_cv[1:])
        assert stats[0, cv2.CC_STAT_AREA] == stats_cv[0, cv2.CC_STAT_AREA]
