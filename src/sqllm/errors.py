"""Errors that reach the user as one line (the CLI prints them and exits with code 2).

Each message names the bad value, what is allowed, and where possible the fix.
"""

from __future__ import annotations


class SqllmError(Exception):
    """Base class of every error sqllm raises on bad input."""


class UnknownModel(SqllmError):
    """A model spec that is neither a folder, a .gguf file, a known alias nor a reachable hub id."""


class UnsupportedArchitecture(SqllmError):
    """A model family with no entry in the architecture table."""


class InvalidConfig(SqllmError):
    """A quantization or evaluation setting outside its allowed range."""


class NotEnoughText(SqllmError):
    """A text source too short for the windows asked of it."""


class CorruptCheckpoint(SqllmError):
    """A packed checkpoint that is truncated, incomplete, or of an unknown format version."""


class DataUnavailable(SqllmError):
    """A named data source (dataset, task) that cannot be reached from here."""


class OutputExists(SqllmError):
    """An output folder that already exists, written without --overwrite."""


class UnsafeOutput(SqllmError):
    """An output path that cannot be written, or whose replacement would destroy something sqllm did not
    write (the input model, a folder holding the working directory, a file of another kind)."""


class NumericalError(SqllmError):
    """A computation that cannot proceed on these numbers (e.g. a Hessian not positive definite)."""


class WriteFailed(SqllmError):
    """An output that could not be written (disk full, no permission); nothing half-written is left."""
