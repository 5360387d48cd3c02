"""The foreign-dye check: a stain vector nearer eosin or aniline blue than to any known stain."""

from __future__ import annotations

import numpy as np
import pytest

from histo.qc._checks import RANGES, _stain_signals
from histo.qc._stain import (
    ANILINE_BLUE_OD,
    COUNTERSTAINS,
    EOSIN_OD,
    SECOND_STAINS,
    angle_deg,
    estimate_stains,
    nearest_foreign_dye,
)

TRAP = SECOND_STAINS["fast red violet (TRAP)"]
HEMATOXYLIN = COUNTERSTAINS["hematoxylin"]


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rotated(a, b, deg: float) -> np.ndarray:
    """``a`` turned by ``deg`` degrees in the plane of ``a`` and ``b``, towards ``b``."""
    a, b = _unit(a), _unit(b)
    ortho = _unit(b - a * (a @ b))
    t = np.radians(deg)
    return np.cos(t) * a + np.sin(t) * ortho


def _two_stain_tile(counter, second, seed: int = 0, size: int = 256) -> np.ndarray:
    """Beer-Lambert RGB of two dyes: the counterstain everywhere, the second in a few spots."""
    rng = np.random.default_rng(seed)
    c1 = rng.uniform(0.1, 0.9, (size, size, 1))
    c2 = rng.uniform(0.0, 0.8, (size, size, 1)) * (rng.random((size, size, 1)) < 0.3)
    od = c1 * _unit(counter) + c2 * _unit(second)
    return np.clip(256.0 * 10.0 ** (-od) - 1.0, 0, 255).round().astype(np.uint8)


def test_nearer_degrees_for_known_vectors():
    # aniline blue as counterstain: nearer itself (0 deg) than hematoxylin, its nearest known
    dye = nearest_foreign_dye(_unit(ANILINE_BLUE_OD), _unit(TRAP))
    assert dye.name.startswith("aniline blue") and dye.role == "counterstain"
    assert dye.known == "hematoxylin"
    assert dye.nearer_deg == pytest.approx(angle_deg(ANILINE_BLUE_OD, HEMATOXYLIN), abs=1e-6)
    # eosin as second stain: nearer itself than pararosaniline, the nearest TRAP chromogen
    dye = nearest_foreign_dye(_unit(HEMATOXYLIN), _unit(EOSIN_OD))
    assert dye.name.startswith("eosin") and dye.role == "second stain"
    assert dye.nearer_deg == pytest.approx(angle_deg(EOSIN_OD, SECOND_STAINS[dye.known]))
    assert dye.nearer_deg > 20
    # the stains histo knows: nearer themselves, by the full angle to the foreign dye
    dye = nearest_foreign_dye(_unit(HEMATOXYLIN), _unit(TRAP))
    assert dye.nearer_deg == pytest.approx(-angle_deg(HEMATOXYLIN, ANILINE_BLUE_OD))


def test_hematoxylin_drawn_off_its_hue_stays_known_unless_it_turns_into_aniline_blue():
    gap = angle_deg(HEMATOXYLIN, ANILINE_BLUE_OD)  # about 19 deg
    # 12 deg away from aniline blue: far from hematoxylin, yet no foreign dye
    away = _rotated(HEMATOXYLIN, _rotated(HEMATOXYLIN, ANILINE_BLUE_OD, -90), 12)
    assert nearest_foreign_dye(away, _unit(TRAP)).nearer_deg < -gap + 1
    # past the bisector towards aniline blue: nearer the foreign dye by twice the overshoot
    past = _rotated(HEMATOXYLIN, ANILINE_BLUE_OD, gap / 2 + 3)
    dye = nearest_foreign_dye(past, _unit(TRAP))
    assert dye.name.startswith("aniline blue") and dye.nearer_deg == pytest.approx(6, abs=0.5)


@pytest.mark.parametrize(
    ("counter", "second", "status", "words"),
    [
        (HEMATOXYLIN, TRAP, "pass", ""),
        (COUNTERSTAINS["fast-green"], SECOND_STAINS["pararosaniline (TRAP)"], "pass", ""),
        (ANILINE_BLUE_OD, TRAP, "fail", "counterstain looks like aniline blue"),
        (HEMATOXYLIN, EOSIN_OD, "fail", "second stain looks like eosin (H&E)"),
    ],
)
def test_signal_on_two_dye_images(counter, second, status, words):
    stains = estimate_stains([_two_stain_tile(counter, second)])
    signal = next(s for s in _stain_signals(stains) if s.name == "stain.foreign_dye_deg")
    assert signal.status == status, signal
    assert words in signal.reason
    assert signal.accepted == RANGES["stain.foreign_dye_deg"].text() == "<= 0"
