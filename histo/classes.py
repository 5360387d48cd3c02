"""Class codes of the class map (the contract of DESIGN.md)."""

from __future__ import annotations

BACKGROUND = 0  #: glass, outside the section
MARROW = 1  #: marrow and soft tissue (marrow cavities)
BONE = 2  #: bone matrix
OSTEOCLAST = 3  #: TRAP+ multinucleated cell on bone
OSTEOCYTE = 4  #: osteocyte lacuna with its cell

NAMES = {
    BACKGROUND: "background",
    MARROW: "marrow",
    BONE: "bone",
    OSTEOCLAST: "osteoclast",
    OSTEOCYTE: "osteocyte",
}
N_CLASSES = len(NAMES)

#: display colours (RGB 0-255) used by overlays and the napari plugin
COLORS = {
    BACKGROUND: (0, 0, 0),
    MARROW: (255, 200, 120),
    BONE: (80, 140, 255),
    OSTEOCLAST: (230, 30, 60),
    OSTEOCYTE: (40, 220, 120),
}
