"""Garbage collection: drop what no ref or pin reaches, crash-safely.

Reachable: the snapshots refs and pins name, every block they use, and the XOR reference of each such
block. Lineage parents are not kept alive by their children (`log` shows them as collected).
gc holds gc.lock exclusively, so no ingest or merge is writing meanwhile (they hold it shared and gc
waits for them). Packs are never edited: live records are copied to a new pack, fsynced, the index
switches to the copies in one transaction, and only then is the old file deleted. A crash anywhere
leaves either the old pack or the new one in the index; the other is an orphan the next gc deletes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .durable import FileLock, fsync_dir
from .errors import ConflictError
from .manifest_log import Commit
from .pack import PackWriter, pack_numbers, pack_path
from .snapshot import Manifest

if TYPE_CHECKING:
    from .store import Progress, Store


@dataclass
class GcReport:
    snapshots_removed: int = 0
    blocks_removed: int = 0
    packs_rewritten: int = 0
    orphan_packs_removed: int = 0
    bytes_freed: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


def _mark(store: "Store") -> tuple[set[bytes], set[bytes]]:
    live_snapshots = set(store.refs().values()) | store.pins()
    live_blocks: set[bytes] = set()
    for sid in live_snapshots:
        data = store.index.manifest_bytes(sid)
        if data is not None:
            live_blocks |= Manifest.decode(data).all_blocks()
    refs = {loc.ref for loc in store.index.get_blocks(live_blocks).values() if any(loc.ref)}
    return live_snapshots, live_blocks | refs


def collect(store: "Store", wait: bool = True, progress: "Progress | None" = None) -> GcReport:
    report = GcReport()
    lock = FileLock(store.path / "gc.lock")
    if not lock.acquire(blocking=wait):
        raise ConflictError("an ingest or merge is running; gc waits for it (run again without --no-wait)")
    try:
        with store.commit_lock.held():
            store._catch_up_locked()
            live_snapshots, live_blocks = _mark(store)
            dead = [sid for sid in store.index.snapshot_ids() if sid not in live_snapshots]
            if dead:
                # Forget first: if gc dies later, the blocks are merely garbage for the next run.
                store.append_locked(Commit(forget=dead, message=f"gc: forget {len(dead)} snapshots"))
                report.snapshots_removed = len(dead)
        _sweep(store, live_blocks, report, progress)
    finally:
        lock.release()
    return report


def _sweep(store: "Store", live: set[bytes], report: GcReport, progress: "Progress | None") -> None:
    folder = store.path / "packs"
    ends = store.index.pack_ends()
    by_pack: dict[int, list] = {}
    for block, loc in store.index.iter_blocks():
        by_pack.setdefault(loc.pack, []).append((block, loc))
    for number in pack_numbers(folder):
        path = pack_path(folder, number)
        size = path.stat().st_size
        if number not in ends:
            path.unlink()  # orphan: no index entry points into it
            report.orphan_packs_removed += 1
            report.bytes_freed += size
            continue
        blocks = by_pack.get(number, [])
        dead = [b for b, _ in blocks if b not in live]
        if not dead:
            continue
        keep = sorted(((b, loc) for b, loc in blocks if b in live), key=lambda x: x[1].offset)
        moved, new_number, new_end, new_size = {}, None, None, 0
        if keep:
            writer = PackWriter(folder, lambda _n: None)  # always a fresh pack
            try:
                for block, loc in keep:
                    stored_id, codec, width, raw_len, ref, payload = store.packs.read_record(loc)
                    moved[block] = writer.append(block, codec, width, raw_len, payload, ref)
                new_end = writer.sync()
                new_number = writer.number
                new_size = new_end
            finally:
                writer.close()
        store.index.relocate(moved, dead, number, new_number, new_end)
        path.unlink()
        fsync_dir(folder)
        report.packs_rewritten += 1
        report.blocks_removed += len(dead)
        report.bytes_freed += size - new_size
        if progress:
            progress(size)
    store.packs.close()  # cached descriptors may point at deleted packs
