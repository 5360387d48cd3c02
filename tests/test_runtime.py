"""Process-wide settings: what the entry points' tuning changes (measured in page faults,
collections and resident memory), and that the library changes none of it by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc malloc only",
)

# allocate, touch and free a 4 MiB array 300 times; the minor page faults it cost
_CHURN_FN = """
import resource
import numpy as np
def churn_faults():
    a = np.ones(2**20, np.float32)  # warm up: the first heap growth faults either way
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(300):
        a = np.ones(2**20, np.float32)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""
_CHURN = (
    _CHURN_FN
    + """
import json, sys
from histo.runtime import tune_malloc
if sys.argv[1] == "tune":
    tune_malloc()
print(json.dumps({"faults": churn_faults()}))
"""
)
#: every page of every 4 MiB array faulting again
_ALL_PAGES = 300 * 1024


def _python_json(code: str, *args: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (no MALLOC_* settings but ``env``); its JSON output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**environ, **env},
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux_glibc
def test_tune_malloc_undoes_a_small_trim_threshold():
    """dask's workers run with MALLOC_TRIM_THRESHOLD_=65536, which freezes glibc's mmap
    threshold at 128 kB: each 4 MiB array is then a new mmap whose pages fault in again each
    time. tune_malloc raises both thresholds, and the same loop reuses the heap."""
    frozen = _python_json(_CHURN, "plain", MALLOC_TRIM_THRESHOLD_="65536")
    tuned = _python_json(_CHURN, "tune", MALLOC_TRIM_THRESHOLD_="65536")
    assert frozen["faults"] > _ALL_PAGES / 2
    assert tuned["faults"] < 300


@linux_glibc
def test_tune_malloc_keeps_the_users_own_thresholds():
    """A trim threshold set by the user together with an mmap threshold is the user's choice:
    tune_malloc leaves both, and the arrays stay fresh mmaps."""
    env = {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}
    kept = _python_json(_CHURN, "tune", **env)
    assert kept["faults"] > _ALL_PAGES / 2


@linux_glibc
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")  # another cluster's dashboard
def test_local_workers_reuse_their_heap():
    """The workers of histo's local cluster start without dask's trim threshold: the same
    churn that faults every page under dask's default reuses the heap there."""
    from histo.batch import dask_client

    namespace: dict = {}
    exec(_CHURN_FN, namespace)
    churn_faults = namespace["churn_faults"]
    with dask_client(workers=1) as client:
        faults = next(iter(client.run(churn_faults).values()))
    assert faults < _ALL_PAGES / 10, faults


def _worker_state() -> dict:
    import gc

    import cv2

    import histo.runtime

    return {
        "gc0": gc.get_threshold()[0],
        "trim": histo.runtime._HEAP_TRIM_ALLOWED,
        "cv2_threads": cv2.getNumThreads(),
    }


@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")  # another cluster's dashboard
def test_local_workers_are_tuned_as_the_histo_command_is(monkeypatch):
    """histo's own workers are its entry points: each is tuned once when it starts (rarer GC,
    heap trimming allowed, its share of the cores), and the tasks themselves tune nothing."""
    from histo.batch import dask_client
    from histo.runtime import GC_THRESHOLD

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with dask_client(workers=2) as client:
        states = list(client.run(_worker_state).values())
    assert len(states) == 2
    for state in states:
        assert state["gc0"] == GC_THRESHOLD
        assert state["trim"] is True
        assert state["cv2_threads"] == 1  # 2 cores / 2 workers


# churn(mb): fill mb MB of the heap with 4 kB blocks and free all but the last, returned (it
# pins the heap's top, so free() cannot shrink the heap); rss_mib(): resident memory
_HEAP = """
import json
from histo.runtime import allow_heap_trim, release_free_memory
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS:"))
def churn(mb):
    blocks = [bytearray(4000) for _ in range(mb * 250)]
    return blocks[-1]
"""

# 200 MB freed and pinned; resident memory before and after a release, first as a library
# call in a process whose entry point did not allow trimming, then allowed
_PINNED = (
    _HEAP
    + """
pin = churn(200)
held = rss_mib()
refused = release_free_memory()
kept = rss_mib()
allow_heap_trim()
released = release_free_memory()
print(json.dumps({"held": held, "kept": kept, "refused": refused, "after": rss_mib(),
                  "released": released}))
"""
)


@linux_glibc
def test_release_free_memory_returns_freed_heap_pages_once_allowed():
    out = _python_json(_PINNED)
    assert out["refused"] is False
    assert out["held"] - out["kept"] < 5  # MiB: not allowed, the heap is the host's
    assert out["released"] is True
    assert out["held"] - out["after"] > 150  # MiB: the freed blocks' pages were resident


