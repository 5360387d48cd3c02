import numpy as np

from histo.classes import BONE, OSTEOCLAST
from histo.segment import load_model


def test_red_blob_on_blue_grey_is_an_osteoclast(drawn_shapes):
    img, n_discs, _ = drawn_shapes
    model = load_model("classical")
    cm = model.classify(img)
    # the centre of each red disc is osteoclast, the blue-grey field is bone
    assert cm[120, 130] == OSTEOCLAST
    assert cm[384, 384] == OSTEOCLAST
    assert cm[30, 450] == BONE
    pred = model.predict(img)
    assert int(pred.osteoclast_labels.max()) == n_discs


def test_scores_are_probabilities(drawn_shapes):
    img, _, _ = drawn_shapes
    scores = load_model("classical").predict_scores(img[:200, :200])
    assert scores.shape == (6, 200, 200)
    np.testing.assert_allclose(scores[:5].sum(0), 1.0)
