"""Progress bars for the command line (tqdm on stderr), as ``progress(fraction, message)``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(
    description: str, *, position: int = 0, leave: bool = True
) -> Iterator[Callable[[float, str], None]]:
    """A ``progress(fraction, message)`` callback drawing a percentage bar on stderr."""
    bar = tqdm(
        total=100,
        desc=description,
        unit="%",
        position=position,
        leave=leave,
        file=sys.stderr,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
        disable=False,
    )

    def update(fraction: float, message: str = "") -> None:
        target = round(max(0.0, min(1.0, fraction)) * 100, 1)
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(message, refresh=True)

    try:
        yield update
    finally:
        bar.close()
