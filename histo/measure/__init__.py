"""ASBMR histomorphometry from a class map: indices and per-object tables, block by block.

One implementation for every size: :func:`measure_by_blocks` reads the maps (numpy or zarr) one
block at a time; :func:`measure` is its call on in-memory arrays.

Modules: :mod:`~histo.measure.indices` (rules, the Measurement record, totals to indices),
:mod:`~histo.measure.blocks` (the block-wise measurement), :mod:`~histo.measure.perimeter`
(sub-pixel bone perimeter and surfaces), :mod:`~histo.measure.objects` (per-object statistics),
:mod:`~histo.measure.labels` (instances), :mod:`~histo.measure.sums` (per-object sums over
blocks), :mod:`~histo.measure.region` (the region of interest),
:mod:`~histo.measure.compartments` (cortical and trabecular bone).

Examples
--------
>>> from histo.measure import measure
>>> m = measure(class_map, pixel_size_um=1.0)            # doctest: +SKIP
>>> m.indices["BV/TV"], m.indices["N.Oc/B.Pm"]            # doctest: +SKIP
"""

from histo.measure.blocks import DEFAULT_BLOCK_PX, MARGIN_UM, measure, measure_by_blocks
from histo.measure.compartments import cortical_trabecular_split, measure_compartments
from histo.measure.indices import (
    INDEX_COLUMNS,
    INDEX_UNITS,
    OSTEOCLAST_COLUMNS,
    OSTEOCYTE_COLUMNS,
    CountingRules,
    Measurement,
    validate_class_map,
    validate_pixel_size,
)
from histo.measure.perimeter import boundary_length_px
from histo.measure.region import roi_mask

__all__ = [
    "DEFAULT_BLOCK_PX",
    "INDEX_COLUMNS",
    "INDEX_UNITS",
    "MARGIN_UM",
    "OSTEOCLAST_COLUMNS",
    "OSTEOCYTE_COLUMNS",
    "CountingRules",
    "Measurement",
    "boundary_length_px",
    "cortical_trabecular_split",
    "measure",
    "measure_by_blocks",
    "measure_compartments",
    "roi_mask",
    "validate_class_map",
    "validate_pixel_size",
]
