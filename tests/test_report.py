"""The batch report: indices table, phenotype scatter, group comparisons, failures."""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from histo.errors import HistoError
from histo.palette import PHENOTYPE_COLORS
from histo.report import group_statistics, read_sample_sheet, write_report_html


def _rows(n_per_group: int = 4) -> tuple[list[dict], dict[str, str]]:
    rng = np.random.default_rng(1)
    rows, groups = [], {}
    for g, (bvtv, noc, call) in {
        "wild-type": (15.0, 2.0, "normal"),
        "oc/oc": (45.0, 4.0, "oc-rich"),
        "RANKL-/-": (50.0, 0.0, "oc-poor"),
    }.items():
        for i in range(n_per_group):
            name = f"{g.replace('/', '')}-{i}"
            rows.append(
                {
                    "slide": name,
                    "phenotype": call,
                    "T.Ar": 1.2,
                    "B.Ar": 0.3,
                    "Ma.Ar": 0.9,
                    "BV/TV": bvtv + rng.normal(0, 2),
                    "Ma.Ar/T.Ar": 100 - bvtv,
                    "B.Pm": 12.0,
                    "N.Oc": int(noc * 12),
                    "N.Oc/B.Pm": max(0.0, noc + rng.normal(0, 0.3)),
                    "N.Oc/T.Ar": 20.0,
                    "Oc.S/BS": 3.0,
                    "N.Ot": 300,
                    "N.Ot/B.Ar": 900.0,
                    "Tb.Th": 45.0,
                    "Tb.N": 4.0,
                    "confidence": 0.9,
                }
            )
            groups[name] = g
    return rows, groups


def test_group_statistics_match_scipy():
    rows, groups = _rows()
    stats = group_statistics(rows, groups, "BV/TV")
    assert sorted(stats["values"]) == ["RANKL-/-", "oc/oc", "wild-type"]
    assert all(len(v) == 4 for v in stats["values"].values())
    a, b = stats["values"]["oc/oc"], stats["values"]["wild-type"]
    expected = mannwhitneyu(a, b, alternative="two-sided").pvalue
    assert stats["p"][("oc/oc", "wild-type")] == pytest.approx(expected)
    assert len(stats["p"]) == 3


def test_group_statistics_skip_small_groups_and_non_finite():
    rows, groups = _rows(2)
    rows[0]["BV/TV"] = float("nan")  # wild-type-0: left out, leaving 1 value
    stats = group_statistics(rows, groups, "BV/TV")
    assert len(stats["values"]["wild-type"]) == 1
    assert all("wild-type" not in pair for pair in stats["p"])
    assert ("RANKL-/-", "oc/oc") in stats["p"]


def test_report_sections_and_values(tmp_path):
    rows, groups = _rows()
    (tmp_path / rows[0]["slide"]).mkdir()
    (tmp_path / rows[0]["slide"] / "overlay.png").write_bytes(b"png")
    failures = [{"slide": "bad<script>", "error": "SlideReadError", "reason": "x.tif: truncated"}]
    path = write_report_html(tmp_path / "report.html", rows, failures, groups, out_dir=tmp_path)
    text = path.read_text(encoding="utf-8")
    for section in ("summary", "scatter", "indices", "groups", "tests", "failures"):
        assert f"id='{section}'" in text
    assert "12 slides analysed, <b>1</b> failed" in text.replace("<b>12</b>", "12")
    # every slide has a row, coloured by its call; names are escaped
    assert text.count("<tr><td class='l'>") == len(rows) + 3 * 4 + 1
    assert "bad&lt;script&gt;" in text and "<script>" not in text
    assert f"href='{rows[0]['slide']}/overlay.png'" in text
    assert f"href='{rows[1]['slide']}/overlay.png'" not in text
    # the Mann-Whitney p-values shown are scipy's
    stats = group_statistics(rows, groups, "N.Oc/B.Pm")
    p = stats["p"][("RANKL-/-", "oc/oc")]
    assert f"<td>{p:.3g}</td>" in text
    # plots are embedded PNGs, nothing is fetched from the network
    assert len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", text)) == 2
    assert "http://" not in text and "https://" not in text
    assert not list(tmp_path.glob(".*partial*"))


def test_report_without_rows_or_groups(tmp_path):
    text = write_report_html(tmp_path / "r.html", [], []).read_text(encoding="utf-8")
    assert "<b>0</b> slides analysed" in text and "id='indices'" not in text
    rows, _ = _rows(1)
    rows[0]["N.Oc/B.Pm"] = float("nan")
    text = write_report_html(tmp_path / "r.html", rows, []).read_text(encoding="utf-8")
    assert "id='indices'" in text and "id='groups'" not in text and "<td>–</td>" in text


