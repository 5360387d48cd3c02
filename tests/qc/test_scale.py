"""The nucleus size behind ``scale.nucleus_um`` on fields of disks whose diameter is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histo.io import read_region, slide_from_array
from histo.qc._sample import WORKING_UM
from histo.qc._scale import (
    DIAMETERS_UM,
    nucleus_diameter_um,
    sampling_blur_um,
    scale_responses,
)

HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
FIELD_UM = 256.0  # one tile of the checks
FINE_UM = 0.125  # disks are drawn at this pixel size, then averaged down (as a sensor does)


def _disk_field(diameter_um: float, pixel_size_um: float, seed: int = 0, noise: float = 2.0):
    """RGB (uint8) of dark hematoxylin disks of one diameter, apart, on glass.

    The disks are drawn at :data:`FINE_UM` and area-averaged down to ``pixel_size_um``, so a
    pixel holds the share of disk it covers; camera noise of ``noise`` DN is added.
    """
    rng = np.random.default_rng(seed)
    side = int(round(FIELD_UM / FINE_UM))
    amount = np.zeros((side, side), np.float32)
    spacing = 2.2 * diameter_um
    centres = np.arange(spacing / 2, FIELD_UM - spacing / 2, spacing)
    for cy in centres:
        for cx in centres:
            jitter = rng.uniform(-0.2, 0.2, 2) * diameter_um
            centre = ((cx + jitter[0]) / FINE_UM, (cy + jitter[1]) / FINE_UM)
            radius = diameter_um / 2 / FINE_UM
            cv2.circle(amount, (round(centre[0]), round(centre[1])), round(radius), 1.0, -1)
    amount *= rng.uniform(0.5, 1.0)
    coarse = round(FIELD_UM / pixel_size_um)
    amount = cv2.resize(amount, (coarse, coarse), interpolation=cv2.INTER_AREA)
    light = 255.0 * 10.0 ** (-amount[..., None] * HEMATOXYLIN_OD) - 1.0
    light += rng.normal(0.0, noise, light.shape)
    return np.clip(light + 0.5, 0, 255).astype(np.uint8)


def _measured(image: np.ndarray, pixel_size_um: float) -> float:
    """The nucleus diameter the checks read from ``image``, resampled as they read a tile."""
    side = round(FIELD_UM / WORKING_UM)
    tile = read_region(slide_from_array(image, pixel_size_um), 0.0, 0.0, side, side, WORKING_UM)
    return nucleus_diameter_um([tile], WORKING_UM, pixel_size_um).diameter_um


# disks of 3-11 µm at 0.25-2 µm/px, 3 pixels across or more
SIZES = [(d, p) for d in (3.0, 6.0, 11.0) for p in (0.25, 0.5, 1.0, 2.0) if d / p >= 2.9]


@pytest.mark.parametrize(("diameter_um", "pixel_size_um"), SIZES)
def test_disks_measure_their_diameter_at_every_pixel_size(diameter_um, pixel_size_um):
    measured = _measured(_disk_field(diameter_um, pixel_size_um), pixel_size_um)
    assert measured == pytest.approx(diameter_um, rel=0.08)


def test_a_diameter_between_the_searched_scales_is_not_snapped_to_one():
    step = DIAMETERS_UM[1] / DIAMETERS_UM[0]
    between = float(np.sqrt(DIAMETERS_UM[9] * DIAMETERS_UM[10]))  # ~7.4 µm
    smaller, larger = between / step**0.5, between * step**0.5
    measured = [_measured(_disk_field(d, WORKING_UM), WORKING_UM) for d in (smaller, larger)]
    assert measured[1] / measured[0] == pytest.approx(step, rel=0.04)


def test_pixel_noise_at_the_native_resolution_is_not_read_as_small_nuclei():
    # 6 µm disks read at their own pixel size (no averaging down) under strong camera noise:
    # the noise's blobs peak below the smallest searched scale and do not count
    noisy = _disk_field(6.0, WORKING_UM, noise=12.0)
    assert _measured(noisy, WORKING_UM) == pytest.approx(6.0, rel=0.1)


def test_halved_image_responses_match_blurring_the_full_image():
    rng = np.random.default_rng(3)
    amount = cv2.GaussianBlur(rng.exponential(0.3, (256, 256)).astype(np.float32), (0, 0), 2.0)
    responses = scale_responses(amount, WORKING_UM)
    assert responses[0].step == 1 and responses[-1].step > 1
    for diameter, (step, response) in zip(DIAMETERS_UM, responses, strict=True):
        sigma = diameter / (2 * np.sqrt(2)) / WORKING_UM
        full = -(sigma**2) * cv2.Laplacian(cv2.GaussianBlur(amount, (0, 0), sigma), cv2.CV_32F)
        truth = full[::step, ::step]  # pixel i of a halved response lies at full-size step * i
        inner = (slice(40 // step, -40 // step),) * 2  # away from the mirrored borders
        diff, ref = (response - truth)[inner], truth[inner]
        err = np.sqrt(np.mean(diff**2) / np.mean(ref**2))
        assert err < (1e-3 if step == 1 else 0.06), (diameter, step, err)


def test_sampling_blur_grows_with_a_coarse_slide_and_is_small_at_the_working_resolution():
    assert sampling_blur_um(None, 0.5) == pytest.approx(0.5 / np.sqrt(12))
    assert sampling_blur_um(0.25, 0.5) == pytest.approx(0.5 / np.sqrt(12))
    assert sampling_blur_um(2.0, 0.5) == pytest.approx(1.0)  # box and linear interpolation
