"""Accuracy regression test of the shipped network, end to end through analyze_slide.

One seeded synthetic slide per counterstain (each with another phenotype, so every call is
made), 1024² at the working resolution of 1 µm/px. The class-map Dice, pooled over the three
slides as the model card pools it, must stay above the card's validation figure
(models/README.md and models/evaluation/validation/stages-8-9.md, the shipped stage 9)
minus a margin; the phenotype calls must be right and BV/TV within the card's target.

Margins: the card pools 36 validation slides; three slides scatter more. On 18 seeded
768² slides (two per counterstain and phenotype pair) the worst single slide fell 0.011
(marrow), 0.03 (osteoclast, where the slide has any) and 0.045 (osteocyte) below the card's
pooled Dice; bone Dice of a normal slide (10-15 % bone, so its boundary weighs more) fell up
to 0.074, but pooled with two bone-rich slides it stays within 0.01 of the card. The margins
(0.02, 0.03, 0.06, 0.06) cover that scatter, and a real regression still fails: on these
three slides the classical baseline scores 0.87 marrow, 0.82 bone, 0.81 osteoclast and 0.38
osteocyte Dice and calls the oc-poor slide normal.
(``python tests/test_accuracy.py`` prints the figures of these slides.)
"""

from __future__ import annotations

import numpy as np
import pytest

from histo.classes import BONE, MARROW, OSTEOCLAST, OSTEOCYTE

#: (counterstain, phenotype, seed) of the slides
SLIDES = [
    ("hematoxylin", "oc-rich", 17000),
    ("fast-green", "normal", 17010),
    ("methyl-green", "oc-poor", 17020),
]
SIZE_PX = 1024
#: the shipped model's pooled validation Dice (model card) and the margin allowed below it
VALIDATION_DICE = {MARROW: 0.987, BONE: 0.979, OSTEOCLAST: 0.933, OSTEOCYTE: 0.822}
DICE_MARGIN = {MARROW: 0.02, BONE: 0.03, OSTEOCLAST: 0.06, OSTEOCYTE: 0.06}
#: the card's target for the BV/TV error (percentage points)
BV_TV_TOLERANCE = 2.0


def analysed_slides() -> list[dict]:
    """Each slide's truth and analysis: class maps, BV/TV and the phenotype call."""
    from histo.pipeline import analyze_slide
    from histo.synth import make_section

    out = []
    for counterstain, phenotype, seed in SLIDES:
        sec = make_section(phenotype, SIZE_PX, 1.0, seed=seed, counterstain=counterstain)
        result = analyze_slide(sec.image, pixel_size_um=1.0, name=f"{counterstain}-{seed}")
        out.append(
            {
                "slide": f"{counterstain} {phenotype} {seed}",
                "phenotype": phenotype,
                "truth": sec.class_map,
                "class_map": np.asarray(result.class_map[:]),
                "call": result.phenotype.phenotype,
                "bv_tv": (result.measurement.indices["BV/TV"], sec.truth["BV/TV"]),
            }
        )
    return out


def pooled_dice(slides: list[dict]) -> dict[int, float]:
    """Dice of each class over all the slides' pixels together."""
    inter = {c: 0 for c in VALIDATION_DICE}
    sizes = {c: 0 for c in VALIDATION_DICE}
    for s in slides:
        for c in VALIDATION_DICE:
            pred, true = s["class_map"] == c, s["truth"] == c
            inter[c] += int(np.count_nonzero(pred & true))
            sizes[c] += int(np.count_nonzero(pred)) + int(np.count_nonzero(true))
    return {c: 2 * inter[c] / max(1, sizes[c]) for c in VALIDATION_DICE}


@pytest.fixture(scope="module")
def slides():
    return analysed_slides()


def test_class_map_dice_holds_against_the_validation_figures(slides):
    dice = pooled_dice(slides)
    for c, validated in VALIDATION_DICE.items():
        assert dice[c] >= validated - DICE_MARGIN[c], (c, dice)


@pytest.mark.parametrize("index", range(len(SLIDES)))
def test_phenotype_call_and_bone_volume(slides, index):
    s = slides[index]
    assert s["call"] == s["phenotype"], s["slide"]
    measured, true = s["bv_tv"]
    assert abs(measured - true) <= BV_TV_TOLERANCE, (s["slide"], measured, true)


if __name__ == "__main__":  # the figures behind the margins
    import time

    t0 = time.perf_counter()
    found = analysed_slides()
    print(f"{time.perf_counter() - t0:.1f} s")
    print({c: round(d, 4) for c, d in pooled_dice(found).items()})
    for s in found:
        print(s["slide"], s["call"], [round(v, 2) for v in s["bv_tv"]], pooled_dice([s]))
