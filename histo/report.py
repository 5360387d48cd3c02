"""Pictures and reports a person looks at: the QC overlay of one slide, the batch report."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from histo import classes
from histo.io.atomic import write_atomic, write_text_atomic
from histo.palette import PHENOTYPE_COLORS, phenotype_color

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


def overlay_class_map(class_map) -> np.ndarray:
    """A class map (numpy or zarr, any size) at the size of the overlay, nearest-neighbour
    (longest side at most :data:`OVERLAY_MAX_PX`; read band by band, never whole)."""
    from histo.io.blocks import downsample_nearest, shape_2d

    H, W = shape_2d(class_map)
    scale = min(1.0, OVERLAY_MAX_PX / max(H, W))
    shape = (max(1, round(H * scale)), max(1, round(W * scale)))
    if shape == (H, W):
        return np.asarray(class_map)
    return downsample_nearest(class_map, shape)


def write_overlay(path: str | os.PathLike, class_map, thumbnail: np.ndarray | None = None) -> Path:
    """Write the QC overlay of a slide as PNG: ``thumbnail`` (RGB, or white) with the classes
    of ``class_map`` (numpy or zarr, any size) outlined, longest side :data:`OVERLAY_MAX_PX`."""
    path = Path(path)
    cm = overlay_class_map(class_map)
    h, w = cm.shape
    rgb = thumbnail
    if rgb is None:
        rgb = np.full((h, w, 3), 255, np.uint8)
    elif rgb.shape[:2] != (h, w):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", overlay_image(rgb, cm)[..., ::-1])
    if not ok:
        raise OSError(f"cannot encode {path.name} as PNG")
    return write_atomic(path, lambda tmp: tmp.write_bytes(png.tobytes()))


#: indices shown in the report's table (name, unit), in this order
REPORT_COLUMNS = (
    ("T.Ar", "mm²"),
    ("BV/TV", "%"),
    ("Ma.Ar/T.Ar", "%"),
    ("B.Pm", "mm"),
    ("N.Oc", ""),
    ("N.Oc/B.Pm", "/mm"),
    ("N.Oc/T.Ar", "/mm²"),
    ("Oc.S/BS", "%"),
    ("N.Ot", ""),
    ("N.Ot/B.Ar", "/mm²"),
    ("Tb.Th", "µm"),
    ("Tb.N", "/mm"),
)
#: colour of each quality-control verdict (indices.csv ``qc``)
QC_COLORS = {"pass": "#3a9d5d", "warn": "#d9a400", "fail": "#c23030"}
#: indices compared between groups (box plots and Mann-Whitney tests)
GROUP_COLUMNS = ("BV/TV", "N.Oc/B.Pm", "Oc.S/BS", "N.Ot/B.Ar")


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _figure(width: float, height: float):
    """A matplotlib Figure drawn with Agg, without pyplot (no global state, thread-safe)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png_base64(fig) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scatter(rows: list[dict]) -> str:
    """N.Oc/B.Pm against BV/TV, one colour per phenotype call (PNG, base64)."""
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    for phenotype, color in PHENOTYPE_COLORS.items():
        pts = [
            (x, y)
            for r in rows
            if r.get("phenotype") == phenotype
            and (x := _finite(r.get("BV/TV"))) is not None
            and (y := _finite(r.get("N.Oc/B.Pm"))) is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(
                xs,
                ys,
                c=color,
                s=36,
                label=f"{phenotype} ({len(pts)})",
                edgecolors="k",
                linewidths=0.4,
            )
    ax.set_xlabel("BV/TV (%)")
    ax.set_ylabel("N.Oc/B.Pm (/mm)")
    ax.set_title("Osteoclasts per bone perimeter against bone fraction")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(frameon=False, title="phenotype call")
    return _png_base64(fig)


def group_statistics(rows: list[dict], groups: dict[str, str], column: str) -> dict:
    """Values of ``column`` per group and two-sided Mann-Whitney U tests between groups.

    Parameters
    ----------
    rows
        Rows of indices.csv (dicts with ``slide`` and the index names).
    groups
        ``{slide: group}``; slides without a group are left out.
    column
        The index compared.

    Returns
    -------
    dict
        ``values``: {group: [values]} (finite values only), ``p``: {(group a, group b): p}
        for every pair of groups with at least 2 values each (p-values not corrected for
        multiple comparisons).
    """
    from itertools import combinations

    from scipy.stats import mannwhitneyu

    values: dict[str, list[float]] = {}
    for r in rows:
        g = groups.get(str(r["slide"]))
        v = _finite(r.get(column))
        if g is not None and v is not None:
            values.setdefault(g, []).append(v)
    tests = {}
    for a, b in combinations(sorted(values), 2):
        if len(values[a]) >= 2 and len(values[b]) >= 2:
            tests[(a, b)] = float(
                mannwhitneyu(values[a], values[b], alternative="two-sided").pvalue
            )
    return {"values": values, "p": tests}


def _boxplots(rows: list[dict], groups: dict[str, str]) -> tuple[str, list[tuple]]:
    """Box plots per group of :data:`GROUP_COLUMNS` (PNG, base64) and the test table rows
    ``(index, group a, n a, median a, group b, n b, median b, p)``."""
    fig = _figure(3.3 * len(GROUP_COLUMNS), 3.4)
    axes = fig.subplots(1, len(GROUP_COLUMNS))
    table = []
    units = dict(REPORT_COLUMNS)
    for ax, col in zip(axes, GROUP_COLUMNS, strict=True):
        stats = group_statistics(rows, groups, col)
        names = sorted(stats["values"])
        if names:
            data = [stats["values"][n] for n in names]
            ax.boxplot(data, tick_labels=names, widths=0.5, showfliers=False)
            rng = np.random.default_rng(0)
            for i, vals in enumerate(data, 1):
                jitter = rng.uniform(-0.08, 0.08, len(vals))
                ax.scatter(i + jitter, vals, s=12, c="k", zorder=3)
        ax.set_title(f"{col} ({units.get(col, '')})".replace(" ()", ""))
        ax.tick_params(axis="x", labelrotation=20)
        for (a, b), p in stats["p"].items():
            va, vb = stats["values"][a], stats["values"][b]
            table.append(
                (col, a, len(va), float(np.median(va)), b, len(vb), float(np.median(vb)), p)
            )
    return _png_base64(fig), table


def read_sample_sheet(path: str | os.PathLike) -> dict[str, str]:
    """A CSV with columns ``slide`` and ``group`` -> {slide: group}.

    ``slide`` may be a file name or a path; its image suffixes are removed (``S1.ome.tif`` ->
    ``S1``) so it matches the slide names of indices.csv. A path is also recorded under the
    name ``histo batch`` gives slides whose file names collide (``a/S1.tif`` -> ``a__S1``).

    Raises
    ------
    HistoError
        The file cannot be read or lacks the ``slide`` and ``group`` columns.
    """
    import csv

    from histo.errors import HistoError
    from histo.io import slide_name

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = {(n or "").strip().lower(): n for n in reader.fieldnames or []}
            if not {"slide", "group"} <= set(fields):
                raise HistoError(f"sample sheet {path} needs the columns 'slide' and 'group'")
            sheet = {}
            for row in reader:
                slide = (row.get(fields["slide"]) or "").strip()
                group = (row.get(fields["group"]) or "").strip()
                if not slide or not group:
                    continue
                parts = Path(slide.replace("\\", "/")).parts
                sheet[slide_name(parts[-1])] = group
                if len(parts) > 1:
                    sheet["__".join([*parts[:-1], slide_name(parts[-1])])] = group
    except OSError as exc:
        raise HistoError(f"cannot read sample sheet {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HistoError(f"sample sheet {path} is not a UTF-8 CSV file: {exc}") from None
    return sheet


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px;margin:.4em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}th small{color:#666;font-weight:normal}
td.l,th.l{text-align:left}tr:nth-child(even) td{background:#fafafa}
.call{display:inline-block;padding:0 .5em;border-radius:.6em;color:#fff;font-weight:600}
.fail td{text-align:left;white-space:normal}.fail td.err{white-space:nowrap;color:#a00}
.note{color:#666;font-size:12px}.counts b{font-size:1.1em}
tr.qc-warn td{background:#fff6d6}tr.qc-fail td{background:#fbe3e3}
td.why{text-align:left;white-space:normal;min-width:22em}
.qcflag td{text-align:left;white-space:normal;vertical-align:top}.qcflag img{width:160px}
a{color:#1a5fb4}img{max-width:100%}
"""


def _cell(value, digits: int = 2) -> str:
    import html

    v = _finite(value)
    if v is None:
        is_text = isinstance(value, str) and value.lower() not in ("nan", "inf", "-inf", "")
        return f"<td>{html.escape(value)}</td>" if is_text else "<td>–</td>"
    if float(v).is_integer() and abs(v) >= 1 and digits == 0:
        return f"<td>{int(v)}</td>"
    return f"<td>{v:.{digits}f}</td>"


def write_report_html(
    path: str | os.PathLike,
    rows: list[dict],
    failures: list[dict],
    groups: dict[str, str] | None = None,
    out_dir: str | os.PathLike | None = None,
    provenance: list[dict] | None = None,
) -> Path:
    """A self-contained HTML report (plots embedded, no server or network needed).

    Parameters
    ----------
    path
        The HTML file written (under a temporary name, then renamed).
    rows
        Rows of indices.csv.
    failures
        ``{slide, reason[, error]}`` per failed slide.
    groups
        ``{slide: group}`` from a sample sheet: adds box plots per group and Mann-Whitney
        tests between groups.
    out_dir
        The batch's output folder: slide names link to ``<slide>/overlay.png`` when it exists.
    provenance
        The distinct ``{histo_version, model_name, model_sha256, device, device_name}`` of the
        slides (:meth:`histo.segment.Segmenter.provenance`), listed in the footer.

    Notes
    -----
    Sections (with element ids for tests): ``summary``, ``qc-counts``, ``scatter``
    (N.Oc/B.Pm against BV/TV coloured by phenotype call), ``indices`` (table), ``groups``
    and ``tests`` (with a sample sheet), ``qc`` (slides warned about or failed, with reasons
    and overlays), ``failures``, ``provenance`` (footer).
    """
    path = Path(path)
    base = Path(out_dir) if out_dir is not None else path.parent
    parts = _report_header(rows, failures)
    if rows:
        parts += _indices_section(rows, groups, base)
    if rows and groups:
        parts += _groups_section(rows, groups)
    if any(r.get("qc") in ("warn", "fail") for r in rows):
        parts += _qc_section(rows, base)
    if failures:
        parts += _failures_section(failures)
    parts.append(
        "<p class='note'>Indices follow the ASBMR nomenclature (Dempster et al., JBMR 2013; "
        "doi 10.1002/jbmr.1805). Areas mm², lengths mm, fractions %, densities /mm or /mm². "
        "Each slide's QC overlay, object tables and outlines are in its folder.</p>"
    )
    parts.append(_provenance_footer(provenance or []))
    parts.append("</body></html>")
    return write_text_atomic(path, "".join(parts))


def _report_header(rows: list[dict], failures: list[dict]) -> list[str]:
    from collections import Counter
    from datetime import datetime
    from html import escape as esc

    from histo import __version__

    calls = Counter(str(r.get("phenotype")) for r in rows)
    call_text = ", ".join(
        f"<span class='call' style='background:{phenotype_color(k)}'>{esc(k)}</span> {n}"
        for k, n in sorted(calls.items())
    )
    return [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>histo report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>histo: bone histomorphometry report</h1>",
        f"<p class='note'>histo {esc(__version__)}, "
        f"{datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
        f"<p id='summary' class='counts'><b>{len(rows)}</b> slides analysed, "
        f"<b>{len(failures)}</b> failed." + (f" Calls: {call_text}." if rows else "") + "</p>",
        _qc_counts(rows),
    ]


def qc_counts(rows: list[dict]) -> dict[str, int]:
    """``{"pass": n, "warn": n, "fail": n}`` over rows of indices.csv (rows without a
    verdict, from a class map alone, are not counted)."""
    counts = dict.fromkeys(QC_COLORS, 0)
    for r in rows:
        if r.get("qc") in counts:
            counts[r["qc"]] += 1
    return counts


def _qc_badge(status: str) -> str:
    from html import escape as esc

    color = QC_COLORS.get(status, "#555555")
    return f"<span class='call' style='background:{color}'>{esc(status)}</span>"


def _qc_row_class(status: str) -> str:
    """The class attribute that colours a warned or failed slide's table row."""
    return f" class='qc-{status}'" if status in ("warn", "fail") else ""


def _qc_counts(rows: list[dict]) -> str:
    counts = qc_counts(rows)
    text = ", ".join(f"{_qc_badge(k)} {n}" for k, n in counts.items())
    return (
        f"<p id='qc-counts' class='counts'>Quality control: {text}. A failed slide gets no "
        "phenotype call (<i>uncertain</i>); a warned one keeps it: check the reasons.</p>"
    )


def _indices_section(rows: list[dict], groups: dict[str, str] | None, base: Path) -> list[str]:
    """The scatter plot and the table of indices, slide names linked to their overlays."""
    from html import escape as esc

    parts = [
        "<img id='scatter' alt='N.Oc/B.Pm against BV/TV, coloured by phenotype call' "
        f"src='data:image/png;base64,{_scatter(rows)}'>",
        "<h2>Indices</h2><table id='indices'><thead><tr><th class='l'>slide</th>"
        "<th class='l'>phenotype</th>",
    ]
    if groups:
        parts.append("<th class='l'>group</th>")
    parts.extend(f"<th>{esc(c)}<br><small>{esc(u)}</small></th>" for c, u in REPORT_COLUMNS)
    parts.append("<th>confidence</th><th class='l'>qc</th><th class='l'>qc reasons</th>")
    parts.append("</tr></thead><tbody>")
    for r in rows:
        slide = str(r["slide"])
        phenotype = str(r.get("phenotype"))
        qc = str(r.get("qc") or "")
        color = phenotype_color(phenotype)
        label = esc(slide)
        if (base / slide / "overlay.png").exists():
            href = esc(f"{slide}/overlay.png", quote=True)
            label = f"<a href='{href}' title='QC overlay'>{label}</a>"
        parts.append(
            f"<tr{_qc_row_class(qc)}><td class='l'>{label}</td><td class='l'>"
            f"<span class='call' style='background:{color}'>{esc(phenotype)}</span></td>"
        )
        if groups:
            parts.append(f"<td class='l'>{esc(groups.get(slide, '–'))}</td>")
        for c, _ in REPORT_COLUMNS:
            parts.append(_cell(r.get(c), 0 if c in ("N.Oc", "N.Ot") else 2))
        parts.append(_cell(r.get("confidence")))
        parts.append(f"<td class='l'>{_qc_badge(qc) if qc else '–'}</td>")
        parts.append(f"<td class='why'>{esc(str(r.get('qc_reasons') or ''))}</td></tr>")
    parts.append("</tbody></table>")
    return parts


def _groups_section(rows: list[dict], groups: dict[str, str]) -> list[str]:
    """Box plots per group and the Mann-Whitney tests between groups."""
    from html import escape as esc

    img, table = _boxplots(rows, groups)
    ungrouped = sorted(str(r["slide"]) for r in rows if str(r["slide"]) not in groups)
    parts = [
        "<h2>Groups</h2>",
        f"<img id='groups' alt='box plots per group' src='data:image/png;base64,{img}'>",
        "<table id='tests'><thead><tr><th class='l'>index</th><th class='l'>group A</th>"
        "<th>n</th><th>median</th><th class='l'>group B</th><th>n</th><th>median</th>"
        "<th>Mann-Whitney p</th></tr></thead><tbody>",
    ]
    for col, a, na, ma, b, nb, mb, p in table:
        parts.append(
            f"<tr><td class='l'>{esc(col)}</td><td class='l'>{esc(a)}</td><td>{na}</td>"
            f"<td>{ma:.2f}</td><td class='l'>{esc(b)}</td><td>{nb}</td><td>{mb:.2f}</td>"
            f"<td>{p:.3g}</td></tr>"
        )
    parts.append("</tbody></table>")
    parts.append(
        "<p class='note'>Two-sided Mann-Whitney U tests, not corrected for multiple "
        "comparisons; pairs with fewer than 2 slides per group are not tested."
        + (f" Slides not in the sample sheet: {esc(', '.join(ungrouped))}." if ungrouped else "")
        + "</p>"
    )
    return parts


def _qc_section(rows: list[dict], base: Path) -> list[str]:
    """The slides quality control warned about or failed: verdict, reasons, overlay."""
    from html import escape as esc

    parts = [
        "<h2>Quality control</h2><table id='qc' class='qcflag'><thead><tr>"
        "<th class='l'>slide</th><th class='l'>qc</th><th class='l'>reasons</th>"
        "<th class='l'>overlay</th></tr></thead><tbody>"
    ]
    flagged = [r for r in rows if r.get("qc") in ("warn", "fail")]
    for r in sorted(flagged, key=lambda r: r["qc"] != "fail"):  # fails first
        slide = str(r["slide"])
        thumb = "–"
        if (base / slide / "overlay.png").exists():
            src = esc(f"{slide}/overlay.png", quote=True)
            thumb = f"<a href='{src}'><img src='{src}' alt='overlay of {esc(slide)}'></a>"
        reasons = "<br>".join(esc(x) for x in str(r.get("qc_reasons") or "").split("; "))
        parts.append(
            f"<tr{_qc_row_class(r['qc'])}><td>{esc(slide)}</td><td>{_qc_badge(r['qc'])}</td>"
            f"<td>{reasons}</td><td>{thumb}</td></tr>"
        )
    parts.append("</tbody></table>")
    parts.append(
        "<p class='note'>What each check means and what to do when it fires: docs/qc.md.</p>"
    )
    return parts


def _failures_section(failures: list[dict]) -> list[str]:
    from html import escape as esc

    parts = [
        "<h2>Failures</h2><table id='failures' class='fail'><thead>"
        "<tr><th class='l'>slide</th><th class='l'>error</th><th class='l'>reason</th></tr>"
        "</thead><tbody>"
    ]
    for f in failures:
        parts.append(
            f"<tr><td class='l'>{esc(str(f['slide']))}</td>"
            f"<td class='err'>{esc(str(f.get('error') or ''))}</td>"
            f"<td>{esc(str(f['reason']))}</td></tr>"
        )
    parts.append("</tbody></table>")
    return parts


def _provenance_footer(provenance: list[dict]) -> str:
    """What produced the results: one line per histo version, model and device used."""
    from html import escape as esc

    lines = [
        f"histo {esc(str(p.get('histo_version')))}, model {esc(str(p.get('model_name')))} "
        f"(sha256 {esc(str(p.get('model_sha256') or 'none: no weights'))}), "
        f"device {esc(str(p.get('device')))} ({esc(str(p.get('device_name')))})"
        for p in provenance
    ]
    return "<footer id='provenance' class='note'>" + "<br>".join(lines) + "</footer>"
