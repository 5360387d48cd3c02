"""The setup of histo's own local dask workers (imported only where a cluster is started)."""

from __future__ import annotations

import logging

from distributed.diagnostics.plugin import WorkerPlugin


class TuneWorker(WorkerPlugin):
    """Tune each worker process of histo's own cluster as the ``histo`` command tunes itself.

    Process-wide settings (malloc, GC, thread counts) are made by entry points only: this plugin
    is the entry point of a local worker. Workers of a cluster given with ``--scheduler`` belong
    to someone else and are left as they are.
    """

    name = "histo-tune-worker"

    def __init__(self, threads: int) -> None:
        self.threads = int(threads)

    def setup(self, worker) -> None:
        from histo.batch import limit_threads
        from histo.runtime import tune_gc, tune_malloc

        tune_malloc()
        tune_gc()
        limit_threads(self.threads)


class _DropHeartbeatFailure(logging.Filter):
    """Drops the worker's traceback for a heartbeat that met the scheduler closing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to communicate with scheduler")


def quiet_shutdown() -> None:
    """Run on each worker once its work is done, before histo closes its own cluster: a
    heartbeat in flight while the scheduler closes would print an OSError traceback to the
    command's stderr, where a user reads failures."""
    logging.getLogger("distributed.worker").addFilter(_DropHeartbeatFailure())
