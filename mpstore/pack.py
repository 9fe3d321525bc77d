"""Pack files: append-only files of self-describing, checksummed block records.

Each writer appends to a pack it holds an exclusive lock on, so concurrent ingests never interleave
records. A record becomes reachable only once its pack has been fsynced and the index points at it;
bytes past the index's durable end of a pack are a torn or abandoned tail and are cut off by the
next writer that takes the pack. See FORMAT.md, "Pack files".
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .codecs import Codec
from .durable import fsync_dir, pread_exact, pwrite_all
from .errors import CorruptionError, FormatVersionError
from .ids import ZERO_BLOCK_ID, checksum64

PACK_MAGIC = b"MPSTPACK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sHHI")  # magic, version, reserved, reserved
RECORD_MAGIC = b"MPBK"
RECORD_HEADER = struct.Struct("<4sBBHII16s16sQ")  # magic codec width reserved raw_len stored_len id ref checksum
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 56
MAX_PACK_BYTES = 1 << 30  # a writer starts a new pack past this size
MAX_RAW_BLOCK = 1 << 26  # limit on any length read from a record header
_PACK_NAME = re.compile(r"^pack-(\d{8})\.mpk$")


@dataclass(frozen=True)
class BlockLocation:
    """Where a block's record lives and how to decode it (the index's value for a block id)."""

    pack: int
    offset: int  # of the record header
    stored_len: int
    raw_len: int
    codec: Codec
    width: int
    ref: bytes  # XOR reference block id, or ZERO_BLOCK_ID

    _STRUCT = struct.Struct("<IQIIBB16s")

    def pack_bytes(self) -> bytes:
        return self._STRUCT.pack(
            self.pack, self.offset, self.stored_len, self.raw_len, int(self.codec), self.width, self.ref
        )

    @classmethod
    def unpack(cls, data: bytes) -> "BlockLocation":
        p, off, stored, raw, codec, width, ref = cls._STRUCT.unpack(data)
        return cls(p, off, stored, raw, Codec(codec), width, ref)

    @property
    def record_len(self) -> int:
        return RECORD_HEADER_SIZE + self.stored_len


def pack_path(folder: Path, number: int) -> Path:
    return folder / f"pack-{number:08d}.mpk"


def pack_numbers(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for name in os.listdir(folder) if (m := _PACK_NAME.match(name)))


def encode_record(block: bytes, codec: Codec, width: int, raw_len: int, payload: bytes, ref: bytes) -> bytes:
    head = struct.pack("<4sBBHII16s16s", RECORD_MAGIC, int(codec), width, 0, raw_len, len(payload), block, ref)
    return head + struct.pack("<Q", checksum64(head, payload)) + payload


def parse_record(data: bytes, where: str) -> tuple[bytes, Codec, int, int, bytes, memoryview]:
    """Check a whole record (header + payload); returns (id, codec, width, raw_len, ref, payload).
    The payload is a view into `data`, not a copy."""
    if len(data) < RECORD_HEADER_SIZE:
        raise CorruptionError(f"{where}: record truncated")
    magic, codec, width, _, raw_len, stored_len, block, ref, checksum = RECORD_HEADER.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise CorruptionError(f"{where}: bad record magic")
    payload = memoryview(data)[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + stored_len]
    if len(payload) != stored_len:
        raise CorruptionError(f"{where}: record payload truncated")
    if checksum64(data[: RECORD_HEADER_SIZE - 8], payload) != checksum:
        raise CorruptionError(f"{where}: record checksum mismatch")
    try:
        codec = Codec(codec)
    except ValueError:
        raise CorruptionError(f"{where}: unknown codec id {codec}") from None
    return block, codec, width, raw_len, ref, payload


class PackReader:
    """Random access to block records; file descriptors are cached and shared by threads (pread)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0  # bytes taken from pack files, for I/O accounting

    def _fd(self, number: int) -> int:
        fd = self._fds.get(number)
        if fd is None:
            with self._lock:
                fd = self._fds.get(number)
                if fd is None:
                    try:
                        fd = os.open(pack_path(self.folder, number), os.O_RDONLY)
                    except FileNotFoundError:
                        raise CorruptionError(f"pack file pack-{number:08d}.mpk is missing") from None
                    self._fds[number] = fd
        return fd

    def read_record(self, loc: BlockLocation) -> tuple[bytes, Codec, int, int, bytes, memoryview]:
        data = pread_exact(self._fd(loc.pack), loc.record_len, loc.offset)
        self.bytes_read += len(data)  # a racy += under threads only skews a statistic by a few bytes
        return parse_record(data, f"pack-{loc.pack:08d}.mpk@{loc.offset}")

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def scan_pack(path: Path) -> Iterator[tuple[int, bytes, Codec, int, int, bytes, int]]:
    """Every valid record of a pack, in order: (offset, id, codec, width, raw_len, ref, stored_len).

    Stops at the first torn or invalid record (the tail a crashed writer left). Used to rebuild the
    index and by fsck.
    """
    with open(path, "rb") as f:
        head = f.read(PACK_HEADER.size)
        check_pack_header(head, path.name)
        offset = PACK_HEADER.size
        while True:
            header = f.read(RECORD_HEADER_SIZE)
            if len(header) < RECORD_HEADER_SIZE:
                return
            magic, codec, width, _, raw_len, stored_len, block, ref, _ = RECORD_HEADER.unpack(header)
            if magic != RECORD_MAGIC or stored_len > MAX_RAW_BLOCK + 1024:
                return
            payload = f.read(stored_len)
            try:
                block, codec, width, raw_len, ref, _ = parse_record(header + payload, path.name)
            except CorruptionError:
                return
            yield offset, block, codec, width, raw_len, ref, stored_len
            offset += RECORD_HEADER_SIZE + stored_len


