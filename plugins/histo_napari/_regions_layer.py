"""A long-bone section's regions as a shapes layer, with the standard region the user can move.

After a run on a long-bone section the pipeline's result says which regions it found
(:attr:`histo.measure.regional.MeasuredRegion.rois`: growth plate, cortices, primary
spongiosa, the junction zone and the standard region of the secondary spongiosa, polygons in
µm). They are drawn as one shapes layer lined up with the image, the standard region on top.
The user may move, resize or reshape the standard region (select or direct-select tool);
**Re-measure** then measures inside it as a user ROI, and the region is named
:data:`MOVED_STANDARD`. Left where it was placed, re-measuring keeps to the standard region,
as the run did. A region chosen in the Section form (a shapes layer the user drew) always wins.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Shapes

from histo.measure.regional import REGION_STANDARD, REGION_USER, REGION_WHOLE
from histo_napari._geometry import Placement

if TYPE_CHECKING:
    from napari.layers import Layer

    from histo_napari._worker import AnalysisOutput, CorrectionJob

#: metadata ``histo_kind`` of the regions layer (the Region choice of the form leaves it out)
REGIONS_KIND = "regions"
#: the region name of indices measured in a moved (resized, reshaped) standard region
MOVED_STANDARD = f"{REGION_USER} / moved standard region"
#: regions in drawing order (the standard region last, on top): label and edge colour
REGION_STYLE = {
    "growth_plate": ("growth plate", "#40c4ff"),
    "cortex": ("cortex", "#b0bec5"),
    "primary": ("primary spongiosa", "#ffab40"),
    "junction": ("junction", "#ea80fc"),
    "standard": ("standard region", "#ffea00"),
}
#: outline width (µm): visible over a whole section, thin beside a 1 mm region
EDGE_WIDTH_UM = 6.0
#: how far (world units) a vertex may lie from where it was placed and still count as unmoved
UNMOVED_TOLERANCE = 1e-6


def regions_layers(output: AnalysisOutput) -> dict[str, Layer]:
    """``{"regions": layer}`` for a run that found a long bone's regions, else ``{}``.

    Built in the worker, beside the other result layers.
    """
    r = output.result
    layer = regions_layer(getattr(r, "region", None), output.placement, r.name, id(output))
    return {} if layer is None else {"regions": layer}


def regions_layer(
    region: Any, place: Placement, slide_name: str, run_id: int | None = None
) -> Shapes | None:
    """The regions of a :class:`histo.measure.regional.MeasuredRegion` as a shapes layer.

    Polygons are the regions' outer rings in µm (holes left out: the layer is for seeing and
    for moving the standard region); ``scale`` and ``translate`` put them over maps placed at
    ``place``; ``run_id`` ties the layer to the run's class map. None when there is no
    standard region (a field, or a user ROI).
    """
    rois = getattr(region, "rois", None) or {}
    if REGION_STANDARD not in rois:
        return None
    keys, polygons = [], []
    for key in REGION_STYLE:
        if rois.get(key) is not None:
            for rings in rois[key].polygons:
                keys.append(key)
                polygons.append(np.asarray(rings[0], float))
    f = float(place.world_per_um)
    origin = np.asarray(place.translate, float)
    standard = [p * f + origin for k, p in zip(keys, polygons, strict=True) if k == "standard"]
    units = {"units": place.units} if place.units is not None else {}
    layer = Shapes(
        polygons,
        shape_type="polygon",
        name=f"{slide_name} regions",
        features={"region": keys, "label": [REGION_STYLE[k][0] for k in keys]},
        edge_color=[REGION_STYLE[k][1] for k in keys],
        face_color="transparent",
        edge_width=EDGE_WIDTH_UM,
        text={"string": "{label}", "color": "white", "size": 9, "anchor": "upper_left"},
        scale=(f, f),
        translate=place.translate,
        metadata={
            "histo_kind": REGIONS_KIND,
            "histo_run": run_id,
            "histo_standard_world": standard,
        },
        **units,
    )
    layer.feature_defaults = {"region": "drawn", "label": ""}
    return layer


def standard_polygons(layer: Shapes) -> list[np.ndarray]:
    """The standard region's shapes as they are now: (N, 2) world (y, x) polygons."""
    keys = layer.features["region"].to_numpy()
    return [
        np.array([layer.data_to_world(v) for v in np.asarray(data, float)])[:, -2:]
        for data, key in zip(layer.data, keys, strict=True)
        if key == REGION_STANDARD
    ]


def is_moved(layer: Shapes) -> bool:
    """Whether the standard region was moved, resized, reshaped, deleted or copied."""
    now = standard_polygons(layer)
    placed = layer.metadata.get("histo_standard_world", [])
    return len(now) != len(placed) or any(
        a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=UNMOVED_TOLERANCE)
        for a, b in zip(now, placed, strict=True)
    )


def remeasure_region(
    job: CorrectionJob, regions: Shapes | None, class_map: Layer
) -> tuple[CorrectionJob, str]:
    """The re-measure job in the region the indices are for, and that region's name.

    A region drawn by the user (``job.region_px``) wins; then the standard region of the run
    the class map comes from, where the user left it (:data:`MOVED_STANDARD` when moved);
    else the whole map.
    """
    if len(job.region_px):
        return job, REGION_USER
    run_id = class_map.metadata.get("histo_run")
    if regions is None or run_id is None or regions.metadata.get("histo_run") != run_id:
        return job, REGION_WHOLE
    polygons = standard_polygons(regions)
    if not polygons:
        return job, REGION_WHOLE
    place = Placement.of_layer(class_map)
    name = MOVED_STANDARD if is_moved(regions) else REGION_STANDARD
    return replace(job, region_px=[place.world_to_px(p) for p in polygons]), name


def run_region(result: Any) -> tuple[str | None, str]:
    """Name and reason of the region a run's indices are for (None: not said)."""
    region = getattr(result, "region", None)
    return (None, "") if region is None else (region.name, region.reason)


def region_text(name: str | None, reason: str = "") -> str:
    """One line for the results panel: which region the indices are for."""
    if name is None:
        return ""
    if name == REGION_STANDARD:
        return (
            "Region: the standard region of the secondary spongiosa (yellow in the regions layer)"
        )
    if name == MOVED_STANDARD:
        return "Region: the standard region as moved by the user (a user ROI)"
    if name == REGION_WHOLE:
        return f"Region: the whole section{f' ({reason})' if reason else ''}"
    return f"Region: {name}"
