"""Ingest: a Hugging Face model folder -> blocks in packs + one committed snapshot.

Everything about the input is validated (mpstore.hf_folder) before a byte is written. Blocks are
hashed, compared with the base's block at the same position, encoded and statistics computed by a
thread pool (zstd, numpy and hashing release the GIL); one thread appends to the pack in input order.
Records are fsynced and published to the index every `SYNC_BYTES`, so an interrupted ingest that is
run again finds and reuses what it already wrote. The snapshot and its ref appear in one commit.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dtypes import DType
from .errors import ConflictError, InvalidInputError
from .folders import fingerprint, remember
from .hf_folder import ModelFolder, scan_model_folder
from .ids import block_id
from .manifest_log import Commit
from .snapshot import FileEntry, Manifest, Segment, TensorEntry
from .writer import BlockSink, process_block, split_blocks, store_literal

if TYPE_CHECKING:
    from .store import Progress, Store

AUTO_BASE_MIN_OVERLAP = 0.9  # a base candidate must share names and shapes for 90% of the elements
AUTO_BASE_SAMPLE_BLOCKS = 8


@dataclass
class IngestResult:
    id: bytes
    name: str | None
    base: bytes | None
    tensors: int = 0
    input_bytes: int = 0  # bytes of every file of the folder
    written_bytes: int = 0  # bytes appended to pack files (records, headers included)
    blocks: int = 0
    blocks_new: int = 0
    blocks_same_as_base: int = 0
    blocks_dedup: int = 0  # already stored (or repeated in this model)
    seconds: float = 0.0
    codecs: dict[str, int] = field(default_factory=dict)


@dataclass
class _Source:
    """One tensor of the input: where its bytes are and what it aligns with in the base."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    data: memoryview
    base_blocks: tuple[bytes, ...] | None = None


def _open_sources(model: ModelFolder) -> list[_Source]:
    sources = []
    for wf in model.weight_files:
        if wf.kind == "safetensors":
            if not wf.header.tensors:
                continue
            with open(model.root / wf.relpath, "rb") as f:
                # The map outlives the file object; it is freed with the last view into it.
                view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            for span in wf.header.tensors:
                sources.append(_Source(span.name, span.dtype, span.shape, view[span.start : span.start + span.nbytes]))
        else:
            for name, (dtype, shape, data) in wf.torch_bin.tensors.items():
                sources.append(_Source(name, dtype, tuple(shape), memoryview(data).cast("B")))
    return sources


def _align_with_base(sources: list[_Source], base: Manifest | None, block_bytes: int) -> None:
    if base is None:
        return
    if base.block_bytes != block_bytes:
        return  # blocks of a different size never line up
    base_tensors = base.tensor_map()
    for src in sources:
        entry = base_tensors.get(src.name)
        if entry is not None and entry.dtype == src.dtype.name and entry.shape == src.shape:
            src.base_blocks = entry.blocks


