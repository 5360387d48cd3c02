"""Result layers: the class map, instances and osteoclast centres of a run, over its image."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Labels, Layer

from histo import classes
from histo.palette import class_rgba
from histo_napari._geometry import Placement

if TYPE_CHECKING:
    import napari

    from histo_napari._worker import AnalysisOutput

#: outline colour of the osteoclast-centre rings
CENTRE_COLOR = "#ff2060"


def class_colormap() -> Any:
    """napari colormap of the class codes (the project's palette; background clear)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=class_rgba())


class ResultLayers:
    """The result layers of the widget, updated in place when a run or re-measure repeats."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.viewer = viewer
        self._layers: dict[str, Layer] = {}

    def get(self, key: str) -> Layer | None:
        """The result layer ``key`` if it is still in the viewer."""
        layer = self._layers.get(key)
        return layer if layer is not None and layer in self.viewer.layers else None

    def upsert(self, key: str, data: Any, kind: str, **kwargs: Any) -> Layer:
        """Update the result layer ``key`` (or a layer of that name and kind) or add it."""
        name = kwargs["name"]
        layer = self.get(key) or next(
            (lyr for lyr in self.viewer.layers if lyr.name == name and lyr._type_string == kind),
            None,
        )
        if layer is None:
            add = getattr(self.viewer, f"add_{kind}")
            layer = add(data, **{k: v for k, v in kwargs.items() if v is not None})
        else:
            layer.data = data
            for attr in ("scale", "translate", "metadata", "features"):
                if attr in kwargs:
                    setattr(layer, attr, kwargs[attr])
            if kind == "points":
                layer.refresh()
        self._layers[key] = layer
        return layer

    def show_run(self, output: AnalysisOutput) -> Labels:
        """Add or update the class map and instance layers of a run; return the class map's."""
        r = output.result
        place = output.placement
        common = {"scale": place.scale, "translate": place.translate, "units": place.units}
        meta = {"pixel_size_um": float(r.pixel_size_um), "slide_name": r.name}
        meta["histo_run"] = id(output)
        maps = _maps_to_show(output)
        if output.levels is not None:
            common["multiscale"] = True
        self.upsert(
            "osteocytes",
            maps["osteocytes"],
            "labels",
            name=f"{r.name} osteocytes",
            opacity=0.7,
            visible=False,
            metadata={**meta, "histo_kind": "osteocytes"},
            **common,
        )
        osteoclasts = self.upsert(
            "osteoclasts",
            maps["osteoclasts"],
            "labels",
            name=f"{r.name} osteoclasts",
            opacity=0.8,
            metadata={**meta, "histo_kind": "osteoclasts"},
            **common,
        )
        if output.levels is None:  # outlines are computed on the GUI thread at every redraw
            osteoclasts.contour = 2
        cmap_layer = self.upsert(
            "class_map",
            maps["class_map"],
            "labels",
            name=f"{r.name} classes",
            opacity=0.45,
            colormap=class_colormap(),
            metadata={**meta, "histo_kind": "class_map"},
            **common,
        )
        cmap_layer.selected_label = classes.MARROW
        return cmap_layer

    def show_osteoclast_centres(self, measurement: Any, cmap_layer: Layer) -> Layer:
        """A point per counted osteoclast, with its features, over the class-map layer."""
        rows = measurement.osteoclasts
        place = Placement.of_layer(cmap_layer)
        f = place.scale[-1] / float(measurement.pixel_size_um)  # world units per µm
        coords = np.array([[r["centroid_y_um"], r["centroid_x_um"]] for r in rows], float).reshape(
            -1, 2
        )
        features = {
            key: np.array([r.get(key, math.nan) for r in rows], float)
            for key in ("area_um2", "bone_contact_um", "nuclei")
        }
        return self.upsert(
            "points",
            coords,
            "points",
            name=cmap_layer.name.removesuffix(" classes") + " osteoclast centres",
            features=features,
            scale=(f, f),
            translate=place.translate,
            units=Placement((f, f), place.translate, f).units,
            size=12.0,
            symbol="ring",
            face_color="transparent",
            border_color=CENTRE_COLOR,
            border_width=0.15,
            metadata={"histo_kind": "osteoclast_points"},
        )

    def instances_of(self, cmap_layer: Layer) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The run's osteoclast and osteocyte instances shown beside ``cmap_layer``."""
        out = []
        for key in ("osteoclasts", "osteocytes"):
            layer = self.get(key)
            same_run = layer is not None and (
                layer.metadata.get("histo_run") == cmap_layer.metadata.get("histo_run")
            )
            out.append(np.asarray(layer.data) if same_run else None)
        return out[0], out[1]


def _maps_to_show(output: AnalysisOutput) -> dict[str, Any]:
    """Layer data of a run's maps: lazy pyramids from its store, or in-memory arrays.

    The in-memory class map is a copy: the user paints it.
    """
    if output.levels is not None:
        return {name: arrays for name, (arrays, _) in output.levels.items()}
    r = output.result
    return {
        "class_map": np.array(r.class_map, dtype=np.uint8, copy=True),
        "osteoclasts": np.asarray(r.osteoclast_labels),
        "osteocytes": np.asarray(r.osteocyte_labels),
    }
