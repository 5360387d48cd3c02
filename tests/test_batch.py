"""``histo batch``: finding slides, resume records, local and distributed dask runs, the lock."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from histo.batch import (
    BatchReporter,
    BatchSettings,
    clean_stale_partials,
    completed_outcome,
    find_slides,
    run_batch,
    unique_names,
)
from histo.errors import HistoError

HISTO = [sys.executable, "-m", "histo"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}


def write_slides(folder: Path, specs=(("normal", 0), ("oc-rich", 1), ("oc-poor", 2))) -> list:
    """Small synthetic slides (512 px, 1 µm/px) named by phenotype and seed."""
    from histo.synth import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for phenotype, seed in specs:
        path = folder / f"{phenotype}-{seed}.ome.tif"
        write_synthetic_slide(path, phenotype, size=512, pixel_size_um=1.0, seed=seed)
        paths.append(path)
    return paths


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    write_slides(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slides) -> list[dict]:
    """indices.csv of the slides analysed in this process, one after the other."""
    out = tmp_path_factory.mktemp("reference")
    run_batch(slides, out, workers=0, model="classical")
    return read_csv(out / "indices.csv")


# ------------------------------------------------------------------ finding slides


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _ngff(folder: Path, label: bool = False) -> Path:
    folder.mkdir(parents=True)
    attrs = {"ome": {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}}
    if label:
        attrs["ome"]["image-label"] = {}
    (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "attributes": attrs}))
    return folder


def test_find_slides_by_extension_recursively(tmp_path):
    root = tmp_path / "in"
    expected = [
        _touch(root / "A.OME.TIFF"),
        _touch(root / "a.svs"),
        _touch(root / "b.ndpi"),
        _touch(root / "c.png"),
        _touch(root / "d.JPG"),
        _touch(root / "e.jpeg"),
        _ngff(root / "f.ome.zarr"),
        _touch(root / "sub dir" / "g h é.tif"),
        _touch(root / "sub dir" / "deeper" / "i.ome.tif"),
    ]
    # not slides
    for name in (
        "x.classes.tif",
        "x.osteoclasts.tif",
        "x.osteocytes.tif",
        "notes.txt",
        "x.truth.json",
        ".hidden.tif",
        "x.tif.partial",
    ):
        _touch(root / name)
    _touch(root / ".cache" / "y.tif")
    _ngff(root / "labels-only.zarr", label=True)
    (root / "empty.zarr").mkdir()
    # histo's own outputs: an output folder (lock) and a slide result folder (indices.json)
    _touch(root / "results" / ".histo.lock")
    _touch(root / "results" / "S1" / "overlay.png")
    _touch(root / "old" / "S2" / "indices.json")
    _touch(root / "old" / "S2" / "overlay.png")
    _touch(root / "excluded" / "z.tif")
    found = find_slides(root, exclude=[root / "excluded"])
    assert sorted(found) == sorted(expected)
    assert found == sorted(found, key=lambda p: [part for part in p.relative_to(root).parts])


def test_find_slides_missing_folder(tmp_path):
    with pytest.raises(HistoError, match="no such folder"):
        find_slides(tmp_path / "nope")


def test_unique_names_disambiguates_collisions(tmp_path):
    paths = [tmp_path / "a" / "S1.tif", tmp_path / "b" / "S1.svs", tmp_path / "S2.ome.tif"]
    names = unique_names(paths, tmp_path)
    assert names == {paths[0]: "a__S1", paths[1]: "b__S1", paths[2]: "S2"}


def test_clean_stale_partials(tmp_path):
    stale = [tmp_path / n for n in (".S1.partial-123", ".S2.old-9", ".indices.csv.partial-5")]
    stale[0].mkdir()
    _touch(stale[0] / "labels.ome.zarr" / "zarr.json")
    stale[1].mkdir()
    _touch(stale[2])
    keep = [
        _touch(tmp_path / "S1" / "indices.json"),
        _touch(tmp_path / ".histo.lock"),
        _touch(tmp_path / "indices.csv"),
    ]
    removed = clean_stale_partials(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_settings_digest_changes_with_every_setting():
    base = BatchSettings("classical", "fp", None, "0.1.0")
    others = [
        BatchSettings("default", "fp", None, "0.1.0"),
        BatchSettings("classical", "fp2", None, "0.1.0"),
        BatchSettings("classical", "fp", 0.5, "0.1.0"),
        BatchSettings("classical", "fp", None, "0.2.0"),
    ]
    assert len({base.digest(), *(o.digest() for o in others)}) == 5
    assert base.digest() == BatchSettings("classical", "fp", None, "0.1.0").digest()


# ------------------------------------------------------------------ end to end


class Recorder(BatchReporter):
    def __init__(self):
        self.started, self.done, self.progress = None, [], []

    def start(self, total, resumed):
        self.started = (total, resumed)

    def slide_progress(self, slide, fraction, message):
        self.progress.append((slide, fraction))

    def slide_done(self, outcome):
        self.done.append(outcome.slide)


def test_batch_in_process_and_resume(tmp_path, slides, reference):
    out = tmp_path / "out"
    rec = Recorder()
    result = run_batch(slides, out, workers=0, model="classical", reporter=rec)
    assert result.failed == 0 and result.succeeded == 3 and rec.started == (3, 0)
    assert {s for s, _ in rec.progress} == set(rec.done) == {"normal-0", "oc-rich-1", "oc-poor-2"}
    rows = read_csv(out / "indices.csv")
    assert [r["slide"] for r in rows] == ["normal-0", "oc-poor-2", "oc-rich-1"]  # path order
    assert rows == reference
    meta = json.loads((out / "normal-0" / "indices.json").read_text())
    assert meta["input"]["path"] == str((slides / "normal-0.ome.tif").resolve())
    assert meta["input"]["size"] == (slides / "normal-0.ome.tif").stat().st_size
    settings = BatchSettings.make("classical", None)
    assert meta["input"]["settings_hash"] == settings.digest()
    assert read_csv(out / "failures.csv") == []
    assert "id='indices'" in (out / "report.html").read_text(encoding="utf-8")

    # resume: nothing reruns, the rows are the same
    stamp = (out / "normal-0" / "indices.json").stat().st_mtime_ns
    rec = Recorder()
    again = run_batch(slides, out, workers=0, model="classical", resume=True, reporter=rec)
    assert again.resumed == 3 and rec.done == [] and rec.started == (3, 3)
    assert read_csv(out / "indices.csv") == rows
    assert (out / "normal-0" / "indices.json").stat().st_mtime_ns == stamp

    # a changed input, a different setting, an incomplete folder: rerun
    src = slides / "oc-rich-1.ome.tif"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 1_000_000_000))
    (out / "oc-poor-2" / "overlay.png").unlink()
    rec = Recorder()
    third = run_batch(slides, out, workers=0, model="classical", resume=True, reporter=rec)
    assert sorted(rec.done) == ["oc-poor-2", "oc-rich-1"] and third.resumed == 1
    assert read_csv(out / "indices.csv") == rows
    assert completed_outcome(out, "normal-0", slides / "normal-0.ome.tif", settings) is not None
    other = BatchSettings.make("classical", 1.0)
    assert completed_outcome(out, "normal-0", slides / "normal-0.ome.tif", other) is None


def test_batch_passes_roi_and_ranges_to_every_slide(tmp_path, slides, reference):
    from histo.phenotype import ReferenceRanges, save_ranges

    roi, ranges = tmp_path / "roi.geojson", tmp_path / "ranges.json"
    square = [[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]
    roi.write_text(json.dumps({"type": "Polygon", "coordinates": [square]}))
    save_ranges(ReferenceRanges(bv_tv_upper=99.0), ranges)
    out = tmp_path / "out"
    result = run_batch(slides, out, workers=0, model="classical", roi=roi, ranges=ranges)
    assert result.failed == 0
    rows = {r["slide"]: r for r in read_csv(out / "indices.csv")}
    whole = {r["slide"]: r for r in reference}
    for name, row in rows.items():
        assert row["phenotype"] == "normal", name  # the ranges were used
        # 201 x 201 pixel centres of the square (1 µm/px) at most are measured
        assert float(row["T.Ar"]) <= 201 * 201 * 1e-6 < float(whole[name]["T.Ar"])
    # the ROI and ranges are settings: changing a file reruns on --resume
    settings = BatchSettings.make("classical", None, roi, ranges)
    assert settings.digest() != BatchSettings.make("classical", None).digest()
    save_ranges(ReferenceRanges(bv_tv_upper=98.0), ranges)
    assert BatchSettings.make("classical", None, roi, ranges).digest() != settings.digest()


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), **kw
    )


def _stop(*procs: subprocess.Popen | None) -> None:
    """Terminate the processes, then wait for each (killing one that does not exit in 30 s)."""
    running = [p for p in procs if p is not None]
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _scheduler_address(scheduler: subprocess.Popen, sched_file: Path, timeout_s=60.0) -> str:
    """The address a starting ``dask scheduler`` writes to its scheduler file."""
    deadline = time.monotonic() + timeout_s
    while not sched_file.exists() or not sched_file.read_text().strip():
        assert scheduler.poll() is None, scheduler.stderr.read()
        assert time.monotonic() < deadline, "scheduler did not start"
        time.sleep(0.2)
    time.sleep(0.2)  # the file can be seen before its JSON is complete
    return json.loads(sched_file.read_text())["address"]


class DaskCluster(NamedTuple):
    """A dask scheduler on loopback and the file it wrote its address to."""

    address: str
    scheduler_file: Path


@pytest.fixture
def dask_cluster(tmp_path) -> Iterator[DaskCluster]:
    """A real scheduler and one single-threaded worker on loopback, started as processes."""
    dask = str(Path(sys.executable).parent / "dask")
    sched_file = tmp_path / "scheduler.json"
    loopback = ["--host", "127.0.0.1", "--no-dashboard"]
    scheduler = _start(
        [dask, "scheduler", *loopback, "--port", "0", "--scheduler-file", str(sched_file)]
    )
    worker = None
    try:
        address = _scheduler_address(scheduler, sched_file)
        assert address.startswith("tcp://127.0.0.1:")
        worker = _start([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", *loopback])
        yield DaskCluster(address, sched_file)
    finally:
        _stop(worker, scheduler)


def _histo_batch(slides: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """``histo batch SLIDES --out OUT --model classical OPTIONS`` in a child process."""
    cmd = [*HISTO, "batch", str(slides), "--out", str(out), "--model", "classical", *options]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())


def test_batch_on_a_distributed_cluster(tmp_path, slides, reference, dask_cluster):
    """The batch runs on a scheduler given by address or by scheduler file."""
    out = tmp_path / "out"
    proc = _histo_batch(slides, out, "--scheduler", dask_cluster.address)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out / "indices.csv")
    assert rows == reference
    assert all((out / r["slide"] / "overlay.png").exists() for r in rows)
    # the scheduler file works as the address too, and --resume reuses everything
    proc = _histo_batch(slides, out, "--scheduler", str(dask_cluster.scheduler_file), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "3 analysed (3 reused), 0 failed" in proc.stderr


def test_unreachable_scheduler_is_a_clear_error(monkeypatch):
    import histo.batch
    from histo.batch import dask_client

    monkeypatch.setattr(histo.batch, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(HistoError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        with dask_client(scheduler="tcp://127.0.0.1:9"):
            pass


def test_local_workers_and_the_output_lock(tmp_path, slides, reference):
    """``histo batch --workers 2`` (a LocalCluster of real processes) gives the in-process
    table; a second run on the same output folder is refused with exit status 4 while the first
    holds it, and the first run's outputs are intact."""
    out = tmp_path / "out"
    first = _start(
        [*HISTO, "batch", str(slides), "--out", str(out), "--workers", "2", "--model", "classical"]
    )
    lock = out / ".histo.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(
        [*HISTO, "batch", str(slides), "--out", str(out), "--workers", "1", "--model", "classical"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert first.poll() is None, "the first run ended before the second was refused"
    assert second.returncode == 4
    lines = [ln for ln in second.stderr.splitlines() if "error" in ln]
    assert lines == [
        f"histo batch: error: output folder {out} is in use by another histo run "
        f"(pid {first.pid}); wait for it or choose another --out"
    ]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "3 analysed, 0 failed" in err
    assert read_csv(out / "indices.csv") == reference


def test_output_error_stops_the_batch_but_keeps_the_finished_rows(tmp_path, slides, reference):
    """A slide whose outputs cannot be written stops the batch (exit 4): it concerns the output
    folder, not the slide. The slides finished before it keep their rows in indices.csv."""
    from histo.errors import OutputError

    out = tmp_path / "out"

    class Obstacle(Recorder):
        def slide_done(self, outcome):
            super().slide_done(outcome)
            # after the 1st slide, a file where the 2nd (path order) writes before renaming
            (out / f".oc-poor-2.partial-{os.getpid()}").write_text("in the way")

    rec = Obstacle()
    with pytest.raises(OutputError) as info:
        run_batch(slides, out, workers=0, model="classical", reporter=rec)
    assert info.value.exit_status == 4
    assert rec.done == ["normal-0"]  # the batch stopped at the 2nd slide
    rows = read_csv(out / "indices.csv")
    assert [r["slide"] for r in rows] == ["normal-0"]
    assert rows[0] == reference[0]
    assert not (out / "oc-rich-1").exists() and not (out / "oc-poor-2").exists()


def test_a_worker_that_dies_becomes_a_failure_row(tmp_path):
    """A slide whose worker process dies (killed here with SIGKILL while it writes the slide's
    outputs, as the kernel's out-of-memory killer would) becomes a failure row; the nanny
    restarts the worker and the other slides are analysed."""
    import signal
    import threading

    import psutil

    from histo.synth import write_synthetic_slide

    folder = tmp_path / "slides"
    write_slides(folder, specs=(("normal", 0), ("oc-rich", 1)))
    write_synthetic_slide(folder / "big-3.ome.tif", "oc-poor", size=2048, pixel_size_um=1.0, seed=3)
    out = tmp_path / "out"
    before = {c.pid for c in psutil.Process().children()}  # never a worker of this batch
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        # the worker analysing big-3 writes into out/.big-3.partial-<its pid>: kill that pid
        while not stop.is_set():
            for p in out.glob(".big-3.partial-*") if out.exists() else []:
                pid = int(p.name.rsplit("-", 1)[1])
                if pid not in killed and pid not in before and psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = run_batch(folder, out, workers=1, model="classical")
    finally:
        stop.set()
        thread.join()
    assert len(killed) == 2  # its first try and its one retry (allowed-failures 1)
    assert result.failed == 1 and result.succeeded == 2
    failures = read_csv(out / "failures.csv")
    assert [f["slide"] for f in failures] == ["big-3"]
    assert "the worker analysing this slide died" in failures[0]["reason"]
    assert sorted(r["slide"] for r in read_csv(out / "indices.csv")) == ["normal-0", "oc-rich-1"]


def test_a_slide_failing_quality_control_is_a_result_and_batch_exits_0(
    tmp_path, slides, reference, monkeypatch, capsys
):
    import histo.qc
    from histo.cli import main
    from histo.qc import FAIL, Signal

    real = histo.qc.check_slide

    def failing_for_oc_rich(slide, **kwargs):
        report = real(slide, **kwargs)
        if slide.name.startswith("oc-rich"):
            bad = Signal("stain.second_deg", 30.0, "deg", "0-15", FAIL, "eosin, not TRAP")
            return report.extended([bad])
        return report

    monkeypatch.setattr(histo.qc, "check_slide", failing_for_oc_rich)
    out = tmp_path / "out"
    code = main(["batch", str(slides), "--out", str(out), "--workers", "0", "--model", "classical"])
    err = capsys.readouterr().err
    assert code == 0
    rows = {r["slide"]: r for r in read_csv(out / "indices.csv")}
    failed = rows["oc-rich-1"]
    assert failed["qc"] == FAIL and failed["phenotype"] == "uncertain"
    assert failed["qc_reasons"].startswith("eosin, not TRAP") and failed["confidence"] == ""
    assert "would call" in failed["evidence"]
    assert failed["BV/TV"] == next(r for r in reference if r["slide"] == "oc-rich-1")["BV/TV"]
    verdicts = [rows[s]["qc"] for s in ("normal-0", "oc-poor-2")]
    assert FAIL not in verdicts
    assert (
        f"quality control: {verdicts.count('pass')} pass, {verdicts.count('warn')} warn, 1 fail"
        in err
    )
    assert "oc-rich-1: uncertain" in err and "qc fail: eosin, not TRAP" in err
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "id='qc'" in html and "class='qc-fail'" in html


def test_quiet_shutdown_drops_only_the_closing_heartbeat_traceback(caplog):
    """Once a batch's work is done its workers stop reporting a heartbeat that met the
    scheduler closing (a traceback in the command's stderr); other worker errors still show."""
    import logging

    from histo._dask_worker import quiet_shutdown

    log = logging.getLogger("distributed.worker")
    before = list(log.filters)
    try:
        quiet_shutdown()
        with caplog.at_level(logging.ERROR, logger="distributed.worker"):
            log.error("Failed to communicate with scheduler during heartbeat.")
            log.error("Compute Failed")
        assert [r.getMessage() for r in caplog.records] == ["Compute Failed"]
    finally:
        log.filters[:] = before