# the same with a slack: 40 MB of freed pages are kept (below the slack), 200 MB are not
_SLACK = (
    _HEAP
    + """
allow_heap_trim()
release_free_memory()
pins = [churn(40)]
small = {"held": rss_mib(), "released": release_free_memory(slack_mb=128), "after": rss_mib()}
pins.append(churn(200))
large = {"held": rss_mib(), "released": release_free_memory(slack_mb=128), "after": rss_mib()}
# a trim while 300 MB are live, then those freed: the baseline follows the memory down
live = bytearray(300 * 2**20)
release_free_memory()
del live
release_free_memory(slack_mb=128)
pins.append(churn(200))
drop = {"held": rss_mib(), "released": release_free_memory(slack_mb=128), "after": rss_mib()}
print(json.dumps({"small": small, "large": large, "drop": drop}))
"""
)


@linux_glibc
def test_release_free_memory_with_slack_trims_only_past_it():
    """Between rows of tiles the heap is trimmed only once freed pages add up to the slack
    (trimming after every row made the next row fault the same pages in again)."""
    out = _python_json(_SLACK)
    small, large = out["small"], out["large"]
    assert small["released"] is False
    assert small["held"] - small["after"] < 5  # the 40 MB stay resident
    assert large["released"] is True
    assert large["held"] - large["after"] > 150
    drop = out["drop"]
    assert drop["released"] is True
    assert drop["held"] - drop["after"] > 150


# settings a host process (napari, a notebook) may have chosen, then a whole analysis by the
# library: the settings must be the host's afterwards, and the heap untrimmed
_HOST = """
import gc, json, os, sys, tempfile
import cv2, torch, zarr  # (OpenCV's import sets LD_LIBRARY_PATH: before the snapshot)
torch.set_num_threads(1)
gc.set_threshold(700, 10, 10)
zarr.config.set({"async.concurrency": 7})
environ = dict(os.environ)
from histo.pipeline import analyze_slide
from histo.synth import make_section
import histo.runtime as runtime
sec = make_section("oc-rich", 640, 1.0, seed=4)
with tempfile.TemporaryDirectory() as out:
    result = analyze_slide(sec.image, pixel_size_um=1.0, out_dir=out, name="s")
print(json.dumps({
    "threads": torch.get_num_threads(),
    "gc": list(gc.get_threshold()),
    "zarr": zarr.config.get("async.concurrency"),
    "environ_same": dict(os.environ) == environ,
    "trimmed": runtime._RSS_AFTER_TRIM is not None,
    "phenotype": result.phenotype.phenotype,
}))
"""


def test_library_leaves_the_host_process_settings_alone():
    """An analysis run as a library call (as napari's plugin runs it) leaves torch's threads,
    the garbage collector, zarr's concurrency and the environment as the host set them, and
    does not trim the host's heap."""
    out = _python_json(_HOST)
    assert out["phenotype"] == "oc-rich"  # the analysis did run
    assert out["threads"] == 1
    assert out["gc"] == [700, 10, 10]
    assert out["zarr"] == 7
    assert out["environ_same"] is True
    assert out["trimmed"] is False


def test_import_in_background(tmp_path, monkeypatch):
    """The module is imported by a daemon thread; a module that fails to import is left for
    the import that needs it to report (nothing raised, nothing printed by the thread)."""
    import threading

    from histo.runtime import import_in_background

    (tmp_path / "histo_probe_ok.py").write_text("VALUE = 42\n")
    (tmp_path / "histo_probe_bad.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    errors: list = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    import_in_background("histo_probe_ok")
    import_in_background("histo_probe_bad")
    for t in threading.enumerate():
        if t.name.startswith("import-histo_probe"):
            t.join(timeout=30)
    assert sys.modules["histo_probe_ok"].VALUE == 42
    assert "histo_probe_bad" not in sys.modules
    assert errors == []
    with pytest.raises(ImportError, match="broken on purpose"):
        import histo_probe_bad  # noqa: F401
    monkeypatch.delitem(sys.modules, "histo_probe_ok")


def _young_collections(n_objects: int) -> int:
    """Collections of the youngest generation while ``n_objects`` lists are made and kept."""
    import gc

    before = gc.get_stats()[0]["collections"]
    kept = [[] for _ in range(n_objects)]
    after = gc.get_stats()[0]["collections"]
    del kept
    return after - before


def test_tune_gc_collects_less_often_and_keeps_a_users_choice():
    """Making 200,000 container objects runs the youngest collection hundreds of times with
    Python's default threshold and a handful of times once tuned; a collector switched off
    by the user stays off."""
    import gc

    from histo.runtime import tune_gc

    before = gc.get_threshold()
    was_enabled = gc.isenabled()
    try:
        gc.enable()
        gc.set_threshold(700, 10, 10)
        default = _young_collections(200_000)
        tune_gc()
        tuned = _young_collections(200_000)
        assert default > 100 and tuned < default / 20, (default, tuned)
        gc.set_threshold(0)  # collection switched off by the user
        tune_gc()
        assert _young_collections(200_000) == 0
    finally:
        gc.set_threshold(*before)
        if not was_enabled:
            gc.disable()
