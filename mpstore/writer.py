"""Writing blocks: hash, compare with the base, measure the delta, encode, append, publish.

Shared by ingest and by merges (mpexec), so both dedup against the store, XOR-code against the base
and record the same per-block statistics. Records are fsynced and published to the index in batches
(every SYNC_BYTES or SYNC_SECONDS), so an interrupted writer that runs again reuses what it wrote.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .codecs import Codec, encode
from .dtypes import DType, as_float32
from .ids import ZERO_BLOCK_ID, block_id
from .pack import BlockLocation, PackWriter
from .snapshot import DeltaStats

if TYPE_CHECKING:
    from .store import Store

# Publish durable blocks to the index after this many bytes or seconds, whichever comes first: a
# killed ingest loses at most that much work, at the price of one fsync per batch.
SYNC_BYTES = 64 << 20
SYNC_SECONDS = 1.0


def delta_stats(dtype: DType, raw: memoryview, base_raw: bytes) -> DeltaStats:
    """(L2 norm, max |delta|, changed elements) of raw - base_raw, from the numbers (numpy, no torch).

    Non-finite deltas (inf or NaN weights) count as changed elements but add nothing to the norms.
    """
    lane = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.group_width]
    changed = int(np.count_nonzero(np.frombuffer(raw, lane) != np.frombuffer(base_raw, lane)))
    if not changed:
        return (0.0, 0.0, 0)
    delta = as_float32(dtype, raw)
    if not delta.flags.writeable:  # a view of the input (C64): subtract into a copy
        delta = delta.copy()
    np.subtract(delta, as_float32(dtype, base_raw), out=delta)
    l2 = float(np.sqrt(np.dot(delta, delta)))
    peak = float(np.abs(delta, out=delta).max())
    if not (np.isfinite(l2) and np.isfinite(peak)):
        delta = np.nan_to_num(as_float32(dtype, raw) - as_float32(dtype, base_raw), nan=0.0, posinf=0.0, neginf=0.0)
        l2, peak = float(np.sqrt(np.dot(delta, delta))), float(np.abs(delta).max())
    return rounded_stats(l2, peak, changed)


def rounded_stats(l2: float, peak: float, changed: int) -> DeltaStats:
    """Statistics as the manifest keeps them: norms to 6 significant digits."""
    return (float(f"{l2:.6g}"), float(f"{peak:.6g}"), int(changed))


def split_blocks(data: memoryview, dtype: DType, block_bytes: int) -> list[memoryview]:
    """Tensor-aligned blocks: block i covers elements [i*E, (i+1)*E) (see DType.block_elements)."""
    step = dtype.nbytes(dtype.block_elements(block_bytes))
    return [data[i : i + step] for i in range(0, len(data), step)]


class BlockSink:
    """Appends new blocks to packs in order, dedups, and publishes durable batches to the index."""

    def __init__(self, store: "Store"):
        self.store = store
        self.written_bytes = 0  # bytes appended to packs, record headers included
        self.codecs: dict[str, int] = {}  # codec name -> blocks written
        self.writer: PackWriter | None = None
        self.unpublished: dict[bytes, BlockLocation] = {}
        self.written: dict[bytes, BlockLocation] = {}
        self.since_sync = 0
        self.last_sync = time.monotonic()

    def known(self, block: bytes) -> bool:
        return block in self.written or self.store.index.get_block(block) is not None

    def add(self, block: bytes, codec: Codec, width: int, raw_len: int, payload: bytes, ref: bytes) -> None:
        if self.writer is None or self.writer.full:
            self.publish()
            if self.writer is not None:
                self.writer.close()
            self.writer = self.store.pack_writer()
        loc = self.writer.append(block, codec, width, raw_len, payload, ref)
        self.written[block] = self.unpublished[block] = loc
        self.written_bytes += loc.record_len
        self.codecs[codec.name.lower()] = self.codecs.get(codec.name.lower(), 0) + 1
        self.since_sync += loc.record_len
        if self.since_sync >= SYNC_BYTES or time.monotonic() - self.last_sync >= SYNC_SECONDS:
            self.publish()

    def publish(self) -> None:
        """fsync the pack, then let the index point at its records (never the other way round)."""
        if self.writer is not None and self.unpublished:
            end = self.writer.sync()
            self.store.index.put_blocks(self.unpublished, self.writer.number, end)
            self.unpublished = {}
        self.since_sync = 0
        self.last_sync = time.monotonic()

    def close(self) -> None:
        self.publish()
        if self.writer is not None:
            self.writer.close()


def process_block(
    store: "Store",
    dtype: DType,
    raw: memoryview,
    known_id: bytes | None,
    base_block: bytes | None,
    sink: BlockSink,
    base_raw: bytes | None = None,
    stats: DeltaStats | None = None,
):
    """Worker: hash, compare with the base, compute delta statistics and encode if new.

    `base_raw` may hand over the base block's bytes when the caller already holds them, `stats` the
    delta statistics when the caller computed them (unrounded; rounded here as delta_stats rounds).
    """
    bid = known_id or block_id(raw)
    if base_block is not None and bid == base_block:
        return bid, (0.0, 0.0, 0), None
    ref_raw, ref_id, block_stats = None, ZERO_BLOCK_ID, None
    if base_block is not None:
        base_loc = store.location(base_block)
        ref_raw = base_raw if base_raw is not None else store.read_block(base_block, base_loc)
        block_stats = delta_stats(dtype, raw, ref_raw) if stats is None else rounded_stats(*stats)
        if base_loc.codec == Codec.XOR_GROUPED_ZSTD:
            ref_raw = None  # delta chains stay one level deep
        else:
            ref_id = base_block
    if sink.known(bid):
        return bid, block_stats, None
    codec, payload = encode(raw, dtype.group_width, store.zstd_level, ref_raw)
    return bid, block_stats, (codec, payload, ref_id if codec == Codec.XOR_GROUPED_ZSTD else ZERO_BLOCK_ID)


def store_literal(store: "Store", data: bytes | memoryview, sink: BlockSink) -> tuple[bytes, ...]:
    """Literal bytes (a small file, a safetensors header) as zstd blocks, deduplicated."""
    ids = []
    for i in range(0, len(data), store.block_bytes):
        chunk = data[i : i + store.block_bytes]
        bid = block_id(chunk)
        if not sink.known(bid):
            codec, payload = encode(chunk, 1, store.zstd_level)
            sink.add(bid, codec, 1, len(chunk), payload, ZERO_BLOCK_ID)
        ids.append(bid)
    return tuple(ids)
