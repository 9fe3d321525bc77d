"""One exception root for the store; each error also subclasses the matching builtin.

Errors carry the file, tensor or key they are about, so the CLI can print one line and exit.
Errors of dependencies (lmdb, zstandard, json) are converted at the boundary and never leak raw.
"""

from __future__ import annotations


class MpstoreError(Exception):
    """Root of every error this library raises on purpose."""


class InvalidInputError(MpstoreError, ValueError):
    """A model file or folder given by the user is malformed (names the file and what is wrong)."""


class NotFoundError(MpstoreError, KeyError):
    """A ref, snapshot, block or path does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class AmbiguousRefError(MpstoreError, KeyError):
    """A snapshot id prefix matches more than one snapshot."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptionError(MpstoreError):
    """Stored bytes do not match their checksum or id."""


class FormatVersionError(MpstoreError):
    """A store file was written by a newer, unknown format version."""


class ConflictError(MpstoreError):
    """A compare-and-swap ref update saw a different old value, or a name is taken."""
