"""The allocator settings of histo.runtime: what they change, measured in page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from histo.runtime import ARENA_MAX, tune_malloc

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc malloc only",
)

# allocate, touch and free a 4 MiB array 300 times; print the minor page faults it cost
_CHURN = """
import json, resource, sys
import numpy as np
from histo.runtime import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else []
a = np.ones(2**20, np.float32)  # warm up: the first heap growth faults either way
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(300):
    a = np.ones(2**20, np.float32)
    del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _python_json(code: str, *args: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (no MALLOC_* settings but ``env``); its JSON output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **env},
        check=True,
    )
    return json.loads(proc.stdout)


def _churn(mode: str, **env: str) -> dict:
    return _python_json(_CHURN, mode, **env)


@linux_glibc
def test_tune_malloc_undoes_a_small_trim_threshold():
    """dask's workers run with MALLOC_TRIM_THRESHOLD_=65536, which freezes glibc's mmap
    threshold at 128 kB: each 4 MiB array is then a new mmap whose pages fault in again each
    time (~154,000 faults here). tune_malloc raises both thresholds, and the same loop reuses
    the heap (no fault)."""
    frozen = _churn("plain", MALLOC_TRIM_THRESHOLD_="65536")
    tuned = _churn("tune", MALLOC_TRIM_THRESHOLD_="65536")
    assert frozen["faults"] > 300 * 256  # every page of every array faults again
    assert tuned["faults"] < 300
    assert "M_MMAP_THRESHOLD=33554432" in tuned["applied"]


def test_tune_malloc_respects_the_environment():
    if not sys.platform.startswith("linux"):
        assert tune_malloc({}) == []
        return
    assert tune_malloc({}) == [f"M_ARENA_MAX={ARENA_MAX}"]
    assert tune_malloc({"MALLOC_ARENA_MAX": "8"}) == []
    # a trim threshold set by the user alongside an mmap threshold is theirs to keep
    assert tune_malloc({"MALLOC_ARENA_MAX": "8", "MALLOC_TRIM_THRESHOLD_": "0"}) != []
    kept = {"MALLOC_ARENA_MAX": "8", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "1"}
    assert tune_malloc(kept) == []
    assert tune_malloc({"MALLOC_ARENA_MAX": "8", "MALLOC_TRIM_THRESHOLD_": "2147483647"}) == []


def test_local_workers_get_histo_environment():
    """The workers of histo's local cluster start with two malloc arenas, without dask's trim
    threshold, and with the per-worker thread count for OpenMP/MKL/OpenBLAS."""
    from histo.batch import dask_client

    with dask_client(workers=1) as client:
        environ = next(iter(client.run(lambda: dict(os.environ)).values()))
    threads = str(max(1, (os.cpu_count() or 1) // 1))
    assert environ.get("MALLOC_ARENA_MAX") == str(ARENA_MAX)
    assert "MALLOC_TRIM_THRESHOLD_" not in environ
    assert environ.get("OMP_NUM_THREADS") == threads
    assert environ.get("OPENBLAS_NUM_THREADS") == threads


# churn(mb): fill mb MB of the heap with 4 kB blocks and free all but the last, returned (it
# pins the heap's top, so free() cannot shrink the heap); rss_mib(): resident memory
_HEAP = """
import json
from histo.runtime import release_free_memory
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS:"))
def churn(mb):
    blocks = [bytearray(4000) for _ in range(mb * 250)]
    return blocks[-1]
"""

# 200 MB freed and pinned, then resident memory before and after the release
_PINNED = (
    _HEAP
    + """
pin = churn(200)
held = rss_mib()
released = release_free_memory()
print(json.dumps({"held": held, "after": rss_mib(), "released": released}))
"""
)


@linux_glibc
def test_release_free_memory_returns_freed_heap_pages():
    out = _python_json(_PINNED)
    assert out["released"] is True
    assert out["held"] - out["after"] > 150  # MiB: the freed blocks' pages were resident


# the same with a slack: 40 MB of freed pages are kept (below the slack), 200 MB are not
_SLACK = (
    _HEAP
    + """
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


def test_tune_gc_raises_the_youngest_threshold_only():
    import gc

    from histo.runtime import GC_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert tune_gc() is True
        assert gc.get_threshold() == (GC_THRESHOLD, 10, 10)
        assert tune_gc() is False  # already raised: kept
        gc.set_threshold(GC_THRESHOLD * 2, 10, 10)
        assert tune_gc() is False and gc.get_threshold()[0] == GC_THRESHOLD * 2
        gc.set_threshold(0)  # collection switched off by the user: left off
        assert tune_gc() is False and gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)
