"""Fixtures of the napari plugin tests: a viewer with the widget, a scripted pipeline."""

from __future__ import annotations

import pytest

# re-exported for test modules that import them from conftest; import from tests.plugin.helpers
from tests.plugin.helpers import ScriptedPipeline, StallProbe, wait_for_run

__all__ = ["ScriptedPipeline", "StallProbe", "wait_for_run"]

SIZE_PX = 512


@pytest.fixture(scope="session")
def oc_rich_section():
    from histo.synth import make_section

    return make_section("oc-rich", size=SIZE_PX, pixel_size_um=1.0, seed=7)


@pytest.fixture(scope="session")
def slide_section():
    """A section rendered at 0.5 µm/px (768 px, 384 µm a side)."""
    from histo.synth import make_section

    return make_section("oc-rich", size=768, pixel_size_um=0.5, seed=7)


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory, slide_section):
    """A two-level pyramidal OME-TIFF at 0.5 µm/px (SubIFDs), and its class map beside it."""
    import tifffile

    path = tmp_path_factory.mktemp("slides") / "rich.ome.tif"
    image = slide_section.image
    levels = [image, image[::2, ::2]]
    meta = {
        "axes": "YXS",
        "PhysicalSizeX": 0.5,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": 0.5,
        "PhysicalSizeYUnit": "µm",
    }
    with tifffile.TiffWriter(path, ome=True) as tif:
        for i, level in enumerate(levels):
            tif.write(
                level,
                photometric="rgb",
                tile=(128, 128),
                compression="zlib",
                subifds=1 if i == 0 else None,
                subfiletype=1 if i else 0,
                metadata=meta if i == 0 else None,
            )
    from histo.synth import write_pyramidal_tiff

    classes_tif = path.with_name("rich.classes.tif")
    write_pyramidal_tiff(classes_tif, slide_section.class_map, 0.5, label=True)
    return path


@pytest.fixture
def viewer_widget(make_napari_viewer, oc_rich_section):
    """(viewer, widget) with the oc-rich synthetic section as the image layer."""
    from histo_napari._widget import HistoWidget

    viewer = make_napari_viewer()
    s = oc_rich_section
    viewer.add_image(
        s.image,
        name="section",
        rgb=True,
        scale=(1.0, 1.0),
        units=("micrometer", "micrometer"),
        metadata={"pixel_size_um": 1.0, "slide_name": "section"},
    )
    widget = HistoWidget(viewer)
    widget.section.model.value = "classical"  # no weights needed
    viewer.window.add_dock_widget(widget, name="Histomorphometry")
    return viewer, widget


@pytest.fixture
def errors(monkeypatch):
    """Messages passed to show_error by the widget (instead of napari notifications)."""
    import histo_napari._widget as w

    shown: list[str] = []
    monkeypatch.setattr(w, "show_error", shown.append)
    return shown


@pytest.fixture
def scripted_pipeline(monkeypatch, oc_rich_section):
    import histo.pipeline

    fake = ScriptedPipeline(oc_rich_section)
    monkeypatch.setattr(histo.pipeline, "analyze_slide", fake)
    return fake


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """An empty user model folder ($HISTO_MODELS) for the models a test trains."""
    root = tmp_path / "models"
    monkeypatch.setenv("HISTO_MODELS", str(root))
    return root
