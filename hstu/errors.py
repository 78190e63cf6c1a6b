"""The framework's own errors: bad data, config, checkpoints, exports and requests.

Each message names what the user can fix: the file and line, the config key, or the request field.
They derive from Hydra's ``CompactHydraException``, so a script started through ``@hydra.main``
prints only the message (one or two lines) and exits with status 1; ``HYDRA_FULL_ERROR=1`` shows
the full traceback. Any other exception is unexpected and keeps its traceback. Each class also
derives from the builtin error that callers of the library already catch (``ValueError``,
``FileNotFoundError``, ``KeyError``).
"""
from __future__ import annotations

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """Something the user can fix; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the key as typed on the command line."""


class DataError(UserError, ValueError):
    """An input file or the data built from it is unusable; the message names the file (and line)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """The output would replace existing files the user did not ask to replace."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is truncated, not a checkpoint, or holds objects that safe loading refuses."""


class ExportFormatError(UserError, ValueError):
    """A file of an export folder is missing, unreadable or inconsistent; the message names the file (and key)."""


class RequestError(UserError, ValueError):
    """A recommendation request is malformed (history, timestamps, k ...)."""


class UnknownIdError(RequestError, KeyError):
    """A user or item id the trained model does not know."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class MissingPackageError(UserError, ImportError):
    """An optional package that a command needs is not installed; the message names the extra that brings it."""


class PackageLoadError(UserError, RuntimeError):
    """A compiled scoring package does not load and run in a fresh process on this machine; it was not
    recorded. ``exit_status`` is the process's (negative: the signal that killed it; None: it timed out)."""

    def __init__(self, message: str, exit_status: int | None):
        super().__init__(message)
        self.exit_status = exit_status


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss became NaN or inf; the message names the epoch and step."""
