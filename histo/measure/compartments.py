"""Cortical and trabecular compartments of a class map, and their indices."""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from histo.measure.blocks import bone_and_tissue, measure
from histo.measure.indices import Measurement, validate_class_map, validate_pixel_size
from histo.measure.objects import EIGHT
from histo.measure.perimeter import disk
from histo.measure.region import roi_mask

__all__ = ["cortical_trabecular_split", "measure_compartments"]


def cortical_trabecular_split(
    class_map, pixel_size_um: float, *, min_cortex_um: float = 80.0
) -> tuple[np.ndarray, np.ndarray]:
    """Split the tissue into cortical and trabecular compartments.

    The cortex is thick bone on the periosteal (outer) tissue edge: the bone is opened with a
    disk of diameter ``min_cortex_um`` (trabeculae, thinner than that, vanish), the opened
    pieces that come within ``min_cortex_um`` of the background (class 0) are kept, and they
    are closed with the same disk so that lacunae, canals and small pores count as cortex.
    The trabecular compartment is the rest of the tissue.

    Parameters
    ----------
    class_map : array_like of int, shape (H, W)
    pixel_size_um : float
    min_cortex_um : float
        Bone thinner than this (µm) is never cortex. Mouse trabeculae are about 40-60 µm thick.

    Returns
    -------
    cortical, trabecular : ndarray of bool, shape (H, W)
        Disjoint masks covering the tissue (classes 1-5). Without background pixels (a field
        inside the section) there is no periosteal edge and the cortex is empty.
    """
    cmap = validate_class_map(class_map)
    px = validate_pixel_size(pixel_size_um)
    bone_mask, tissue = bone_and_tissue(cmap)
    bone = bone_mask.astype(np.uint8)
    background = ~tissue
    if not background.any() or not bone.any():
        return np.zeros(cmap.shape, bool), tissue.copy()
    radius_px = min_cortex_um / 2.0 / px
    kernel = disk(radius_px)
    pad = kernel.shape[0]
    # fill lacunae and small pores before opening so they do not break the cortex
    closed_bone = cv2.morphologyEx(
        cv2.copyMakeBorder(bone, pad, pad, pad, pad, cv2.BORDER_REPLICATE),
        cv2.MORPH_CLOSE,
        disk(max(radius_px / 4.0, 1.0)),
    )
    thick = cv2.morphologyEx(closed_bone, cv2.MORPH_OPEN, kernel)[pad:-pad, pad:-pad] > 0
    if not thick.any():
        return np.zeros(cmap.shape, bool), tissue.copy()
    dist_bg = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 5)
    near_edge = dist_bg * px <= min_cortex_um
    lab, n = ndi.label(thick, structure=EIGHT)
    touching = np.unique(lab[near_edge & thick])
    keep = np.zeros(n + 1, bool)
    keep[touching[touching > 0]] = True
    cortex = keep[lab].astype(np.uint8)
    cortex = (
        cv2.morphologyEx(
            cv2.copyMakeBorder(cortex, pad, pad, pad, pad, cv2.BORDER_REPLICATE),
            cv2.MORPH_CLOSE,
            kernel,
        )[pad:-pad, pad:-pad]
        > 0
    )
    cortex &= tissue
    return cortex, tissue & ~cortex


def measure_compartments(
    class_map,
    pixel_size_um: float,
    *,
    min_cortex_um: float = 80.0,
    roi=None,
    **kwargs,
) -> dict[str, Measurement]:
    """Indices of the whole tissue and of its cortical and trabecular compartments.

    Parameters
    ----------
    class_map, pixel_size_um
        As for :func:`measure`.
    min_cortex_um : float
        Passed to :func:`cortical_trabecular_split`.
    roi : array_like, optional
        Restricts all three compartments (intersected with each).
    **kwargs
        ``osteoclast_labels``, ``osteocyte_labels``, ``image``, ``rules`` for :func:`measure`.

    Returns
    -------
    dict
        ``{"whole": Measurement, "cortical": Measurement, "trabecular": Measurement}``.
    """
    cmap = validate_class_map(class_map)
    cortical, trabecular = cortical_trabecular_split(
        cmap, pixel_size_um, min_cortex_um=min_cortex_um
    )
    base = None if roi is None else roi_mask(roi, cmap.shape)
    out = {"whole": measure(cmap, pixel_size_um, roi=base, **kwargs)}
    for name, mask in (("cortical", cortical), ("trabecular", trabecular)):
        region = mask if base is None else (mask & base)
        out[name] = measure(cmap, pixel_size_um, roi=region, **kwargs)
    return out
