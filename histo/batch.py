"""Many slides: one outcome per slide, failures isolated, summary tables written at the end.

``histo analyze`` runs slides one after the other through :func:`analyze_one`; ``histo batch``
runs the same function on dask.distributed workers through :func:`run_batch`. A slide that fails
never stops the others: its one-line reason goes to failures.csv.

Scheduling
----------
Local runs start a :class:`distributed.LocalCluster` of worker *processes* with one thread
each, rather than dask's multiprocessing scheduler:

- the same code path serves a local machine and an existing cluster (``--scheduler``), and
  ``distributed.as_completed`` drives the overall progress bar in both;
- a slide that crashes its worker (segfault in a codec, out of memory) kills only that worker:
  the nanny restarts it and the slide becomes a failure row (``KilledWorker``) instead of taking
  the whole batch down, which is what a crashed multiprocessing pool does;
- worker memory is limited and watched by the nanny, and workers die with their parent process
  (``histo batch`` killed with SIGKILL leaves no orphans).

The cost is a second or two of cluster start-up, nothing against minutes per slide.

Resume
------
Each finished slide folder holds ``indices.json`` with the slide's row and a record of the input
(path, size, mtime) and the settings (model and its weights' checksum, pixel size, histo
version, hashed). ``--resume`` reuses a slide whose record matches and whose folder is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from histo.device import DeviceError
from histo.errors import HistoError, ModelError, OutputError
from histo.io.formats import slide_suffix

#: ground truth written beside synthetic slides by ``histo synth``: not slides
GROUND_TRUTH_SUFFIXES = (".classes.tif", ".osteoclasts.tif", ".osteocytes.tif")
#: a slide folder is complete when it holds all of these
RECORD_NAME = "indices.json"
#: dask event topic on which workers report per-slide progress
PROGRESS_TOPIC = "histo-slide-progress"
#: how long to try to reach a dask scheduler given with ``--scheduler``
CONNECT_TIMEOUT = "20s"

ProgressFn = Callable[[float, str], None]


@dataclass
class SlideOutcome:
    """What happened to one slide: a row of indices.csv, or a failure reason."""

    slide: str
    path: str
    row: dict | None = None
    reason: str | None = None
    error: str | None = None  #: error class name, e.g. 'PixelSizeError'
    seconds: float = 0.0
    tissue_megapixels: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.row is not None


def analyze_one(path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> SlideOutcome:
    """Analyse one slide into ``out_dir``; never raises for a bad slide.

    histo's own errors become a one-line reason; any other exception (a bug, or a library
    failing on odd input) also becomes a failure, with its type named, so that one slide can
    never take a batch down.

    Parameters
    ----------
    path
        The slide.
    out_dir
        Output folder; the slide's outputs go to ``out_dir/<name>/``.
    **kwargs
        Passed to :func:`histo.pipeline.analyze_slide` (``pixel_size_um``, ``model``,
        ``name``, ``record``, ``progress``, ...).

    Raises
    ------
    OutputError
        The output folder cannot be written: it concerns every slide.
    ModelError, DeviceError
        The model cannot be loaded, or not on the device asked for: it concerns every slide.
    """
    from histo.io import slide_name
    from histo.pipeline import analyze_slide

    path = Path(path)
    name = kwargs.get("name") or slide_name(path)
    try:
        result = analyze_slide(path, out_dir=out_dir, **kwargs)
    except (OutputError, ModelError, DeviceError):
        raise
    except HistoError as exc:
        return SlideOutcome(name, str(path), reason=_one_line(str(exc)), error=type(exc).__name__)
    except MemoryError:
        return SlideOutcome(name, str(path), reason="out of memory", error="MemoryError")
    except Exception as exc:  # noqa: BLE001 - isolate any failure to its slide
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
        reason = f"unexpected {type(exc).__name__}: {_one_line(str(exc))}"
        return SlideOutcome(name, str(path), reason=reason + where, error=type(exc).__name__)
    return SlideOutcome(
        result.name,
        str(path),
        row=result.row(),
        seconds=result.seconds,
        tissue_megapixels=result.tissue_megapixels,
        extra={"provenance": result.provenance},
    )


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def write_summary(
    out_dir: str | os.PathLike,
    outcomes: list[SlideOutcome],
    groups: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write indices.csv, failures.csv and report.html for ``outcomes`` into ``out_dir``.

    Each file is written under a temporary name and renamed: a reader (or a killed run) sees
    the previous version or the new one, never half a table.

    Parameters
    ----------
    out_dir
        The output folder.
    outcomes
        One per slide, in the order the rows should appear.
    groups
        ``{slide: group}`` from a sample sheet: adds per-group box plots to the report.
    """
    from histo.io.tables import write_indices_csv, write_object_table
    from histo.report import write_report_html

    out_dir = Path(out_dir)
    rows = [o.row for o in outcomes if o.ok]
    failures = [
        {"slide": o.slide, "path": o.path, "error": o.error, "reason": o.reason}
        for o in outcomes
        if not o.ok
    ]
    paths = {
        "indices": out_dir / "indices.csv",
        "failures": out_dir / "failures.csv",
        "report": out_dir / "report.html",
    }
    # each writer is atomic (histo.io.atomic) and raises OutputError
    write_indices_csv(paths["indices"], rows)
    write_object_table(paths["failures"], failures, columns=["slide", "path", "error", "reason"])
    write_report_html(
        paths["report"],
        rows,
        failures,
        groups=groups,
        out_dir=out_dir,
        provenance=_provenances(outcomes),
    )
    return paths


