"""Pictures and reports a person looks at: the QC overlay of one slide, the batch report."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from histo import classes

#: longest side of overlay.png in pixels
OVERLAY_MAX_PX = 2048


def overlay_image(rgb: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    """``rgb`` with bone, marrow, osteoclasts and osteocytes outlined in their class colours.

    ``class_map`` is resampled (nearest) to ``rgb``'s size. Bone and marrow are outlined thinly,
    osteoclasts and osteocytes with thicker contours so they stand out on a thumbnail.
    """
    h, w = rgb.shape[:2]
    if class_map.shape != (h, w):
        class_map = cv2.resize(class_map, (w, h), interpolation=cv2.INTER_NEAREST)
    out = np.ascontiguousarray(rgb.copy())
    masks = [
        (classes.MARROW, class_map > 0, 1),  # tissue outline
        (classes.BONE, np.isin(class_map, (classes.BONE, classes.OSTEOCYTE)), 1),
        (classes.OSTEOCYTE, class_map == classes.OSTEOCYTE, 1),
        (classes.OSTEOCLAST, class_map == classes.OSTEOCLAST, 2),
    ]
    for code, mask, thickness in masks:
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(out, contours, -1, classes.COLORS[code], thickness)
    return out


def write_overlay(path: str | os.PathLike, result) -> Path:
    """Write the QC overlay of a :class:`histo.pipeline.SlideResult` as PNG."""
    path = Path(path)
    cm = result.class_map
    scale = min(1.0, OVERLAY_MAX_PX / max(cm.shape))
    h, w = max(1, round(cm.shape[0] * scale)), max(1, round(cm.shape[1] * scale))
    rgb = result.thumbnail
    if rgb is None:
        rgb = np.full((h, w, 3), 255, np.uint8)
    elif rgb.shape[:2] != (h, w):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    img = overlay_image(rgb, cm)
    partial = path.with_name(path.name + ".partial.png")
    if not cv2.imwrite(str(partial), img[..., ::-1]):
        raise OSError(f"cannot write {path}")
    os.replace(partial, path)
    return path


PHENOTYPE_COLORS = {"normal": "#2b8cbe", "oc-rich": "#e34a33", "oc-poor": "#756bb1"}
REPORT_COLUMNS = (
    "BV/TV",
    "Ma.Ar/T.Ar",
    "N.Oc/B.Pm",
    "N.Oc/T.Ar",
    "Oc.S/BS",
    "N.Ot/B.Ar",
    "Tb.Th",
    "Tb.N",
)


def _png_base64(fig) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scatter(rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for phenotype, color in PHENOTYPE_COLORS.items():
        pts = [r for r in rows if r.get("phenotype") == phenotype]
        if pts:
            ax.scatter(
                [r["BV/TV"] for r in pts],
                [r["N.Oc/B.Pm"] for r in pts],
                c=color,
                label=f"{phenotype} ({len(pts)})",
                edgecolors="k",
                linewidths=0.4,
            )
    ax.set_xlabel("BV/TV (%)")
    ax.set_ylabel("N.Oc/B.Pm (/mm)")
    ax.set_title("Phenotype call")
    ax.legend(frameon=False)
    data = _png_base64(fig)
    plt.close(fig)
    return data


def group_statistics(rows: list[dict], groups: dict[str, str], column: str) -> dict:
    """Values of ``column`` per group and two-sided Mann-Whitney U p-values between groups."""
    from itertools import combinations

    from scipy.stats import mannwhitneyu

    values: dict[str, list[float]] = {}
    for r in rows:
        g = groups.get(r["slide"])
        v = r.get(column)
        if g is not None and v is not None and np.isfinite(v):
            values.setdefault(g, []).append(float(v))
    tests = {}
    for a, b in combinations(sorted(values), 2):
        if len(values[a]) >= 2 and len(values[b]) >= 2:
            tests[(a, b)] = float(
                mannwhitneyu(values[a], values[b], alternative="two-sided").pvalue
            )
    return {"values": values, "p": tests}


def _boxplots(rows: list[dict], groups: dict[str, str]) -> tuple[str, list[tuple]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("BV/TV", "N.Oc/B.Pm", "Oc.S/BS", "N.Ot/B.Ar")
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.6))
    table = []
    for ax, col in zip(axes, cols, strict=True):
        stats = group_statistics(rows, groups, col)
        names = sorted(stats["values"])
        if names:
            ax.boxplot([stats["values"][n] for n in names], tick_labels=names)
            for i, n in enumerate(names, 1):
                ax.scatter(np.full(len(stats["values"][n]), i), stats["values"][n], s=10, c="k")
        ax.set_title(col)
        for (a, b), p in stats["p"].items():
            table.append((col, a, b, p))
    data = _png_base64(fig)
    plt.close(fig)
    return data, table


def read_sample_sheet(path: str | os.PathLike) -> dict[str, str]:
    """A CSV with columns ``slide`` and ``group`` -> {slide: group}."""
    import csv

    from histo.errors import HistoError

    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"slide", "group"} <= set(reader.fieldnames):
            raise HistoError(f"sample sheet {path} needs the columns 'slide' and 'group'")
        sheet = {}
        for row in reader:
            slide = row["slide"].strip()
            for suffix in (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".svs", ".ndpi", ".png"):
                if slide.lower().endswith(suffix):
                    slide = slide[: -len(suffix)]
                    break
            sheet[slide] = row["group"].strip()
    return sheet


def write_report_html(
    path: str | os.PathLike,
    rows: list[dict],
    failures: list[dict],
    groups: dict[str, str] | None = None,
) -> Path:
    """A self-contained HTML report (plots embedded, no server needed)."""
    import html

    path = Path(path)
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>histo report</title>",
        "<style>body{font-family:sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        ".fail td{text-align:left}</style></head><body>",
        "<h1>histo: bone histomorphometry report</h1>",
        f"<p id='summary'>{len(rows)} slides analysed, {len(failures)} failed.</p>",
    ]
    if rows:
        parts.append(
            f"<img id='scatter' alt='N.Oc/B.Pm against BV/TV' "
            f"src='data:image/png;base64,{_scatter(rows)}'>"
        )
        parts.append("<h2>Indices</h2><table id='indices'><tr><th>slide</th><th>phenotype</th>")
        parts.extend(f"<th>{esc(c)}</th>" for c in REPORT_COLUMNS)
        parts.append("<th>confidence</th></tr>")
        for r in rows:
            color = PHENOTYPE_COLORS.get(r.get("phenotype"), "#000")
            parts.append(
                f"<tr><td>{esc(str(r['slide']))}</td>"
                f"<td style='color:{color}'>{esc(str(r.get('phenotype')))}</td>"
            )
            for c in REPORT_COLUMNS:
                v = r.get(c)
                parts.append(f"<td>{v:.2f}</td>" if isinstance(v, float) else f"<td>{v}</td>")
            conf = r.get("confidence")
            parts.append(f"<td>{conf:.2f}</td></tr>" if isinstance(conf, float) else "<td></td>")
        parts.append("</table>")
    if rows and groups:
        img, table = _boxplots(rows, groups)
        parts.append("<h2>Groups</h2>")
        parts.append(
            f"<img id='groups' alt='box plots per group' src='data:image/png;base64,{img}'>"
        )
        parts.append(
            "<table id='tests'><tr><th>index</th><th>group A</th><th>group B</th>"
            "<th>Mann-Whitney p</th></tr>"
        )
        for col, a, b, p in table:
            parts.append(
                f"<tr><td>{esc(col)}</td><td>{esc(a)}</td><td>{esc(b)}</td><td>{p:.4g}</td></tr>"
            )
        parts.append("</table>")
    if failures:
        parts.append(
            "<h2>Failures</h2><table id='failures' class='fail'>"
            "<tr><th>slide</th><th>reason</th></tr>"
        )
        for f in failures:
            parts.append(
                f"<tr><td>{esc(str(f['slide']))}</td><td>{esc(str(f['reason']))}</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        "<p style='color:#777'>Indices follow the ASBMR nomenclature (Dempster et al., "
        "JBMR 2013). Areas mm², lengths mm, fractions %, densities /mm or /mm².</p>"
    )
    parts.append("</body></html>")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(parts), encoding="utf-8")
    os.replace(partial, path)
    return path
