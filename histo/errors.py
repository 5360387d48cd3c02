"""histo's own errors. Each carries a one-line reason meant for the user and an exit status.

Exit statuses of the command line:

======  =========================================================
0       every slide succeeded
1       at least one slide failed (see failures.csv; analyze, batch and measure treat every
        slide alike, one slide or many)
2       the command line itself was wrong (argparse)
3       bad input to the command itself (missing folder, unreadable sample sheet or
        ranges file, unreachable scheduler)
4       output folder unusable (read-only, locked by another run)
5       model weights missing, corrupt or tampered
======  =========================================================
"""

from __future__ import annotations


class HistoError(Exception):
    """Base class: the message is a one-line reason a user can act on."""

    exit_status = 3


class SlideReadError(HistoError):
    """The file is not a slide histo can read (not an image, truncated, unsupported)."""


class PixelSizeError(HistoError):
    """No usable pixel size: missing from the file and not given, or absurd."""


class EmptyTissueError(HistoError):
    """The slide holds no tissue (or no bone) to measure."""


class ClassMapError(HistoError):
    """A class map is not a 2-D integer array with the codes 0-4."""


class OutputError(HistoError):
    """The output folder cannot be written, or another run holds it."""

    exit_status = 4


class ModelError(HistoError):
    """Model weights missing, corrupt, or not matching the registry checksum."""

    exit_status = 5


class Cancelled(HistoError):
    """The run was cancelled by the caller (GUI Cancel button, Ctrl-C)."""

    exit_status = 130
