"""Class codes of the class map (the contract of DESIGN.md).

Codes 0-4 are those of section fields; long-bone sections add cartilage (5) and soft tissue
outside bone (6). A map holding only codes 0-4 means what it always meant.
"""

from __future__ import annotations

BACKGROUND = 0  #: glass, outside the section
MARROW = 1  #: marrow and soft tissue inside the marrow cavities
BONE = 2  #: bone matrix
OSTEOCLAST = 3  #: TRAP+ multinucleated cell on bone
OSTEOCYTE = 4  #: osteocyte lacuna with its cell
CARTILAGE = (
    5  #: hyaline cartilage (growth plate, articular) and calcified cartilage, lacunae included
)
SOFT_TISSUE = 6  #: soft tissue outside bone: periosteum, muscle, tendon (not marrow)
UNLABELLED = 255  #: no label (only in corrections and scribbles given to ``histo finetune``)

NAMES = {
    BACKGROUND: "background",
    MARROW: "marrow",
    BONE: "bone",
    OSTEOCLAST: "osteoclast",
    OSTEOCYTE: "osteocyte",
}
#: classes of section fields and of the shipped network (codes 0-4)
N_CLASSES = len(NAMES)

#: every class of the class map, long-bone classes included
ALL_NAMES = {
    **NAMES,
    CARTILAGE: "cartilage",
    SOFT_TISSUE: "soft tissue",
}
N_ALL_CLASSES = len(ALL_NAMES)

#: display colours (RGB 0-255) used by overlays and the napari plugin
COLORS = {
    BACKGROUND: (0, 0, 0),
    MARROW: (255, 200, 120),
    BONE: (80, 140, 255),
    OSTEOCLAST: (230, 30, 60),
    OSTEOCYTE: (40, 220, 120),
    CARTILAGE: (190, 120, 255),
    SOFT_TISSUE: (150, 90, 60),
}
