"""One run at a time per output folder: an advisory lock file, refused clearly when held."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histo.errors import OutputError

LOCK_NAME = ".histo.lock"


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` (created if needed) for the duration.

    Raises
    ------
    OutputError
        The folder cannot be created or written, or another histo run holds it.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {out_dir}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise OutputError(
                f"output folder {out_dir} is in use by another histo run (pid {holder}); "
                "wait for it or choose another --out"
            ) from None
        if not os.access(out_dir, os.W_OK):
            raise OutputError(f"output folder {out_dir} is read-only")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield out_dir
    finally:
        os.close(fd)
