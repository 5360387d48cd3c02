"""Reliability: bad input never takes a batch down, killed runs resume to the same result,
readers and measure raise only histo's errors on arbitrary input, weights are never code.

Run this file as a script to print the bad-input table of docs/bad-input.md from a real run::

    .venv/bin/python tests/test_reliability.py
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

HISTO = [sys.executable, "-m", "histo"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_slide(path: Path, phenotype: str = "normal", seed: int = 0, size: int = 512) -> Path:
    from histo.synth import write_synthetic_slide

    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(path, phenotype, size=size, pixel_size_um=1.0, seed=seed)
    for suffix in (".classes.tif", ".osteoclasts.tif", ".osteocytes.tif", ".truth.json"):
        path.with_name(path.name.replace(".ome.tif", suffix)).unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------ the bad-input corpus


def _ome(path: Path, image: np.ndarray, pixel_size: float | None) -> Path:
    meta = {"axes": "YXS" if image.ndim == 3 else "YX"}
    if pixel_size is not None:
        meta.update(
            PhysicalSizeX=pixel_size,
            PhysicalSizeY=pixel_size,
            PhysicalSizeXUnit="µm",
            PhysicalSizeYUnit="µm",
        )
    tifffile.imwrite(
        path,
        image,
        photometric="rgb" if image.ndim == 3 else "minisblack",
        metadata=meta,
        tile=(64, 64) if min(image.shape[:2]) >= 64 else None,
    )
    return path


def _patch_first_ifd(path: Path, values: dict[int, int]) -> None:
    """Overwrite inline SHORT/LONG values of tags of a classic little-endian TIFF's first IFD."""
    with tifffile.TiffFile(path) as tf:
        tags = {code: tf.pages.first.tags[code] for code in values}
        offsets = {code: (t.offset, t.dtype) for code, t in tags.items()}
    with open(path, "r+b") as fh:
        for code, value in values.items():
            offset, dtype = offsets[code]
            fh.seek(offset + 8)
            fh.write(struct.pack("<H" if dtype == 3 else "<I", value))


def _png(path: Path, image: np.ndarray, pixel_size_um: float | None = 1.0) -> Path:
    """PNG (RGB or RGBA) with its pixel size in a pHYs chunk (pixels per metre)."""
    import zlib

    code = cv2.COLOR_RGBA2BGRA if image.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, code))
    data = buf.tobytes()
    if pixel_size_um is not None:
        ppm = round(1e6 / pixel_size_um)
        body = b"pHYs" + struct.pack(">IIB", ppm, ppm, 1)
        chunk = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body))
        data = data[:33] + chunk + data[33:]  # after the signature and IHDR
    path.write_bytes(data)
    return path


