"""Errors that mean "the user's input is wrong", as opposed to bugs.

The CLI prints these as one line (what, where, how to fix) and exits with status 2; anything else is a bug and keeps
its traceback. Each subclass exists so callers and tests can tell the kinds apart.
"""


class HydraError(ValueError):
    """Base class of user-facing input errors."""


class ConfigError(HydraError):
    """A configuration key is unknown, mistyped or out of range."""


class DataError(HydraError):
    """A dataset file, sample or image is missing or malformed."""


class ModelLoadError(HydraError):
    """The model cannot be found, loaded or adapted."""


class InvariantError(RuntimeError):
    """An internal invariant broke (e.g. the parameter budget was exceeded): a bug in hydra-rank, not an input error.
    Raised explicitly rather than asserted, so `python -O` cannot skip the check."""
