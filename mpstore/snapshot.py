"""Snapshot manifests: the tensors, files and lineage of one model, in a canonical JSON encoding.

The snapshot id is the SHA-256 of the canonical bytes, so equal content and lineage give equal ids.
Nothing time- or machine-dependent goes into a manifest (timestamps live in the commit record).
See FORMAT.md, "Manifest".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .dtypes import DType, dtype_named
from .errors import CorruptionError
from .ids import snapshot_id

MANIFEST_FORMAT = 1
# Per-block delta statistics against the base: (L2 norm, max |delta|, changed elements).
DeltaStats = tuple[float, float, int]


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[bytes, ...]
    delta: tuple[DeltaStats, ...] | None = None  # None: no aligned base tensor

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def dtype_info(self) -> DType:
        return dtype_named(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.dtype_info.nbytes(self.numel)


@dataclass(frozen=True)
class Segment:
    """A piece of a file: the raw bytes of a tensor, or literal bytes stored as blocks."""

    tensor: str | None = None
    blocks: tuple[bytes, ...] = ()
    size: int = 0
    literal: bytes | None = None  # only in files export builds on the fly; never stored


@dataclass(frozen=True)
class FileEntry:
    path: str  # posix, relative to the model folder
    size: int
    sha256: str | None  # None for files a merge assembled: export then relies on the block ids
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Manifest:
    block_bytes: int
    tensors: tuple[TensorEntry, ...]
    files: tuple[FileEntry, ...]
    base: bytes | None = None
    parents: tuple[bytes, ...] = ()
    operation: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        return canonical_json(
            {
                "format": MANIFEST_FORMAT,
                "block_bytes": self.block_bytes,
                "base": self.base.hex() if self.base else None,
                "parents": [p.hex() for p in self.parents],
                "operation": self.operation,
                "tensors": [
                    {
                        "name": t.name,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "blocks": [b.hex() for b in t.blocks],
                        "delta": [list(s) for s in t.delta] if t.delta is not None else None,
                    }
                    for t in sorted(self.tensors, key=lambda t: t.name)
                ],
                "files": [
                    {
                        "path": f.path,
                        "size": f.size,
                        "sha256": f.sha256,
                        "segments": [
                            {"tensor": s.tensor}
                            if s.tensor is not None
                            else {"blocks": [b.hex() for b in s.blocks], "size": s.size}
                            for s in f.segments
                        ],
                    }
                    for f in sorted(self.files, key=lambda f: f.path)
                ],
            }
        )

    @property
    def id(self) -> bytes:
        return snapshot_id(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> "Manifest":
        try:
            obj = json.loads(data)
            if obj["format"] > MANIFEST_FORMAT:
                raise CorruptionError(f"manifest format {obj['format']} is newer than this mpstore reads")
            tensors = tuple(
                TensorEntry(
                    name=t["name"],
                    dtype=t["dtype"],
                    shape=tuple(t["shape"]),
                    blocks=tuple(bytes.fromhex(b) for b in t["blocks"]),
                    delta=tuple((float(a), float(m), int(c)) for a, m, c in t["delta"])
                    if t["delta"] is not None
                    else None,
                )
                for t in obj["tensors"]
            )
            files = tuple(
                FileEntry(
                    path=f["path"],
                    size=f["size"],
                    sha256=f["sha256"],
                    segments=tuple(
                        Segment(tensor=s["tensor"])
                        if "tensor" in s
                        else Segment(blocks=tuple(bytes.fromhex(b) for b in s["blocks"]), size=s["size"])
                        for s in f["segments"]
                    ),
                )
                for f in obj["files"]
            )
            return cls(
                block_bytes=obj["block_bytes"],
                tensors=tensors,
                files=files,
                base=bytes.fromhex(obj["base"]) if obj["base"] else None,
                parents=tuple(bytes.fromhex(p) for p in obj["parents"]),
                operation=obj["operation"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"malformed manifest: {exc}") from None

    def tensor_map(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def all_blocks(self) -> set[bytes]:
        blocks = {b for t in self.tensors for b in t.blocks}
        blocks.update(b for f in self.files for s in f.segments for b in s.blocks)
        return blocks
