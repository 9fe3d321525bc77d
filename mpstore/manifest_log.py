"""The manifest log: an append-only file of checksummed commit records; the store's commit point.

A commit is durable once its record is appended and fsynced. The LMDB index is a cache of the log:
it remembers up to which offset it has applied records (its high-water mark), and records past that
mark are replayed on open. A torn record at the tail (a crash mid-append) is cut off.
See FORMAT.md, "Manifest log".
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .durable import fsync_dir, pread_exact, pwrite_all
from .errors import CorruptionError, FormatVersionError
from .ids import checksum64, snapshot_id

LOG_MAGIC = b"MPSTLOG\0"
LOG_VERSION = 1
LOG_HEADER = struct.Struct("<8sII")
RECORD_MAGIC = b"MPLR"
RECORD_HEAD = struct.Struct("<4sB3xI")  # magic, type, reserved, payload length
RECORD_COMMIT = 1
MAX_RECORD_PAYLOAD = 1 << 31


@dataclass
class Commit:
    """One atomic change of the store: new snapshots, ref moves and pin changes, all or nothing."""

    manifests: list[bytes] = field(default_factory=list)  # canonical manifest bytes, hashed for ids
    refs: dict[str, bytes | None] = field(default_factory=dict)  # name -> snapshot id, None deletes
    pins: list[bytes] = field(default_factory=list)
    unpins: list[bytes] = field(default_factory=list)
    forget: list[bytes] = field(default_factory=list)  # snapshots gc removed
    time: float = 0.0
    message: str = ""

    def encode(self) -> bytes:
        parts = [struct.pack("<I", len(self.manifests))]
        for manifest in self.manifests:
            parts += [struct.pack("<I", len(manifest)), manifest]
        ops = {
            "time": self.time,
            "message": self.message,
            "refs": {name: (sid.hex() if sid else None) for name, sid in sorted(self.refs.items())},
            "pins": [p.hex() for p in self.pins],
            "unpins": [p.hex() for p in self.unpins],
        }
        if self.forget:
            ops["forget"] = [p.hex() for p in self.forget]
        parts.append(json.dumps(ops, sort_keys=True, separators=(",", ":")).encode())
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes) -> "Commit":
        try:
            (count,) = struct.unpack_from("<I", payload, 0)
            pos = 4
            manifests = []
            for _ in range(count):
                (length,) = struct.unpack_from("<I", payload, pos)
                manifests.append(payload[pos + 4 : pos + 4 + length])
                pos += 4 + length
            ops = json.loads(payload[pos:])
            return cls(
                manifests=manifests,
                refs={name: (bytes.fromhex(v) if v else None) for name, v in ops["refs"].items()},
                pins=[bytes.fromhex(p) for p in ops["pins"]],
                unpins=[bytes.fromhex(p) for p in ops["unpins"]],
                forget=[bytes.fromhex(p) for p in ops.get("forget", [])],
                time=float(ops["time"]),
                message=str(ops.get("message", "")),
            )
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptionError(f"manifest.log: malformed commit record: {exc}") from None

    @property
    def snapshot_ids(self) -> list[bytes]:
        return [snapshot_id(m) for m in self.manifests]


class ManifestLog:
    """Appends and reads commit records. Appends must be serialized by the caller (the store lock)."""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def create(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pwrite_all(fd, LOG_HEADER.pack(LOG_MAGIC, LOG_VERSION, 0), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    def check_header(self) -> None:
        with open(self.path, "rb") as f:
            head = f.read(LOG_HEADER.size)
        if len(head) < LOG_HEADER.size or head[:8] != LOG_MAGIC:
            raise CorruptionError("manifest.log: bad header")
        _, version, _ = LOG_HEADER.unpack(head)
        if version > LOG_VERSION:
            raise FormatVersionError(
                f"manifest.log: version {version} is newer than this mpstore reads ({LOG_VERSION})"
            )

    def size(self) -> int:
        return os.path.getsize(self.path)

    def append(self, commit: Commit) -> tuple[int, int]:
        """Append and fsync one record; returns (offset, end). The caller holds the store lock."""
        payload = commit.encode()
        head = RECORD_HEAD.pack(RECORD_MAGIC, RECORD_COMMIT, len(payload))
        record = head + payload + struct.pack("<Q", checksum64(head, payload))
        fd = os.open(self.path, os.O_WRONLY)
        try:
            offset = os.lseek(fd, 0, os.SEEK_END)
            pwrite_all(fd, record, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        return offset, offset + len(record)

    def records(self, start: int = LOG_HEADER.size) -> Iterator[tuple[int, int, Commit]]:
        """Valid records from `start`: (offset, end, commit). Stops at a torn or damaged tail."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            offset = max(start, LOG_HEADER.size)
            while offset + RECORD_HEAD.size <= size:
                head = pread_exact(fd, RECORD_HEAD.size, offset)
                magic, rtype, length = RECORD_HEAD.unpack(head)
                end = offset + RECORD_HEAD.size + length + 8
                if magic != RECORD_MAGIC or rtype != RECORD_COMMIT or end > size:
                    return
                body = pread_exact(fd, length + 8, offset + RECORD_HEAD.size)
                payload, (checksum,) = body[:length], struct.unpack("<Q", body[length:])
                if checksum64(head, payload) != checksum:
                    return
                yield offset, end, Commit.decode(payload)
                offset = end
        finally:
            os.close(fd)

    def valid_end(self, start: int = LOG_HEADER.size) -> int:
        end = max(start, LOG_HEADER.size)
        for _, end, _ in self.records(start):
            pass
        return end

    def truncate(self, end: int) -> None:
        """Cut a torn tail; only called under the store lock."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
