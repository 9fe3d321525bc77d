"""The store facade: opening a store folder, resolving refs, committing, reading blocks and tensors.

Layout of a store folder (FORMAT.md has every byte):
    mpstore.json    descriptor: format version and store-wide settings, written once at init
    lock            flock target that serializes commits
    manifest.log    the commit log
    index/          LMDB index (a cache of packs and log)
    packs/          append-only pack files of block records
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .codecs import Codec, decode
from .durable import FileLock, fsync_dir, write_atomic
from .errors import (
    AmbiguousRefError,
    ConflictError,
    CorruptionError,
    FormatVersionError,
    InvalidInputError,
    MpstoreError,
    NotFoundError,
)
from .index import Index
from .manifest_log import LOG_HEADER, Commit, ManifestLog
from .pack import RECORD_HEADER_SIZE, BlockLocation, PackReader, PackWriter, pack_numbers, pack_path, scan_pack
from .snapshot import Manifest, TensorEntry

if TYPE_CHECKING:
    import torch

STORE_FORMAT = "mpstore"
STORE_VERSION = 1
DEFAULT_BLOCK_BYTES = 1 << 20
DEFAULT_ZSTD_LEVEL = 1  # measured: level 1 compresses grouped bf16 as well as 3, at twice the speed
MIN_ID_PREFIX = 4
_REF_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
Progress = Callable[[int], None]  # called with a number of bytes just processed


def default_store_path() -> Path:
    """$MPSTORE_PATH, else ./.mpstore (a store per project folder, like .git)."""
    return Path(os.environ.get("MPSTORE_PATH", ".mpstore"))


def check_ref_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 200 or not _REF_NAME.match(name) or ".." in name:
        raise InvalidInputError(f"invalid ref name {name!r}: use letters, digits, '.', '_', '-' and '/' between parts")
    return name


@dataclass(frozen=True)
class SnapshotInfo:
    id: bytes
    time: float
    manifest: Manifest


class Store:
    """A MergePipe store folder. Open with `Store.open(path)` or create with `Store.init(path)`."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.block_bytes: int = settings["block_bytes"]
        self.zstd_level: int = settings["zstd_level"]
        self.index = Index(path / "index")
        self.log = ManifestLog(path / "manifest.log")
        self.packs = PackReader(path / "packs")
        self.commit_lock = FileLock(path / "lock")  # serializes commits (FORMAT.md section 8)
        self._manifest_cache: dict[bytes, Manifest] = {}

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def init(
        cls, path: Path | str, block_bytes: int = DEFAULT_BLOCK_BYTES, zstd_level: int = DEFAULT_ZSTD_LEVEL
    ) -> "Store":
        """Create an empty store at `path` (a new or empty folder)."""
        path = Path(path)
        if not (4096 <= block_bytes <= 1 << 26) or block_bytes % 8:
            raise InvalidInputError(f"block size {block_bytes}: must be a multiple of 8 between 4 KiB and 64 MiB")
        if (path / "mpstore.json").exists():
            raise ConflictError(f"{path}: a store already exists here")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InvalidInputError(f"{path}: not an empty folder")
        # Built in a sibling folder and renamed into place, so a crashed init leaves `path` as it was
        # (an orphaned `.NAME.init-PID` folder at worst) and can simply be run again.
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.init-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        (staging / "packs").mkdir()
        ManifestLog.create(staging / "manifest.log")
        Index(staging / "index").close()
        settings = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "block_bytes": block_bytes,
            "zstd_level": zstd_level,
        }
        write_atomic(staging / "mpstore.json", json.dumps(settings, indent=2).encode() + b"\n")
        os.replace(staging, path)  # replaces an empty folder atomically
        fsync_dir(path.parent)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path | str) -> "Store":
        """Open an existing store; replays commits the index has not seen and cuts a torn log tail."""
        path = Path(path)
        try:
            settings = json.loads((path / "mpstore.json").read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"{path}: no store here (run `mpstore init` or set --store / MPSTORE_PATH)") from None
        except (OSError, ValueError) as exc:
            raise CorruptionError(f"{path}/mpstore.json: unreadable: {exc}") from None
        if settings.get("format") != STORE_FORMAT:
            raise CorruptionError(f"{path}/mpstore.json: not an mpstore descriptor")
        if settings.get("version", 0) > STORE_VERSION:
            raise FormatVersionError(
                f"{path}: store format version {settings['version']} is newer than this mpstore "
                f"reads ({STORE_VERSION}); upgrade mergepipe"
            )
        store = cls(path, settings)
        store.log.check_header()
        if store.log.size() > max(store.index.high_water(), LOG_HEADER.size):
            with store.commit_lock.held():
                store._catch_up_locked()
        return store

    def close(self) -> None:
        self.packs.close()
        self.index.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commits --------------------------------------------------------------------------------

    def _catch_up_locked(self) -> None:
        """Apply log records past the index's high-water mark; cut a torn tail. Lock held."""
        start = max(self.index.high_water(), LOG_HEADER.size)
        size = self.log.size()
        if start > size:
            raise CorruptionError(f"{self.path}: manifest.log is shorter than the index has applied")
        end = start
        for offset, end, commit in self.log.records(start):
            self.index.apply_commit(commit, offset, end)
        if end < size:
            self.log.truncate(end)

    def commit(self, commit: Commit, expect: dict[str, bytes | None] | None = None) -> None:
        """Append `commit` to the log and apply it, atomically.

        `expect` maps ref names to the snapshot id each must hold now (None: must not exist); the
        check and the write happen under the store lock, so concurrent writers cannot lose updates.
        """
        with self.commit_lock.held():
            self._catch_up_locked()
            for name, old in (expect or {}).items():
                now = self.index.ref(name)
                if now != old:
                    state = f"points to {now.hex()[:12]}" if now else "does not exist"
                    raise ConflictError(f"ref {name!r} {state} (changed by another writer?)")
            for sid in set(commit.refs.values()) | set(commit.pins):
                if sid is not None and sid not in commit.snapshot_ids and self.index.manifest_bytes(sid) is None:
                    raise NotFoundError(f"snapshot {sid.hex()} is not in the store")
            for data in commit.manifests:
                blocks = Manifest.decode(data).all_blocks()
                if len(self.index.get_blocks(blocks)) != len(blocks):
                    raise CorruptionError(
                        "a block of the new snapshot is missing from the index "
                        "(removed by a concurrent gc?); run the command again"
                    )
            self.append_locked(commit)

    def append_locked(self, commit: Commit) -> None:
        """Stamp, append and apply one commit record. The caller holds the commit lock."""
        commit.time = time.time()
        offset, end = self.log.append(commit)
        self.index.apply_commit(commit, offset, end)

    def rebuild_index(self) -> int:
        """Rebuild the index from the packs and the log (after losing or damaging index/).

        Returns the number of blocks indexed. Holds the commit lock; no writer may run meanwhile.
        """
        with self.commit_lock.held():
            self.index.clear()
            count = 0
            folder = self.path / "packs"
            for number in pack_numbers(folder):
                found, end = {}, None
                for offset, block, codec, width, raw_len, ref, stored_len in scan_pack(pack_path(folder, number)):
                    found.setdefault(block, BlockLocation(number, offset, stored_len, raw_len, codec, width, ref))
                    end = offset + RECORD_HEADER_SIZE + stored_len
                if end is not None:
                    self.index.put_blocks(found, number, end)
                    count += len(found)
            self._manifest_cache.clear()
            self._catch_up_locked()
        return count

    def writing(self) -> FileLock:
        """A shared hold on gc.lock for the whole of an ingest or merge: gc waits until it ends."""
        return FileLock(self.path / "gc.lock", shared=True)

    def pack_writer(self) -> PackWriter:
        return PackWriter(self.path / "packs", self.index.pack_end)

    # -- refs and snapshots ---------------------------------------------------------------------

    def resolve(self, ref: str | bytes) -> bytes:
        """A ref name, a full snapshot id, or a unique id prefix (>= 4 hex digits) -> snapshot id."""
        if isinstance(ref, bytes):
            if self.index.manifest_bytes(ref) is None:
                raise NotFoundError(f"unknown snapshot {ref.hex()}")
            return ref
        sid = self.index.ref(ref)
        if sid is not None:
            return sid
        text = ref.lower()
        if len(text) >= MIN_ID_PREFIX and re.fullmatch(r"[0-9a-f]+", text):
            matches = [
                s
                for s in self.index.ids_with_prefix(bytes.fromhex(text[: len(text) // 2 * 2]), 1 << 30)
                if s.hex().startswith(text)
            ]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousRefError(
                    f"snapshot id prefix {ref!r} matches {len(matches)} snapshots; give more digits"
                )
        raise NotFoundError(f"unknown ref {ref!r} (not a ref name or a snapshot id prefix; see `mpstore ls`)")

    def manifest(self, ref: str | bytes) -> Manifest:
        sid = self.resolve(ref)
        cached = self._manifest_cache.get(sid)
        if cached is None:
            data = self.index.manifest_bytes(sid)
            if data is None:
                raise NotFoundError(f"unknown snapshot {sid.hex()}")
            cached = self._manifest_cache[sid] = Manifest.decode(data)
        return cached

    def snapshot(self, ref: str | bytes) -> SnapshotInfo:
        sid = self.resolve(ref)
        return SnapshotInfo(sid, self.index.snapshot_info(sid)["time"], self.manifest(sid))

    def refs(self) -> dict[str, bytes]:
        return self.index.refs()

    def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot, oldest first."""
        infos = [self.snapshot(sid) for sid in self.index.snapshot_ids()]
        return sorted(infos, key=lambda s: s.time)

    def set_ref(self, name: str, ref: str | bytes, force: bool = False) -> bytes:
        """Point `name` at a snapshot; refuses to move an existing ref unless `force`."""
        check_ref_name(name)
        sid = self.resolve(ref)
        old = self.index.ref(name)
        if old is not None and old != sid and not force:
            raise ConflictError(f"ref {name!r} already points to {old.hex()[:12]}; use --force to move it")
        self.commit(Commit(refs={name: sid}, message=f"ref {name}"), expect={name: old})
        return sid

    def delete_ref(self, name: str) -> bytes:
        old = self.index.ref(name)
        if old is None:
            raise NotFoundError(f"unknown ref {name!r}")
        self.commit(Commit(refs={name: None}, message=f"delete ref {name}"), expect={name: old})
        return old

    def rename_ref(self, old_name: str, new_name: str) -> bytes:
        check_ref_name(new_name)
        sid = self.index.ref(old_name)
        if sid is None:
            raise NotFoundError(f"unknown ref {old_name!r}")
        if self.index.ref(new_name) is not None:
            raise ConflictError(f"ref {new_name!r} already exists")
        self.commit(
            Commit(refs={old_name: None, new_name: sid}, message=f"rename {old_name} -> {new_name}"),
            expect={old_name: sid, new_name: None},
        )
        return sid

    def pin(self, ref: str | bytes) -> bytes:
        sid = self.resolve(ref)
        self.commit(Commit(pins=[sid], message=f"pin {sid.hex()[:12]}"))
        return sid

    def unpin(self, ref: str | bytes) -> bytes:
        sid = self.resolve(ref)
        if sid not in self.index.pins():
            raise NotFoundError(f"snapshot {sid.hex()[:12]} is not pinned")
        self.commit(Commit(unpins=[sid], message=f"unpin {sid.hex()[:12]}"))
        return sid

    def pins(self) -> set[bytes]:
        return self.index.pins()

    # -- reading data ---------------------------------------------------------------------------

    def location(self, block: bytes) -> BlockLocation:
        loc = self.index.get_block(block)
        if loc is None:
            raise _unindexed(block)
        return loc

    def locations(self, blocks: Iterable[bytes]) -> dict[bytes, BlockLocation]:
        """Where each block is, looked up in one index transaction."""
        blocks = list(blocks)
        found = self.index.get_blocks(blocks)
        missing = next((block for block in blocks if block not in found), None)
        if missing is not None:
            raise _unindexed(missing)
        return found

    def read_block(
        self, block: bytes, loc: BlockLocation | None = None, ref_raw: bytes | None = None, ungroup_xor=None
    ) -> bytes | memoryview:
        """The raw bytes of a block. `ref_raw` may supply an XOR reference the caller already holds;
        `ungroup_xor` a fused decoder of XOR-coded blocks (see codecs.decode)."""
        loc = loc or self.location(block)
        stored_id, codec, width, raw_len, ref, payload = self.packs.read_record(loc)
        if stored_id != block:
            raise CorruptionError(
                f"block {block.hex()}: pack record at pack-{loc.pack:08d}.mpk@{loc.offset} holds another block"
            )
        if codec == Codec.XOR_GROUPED_ZSTD and ref_raw is None:
            ref_loc = self.location(ref)
            if ref_loc.codec == Codec.XOR_GROUPED_ZSTD:
                raise CorruptionError(f"block {block.hex()}: XOR reference {ref.hex()} is itself XOR-coded")
            ref_raw = self.read_block(ref, ref_loc)
        return decode(codec, payload, raw_len, width, ref_raw, ungroup_xor)

    def read_blocks(self, blocks: Iterable[bytes], threads: int | None = None) -> Iterator[bytes]:
        """Raw bytes of `blocks` in order, decoded by a small thread pool with bounded read-ahead."""
        workers = threads or max(2, os.cpu_count() or 2)
        with ThreadPoolExecutor(workers) as pool:
            pending: deque = deque()
            for block in blocks:
                pending.append(pool.submit(self.read_block, block))
                if len(pending) >= workers * 3:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def tensor_bytes(self, entry: TensorEntry) -> bytes:
        return b"".join(self.read_blocks(entry.blocks))

    def tensors(self, ref: str | bytes, names: Iterable[str] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Iterate a snapshot's tensors as torch tensors (CPU), in name order."""
        from .torch_dtypes import to_torch

        manifest = self.manifest(ref)
        entries = manifest.tensor_map()
        for name in sorted(entries) if names is None else names:
            if name not in entries:
                raise NotFoundError(f"snapshot has no tensor {name!r}")
            entry = entries[name]
            yield name, to_torch(self.tensor_bytes(entry), entry.dtype, entry.shape)

    # -- high-level operations (one module each) ------------------------------------------------

    def ingest(
        self,
        folder: Path | str,
        name: str | None = None,
        base: str | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ):
        """Ingest a Hugging Face model folder; see mpstore.ingest.ingest_folder."""
        from .ingest import ingest_folder

        return ingest_folder(self, Path(folder), name=name, base=base, force=force, progress=progress)

    def export(
        self, ref: str | bytes, outdir: Path | str, progress: Progress | None = None, shard_bytes: int | None = None
    ):
        """Write a snapshot back as a model folder; see mpstore.export.export_snapshot."""
        from .export import export_snapshot

        return export_snapshot(self, ref, Path(outdir), progress=progress, shard_bytes=shard_bytes)

    def fsck(self, progress: Progress | None = None):
        from .fsck import fsck

        return fsck(self, progress=progress)

    def gc(self, wait: bool = True, progress: Progress | None = None):
        """Delete snapshots and blocks no ref or pin reaches; see mpstore.gc."""
        from .gc import collect

        return collect(self, wait=wait, progress=progress)

    def du(self):
        from .usage import disk_usage

        return disk_usage(self)


def _unindexed(block: bytes) -> CorruptionError:
    return CorruptionError(f"block {block.hex()} is referenced but not in the index")


__all__ = ["Store", "SnapshotInfo", "default_store_path", "check_ref_name", "MpstoreError"]
