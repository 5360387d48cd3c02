"""Former home of the block-wise label writers; they live in :mod:`histo.io` now."""

from histo.io.geojson import write_label_geojson_by_blocks
from histo.io.label_store import LabelsSink, copy_labels

__all__ = ["LabelsSink", "copy_labels", "write_label_geojson_by_blocks"]