def _choose_base(store: "Store", sources: list[_Source], ids: dict[str, list[bytes]]) -> bytes | None:
    """The stored root snapshot closest to the input: most identical blocks, then least bit distance."""
    total = sum(len(s.data) for s in sources) or 1
    scored = []
    for info in store.snapshots():
        manifest = info.manifest
        if manifest.base is not None or manifest.block_bytes != store.block_bytes:
            continue  # only roots: XOR chains are one level deep, and statistics are against a base
        tmap = manifest.tensor_map()
        overlap, identical, differing = 0, 0, []
        for src in sources:
            entry = tmap.get(src.name)
            if entry is None or entry.dtype != src.dtype.name or entry.shape != src.shape:
                continue
            overlap += len(src.data)
            for i, (mine, theirs) in enumerate(zip(ids[src.name], entry.blocks)):
                if mine == theirs:
                    identical += 1
                else:
                    differing.append((src, i, theirs))
        if overlap >= AUTO_BASE_MIN_OVERLAP * total:
            scored.append((identical, info.id, differing))
    if not scored:
        return None
    top = max(s[0] for s in scored)
    finalists = [s for s in scored if s[0] == top]
    if len(finalists) == 1:
        return finalists[0][1]

    def bit_distance(differing: list) -> float:
        if not differing:
            return 0.0
        step = max(1, len(differing) // AUTO_BASE_SAMPLE_BLOCKS)
        bits = 0
        for src, i, theirs in differing[::step][:AUTO_BASE_SAMPLE_BLOCKS]:
            mine = split_blocks(src.data, src.dtype, store.block_bytes)[i]
            x = np.bitwise_xor(np.frombuffer(mine, np.uint8), np.frombuffer(store.read_block(theirs), np.uint8))
            bits += int(np.bitwise_count(x).sum())
        return bits

    return min(finalists, key=lambda s: (bit_distance(s[2]), s[1]))[1]


def _resolve_base(
    store: "Store", base: str | None, sources: list[_Source], pool: ThreadPoolExecutor, progress: "Progress | None"
) -> tuple[bytes | None, dict[str, list[bytes]] | None]:
    if base is None:
        return None, None
    if base != "auto":
        return store.resolve(base), None
    ids: dict[str, list[bytes]] = {}
    for src in sources:  # a first, hashing-only pass: the base is chosen on block identity
        ids[src.name] = list(pool.map(block_id, split_blocks(src.data, src.dtype, store.block_bytes)))
    return _choose_base(store, sources, ids), ids


def ingest_folder(
    store: "Store",
    folder: Path,
    name: str | None = None,
    base: str | None = None,
    force: bool = False,
    progress: "Progress | None" = None,
) -> IngestResult:
    """Ingest `folder` into `store`; `base` is a ref, 'auto', or None. Returns what was done."""
    from .store import check_ref_name

    started = time.monotonic()
    if name is not None:
        check_ref_name(name)
        old = store.index.ref(name)
        if old is not None and not force:
            raise ConflictError(f"ref {name!r} already exists (points to {old.hex()[:12]}); use --force to move it")
    else:
        old = None
    model = scan_model_folder(folder)
    folder_fingerprint = fingerprint(folder)  # before reading the data: a change while reading mismatches
    with store.writing().held():  # gc waits until this ingest is committed
        result = _ingest(store, model, name, old, base, progress, started)
    try:
        remember(store, folder, folder_fingerprint, result.id)
    except OSError:
        pass  # only a cache (mpstore.folders): a merge naming this folder ingests it again
    return result


def _ingest(
    store: "Store",
    model: ModelFolder,
    name: str | None,
    old: bytes | None,
    base: str | None,
    progress: "Progress | None",
    started: float,
) -> IngestResult:
    workers = max(2, os.cpu_count() or 2)
    sources = _open_sources(model)
    result = IngestResult(id=b"", name=name, base=None)
    result.input_bytes = sum(
        os.path.getsize(model.root / p) for p in [wf.relpath for wf in model.weight_files] + list(model.other_files)
    )
    with ThreadPoolExecutor(workers) as pool:
        base_id, known_ids = _resolve_base(store, base, sources, pool, progress)
        base_manifest = store.manifest(base_id) if base_id else None
        _align_with_base(sources, base_manifest, store.block_bytes)
        sink = BlockSink(store)
        try:
            file_hashes = {
                rel: pool.submit(_sha256_file, model.root / rel) for rel in [wf.relpath for wf in model.weight_files]
            }
            tensors = _ingest_tensors(store, sources, known_ids, sink, pool, workers, result, progress)
            files = _ingest_files(store, model, sink, file_hashes, progress)
        finally:
            sink.close()
        result.written_bytes, result.codecs = sink.written_bytes, dict(sink.codecs)
    manifest = Manifest(
        block_bytes=store.block_bytes,
        tensors=tuple(tensors),
        files=tuple(files),
        base=base_id,
        parents=(base_id,) if base_id else (),
        operation={"op": "ingest"},
    )
    manifest_bytes = manifest.encode()
    result.id, result.base, result.tensors = manifest.id, base_id, len(tensors)
    commit = Commit(manifests=[manifest_bytes], refs={name: result.id} if name else {}, message=f"ingest {model.root}")
    store.commit(commit, expect={name: old} if name else None)
    result.seconds = time.monotonic() - started
    return result


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buffer = bytearray(8 << 20)  # one reused buffer: a fresh 8 MiB allocation per read cost 15%
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def _ingest_tensors(store, sources, known_ids, sink, pool, workers, result, progress) -> list[TensorEntry]:
    entries: dict[str, dict] = {}
    pending: deque = deque()

    def drain_one() -> None:
        src, i, raw_len, future = pending.popleft()
        bid, stats, encoded = future.result()
        entry = entries[src.name]
        entry["blocks"][i] = bid
        if entry["delta"] is not None:
            entry["delta"][i] = stats
        result.blocks += 1
        if encoded is None:
            if src.base_blocks is not None and bid == src.base_blocks[i]:
                result.blocks_same_as_base += 1
            else:
                result.blocks_dedup += 1
        elif bid in sink.written:
            result.blocks_dedup += 1  # repeated within this model
        else:
            codec, payload, ref = encoded
            sink.add(bid, codec, src.dtype.group_width, raw_len, payload, ref)
            result.blocks_new += 1
        if progress:
            progress(raw_len)

    for src in sources:
        chunks = split_blocks(src.data, src.dtype, store.block_bytes)
        entries[src.name] = {
            "blocks": [None] * len(chunks),
            "delta": [None] * len(chunks) if src.base_blocks is not None else None,
        }
        ids = known_ids.get(src.name) if known_ids else None
        for i, raw in enumerate(chunks):
            base_block = src.base_blocks[i] if src.base_blocks is not None else None
            future = pool.submit(process_block, store, src.dtype, raw, ids[i] if ids else None, base_block, sink)
            pending.append((src, i, len(raw), future))
            if len(pending) >= workers * 4:  # bounded read-ahead keeps memory flat
                drain_one()
    while pending:
        drain_one()
    return [
        TensorEntry(
            name=src.name,
            dtype=src.dtype.name,
            shape=src.shape,
            blocks=tuple(entries[src.name]["blocks"]),
            delta=tuple(entries[src.name]["delta"]) if entries[src.name]["delta"] is not None else None,
        )
        for src in sources
    ]


def _ingest_files(store, model: ModelFolder, sink, file_hashes, progress) -> list[FileEntry]:
    files = []
    for wf in model.weight_files:
        path = model.root / wf.relpath
        if wf.kind == "safetensors":
            prefix = wf.header.prefix
            segments = [Segment(blocks=store_literal(store, prefix, sink), size=len(prefix))]
            segments += [Segment(tensor=span.name) for span in wf.header.tensors]
            size = wf.header.file_size
        else:
            segments = []
            with open(path, "rb") as f:
                for seg in wf.torch_bin.segments:
                    if seg.kind == "tensor":
                        segments.append(Segment(tensor=seg.name))
                    else:
                        f.seek(seg.start)
                        literal = f.read(seg.end - seg.start)
                        segments.append(Segment(blocks=store_literal(store, literal, sink), size=len(literal)))
            size = wf.torch_bin.file_size
        files.append(FileEntry(wf.relpath, size, file_hashes[wf.relpath].result(), tuple(segments)))
    for rel in model.other_files:
        try:
            data = (model.root / rel).read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"{rel}: cannot read: {exc.strerror}") from None
        segment = Segment(blocks=store_literal(store, data, sink), size=len(data))
        files.append(FileEntry(rel, len(data), hashlib.sha256(data).hexdigest(), (segment,)))
        if progress:
            progress(len(data))
    return files
