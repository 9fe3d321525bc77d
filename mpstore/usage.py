"""Disk usage: what the store holds on disk and what each snapshot costs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store


@dataclass
class SnapshotUsage:
    id: str
    refs: list[str]
    logical_bytes: int  # bytes of the model folder it rebuilds
    stored_bytes: int  # stored bytes of every block it references (shared blocks counted in full)
    exclusive_bytes: int  # stored bytes of blocks no other snapshot references


@dataclass
class Usage:
    pack_bytes: int = 0
    index_bytes: int = 0
    log_bytes: int = 0
    blocks: int = 0
    block_raw_bytes: int = 0
    block_stored_bytes: int = 0
    logical_bytes: int = 0  # sum over snapshots of the folders they rebuild
    by_codec: dict[str, dict[str, int]] = field(default_factory=dict)
    snapshots: list[SnapshotUsage] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.pack_bytes + self.index_bytes + self.log_bytes

    def as_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "pack_bytes": self.pack_bytes,
            "index_bytes": self.index_bytes,
            "log_bytes": self.log_bytes,
            "blocks": self.blocks,
            "block_raw_bytes": self.block_raw_bytes,
            "block_stored_bytes": self.block_stored_bytes,
            "logical_bytes": self.logical_bytes,
            "ratio": round(self.total_bytes / self.logical_bytes, 4) if self.logical_bytes else None,
            "by_codec": self.by_codec,
            "snapshots": [vars(s) for s in self.snapshots],
        }


def _folder_bytes(path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) if path.exists() else 0


def disk_usage(store: "Store") -> Usage:
    usage = Usage(
        pack_bytes=_folder_bytes(store.path / "packs"),
        index_bytes=_folder_bytes(store.path / "index"),
        log_bytes=store.log.size(),
    )
    stored: dict[bytes, int] = {}
    for block, loc in store.index.iter_blocks():
        stored[block] = loc.record_len
        usage.blocks += 1
        usage.block_raw_bytes += loc.raw_len
        usage.block_stored_bytes += loc.record_len
        codec = usage.by_codec.setdefault(loc.codec.name.lower(), {"blocks": 0, "raw_bytes": 0, "stored_bytes": 0})
        codec["blocks"] += 1
        codec["raw_bytes"] += loc.raw_len
        codec["stored_bytes"] += loc.record_len
    names: dict[bytes, list[str]] = {}
    for name, sid in store.refs().items():
        names.setdefault(sid, []).append(name)
    infos = store.snapshots()
    owners: dict[bytes, int] = {}
    block_sets = {}
    for info in infos:
        blocks = info.manifest.all_blocks()
        block_sets[info.id] = blocks
        for b in blocks:
            owners[b] = owners.get(b, 0) + 1
    for info in infos:
        blocks = block_sets[info.id]
        logical = info.manifest.file_bytes
        usage.logical_bytes += logical
        usage.snapshots.append(
            SnapshotUsage(
                id=info.id.hex(),
                refs=sorted(names.get(info.id, [])),
                logical_bytes=logical,
                stored_bytes=sum(stored.get(b, 0) for b in blocks),
                exclusive_bytes=sum(stored.get(b, 0) for b in blocks if owners[b] == 1),
            )
        )
    return usage