def _provenances(outcomes: list[SlideOutcome]) -> list[dict]:
    """The distinct provenance records (version, model, device) of the slides analysed."""
    found: list[dict] = []
    for o in outcomes:
        p = o.extra.get("provenance")
        if p and p not in found:
            found.append(p)
    return found


# --------------------------------------------------------------------------- finding slides


def is_ome_zarr_image(path: Path) -> bool:
    """True if the folder ``path`` is an OME-Zarr image (NGFF ``multiscales`` metadata)."""
    for meta in ("zarr.json", ".zattrs"):
        try:
            attrs = json.loads((path / meta).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta == "zarr.json":
            attrs = attrs.get("attributes", {}) if isinstance(attrs, dict) else {}
        if not isinstance(attrs, dict):
            continue
        ome = attrs.get("ome", attrs)
        if isinstance(ome, dict) and ome.get("multiscales") and "image-label" not in ome:
            return True
    return False


def _is_histo_output(folder: Path) -> bool:
    """A folder written by histo: an output folder (lock file) or one slide's results."""
    from histo.io.locking import LOCK_NAME

    return (folder / LOCK_NAME).exists() or (folder / RECORD_NAME).exists()


def _slide_suffix(name: str) -> str | None:
    if name.lower().endswith(GROUND_TRUTH_SUFFIXES):
        return None
    return slide_suffix(name)


def find_slides(folder: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Slides under ``folder``, recursively, sorted by path.

    Slides are files with a slide suffix (:data:`histo.io.formats.SLIDE_SUFFIXES`, any case)
    and OME-Zarr image folders (``*.zarr`` with NGFF ``multiscales`` metadata). Skipped: hidden
    files and folders, the ground truth beside synthetic slides (:data:`GROUND_TRUTH_SUFFIXES`),
    histo's own output folders (those holding ``.histo.lock`` or a slide's ``indices.json``) and
    the folders in ``exclude`` (the batch's own output folder).

    Raises
    ------
    HistoError
        ``folder`` does not exist or is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise HistoError(f"{root}: no such folder")
    skip = {Path(p).resolve() for p in exclude}
    found: list[Path] = []

    def walk(d: Path) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            try:
                is_dir = e.is_dir()
            except OSError:
                continue
            if is_dir:
                if p.resolve() in skip or _is_histo_output(p):
                    continue
                if e.name.lower().endswith(".zarr"):
                    if is_ome_zarr_image(p):
                        found.append(p)
                    continue
                walk(p)
            elif _slide_suffix(e.name):
                found.append(p)

    walk(root)
    return found


def unique_names(slides: list[Path], root: Path) -> dict[Path, str]:
    """An output folder name per slide: the file name without suffixes, made unique.

    Slides whose names collide (``a/S1.tif`` and ``b/S1.svs``) are named from their path
    relative to ``root`` with ``__`` between the parts (``a__S1``, ``b__S1``).
    """
    from histo.io import slide_name

    base = {p: slide_name(p) for p in slides}
    counts: dict[str, int] = {}
    for n in base.values():
        counts[n] = counts.get(n, 0) + 1
    names = {}
    for p, n in base.items():
        if counts[n] > 1:
            try:
                rel = p.relative_to(root)
            except ValueError:
                rel = Path(p.name)
            n = "__".join([*rel.parent.parts, slide_name(p)])
        names[p] = re.sub(r"[/\\\x00]", "_", n) or "slide"
    return names


# --------------------------------------------------------------------------- resume records


@dataclass(frozen=True)
class BatchSettings:
    """Settings that change a slide's results: a slide is reused only if they are unchanged.

    They are recorded, with their :meth:`digest`, in each slide's indices.json.

    Attributes
    ----------
    model : str
        Model name or weights path as given.
    model_fingerprint : str
        sha256 of the weights (from the registry or the file) or the classical config.
    pixel_size_um : float or None
        ``--pixel-size`` (None: from each file).
    histo_version : str
        The histo version that wrote the results.
    roi, ranges : str or None
        Absolute paths of the region of interest (GeoJSON) and of the reference ranges (JSON)
        given to every slide, or None.
    roi_sha256, ranges_sha256 : str or None
        Checksums of those files: a changed file changes the results.
    """

    model: str
    model_fingerprint: str
    pixel_size_um: float | None
    histo_version: str
    roi: str | None = None
    roi_sha256: str | None = None
    ranges: str | None = None
    ranges_sha256: str | None = None

    @classmethod
    def make(
        cls,
        model: str = "default",
        pixel_size_um: float | None = None,
        roi: str | os.PathLike | None = None,
        ranges: str | os.PathLike | None = None,
    ) -> BatchSettings:
        from histo import __version__

        files = []
        for path in (roi, ranges):
            resolved = None if path is None else Path(path).resolve()
            files += [None, None] if resolved is None else [str(resolved), _sha256(resolved)]
        return cls(str(model), model_fingerprint(model), pixel_size_um, __version__, *files)

    def digest(self) -> str:
        """A short hash of the settings (16 hex digits); settings left unset do not enter it."""
        settings = {k: v for k, v in asdict(self).items() if v is not None or k == "pixel_size_um"}
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    """sha256 of a file's content; HistoError (one line) if it cannot be read."""
    from histo.segment.registry import file_sha256

    try:
        return file_sha256(path)
    except OSError as exc:
        raise HistoError(f"{path}: cannot read ({exc.strerror or exc})") from None


def model_fingerprint(model: str) -> str:
    """What identifies the weights behind ``model``: their sha256, or the registry entry."""
    from histo.segment.registry import file_sha256, locate_model

    try:
        source = locate_model(model)
        if source.weights is None:
            return json.dumps(source.entry, sort_keys=True)
        return source.sha256 or file_sha256(source.weights)
    except (HistoError, OSError):
        return str(model)


def input_record(path: str | os.PathLike) -> dict:
    """Path, size and modification time of a slide (summed/latest over an OME-Zarr folder).

    Raises
    ------
    OSError
        The slide does not exist (any more).
    """
    p = Path(path).resolve()
    st = p.stat()
    size, mtime = st.st_size, st.st_mtime_ns
    if p.is_dir():
        size = 0
        for dirpath, _, files in os.walk(p):
            for f in files:
                fst = os.stat(os.path.join(dirpath, f))
                size += fst.st_size
                mtime = max(mtime, fst.st_mtime_ns)
    return {"path": str(p), "size": int(size), "mtime_ns": int(mtime)}


def completed_outcome(
    out_dir: Path, name: str, path: Path, settings: BatchSettings
) -> SlideOutcome | None:
    """The outcome recorded in ``out_dir/<name>/`` if it is complete and was made from the same
    input (path, size, mtime) with the same settings; otherwise None (the slide must run)."""
    from histo.pipeline import SLIDE_OUTPUTS
    from histo.segment import PROVENANCE_KEYS

    folder = out_dir / name
    try:
        meta = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
        record = meta.get("input") or {}
        if record.get("settings_hash") != settings.digest():
            return None
        current = input_record(path)
    except (OSError, ValueError, AttributeError):
        return None
    if any(record.get(k) != current[k] for k in ("path", "size", "mtime_ns")):
        return None
    if not all((folder / f).exists() for f in SLIDE_OUTPUTS):
        return None
    row = meta.get("row")
    if not isinstance(row, dict):
        return None
    provenance = {k: meta[k] for k in PROVENANCE_KEYS if k in meta}
    return SlideOutcome(name, str(path), row=row, extra={"resumed": True, "provenance": provenance})


_STALE = re.compile(r"^\..+\.(partial|old)-\d+$")


def clean_stale_partials(out_dir: str | os.PathLike) -> list[Path]:
    """Remove what killed runs left in ``out_dir``: ``.NAME.partial-PID`` / ``.NAME.old-PID``
    folders and files. Call it while holding the output lock (no other run writes there)."""
    out_dir = Path(out_dir)
    removed = []
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return removed
    for e in entries:
        if _STALE.match(e.name):
            p = Path(e.path)
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- running a batch


@dataclass
class SlideJob:
    """One slide to analyse: where it is, what its outputs are called, its input record."""

    path: Path
    name: str


def run_slide(
    path: str,
    out_dir: str,
    name: str,
    settings: dict,
    report_progress: bool = True,
    progress: ProgressFn | None = None,
    device: str | None = None,
) -> SlideOutcome:
    """The task a worker runs for one slide: :func:`analyze_one` plus the resume record.

    A slide that cannot be read or analysed comes back as a failed outcome with its reason.

    Parameters
    ----------
    path, out_dir, name
        The slide, the batch's output folder and the slide's output name.
    settings
        :class:`BatchSettings` as a dict (plain data travels to workers cheaply).
    report_progress
        Publish progress on the :data:`PROGRESS_TOPIC` event topic (a few events per second at
        most) when running on a dask worker.
    progress
        ``progress(fraction, message)`` when running in this process.
    device
        Where this worker runs the network ("auto", "cpu", "cuda", "mps").
    """
    s = BatchSettings(**settings)
    try:
        record = input_record(path)
    except OSError as exc:
        return SlideOutcome(
            name,
            str(path),
            reason=f"{Path(path).name}: cannot read ({exc.strerror or exc})",
            error="SlideReadError",
        )
    record.update(settings=asdict(s), settings_hash=s.digest())
    if progress is None and report_progress:
        progress = _worker_progress(name)
    t0 = time.perf_counter()
    outcome = analyze_one(
        path,
        out_dir,
        name=name,
        pixel_size_um=s.pixel_size_um,
        model=s.model,
        roi=s.roi,
        ranges=s.ranges,
        record=record,
        progress=progress,
        device=device,
    )
    outcome.slide = name
    outcome.seconds = outcome.seconds or time.perf_counter() - t0
    return outcome


def limit_threads(threads: int) -> None:
    """Threads for OpenCV (and torch, if already imported; otherwise OMP_NUM_THREADS, set in
    the worker's environment, applies when it is)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with contextlib.suppress(Exception):
        import cv2

        cv2.setNumThreads(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.set_num_threads(threads)


def _worker_progress(name: str) -> ProgressFn | None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    last = [0.0, -1.0]

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - last[0] < 0.25 and fraction - last[1] < 0.1:
            return
        last[0], last[1] = now, fraction
        with contextlib.suppress(Exception):
            worker.log_event(
                PROGRESS_TOPIC, {"slide": name, "fraction": fraction, "message": message}
            )

    return progress


@dataclass
class BatchResult:
    """What a batch did: one outcome per slide found (in path order)."""

    outcomes: list[SlideOutcome]
    paths: dict[str, Path]
    resumed: int = 0
    cleaned: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    @property
    def succeeded(self) -> int:
        return sum(o.ok for o in self.outcomes)


class BatchReporter:
    """Callbacks a front end gives :func:`run_batch` (all optional no-ops by default)."""

    def start(self, total: int, resumed: int) -> None:
        """The batch found ``total`` slides, of which ``resumed`` are reused."""

    def slide_progress(self, slide: str, fraction: float, message: str) -> None:
        """Progress of one running slide."""

    def slide_done(self, outcome: SlideOutcome) -> None:
        """One slide finished (or failed)."""

    def close(self) -> None:
        """The batch is over."""


def default_workers() -> int:
    """Local workers: one per core, at most one per 2 GB of memory (a slide's peak)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return max(1, min(cores or 1, int(mem_gb // 2)))


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator:
    """A :class:`distributed.Client`: on ``scheduler`` if given, else on a local cluster of
    ``workers`` processes with one thread each (no dashboard, quiet logs).

    Raises
    ------
    HistoError
        The scheduler cannot be reached.
    """
    import dask

    # distributed puts its config defaults into dask's on import: they must be there before
    # the overrides below, whose exit would otherwise drop them
    import distributed  # noqa: F401

    # worker-saturation 1.0: a worker holds only the slides it is running (one per thread), so
    # a worker that dies takes no queued slide down with it (each task on a dead worker counts
    # one failure; with the default 1.1 a second slide waits on every 1-thread worker)
    with dask.config.set(
        {
            "distributed.scheduler.allowed-failures": 1,
            "distributed.scheduler.worker-saturation": 1.0,
            "distributed.admin.tick.limit": "1h",
        }
    ):
        clients = _remote_client(scheduler) if scheduler else _local_client(workers)
        with clients as client:
            yield client


@contextlib.contextmanager
def _remote_client(scheduler: str) -> Iterator:
    """A client of the scheduler at an address or in a scheduler file."""
    from distributed import Client

    try:
        if Path(scheduler).is_file():
            client = Client(scheduler_file=scheduler, timeout=CONNECT_TIMEOUT)
        else:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        raise HistoError(
            f"cannot reach the dask scheduler at {scheduler}: {_one_line(str(exc))}"
        ) from None
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _local_client(workers: int | None) -> Iterator:
    """A client of a local cluster of ``workers`` one-thread processes."""
    import logging

    import dask
    from distributed import Client, LocalCluster

    from histo.runtime import WORKER_ENV

    n = workers or default_workers()
    threads = max(1, (os.cpu_count() or 1) // n)
    # the workers' environment, set before they start (replacing dask's default, whose
    # MALLOC_TRIM_THRESHOLD_ makes every array a fresh mmap: 2x slower, histo.runtime)
    environ = {
        **WORKER_ENV,
        **{f"{lib}_NUM_THREADS": str(threads) for lib in ("OMP", "MKL", "OPENBLAS")},
    }
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # the scheduler's health routes on any free port, not 8787: another cluster
            # (a second batch, a notebook's dashboard) may hold that one
            scheduler_kwargs={"dashboard_address": ":0"},
            silence_logs=logging.ERROR,
            memory_limit="auto",
        )
    try:
        with Client(cluster) as client:
            from histo._dask_worker import TuneWorker, quiet_shutdown

            client.register_plugin(TuneWorker(threads))
            yield client
            client.run(quiet_shutdown, on_error="ignore")
    finally:
        cluster.close()


def run_batch(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    resume: bool = False,
    pixel_size_um: float | None = None,
    model: str = "default",
    roi: str | os.PathLike | None = None,
    ranges: str | os.PathLike | None = None,
    groups: dict[str, str] | None = None,
    reporter: BatchReporter | None = None,
    device: str | None = None,
) -> BatchResult:
    """Analyse every slide under ``folder`` into ``out_dir`` on dask workers.

    A slide that fails becomes a row of failures.csv with its reason; the others go on.

    Parameters
    ----------
    folder
        Searched recursively (see :func:`find_slides`).
    out_dir
        Output folder (created; locked for the duration, see :func:`histo.io.locking.output_lock`).
    workers
        Local worker processes (default: :func:`default_workers`); ``0`` runs the slides one
        after the other in this process (no dask; for debugging).
    scheduler
        Address of an existing dask.distributed scheduler (``tcp://host:8786``) or a scheduler
        file (JSON); its workers must see ``folder`` and ``out_dir`` at the same paths.
    resume
        Reuse slides whose outputs are complete for the same input and settings.
    pixel_size_um, model, roi, ranges
        For every slide, as :func:`histo.pipeline.analyze_slide` takes them (``roi`` a
        GeoJSON path, ``ranges`` a JSON path); they are part of the resume settings.
    groups
        ``{slide: group}`` from a sample sheet, for the report's group comparisons.
    reporter
        Progress callbacks.
    device
        Where each worker runs the network: "auto" (default), "cpu", "cuda" or "mps".

    Returns
    -------
    BatchResult
        Outcomes in path order; indices.csv, failures.csv and report.html are written.

    Raises
    ------
    OutputError
        ``out_dir`` cannot be written or another run holds it (exit status 4); a slide's
        outputs cannot be written (the batch stops; the rows finished are kept if possible).
    ModelError
        The model cannot be loaded (exit status 5).
    DeviceError
        The device asked for is not available here (exit status 2).
    """
    from histo.io.locking import output_lock
    from histo.segment import load_model

    t0, reporter = time.perf_counter(), reporter or BatchReporter()
    folder, out_dir = Path(folder), Path(out_dir)
    slides = find_slides(folder, exclude=[out_dir])
    # fail fast (exit 5 or 2) on missing or tampered weights, or a device missing here; the
    # workers of a remote scheduler have devices of their own, and check them themselves
    load_model(model, device="cpu" if scheduler else device)
    settings = BatchSettings.make(model, pixel_size_um, roi, ranges)
    with output_lock(out_dir):
        cleaned = clean_stale_partials(out_dir)
        names = unique_names(slides, folder)
        outcomes, todo = _resumed_and_todo(slides, names, out_dir, settings, resume)
        resumed = len(outcomes)
        reporter.start(len(slides), resumed)
        run = _BatchRun(out_dir, settings, slides, outcomes, reporter, groups, device)
        _run_todo(run, todo, workers, scheduler)
        paths = write_summary(out_dir, run.ordered(), groups)
    return BatchResult(run.ordered(), paths, resumed, cleaned, time.perf_counter() - t0)


@dataclass
class _BatchRun:
    """What the slide runners of one batch share; ``outcomes`` fills in as slides finish."""

    out_dir: Path
    settings: BatchSettings
    slides: list[Path]
    outcomes: dict[Path, SlideOutcome]
    reporter: BatchReporter
    groups: dict[str, str] | None
    device: str | None

    def ordered(self) -> list[SlideOutcome]:
        """The outcomes so far, in path order."""
        return [self.outcomes[p] for p in self.slides if p in self.outcomes]


def _run_todo(run: _BatchRun, todo: list[SlideJob], workers, scheduler) -> None:
    """Run ``todo`` here (``workers == 0``, no scheduler) or on dask.

    An error that concerns every slide stops the batch, but the slides finished so far keep
    their rows: the summary tables of those are written first, if the folder still allows it.
    """
    try:
        if todo and workers == 0 and not scheduler:
            _run_here(run, todo)
        elif todo:
            _run_dask(run, todo, workers, scheduler)
    except (OutputError, ModelError, DeviceError):
        with contextlib.suppress(OutputError):
            write_summary(run.out_dir, run.ordered(), run.groups)
        raise
    finally:
        run.reporter.close()


def _resumed_and_todo(
    slides: list[Path], names: dict[Path, str], out_dir: Path, settings: BatchSettings, resume: bool
) -> tuple[dict[Path, SlideOutcome], list[SlideJob]]:
    """The outcomes reused from a previous run (with ``resume``) and the slides left to run."""
    outcomes: dict[Path, SlideOutcome] = {}
    todo: list[SlideJob] = []
    for p in slides:
        done = completed_outcome(out_dir, names[p], p, settings) if resume else None
        if done is not None:
            outcomes[p] = done
        else:
            todo.append(SlideJob(p, names[p]))
    return outcomes, todo


def _run_here(run: _BatchRun, todo: list[SlideJob]) -> None:
    for job in todo:

        def progress(fraction: float, message: str, _name: str = job.name) -> None:
            run.reporter.slide_progress(_name, fraction, message)

        outcome = run_slide(
            str(job.path),
            str(run.out_dir),
            job.name,
            asdict(run.settings),
            progress=progress,
            device=run.device,
        )
        run.outcomes[job.path] = outcome
        run.reporter.slide_done(outcome)


def _run_dask(run: _BatchRun, todo: list[SlideJob], workers, scheduler) -> None:
    from distributed import as_completed

    reporter, settings = run.reporter, run.settings
    with dask_client(workers, scheduler) as client:
        client.subscribe_topic(
            PROGRESS_TOPIC,
            lambda event: reporter.slide_progress(
                event[1]["slide"], event[1]["fraction"], event[1]["message"]
            ),
        )
        s = asdict(settings)
        futures = {}
        for job in todo:
            fut = client.submit(
                run_slide,
                str(job.path.resolve()),
                str(run.out_dir.resolve()),
                job.name,
                s,
                True,
                device=run.device,
                key=f"histo-slide-{job.name}-{settings.digest()}-{os.getpid()}",
                pure=False,
                retries=0,
            )
            futures[fut] = job
        try:
            for fut in as_completed(list(futures)):
                job = futures[fut]
                outcome = _outcome_of(fut, job)
                run.outcomes[job.path] = outcome
                reporter.slide_done(outcome)
        except BaseException:
            client.cancel(list(futures))
            raise
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(PROGRESS_TOPIC)


def _outcome_of(fut, job: SlideJob) -> SlideOutcome:
    """The outcome of a finished future; a worker that died becomes a failure row."""
    if fut.status == "finished":
        return fut.result()
    if fut.status == "cancelled":
        return SlideOutcome(job.name, str(job.path), reason="cancelled", error="Cancelled")
    exc = fut.exception()
    if isinstance(exc, (OutputError, ModelError, DeviceError)):
        raise exc
    if type(exc).__name__ == "KilledWorker":
        reason = (
            "the worker analysing this slide died (out of memory or a crash in a "
            "library); try it alone with 'histo analyze'"
        )
    else:
        reason = f"unexpected {type(exc).__name__}: {_one_line(str(exc))}"
    return SlideOutcome(job.name, str(job.path), reason=reason, error=type(exc).__name__)
