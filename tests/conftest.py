"""Shared fixtures: synthetic sections are the ground truth of most tests."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=32)
def _section(phenotype: str, size: int, pixel_size_um: float, seed: int, counterstain=None):
    from histo.synth import make_section

    return make_section(phenotype, size, pixel_size_um, seed=seed, counterstain=counterstain)


@pytest.fixture(scope="session")
def synthetic_section():
    """``synthetic_section(phenotype, size=768, pixel_size_um=1.0, seed=0)``, cached."""

    def get(phenotype="normal", size=768, pixel_size_um=1.0, seed=0, counterstain=None):
        return _section(phenotype, size, pixel_size_um, seed, counterstain)

    return get


@pytest.fixture(scope="session")
def tibia():
    """An oc-rich long-bone section (growth plate, cortex, marrow) at 2 µm/px, seed 4."""
    from histo.synth import make_section

    return make_section("oc-rich", pixel_size_um=2.0, seed=4, anatomy="long-bone")
