"""The LMDB index: block locations, snapshots, refs, pins, pack ends and the log high-water mark.

The index is a cache of the packs and the manifest log and can be rebuilt from them (`rebuild`).
Every multi-key change happens in one LMDB write transaction, so readers see all of it or none.
See FORMAT.md, "Index".
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator

import lmdb

from .errors import CorruptionError, MpstoreError
from .manifest_log import Commit
from .pack import BlockLocation

INDEX_VERSION = 1
_U64 = struct.Struct("<Q")
_DB_NAMES = ("meta", "blocks", "snapshots", "snapinfo", "refs", "pins", "packs")


# LMDB allows one open environment per file per process: Index objects of one path share it.
_shared: dict[str, list] = {}  # realpath -> [env, dbs, open count]
_shared_lock = threading.Lock()


def _acquire_env(path: Path) -> tuple[lmdb.Environment, dict]:
    key = os.path.realpath(path)
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            try:
                env = lmdb.open(
                    key, max_dbs=len(_DB_NAMES) + 1, map_size=1 << 40, subdir=True, readahead=False, max_readers=256
                )
                dbs = {name: env.open_db(name.encode()) for name in _DB_NAMES}
                env.reader_check()  # free reader slots left by processes that were killed
            except lmdb.Error as exc:
                raise MpstoreError(f"{path}: cannot open index: {exc}") from None
            entry = _shared[key] = [env, dbs, 0]
        entry[2] += 1
        return entry[0], entry[1]


def _release_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] == 0:
            entry[0].close()
            del _shared[key]


class Index:
    def __init__(self, path: Path):
        self.path = path
        self.env, self.dbs = _acquire_env(path)
        self._open = True
        with self.env.begin(write=True) as txn:
            version = txn.get(b"version", db=self.dbs["meta"])
            if version is None:
                txn.put(b"version", str(INDEX_VERSION).encode(), db=self.dbs["meta"])
            elif int(version) > INDEX_VERSION:
                raise MpstoreError(f"{path}: index version {int(version)} is newer than this mpstore reads")

    def close(self) -> None:
        if self._open:
            self._open = False
            _release_env(self.path)

    # -- blocks ---------------------------------------------------------------------------------

    def get_block(self, block: bytes) -> BlockLocation | None:
        with self.env.begin(db=self.dbs["blocks"], buffers=False) as txn:
            value = txn.get(block)
        return BlockLocation.unpack(value) if value is not None else None

    def get_blocks(self, blocks: Iterable[bytes]) -> dict[bytes, BlockLocation]:
        found = {}
        with self.env.begin(db=self.dbs["blocks"]) as txn:
            for block in blocks:
                value = txn.get(block)
                if value is not None:
                    found[block] = BlockLocation.unpack(value)
        return found

    def put_blocks(self, locations: dict[bytes, BlockLocation], pack: int, pack_end: int) -> None:
        """Publish durable records of one pack; an id already indexed keeps its first location."""
        with self.env.begin(write=True) as txn:
            for block, loc in locations.items():
                txn.put(block, loc.pack_bytes(), overwrite=False, db=self.dbs["blocks"])
            txn.put(_U64.pack(pack), _U64.pack(pack_end), db=self.dbs["packs"])

    def pack_end(self, pack: int) -> int | None:
        with self.env.begin(db=self.dbs["packs"]) as txn:
            value = txn.get(_U64.pack(pack))
        return _U64.unpack(value)[0] if value is not None else None

    def pack_ends(self) -> dict[int, int]:
        with self.env.begin(db=self.dbs["packs"]) as txn:
            return {_U64.unpack(k)[0]: _U64.unpack(v)[0] for k, v in txn.cursor()}

    def iter_blocks(self) -> Iterator[tuple[bytes, BlockLocation]]:
        with self.env.begin(db=self.dbs["blocks"]) as txn:
            for key, value in txn.cursor():
                yield bytes(key), BlockLocation.unpack(value)

    # -- commits --------------------------------------------------------------------------------

    def high_water(self) -> int:
        with self.env.begin(db=self.dbs["meta"]) as txn:
            value = txn.get(b"log_high_water")
        return _U64.unpack(value)[0] if value is not None else 0

    def apply_commit(self, commit: Commit, offset: int, end: int) -> None:
        """Apply one log record and move the high-water mark past it, atomically."""
        with self.env.begin(write=True) as txn:
            for sid, manifest in zip(commit.snapshot_ids, commit.manifests):
                if txn.get(sid, db=self.dbs["snapshots"]) is None:
                    txn.put(sid, manifest, db=self.dbs["snapshots"])
                    info = {"time": commit.time, "log_offset": offset}
                    txn.put(sid, json.dumps(info).encode(), db=self.dbs["snapinfo"])
            for name, sid in commit.refs.items():
                if sid is None:
                    txn.delete(name.encode(), db=self.dbs["refs"])
                else:
                    txn.put(name.encode(), sid, db=self.dbs["refs"])
            for sid in commit.pins:
                txn.put(sid, b"", db=self.dbs["pins"])
            for sid in commit.unpins:
                txn.delete(sid, db=self.dbs["pins"])
            for sid in commit.forget:
                txn.delete(sid, db=self.dbs["snapshots"])
                txn.delete(sid, db=self.dbs["snapinfo"])
            txn.put(b"log_high_water", _U64.pack(end), db=self.dbs["meta"])

    # -- snapshots, refs, pins ------------------------------------------------------------------

    def manifest_bytes(self, sid: bytes) -> bytes | None:
        with self.env.begin(db=self.dbs["snapshots"], buffers=False) as txn:
            return txn.get(sid)

    def snapshot_info(self, sid: bytes) -> dict:
        with self.env.begin(db=self.dbs["snapinfo"]) as txn:
            value = txn.get(sid)
        if value is None:
            raise CorruptionError(f"index: snapshot {sid.hex()} has no info record")
        return json.loads(bytes(value))

    def snapshot_ids(self) -> list[bytes]:
        with self.env.begin(db=self.dbs["snapinfo"]) as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    def ids_with_prefix(self, prefix: bytes, limit: int = 2) -> list[bytes]:
        """Snapshot ids whose bytes start with `prefix` (at most `limit`)."""
        found = []
        with self.env.begin(db=self.dbs["snapinfo"]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not bytes(key).startswith(prefix) or len(found) >= limit:
                        break
                    found.append(bytes(key))
        return found

    def refs(self) -> dict[str, bytes]:
        with self.env.begin(db=self.dbs["refs"]) as txn:
            return {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}

    def ref(self, name: str) -> bytes | None:
        with self.env.begin(db=self.dbs["refs"], buffers=False) as txn:
            return txn.get(name.encode())

    def pins(self) -> set[bytes]:
        with self.env.begin(db=self.dbs["pins"]) as txn:
            return {bytes(k) for k in txn.cursor().iternext(keys=True, values=False)}

    def relocate(
        self,
        moved: dict[bytes, BlockLocation],
        dropped: list[bytes],
        old_pack: int,
        new_pack: int | None,
        new_end: int | None,
    ) -> None:
        """gc's switch from an old pack to its rewritten copy, in one transaction."""
        with self.env.begin(write=True) as txn:
            for block, loc in moved.items():
                txn.put(block, loc.pack_bytes(), db=self.dbs["blocks"])
            for block in dropped:
                txn.delete(block, db=self.dbs["blocks"])
            txn.delete(_U64.pack(old_pack), db=self.dbs["packs"])
            if new_pack is not None:
                txn.put(_U64.pack(new_pack), _U64.pack(new_end), db=self.dbs["packs"])

    # -- rebuild --------------------------------------------------------------------------------

    def clear(self) -> None:
        with self.env.begin(write=True) as txn:
            for name, db in self.dbs.items():
                txn.drop(db, delete=False)
            txn.put(b"version", str(INDEX_VERSION).encode(), db=self.dbs["meta"])