def test_read_sample_sheet(tmp_path):
    sheet = tmp_path / "groups.csv"
    sheet.write_text(
        "\ufeffSlide,Group\nS1.ome.tif,wt\nsub/S2.svs, ko \n S3 ,wt\nfield.jpeg,ko\n,wt\n",
        encoding="utf-8",
    )
    groups = read_sample_sheet(sheet)
    assert groups["S1"] == "wt" and groups["S2"] == "ko" and groups["sub__S2"] == "ko"
    assert groups["S3"] == "wt" and groups["field"] == "ko"
    assert "" not in groups


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read sample sheet"),
        ("name,genotype\nS1,wt\n", "needs the columns"),
        (b"\xff\xfe\x00bad", "not a UTF-8 CSV"),
    ],
)
def test_read_sample_sheet_errors(tmp_path, content, message):
    sheet = tmp_path / "groups.csv"
    if isinstance(content, str):
        sheet.write_text(content)
    elif isinstance(content, bytes):
        sheet.write_bytes(content)
    with pytest.raises(HistoError, match=message) as info:
        read_sample_sheet(sheet)
    assert "\n" not in str(info.value)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    """The report renders: the screenshot holds the scatter's phenotype colours."""
    import cv2

    rows, groups = _rows()
    path = write_report_html(tmp_path / "report.html", rows, [], groups)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1200,1600",
                path.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=90,
            env={**os.environ, "HOME": profile},
        )
    img = cv2.imread(str(shot))[..., ::-1].astype(int)
    assert img.shape[:2] == (1600, 1200)
    for color in (PHENOTYPE_COLORS[k] for k in ("normal", "oc-rich", "oc-poor")):
        rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
        close = np.abs(img - rgb).sum(axis=-1) < 30
        assert close.sum() > 50, f"{color} not drawn"
    assert not math.isclose(img.std(), 0)
    assert html.escape("N.Oc/B.Pm") in path.read_text(encoding="utf-8")


def test_overlay_outlines_the_classes_of_a_map_of_any_size(tmp_path):
    """A 4096² class map (numpy or zarr) gives a 2048² overlay whose osteoclast outline is
    drawn where the map's osteoclast is, in its class colour."""
    import cv2
    import zarr

    from histo.classes import COLORS, OSTEOCLAST
    from histo.report import OVERLAY_MAX_PX, write_overlay

    cm = np.ones((4096, 4096), np.uint8)
    cm[1000:1400, 2000:2400] = OSTEOCLAST
    stored = zarr.create_array(
        store=str(tmp_path / "cm.zarr"), shape=cm.shape, chunks=(1024, 1024), dtype="uint8"
    )
    stored[:] = cm
    for name, source in (("numpy", cm), ("zarr", stored)):
        path = write_overlay(tmp_path / f"{name}.png", source)
        img = cv2.imread(str(path))[..., ::-1]
        assert img.shape == (OVERLAY_MAX_PX, OVERLAY_MAX_PX, 3)
        colour = np.all(img == COLORS[OSTEOCLAST], axis=-1)
        ys, xs = np.nonzero(colour)
        # the square's outline at half the size: rows and columns 500-700, 1000-1200
        assert 495 <= ys.min() <= 502 and 697 <= ys.max() <= 702
        assert 995 <= xs.min() <= 1002 and 1197 <= xs.max() <= 1202


def test_report_marks_and_counts_warned_and_failed_slides(tmp_path):
    rows, _ = _rows(2)  # 6 slides
    verdicts = ["pass", "warn", "fail", "pass", "fail", ""]
    for r, qc in zip(rows, verdicts, strict=True):
        r["qc"] = qc
        r["qc_reasons"] = {"warn": "out of focus", "fail": "eosin; scale <wrong>"}.get(qc, "")
    rows[2]["phenotype"] = rows[4]["phenotype"] = "uncertain"
    (tmp_path / rows[2]["slide"]).mkdir()
    (tmp_path / rows[2]["slide"] / "overlay.png").write_bytes(b"png")
    text = write_report_html(tmp_path / "r.html", rows, [], out_dir=tmp_path).read_text("utf-8")
    counts = re.search(r"<p id='qc-counts'.*?</p>", text).group(0)
    assert re.sub(r"<[^>]+>", "", counts).startswith("Quality control: pass 2, warn 1, fail 2.")
    # each flagged slide's row is coloured in the indices table and listed with its reasons
    indices = text[text.index("id='indices'") : text.index("id='qc'")]
    assert indices.count("<tr class='qc-fail'>") == 2 and indices.count("<tr class='qc-warn'>") == 1
    flagged = text[text.index("id='qc'") : text.index("</table>", text.index("id='qc'"))]
    assert flagged.count("<tr class=") == 3
    assert flagged.index(rows[2]["slide"]) < flagged.index(rows[1]["slide"])  # fails first
    assert "eosin<br>scale &lt;wrong&gt;" in flagged
    assert f"<img src='{rows[2]['slide']}/overlay.png'" in flagged
    assert PHENOTYPE_COLORS["uncertain"] in indices
