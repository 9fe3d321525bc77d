"""mpstore: the MergePipe storage engine (no torch import at package import time)."""

from .errors import (
    AmbiguousRefError,
    ConflictError,
    CorruptionError,
    FormatVersionError,
    InvalidInputError,
    MpstoreError,
    NotFoundError,
)
from .store import Store, default_store_path

__all__ = [
    "Store",
    "default_store_path",
    "MpstoreError",
    "InvalidInputError",
    "NotFoundError",
    "AmbiguousRefError",
    "ConflictError",
    "CorruptionError",
    "FormatVersionError",
]
__version__ = "0.1.0"
