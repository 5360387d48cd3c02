"""Process-wide settings for the processes histo runs in on its own, and heap trimming.

Only entry points call the ``tune_*`` functions: the ``histo`` command's ``main`` and the
set-up of a ``histo batch`` dask worker. The library never changes process-wide state on
import or inside its calls, so it behaves the same inside napari, a notebook or someone
else's dask worker. What the entry points change:

- glibc malloc (:func:`tune_malloc`): a slide's analysis allocates and frees arrays of a few
  to tens of MB many times a second in several threads; with glibc's defaults every thread
  gets an arena of its own whose heaps are shrunk and grown again (a page fault on every
  reuse), and dask's worker default ``MALLOC_TRIM_THRESHOLD_`` freezes the mmap threshold so
  that every array is a fresh ``mmap`` whose pages fault in one by one. Two arenas, and that
  threshold undone, make an analysis faster and smaller (docs/performance.md);
- heap trimming (:func:`allow_heap_trim`, switched on by :func:`tune_malloc`): the library asks
  for the heap's free pages to be given back between the phases of an analysis
  (:func:`release_free_memory`); the call does nothing unless an entry point allowed it;
- Python's cyclic garbage collector (:func:`tune_gc`).

:data:`WORKER_ENV` is the environment histo gives the dask workers it starts.
"""

from __future__ import annotations

import os
import sys

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: malloc arenas: the main one and one shared by every other thread
ARENA_MAX = 2
#: the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
_MMAP_THRESHOLD = 32 * 2**20
#: a trim threshold below this (dask sets 64 kB) is raised to _TRIM_THRESHOLD
_TRIM_THRESHOLD = 128 * 2**20

#: environment of the worker processes of ``histo batch``'s local cluster (replaces dask's
#: ``distributed.nanny.pre-spawn-environ``, whose MALLOC_TRIM_THRESHOLD_ halves histo's speed)
WORKER_ENV = {"MALLOC_ARENA_MAX": str(ARENA_MAX)}


def tune_malloc(environ: dict[str, str] | None = None) -> list[str]:
    """Limit glibc to :data:`ARENA_MAX` arenas, undo a small trim threshold and allow the
    library to trim the heap between phases (:func:`allow_heap_trim`). For entry points only.

    Settings already given in the environment (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``)
    are left alone. Call it early, before threads allocate: arenas already made stay. Does
    nothing off Linux/glibc.

    Returns
    -------
    list of str
        The settings applied, e.g. ``["M_ARENA_MAX=2"]`` (empty when none were).
    """
    environ = os.environ if environ is None else environ
    mallopt = _mallopt()
    if mallopt is None:
        return []
    allow_heap_trim()
    applied = []
    if "MALLOC_ARENA_MAX" not in environ and mallopt(_M_ARENA_MAX, ARENA_MAX) == 1:
        applied.append(f"M_ARENA_MAX={ARENA_MAX}")
    trim = environ.get("MALLOC_TRIM_THRESHOLD_")
    if trim is not None and "MALLOC_MMAP_THRESHOLD_" not in environ:
        try:
            small = int(trim) < _MMAP_THRESHOLD
        except ValueError:
            small = False
        if (
            small
            and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
        ):
            applied.append(f"M_MMAP_THRESHOLD={_MMAP_THRESHOLD}")
            applied.append(f"M_TRIM_THRESHOLD={_TRIM_THRESHOLD}")
    return applied


#: allocations of container objects between two collections of Python's youngest generation
#: (Python's default: 700)
GC_THRESHOLD = 50_000


def tune_gc() -> bool:
    """Run Python's cyclic garbage collector less often: raise the youngest generation's
    threshold to :data:`GC_THRESHOLD` (a threshold already higher is kept). For entry points
    only.

    Labelling and measuring make and drop millions of small tuples, lists and arrays; with
    the default threshold the collector runs thousands of times an analysis and walks every
    live object in the older generations (a few % of an analysis, docs/performance.md).
    Histo's data hold no reference cycles that need prompt collection. Returns whether the
    threshold was raised.
    """
    import gc

    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 == 0 or gen0 >= GC_THRESHOLD:  # collection off, or already rarer
        return False
    gc.set_threshold(GC_THRESHOLD, gen1, gen2)
    return True


def import_in_background(module: str) -> None:
    """Start importing ``module`` in a daemon thread, to overlap a slow import (torch,
    matplotlib) with other work. A later ``import`` of it in another thread waits for
    this one to finish (Python's import lock is per module); an import error is left for that
    later import to report."""
    import importlib
    import threading

    def load() -> None:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the import where it is needed reports it
            pass

    if module not in sys.modules:
        threading.Thread(target=load, name=f"import-{module}", daemon=True).start()


def allow_heap_trim(allowed: bool = True) -> None:
    """Let :func:`release_free_memory` trim the heap (off until an entry point allows it:
    in a process histo shares, such as napari's, the heap is the host's to manage)."""
    global _HEAP_TRIM_ALLOWED
    _HEAP_TRIM_ALLOWED = bool(allowed)


def release_free_memory(slack_mb: float = 0.0) -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``), if an entry
    point allowed it (:func:`allow_heap_trim`).

    A long analysis frees arrays of many sizes in several threads; glibc keeps the freed pages
    of the middle of its heaps resident until they are reused, so a process's resident memory
    creeps up with the slide's length even though its live data does not. Called between the
    phases of an analysis and, with ``slack_mb``, between rows of tiles.

    Pages given back fault in again when reused (the network's tiles reuse the same sizes):
    with ``slack_mb`` > 0 the heap is trimmed only once the resident memory has grown by more
    than that since the last trim (or since the lowest point after it, when memory was freed
    in between). Returns whether it trimmed (False when not allowed and off glibc).
    """
    global _RSS_AFTER_TRIM
    libc = _libc()
    if libc is None or not _HEAP_TRIM_ALLOWED:
        return False
    if slack_mb > 0 and _RSS_AFTER_TRIM is not None:
        rss = resident_bytes()
        if rss is not None:
            # the baseline follows the memory down (arrays freed since the last trim)
            _RSS_AFTER_TRIM = min(_RSS_AFTER_TRIM, rss)
            if rss - _RSS_AFTER_TRIM < slack_mb * 2**20:
                return False
    libc.malloc_trim(0)
    _RSS_AFTER_TRIM = resident_bytes()
    return True


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_RSS_AFTER_TRIM: int | None = None  # resident bytes right after the last malloc_trim
_HEAP_TRIM_ALLOWED = False  # set by an entry point (allow_heap_trim)


def _libc():
    """glibc (None elsewhere: macOS, Windows, musl)."""
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.mallopt.restype = ctypes.c_int
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.malloc_trim.restype = ctypes.c_int
                _LIBC = libc
            except (OSError, AttributeError):
                pass
    return _LIBC


_LIBC = False  # not looked up yet


def _mallopt():
    """glibc's ``mallopt`` (None elsewhere)."""
    libc = _libc()
    return None if libc is None else libc.mallopt
