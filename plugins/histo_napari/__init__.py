"""napari plugin of histo: open slides at their physical scale, analyse, correct, re-measure.

Contributions (``napari.yaml``, npe2):

- reader: slides (OME-TIFF, SVS, NDPI, TIFF, PNG, JPEG, OME-Zarr) as multiscale image layers in
  µm, histo class maps (``NAME.classes.tif``) and histo output folders as labels layers;
- sample data: a synthetic TRAP section of each phenotype (normal, oc-rich, oc-poor);
- widget: *Histomorphometry* (segment, measure, call the phenotype; correct and re-measure).

The modules import napari and Qt; the core package ``histo`` never does.
"""

from __future__ import annotations

__all__ = ["__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("histo")
except Exception:  # noqa: BLE001 - running from a source tree without metadata
    __version__ = "0+unknown"