def _marrow_only(size: int = 384) -> np.ndarray:
    """A field of marrow only: dense dark nuclei on pink, no bone."""
    rng = np.random.default_rng(3)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (222, 180, 200)
    for y, x in rng.integers(0, size, (size * size // 60, 2)):
        cv2.circle(img, (int(x), int(y)), int(rng.integers(2, 4)), (70, 40, 110), -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


#: file name -> (what it is, expected error class or None for success)
BAD_INPUTS = {
    "not-an-image.tif": ("not an image (text)", "SlideReadError"),
    "zero-bytes.tif": ("zero bytes", "SlideReadError"),
    "truncated.ome.tif": ("truncated TIFF (first half of a slide)", "SlideReadError"),
    "unsupported-compression.tif": ("TIFF with an unknown compression code", "SlideReadError"),
    "grayscale.ome.tif": ("grayscale (single channel)", "SlideReadError"),
    "rgba.png": ("RGBA PNG (alpha dropped)", None),
    "sixteen-bit.ome.tif": ("16-bit RGB (scaled to 8 bits)", None),
    "one-pixel.png": ("a 1x1 image", "EmptyTissueError"),
    "huge-dimensions.tif": ("tiny file declaring 1,000,000 x 1,000,000 pixels", "SlideReadError"),
    "no-pixel-size.png": ("no pixel size in the file", "PixelSizeError"),
    "pixel-size-zero.ome.tif": ("PhysicalSizeX = 0", "PixelSizeError"),
    "pixel-size-negative.ome.tif": ("PhysicalSizeX = -0.5", "PixelSizeError"),
    "pixel-size-100um.ome.tif": ("PhysicalSizeX = 100 µm", "PixelSizeError"),
    "blank-white.ome.tif": ("blank white slide (no tissue)", "EmptyTissueError"),
    "marrow-no-bone.ome.tif": ("tissue without bone", "EmptyTissueError"),
    "séction ünïcode 1.ome.tif": ("non-ASCII name with spaces (a good slide)", None),
}


def write_bad_corpus(folder: Path) -> dict[str, Path]:
    """Write :data:`BAD_INPUTS` into ``folder``; returns name -> path."""
    from histo.synth import make_section

    folder.mkdir(parents=True, exist_ok=True)
    p = {name: folder / name for name in BAD_INPUTS}
    good = make_section("normal", 384, 1.0, seed=5).image
    p["not-an-image.tif"].write_text("this is a lab notebook, not a slide\n" * 20)
    p["zero-bytes.tif"].write_bytes(b"")
    full = _ome(folder / "full.tmp", good, 1.0).read_bytes()
    (folder / "full.tmp").unlink()
    p["truncated.ome.tif"].write_bytes(full[: len(full) // 2])
    tifffile.imwrite(
        p["unsupported-compression.tif"],
        good,
        photometric="rgb",
        compression="zlib",
        resolution=(1e4, 1e4),
        resolutionunit="CENTIMETER",
    )
    _patch_first_ifd(p["unsupported-compression.tif"], {259: 34999})
    _ome(p["grayscale.ome.tif"], cv2.cvtColor(good, cv2.COLOR_RGB2GRAY), 1.0)
    _png(p["rgba.png"], np.dstack([good, np.full(good.shape[:2], 255, np.uint8)]))
    _ome(p["sixteen-bit.ome.tif"], good.astype(np.uint16) * 257, 1.0)
    _png(p["one-pixel.png"], good[:1, :1])
    tifffile.imwrite(
        p["huge-dimensions.tif"],
        good[:16, :16],
        photometric="rgb",
        resolution=(1e4, 1e4),
        resolutionunit="CENTIMETER",
    )
    _patch_first_ifd(p["huge-dimensions.tif"], {256: 1_000_000, 257: 1_000_000})
    _png(p["no-pixel-size.png"], good, None)
    _ome(p["pixel-size-zero.ome.tif"], good, 0.0)
    _ome(p["pixel-size-negative.ome.tif"], good, -0.5)
    _ome(p["pixel-size-100um.ome.tif"], good[:64, :64], 100.0)
    _ome(p["blank-white.ome.tif"], np.full((384, 384, 3), 255, np.uint8), 1.0)
    _ome(p["marrow-no-bone.ome.tif"], _marrow_only(), 1.0)
    _ome(p["séction ünïcode 1.ome.tif"], good, 1.0)
    return p


# ------------------------------------------------------------------ tests


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HISTO, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


def test_bad_inputs_never_stop_a_batch(tmp_path):
    """Every bad file gets a one-line reason (stderr and failures.csv); good slides beside them
    are analysed; the exit status is 1."""
    folder = tmp_path / "in"
    paths = write_bad_corpus(folder)
    write_slide(folder / "good.ome.tif", "oc-rich", seed=3)
    out = tmp_path / "out"
    proc = _run(["batch", str(folder), "--out", str(out), "--workers", "2", "--model", "classical"])
    assert proc.returncode == 1, proc.stderr
    failures = {r["slide"]: r for r in read_csv(out / "failures.csv")}
    rows = {r["slide"]: r for r in read_csv(out / "indices.csv")}
    from histo.io import slide_name

    for name, (_, error) in BAD_INPUTS.items():
        key = slide_name(paths[name])
        if error is None:
            assert key in rows, (name, failures.get(key))
        else:
            assert key in failures, (name, rows.get(key))
            f = failures[key]
            assert f["error"] == error, (name, f)
            assert f["reason"] and "\n" not in f["reason"]
            assert f"{key}: failed: {f['reason']}" in proc.stderr
    assert "good" in rows
    n_bad = sum(e is not None for _, e in BAD_INPUTS.values())
    assert f"{len(rows)} analysed, {n_bad} failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("<td class='err'>") == n_bad


def test_file_deleted_mid_batch(tmp_path):
    """A slide found, then deleted before it is analysed, fails alone with a clear reason."""
    from histo.batch import BatchReporter, run_batch

    folder = tmp_path / "in"
    write_slide(folder / "a.ome.tif", "normal", seed=1)
    gone = write_slide(folder / "b.ome.tif", "oc-poor", seed=2)

    class DeleteAtStart(BatchReporter):
        def start(self, total, resumed):
            gone.unlink()

    result = run_batch(
        folder, tmp_path / "out", workers=0, model="classical", reporter=DeleteAtStart()
    )
    assert [o.slide for o in result.outcomes] == ["a", "b"]
    assert result.outcomes[0].ok and not result.outcomes[1].ok
    assert result.outcomes[1].reason == "b.ome.tif: cannot read (No such file or directory)"
    assert result.outcomes[1].error == "SlideReadError"


def _read_only_command(out: Path, command: list[str]) -> list[str] | None:
    """``command`` run with ``out`` read-only: a read-only tmpfs in a private mount namespace
    (root), or a folder without write permission (other users); None when neither works."""
    out.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        out.chmod(0o555)
        return command
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
    return [unshare, "--mount", "sh", "-c", script, str(out), *command]


def test_read_only_output_folder(tmp_path):
    folder = tmp_path / "in"
    write_slide(folder / "a.ome.tif", "normal", seed=1)
    out = tmp_path / "ro"
    cmd = _read_only_command(
        out,
        [*HISTO, "batch", str(folder), "--out", str(out), "--workers", "1", "--model", "classical"],
    )
    if cmd is None:
        pytest.skip("cannot make a read-only folder here")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"histo batch: error: cannot write to output folder {out}: Read-only file system"
        if os.geteuid() == 0
        else f"histo batch: error: cannot write to output folder {out}: Permission denied"
    )


def _descendants(pid: int) -> set[int]:
    """Process ids below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_when(cmd: list[str], ready, timeout: float = 240) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()``; True if killed (False: it finished).
    Checks that its worker processes die with it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.02)
        if proc.poll() is not None:
            return False
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        end = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < end:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "worker processes outlived the batch"
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_batch_resumes_to_the_same_result(tmp_path):
    """SIGKILL while a slide is being written, then again mid-way; ``--resume`` finishes, the
    indices equal an uninterrupted run's, and no partial output survives."""
    from histo.batch import run_batch

    folder = tmp_path / "in"
    for i, phenotype in enumerate(("normal", "oc-rich", "oc-poor", "normal")):
        write_slide(folder / f"s{i}.ome.tif", phenotype, seed=10 + i)
    ref = tmp_path / "ref"
    run_batch(folder, ref, workers=0, model="classical")
    out = tmp_path / "out"
    args = ["batch", str(folder), "--out", str(out), "--workers", "1", "--model", "classical"]
    args.append("--resume")
    cmd = [*HISTO, *args]

    def partial_exists() -> bool:
        return out.exists() and any(".partial-" in p.name for p in out.iterdir())

    def finished(n: int):
        return lambda: (
            out.exists()
            and sum(
                (p / "indices.json").exists() for p in out.iterdir() if not p.name.startswith(".")
            )
            >= n
        )

    assert _kill_when(cmd, partial_exists), "the batch finished before the first kill point"
    left = [p.name for p in out.iterdir() if ".partial-" in p.name]
    assert _kill_when(cmd, finished(2)), "the batch finished before the second kill point"
    assert left, "the first kill left no partial folder to clean up"
    assert not (out / "indices.csv").exists()
    proc = _run(args)  # the same command, run to the end
    assert proc.returncode == 0, proc.stderr
    assert "reused" in proc.stderr
    assert read_csv(out / "indices.csv") == read_csv(ref / "indices.csv")
    leftovers = [p.name for p in out.iterdir() if ".partial" in p.name or ".old-" in p.name]
    assert leftovers == []
    for r in read_csv(out / "indices.csv"):
        meta = json.loads((out / r["slide"] / "indices.json").read_text())
        assert meta["row"]["slide"] == r["slide"]


# ------------------------------------------------------------------ property-based

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_HEADERS = [
    b"",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00\x08\x00\x00\x00",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
]


def _exercise(path: Path, pixel_size_um: float | None = None) -> None:
    """Open ``path`` and read from it; only histo's errors may escape."""
    from histo.errors import HistoError
    from histo.io import open_slide, read_region

    try:
        slide = open_slide(path, pixel_size_um=pixel_size_um)
    except HistoError:
        return
    try:
        h, w = slide.shape[:2]
        level = slide.levels[-1]
        level[: min(8, level.shape[0]), : min(8, level.shape[1])]
        if slide.pixel_size_um is not None:
            read_region(slide, 0.0, 0.0, min(h, 16), min(w, 16), slide.pixel_size_um)
    except HistoError:
        pass
    finally:
        slide.close()


@PROPERTY
@given(
    header=st.sampled_from(_HEADERS),
    body=st.binary(max_size=600),
    suffix=st.sampled_from([".tif", ".png", ".jpg", ".svs"]),
)
def test_open_slide_on_arbitrary_bytes(tmp_path_factory, header, body, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"x{suffix}"
    path.write_bytes(header + body)
    _exercise(path)


_small_images = st.one_of(
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint16]),
        st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([None, 1, 3, 4])).map(
            lambda t: t[:2] if t[2] is None else t
        ),
    ),
)


@PROPERTY
@given(image=_small_images)
def test_open_slide_on_arbitrary_png(tmp_path_factory, image):
    path = tmp_path_factory.mktemp("png") / "x.png"
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., ::-1][..., [2, 1, 0, 3][: image.shape[2]]]
    assert cv2.imwrite(str(path), image)
    _exercise(path, pixel_size_um=1.0)


