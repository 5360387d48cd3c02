"""Display colours shared by the reports and the napari plugin (no GUI toolkit here).

One palette for the whole project: the phenotype calls (report badges and plots, the
plugin's call banner) and the class codes (overlays, the plugin's class-map layer).
"""

from __future__ import annotations

from histo import classes

#: colour of each phenotype call (hex RGB); ``uncertain`` when QC fails
PHENOTYPE_COLORS = {
    "normal": "#3a9d5d",
    "oc-rich": "#d9822b",
    "oc-poor": "#c23030",
    "uncertain": "#888888",
}
#: colour of a call the palette does not know
UNKNOWN_COLOR = "#555555"

#: colour of each class code (RGB 0-255), as drawn by overlays and the plugin
CLASS_COLORS: dict[int, tuple[int, int, int]] = dict(classes.COLORS)


def phenotype_color(phenotype: str) -> str:
    """Hex colour of a phenotype call (:data:`UNKNOWN_COLOR` for an unknown one)."""
    return PHENOTYPE_COLORS.get(phenotype, UNKNOWN_COLOR)


def class_rgba() -> dict[int | None, tuple[float, float, float, float]]:
    """Class code -> RGBA (0-1) for a labels display; background and unknown codes clear.

    Returns
    -------
    dict
        Keyed by class code, plus ``None`` (any other value) mapped to transparent, the
        form napari's ``DirectLabelColormap(color_dict=...)`` takes.
    """
    rgba: dict[int | None, tuple[float, float, float, float]] = {None: (0.0, 0.0, 0.0, 0.0)}
    for code, (r, g, b) in CLASS_COLORS.items():
        alpha = 0.0 if code == classes.BACKGROUND else 1.0
        rgba[code] = (r / 255, g / 255, b / 255, alpha)
    return rgba
