"""Helpers shared by the tests, imported as ``tests.helpers``.

pytest puts the project root on ``sys.path`` (``pythonpath`` in pyproject.toml), so these
import the same way whichever folders a run collects; ``conftest`` modules are for fixtures.
"""

from __future__ import annotations

from histo.measure import Measurement, measure


def measure_truth(section, pixel_size_um: float | None = None, **kwargs) -> Measurement:
    """:func:`histo.measure.measure` of a record's class map and instance maps.

    Parameters
    ----------
    section : histo.synth.SyntheticSection or histo.pipeline.SlideResult
        Anything with ``class_map``, ``osteoclast_labels``, ``osteocyte_labels`` and
        ``pixel_size_um``: a synthetic section (its truth) or an analysis's maps.
    pixel_size_um : float, optional
        µm per pixel; the section's own by default.
    **kwargs
        ``image``, ``roi``, ``rules``: passed to :func:`histo.measure.measure`.
    """
    return measure(
        section.class_map,
        section.pixel_size_um if pixel_size_um is None else pixel_size_um,
        osteoclast_labels=section.osteoclast_labels,
        osteocyte_labels=section.osteocyte_labels,
        **kwargs,
    )


def store_levels(store) -> dict:
    """Every label image of a ``labels.ome.zarr`` at every pyramid level, as
    ``{(name, level): array}``."""
    from histo.io.ome_zarr import read_labels

    out, k = {}, 0
    while True:
        try:
            labels = read_labels(store, level=k)
        except (IndexError, KeyError):
            return out
        out.update({(name, k): array for name, (array, _) in labels.items()})
        k += 1