@PROPERTY
@given(
    image=hnp.arrays(
        st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.float64, np.bool_]),
        st.tuples(
            st.integers(1, 24), st.integers(1, 24), st.sampled_from([None, 1, 2, 3, 4, 5])
        ).map(lambda t: t[:2] if t[2] is None else t),
    ),
    tiled=st.booleans(),
)
def test_open_slide_on_arbitrary_tiff(tmp_path_factory, image, tiled):
    path = tmp_path_factory.mktemp("tif") / "x.tif"
    kw = {"tile": (16, 16)} if tiled else {}
    photometric = "rgb" if image.ndim == 3 and image.shape[2] in (3, 4) else "minisblack"
    tifffile.imwrite(path, image, photometric=photometric, **kw)
    _exercise(path, pixel_size_um=0.5)


_DTYPES = [np.uint8, np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64, np.bool_]


@PROPERTY
@given(
    codes=hnp.arrays(
        np.int64,
        st.one_of(
            st.tuples(st.integers(1, 32), st.integers(1, 32)),
            st.tuples(st.integers(0, 4)),
            st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
        ),
        elements=st.integers(-1, 6),
    ),
    dtype=st.sampled_from(_DTYPES),
    pixel_size_um=st.sampled_from([1.0, 0.25, 3.0, 0.0, -1.0, float("nan"), float("inf")]),
    with_labels=st.booleans(),
)
def test_measure_raises_only_histo_errors(codes, dtype, pixel_size_um, with_labels):
    from histo.errors import HistoError
    from histo.measure import measure

    class_map = codes.astype(dtype)
    kw = {}
    if with_labels and class_map.ndim == 2:
        from scipy import ndimage as ndi

        cm = np.asarray(class_map)
        kw["osteoclast_labels"] = ndi.label(cm == 3)[0].astype(np.int32)
        kw["osteocyte_labels"] = ndi.label(cm == 4)[0].astype(np.int32)
    try:
        m = measure(class_map, pixel_size_um, **kw)
    except HistoError as exc:
        assert "\n" not in str(exc)
        return
    for key in ("T.Ar", "B.Ar", "BV/TV", "N.Oc", "N.Ot"):
        assert key in m.indices


