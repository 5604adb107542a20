"""Errors a user can fix: entry points print them as one line and exit non-zero."""


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
