"""The file names histo takes for slides: one list for the reader, the batch finder and the help.

The format itself is recognised from the content (:func:`histo.io._readers.sniff`); the suffix
decides which files a folder search picks up and what is stripped to name a slide.
"""

from __future__ import annotations

__all__ = ["SLIDE_FOLDER_SUFFIXES", "SLIDE_SUFFIXES", "slide_suffix", "strip_slide_suffix"]

#: slide files (lower case; longest first where one ends another): OME-TIFF, TIFF and BigTIFF,
#: Aperio SVS, Hamamatsu NDPI, PNG, JPEG
SLIDE_SUFFIXES = (
    ".ome.tiff",
    ".ome.tif",
    ".tiff",
    ".tif",
    ".btf",
    ".tf8",
    ".tf2",
    ".svs",
    ".ndpi",
    ".png",
    ".jpeg",
    ".jpg",
)
#: slide folders: OME-Zarr images
SLIDE_FOLDER_SUFFIXES = (".ome.zarr", ".zarr")


def slide_suffix(name: str, folder: bool = False) -> str | None:
    """The slide suffix that ``name`` ends with (any case), or None.

    ``folder=True`` checks the suffixes of slide folders (OME-Zarr) instead of files.
    """
    low = name.lower()
    suffixes = SLIDE_FOLDER_SUFFIXES if folder else SLIDE_SUFFIXES
    return next((s for s in suffixes if low.endswith(s)), None)


def strip_slide_suffix(name: str) -> str:
    """``name`` without its slide suffix (file or folder): ``S1.ome.tif`` -> ``S1``."""
    suffix = slide_suffix(name) or slide_suffix(name, folder=True)
    return name[: -len(suffix)] if suffix and len(suffix) < len(name) else name