# ------------------------------------------------------------------ docs/bad-input.md


def bad_input_table() -> str:
    """Run ``histo analyze`` on each bad input and ``histo batch`` on all of them; the
    markdown table of docs/bad-input.md."""
    import tempfile

    from histo.io import slide_name

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_bad_corpus(tmp / "in")
        write_slide(tmp / "in" / "good.ome.tif", "oc-rich", seed=3)
        batch = _run(
            [
                "batch",
                str(tmp / "in"),
                "--out",
                str(tmp / "batch"),
                "--workers",
                "2",
                "--model",
                "classical",
            ]
        )
        failures = {r["slide"]: r for r in read_csv(tmp / "batch" / "failures.csv")}
        lines = [
            "| input | `histo analyze` exit | message (stderr and failures.csv) |",
            "|---|---|---|",
        ]
        for name, (what, _) in BAD_INPUTS.items():
            proc = _run(
                ["analyze", str(paths[name]), "--out", str(tmp / "one"), "--model", "classical"]
            )
            f = failures.get(slide_name(paths[name]))
            msg = f"`{f['error']}`: {f['reason']}" if f else "analysed (a row in indices.csv)"
            lines.append(f"| {what} (`{name}`) | {proc.returncode} | {msg} |")
        lines.append(
            f"\n`histo batch` on all of them plus a good slide: exit status "
            f"{batch.returncode}; last line: `{batch.stderr.strip().splitlines()[-1]}`"
        )
    return "\n".join(lines).replace(str(tmp), "…")


if __name__ == "__main__":
    print(bad_input_table())
