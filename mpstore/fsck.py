"""fsck: verify every record of the store and every block a snapshot can reach.

Checks, in order: the manifest log (every record's checksum, the index caught up to its end); every
pack (each record's checksum up to the end the index calls durable); every snapshot (its manifest
hashes to its id); refs and pins (they name snapshots); every reachable block (its record decodes,
its XOR reference exists and is not itself XOR-coded, and the decoded bytes hash to its id).
A damaged block is reported with the snapshots, tensors and files it belongs to.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .codecs import Codec
from .errors import CorruptionError, MpstoreError
from .ids import ZERO_BLOCK_ID, block_id, snapshot_id
from .manifest_log import LOG_HEADER
from .pack import PACK_HEADER, RECORD_HEADER_SIZE, pack_numbers, pack_path, scan_pack
from .snapshot import Manifest

if TYPE_CHECKING:
    from .store import Progress, Store


@dataclass
class FsckReport:
    snapshots: int = 0
    blocks_checked: int = 0
    bytes_checked: int = 0
    packs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "blocks_checked": self.blocks_checked,
            "bytes_checked": self.bytes_checked,
            "packs": self.packs,
            "problems": self.problems,
        }


def _check_log(store: "Store", report: FsckReport) -> None:
    end = store.log.valid_end(LOG_HEADER.size)
    size = store.log.size()
    if end != size:
        report.problems.append(f"manifest.log: damaged or torn record at offset {end} (file is {size} bytes)")
    if store.index.high_water() > end:
        report.problems.append("index: applied past the last valid log record")


def _check_packs(store: "Store", report: FsckReport) -> None:
    ends = store.index.pack_ends()
    folder = store.path / "packs"
    for number in pack_numbers(folder):
        report.packs += 1
        durable = ends.get(number)
        if durable is None:
            continue  # an abandoned pack no commit refers to; gc removes it
        last = None
        try:
            for offset, *_rest, stored_len in scan_pack(pack_path(folder, number)):
                last = offset + RECORD_HEADER_SIZE + stored_len
                if last >= durable:
                    break
        except MpstoreError as exc:
            report.problems.append(str(exc))
            continue
        reached = last if last is not None else PACK_HEADER.size
        if reached < durable:
            report.problems.append(f"pack-{number:08d}.mpk: damaged record at offset {reached} (durable end {durable})")


def _check_block(store: "Store", block: bytes) -> tuple[int, str | None]:
    try:
        loc = store.location(block)
        if loc.codec == Codec.XOR_GROUPED_ZSTD:
            if loc.ref == ZERO_BLOCK_ID:
                return 0, "XOR-coded without a reference"
            if store.location(loc.ref).codec == Codec.XOR_GROUPED_ZSTD:
                return 0, f"XOR reference {loc.ref.hex()} is itself XOR-coded"
        raw = store.read_block(block, loc)
        if len(raw) != loc.raw_len or block_id(raw) != block:
            return loc.record_len, "decoded bytes do not hash to the block id"
        return loc.record_len, None
    except MpstoreError as exc:
        return 0, str(exc)


def fsck(store: "Store", progress: "Progress | None" = None) -> FsckReport:
    report = FsckReport()
    # The log, refs, pins and snapshot list are read under the commit lock so that a writer
    # committing meanwhile cannot make a consistent store look damaged; block checks run unlocked
    # (committed blocks never change).
    with store.commit_lock.held():
        _check_log(store, report)
        snapshot_ids = store.index.snapshot_ids()
        refs, pins = store.refs(), store.pins()
    _check_packs(store, report)
    manifests: dict[bytes, Manifest] = {}
    for sid in snapshot_ids:
        report.snapshots += 1
        data = store.index.manifest_bytes(sid)
        if data is None or snapshot_id(data) != sid:
            report.problems.append(f"snapshot {sid.hex()[:12]}: manifest does not hash to its id")
            continue
        try:
            manifests[sid] = Manifest.decode(data)
        except CorruptionError as exc:
            report.problems.append(f"snapshot {sid.hex()[:12]}: {exc}")
    for name, sid in refs.items():
        if sid not in manifests:
            report.problems.append(f"ref {name!r} points to missing snapshot {sid.hex()[:12]}")
    for sid in pins:
        if sid not in manifests:
            report.problems.append(f"pin {sid.hex()[:12]} names a missing snapshot")

    reachable = set()
    for manifest in manifests.values():
        reachable |= manifest.all_blocks()
    locs = store.index.get_blocks(reachable)
    order = sorted(reachable, key=lambda b: (locs[b].pack, locs[b].offset) if b in locs else (-1, 0))
    damaged: dict[bytes, str] = {}
    with ThreadPoolExecutor(2) as pool:
        for block, (nbytes, problem) in zip(order, pool.map(lambda b: _check_block(store, b), order)):
            report.blocks_checked += 1
            report.bytes_checked += nbytes
            if problem:
                damaged[block] = problem
            if progress:
                progress(nbytes)
    if damaged:
        names = {sid: sorted(n for n, s in refs.items() if s == sid) for sid in manifests}
        for block, problem in damaged.items():
            owners = []
            for sid, manifest in manifests.items():
                label = sid.hex()[:12] + (f" ({', '.join(names[sid])})" if names[sid] else "")
                owners += [f"snapshot {label} tensor {t.name}" for t in manifest.tensors if block in t.blocks]
                owners += [
                    f"snapshot {label} file {f.path}"
                    for f in manifest.files
                    if any(block in s.blocks for s in f.segments)
                ]
            report.problems.append(f"block {block.hex()}: {problem}; used by: {'; '.join(owners)}")
    return report
