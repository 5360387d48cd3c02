"""histo: bone histomorphometry from TRAP-stained sections.

The core library. It never imports napari or Qt; the command line (:mod:`histo.cli`)
and the napari plugin (``histo_napari``) are thin adapters over it.
"""

__version__ = "0.1.0"
