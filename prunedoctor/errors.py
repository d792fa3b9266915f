"""Exceptions that the command-line interface maps to exit codes.

Every error caused by a user's input (a file, a key, an option value) derives
from :class:`PrunedoctorError`. The CLI prints its message as one line on
stderr and exits with ``exit_code`` (2). Any other exception is a bug in
prunedoctor and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "PrunedoctorError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "ReparametrizationError",
    "StructureError",
    "DataError",
    "OutputExistsError",
]


class PrunedoctorError(Exception):
    """Base class of the errors caused by bad input or usage."""

    exit_code = 2


class CheckpointError(PrunedoctorError):
    """A checkpoint file is missing, unreadable, corrupt or has no state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle needs globals outside the allowlist and ``--unsafe-load`` was not given."""

    def __init__(self, message: str, unsafe_globals: list[str]) -> None:
        super().__init__(message)
        self.unsafe_globals = unsafe_globals


class ReparametrizationError(PrunedoctorError):
    """A ``*_orig``/``*_mask`` pair cannot be merged (missing half, shape or dtype mismatch)."""


class StructureError(PrunedoctorError):
    """A state dict does not have the ViT layout that a command needs."""


class DataError(PrunedoctorError):
    """A data set is missing or has an unexpected layout."""


class OutputExistsError(PrunedoctorError):
    """An output file exists and ``--force`` was not given."""
