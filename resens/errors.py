"""Errors a user can fix: entry points print them as one line and exit non-zero."""

from __future__ import annotations

import sys
from collections.abc import Callable


class ResensError(Exception):
    """Base class: the message names the problem (a key, a file, a folder) in one line."""


class ConfigError(ResensError):
    """An unknown key, a wrong type or a missing config file."""


class DataError(ResensError):
    """A missing or malformed data folder."""


class CheckpointError(ResensError):
    """A missing, truncated, foreign or unsafe checkpoint."""


class AnalysisOutOfMemory(ResensError):
    """The device ran out of memory while evaluating lesion variants."""


def cli_main(run: Callable[[], object]) -> int:
    """Call ``run`` for an entry point: 0 when it returns, 2 when it raises a ``ResensError``,
    whose message goes to stderr as ``error: <message>`` in a single write, so that the lines of
    several DDP processes do not interleave."""
    try:
        run()
    except ResensError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2
    return 0