def check_pack_header(head: bytes, name: str) -> None:
    if len(head) < PACK_HEADER.size:
        raise CorruptionError(f"{name}: pack header truncated")
    magic, version, _, _ = PACK_HEADER.unpack(head)
    if magic != PACK_MAGIC:
        raise CorruptionError(f"{name}: not a pack file (bad magic)")
    if version > PACK_VERSION:
        raise FormatVersionError(f"{name}: pack version {version} is newer than this mpstore reads ({PACK_VERSION})")


class PackWriter:
    """Appends records to one pack this process holds an exclusive lock on.

    `durable_end(number)` reads the end of a pack's last durable record from the index; it is asked
    only while the pack's lock is held, so no other writer can move it. A reused pack is cut back to
    that end first, dropping whatever a crashed writer left after it.
    """

    BUFFER_BYTES = 8 << 20

    def __init__(self, folder: Path, durable_end: Callable[[int], int | None]):
        self.folder = folder
        self.number, self.fd, self.end = self._take_pack(durable_end)
        self._buffer = bytearray()
        self._buffer_start = self.end
        self.bytes_written = 0

    def _take_pack(self, durable_end: Callable[[int], int | None]) -> tuple[int, int, int]:
        numbers = pack_numbers(self.folder)
        # Reuse one of the newest packs that is not full and not held by another writer.
        for number in reversed(numbers[-4:]):
            fd = os.open(pack_path(self.folder, number), os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            end = durable_end(number)
            if end is None or end >= MAX_PACK_BYTES:
                os.close(fd)
                continue
            os.ftruncate(fd, end)
            return number, fd, end
        number = (numbers[-1] if numbers else 0) + 1
        while True:
            try:
                fd = os.open(pack_path(self.folder, number), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                number += 1
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            pwrite_all(fd, PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0, 0), 0)
            os.fsync(fd)
            fsync_dir(self.folder)
            return number, fd, PACK_HEADER.size

    @property
    def full(self) -> bool:
        return self.end >= MAX_PACK_BYTES

    def append(
        self, block: bytes, codec: Codec, width: int, raw_len: int, payload: bytes, ref: bytes = ZERO_BLOCK_ID
    ) -> BlockLocation:
        record = encode_record(block, codec, width, raw_len, payload, ref)
        loc = BlockLocation(self.number, self.end, len(payload), raw_len, codec, width, ref)
        self._buffer += record
        self.end += len(record)
        self.bytes_written += len(record)
        if len(self._buffer) >= self.BUFFER_BYTES:
            self._flush()
        return loc

    def _flush(self) -> None:
        if self._buffer:
            pwrite_all(self.fd, self._buffer, self._buffer_start)
            self._buffer_start += len(self._buffer)
            self._buffer = bytearray()

    def sync(self) -> int:
        """Make every appended record durable; returns the durable end."""
        self._flush()
        os.fsync(self.fd)
        return self.end

    def close(self) -> None:
        if self.fd >= 0:
            self._flush()
            os.close(self.fd)  # closing releases the flock
            self.fd = -1
