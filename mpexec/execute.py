"""Execution: a MergePlan -> merged tensors written as blocks -> one committed snapshot with lineage.

Each output tensor becomes a job (_Job): passed through (an input's blocks, nothing read), merged
block-wise (mpexec.blockmerge: task arithmetic, ties, DARE), merged whole (the methods' kernels), or
streamed in chunks (mpexec.stream). The jobs run as a pipeline: a reader thread reads the next jobs'
blocks ahead (bounded by PREFETCH_BYTES of decoded blocks, decoding in a small pool), this thread
merges (block-wise jobs in a compute pool), and a writer pool hashes, XOR-codes and compresses the
output blocks. Memory is bounded by those limits and by the size of a chunk or window, never by the
model. Input blocks are read once: a block identical to the base's block at the same position is a
zero delta, and blocks shared between inputs are read once. Output blocks go through mpstore.writer,
XOR-coded against the base, so a merge close to its base stores little and an identical re-run
writes nothing.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence


from mpstore.codecs import Codec
from mpstore.errors import ConflictError
from mpstore.manifest_log import Commit
from mpstore.snapshot import FileEntry, Manifest, Segment, TensorEntry
from mpstore.writer import BlockSink, process_block, store_literal
from mpstore.dtypes import dtype_named
from mpstore.safetensors_io import build_prefix, index_json, plan_shards, shard_names

from .lazy_torch import torch
from . import blockmerge
from .methods import TASK_ARITHMETIC_FAMILY, MergeError, QueryError, identity_on_equal_inputs, merge_tensor
from .plan import MergePlan, TensorPlan
from .stream import stream_merge, stream_passes, streamable

if TYPE_CHECKING:
    from mpstore import Store

ENGINE_VERSION = "mpexec 0.2.1"  # 0.2: block-wise task arithmetic, DARE masks per block; .1: DARE sums in 64 lanes
DEFAULT_SHARD_BYTES = 5 * 10**9  # mergekit's default --out-shard-size
# Methods whose output is exactly the base when every input equals the base (a zero delta adds nothing).
DELTA_METHODS = set(TASK_ARITHMETIC_FAMILY) | {"sce"}
# Files of the base (or tokenizer source) that a merged model carries along, as mergekit does.
TAGALONG = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# Tensors larger than this are merged in chunks of CHUNK_ELEMENTS per input (see mpexec.stream), so
# memory stays flat whatever the model's size; smaller ones are merged whole.
STREAM_MIN_ELEMENTS = 1 << 22
CHUNK_ELEMENTS = 1 << 20
# The reader stage reads ahead of the tensor being merged until it holds this many decoded bytes.
PREFETCH_BYTES = 192 << 20
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass
class MergeResult:
    id: bytes
    name: str | None
    tensors: int = 0
    bytes_read: int = 0
    bytes_read_base: int = 0
    bytes_read_experts: int = 0
    blocks_read: int = 0
    blocks_skipped: dict[str, int] = field(default_factory=lambda: {"same_as_base": 0, "shared": 0, "dropped": 0})
    tensors_passed_through: int = 0  # outputs that are an input's blocks, with nothing read
    written_bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "id": self.id.hex(),
            "name": self.name,
            "tensors": self.tensors,
            "bytes_read": self.bytes_read,
            "bytes_read_base": self.bytes_read_base,
            "bytes_read_experts": self.bytes_read_experts,
            "blocks_read": self.blocks_read,
            "blocks_skipped": dict(self.blocks_skipped),
            "tensors_passed_through": self.tensors_passed_through,
            "written_bytes": self.written_bytes,
            "seconds": round(self.seconds, 3),
        }


def resolve_device(device: str) -> str:
    """The device's name, "cpu" or "cuda": torch takes names wherever it takes devices, and the CPU
    needs no torch here."""
    if device not in ("cpu", "cuda", "auto"):
        raise QueryError(f"--device {device!r}: use cpu, cuda or auto")
    if device == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise QueryError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return "cuda" if available else "cpu"


def reuse_freed_memory() -> None:
    """Let glibc keep freed buffers of up to 256 MiB for reuse instead of unmapping them at once.

    A merge allocates and frees block-sized float buffers by the thousand; served by fresh mmaps each
    time, every page is faulted in and zeroed again (a third of the CPU time of a task_arithmetic
    merge). The cap on resident memory is unchanged: the executor's own bounds hold."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)
    libc.mallopt(m_top_pad, 64 << 20)


class _TorchThreads:
    """During a merge torch computes on one thread: worker threads decode, merge and encode, and torch's
    own would only compete with them (and busy-wait between operations, a quarter of the CPU). Set
    when a merge first computes with torch; merges that never do leave torch unimported."""

    def __init__(self) -> None:
        self.saved: int | None = None

    def limit(self) -> None:
        if self.saved is None:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def restore(self) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)
            self.saved = None


_TORCH_THREADS = _TorchThreads()


def tensor_seed(seed: int, tensor: str) -> int:
    """Per-tensor RNG seed: the same seed and tensor name give the same masks on any device."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{tensor}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class _Reader:
    """Reads input blocks once per tensor, taking XOR references from blocks already in hand.

    A dry reader reads nothing: it counts the bytes a real one would take from the packs (the record,
    plus its XOR reference when that is not in hand) and marks the blocks as held. EXPLAIN's
    estimates are the executor's own read logic run dry.
    """

    def __init__(
        self,
        store: "Store",
        pool: ThreadPoolExecutor | None,
        result: MergeResult,
        dry: bool = False,
        limit: int | None = None,
        ungroup_xor=None,
    ):
        self.store, self.pool, self.result, self.dry = store, pool, result, dry
        self.ungroup_xor = ungroup_xor  # a fused decoder of XOR-coded blocks (see codecs.decode)
        self.limit = limit  # a hard cap on the bytes this reader may take from the packs (--io-budget)
        self.total = 0
        self.raw_bytes = 0  # decoded bytes (dry runs only: what decoding will cost)

    def _projected(self, plain: list[bytes], coded: list[bytes], locs: dict, cache: dict[bytes, bytes]) -> int:
        """The bytes reading these blocks takes from the packs: each record, and the XOR reference of
        a coded block when neither the cache nor the plain blocks read first hold it."""
        total = sum(locs[b].record_len for b in plain + coded)
        held = set(plain)
        for block in coded:
            ref = locs[block].ref
            if ref not in cache and ref not in held:
                total += self.store.location(ref).record_len
        return total

    def read(self, blocks: list[bytes], cache: dict[bytes, bytes]) -> int:
        """Read the blocks not in `cache` into it; returns the bytes taken from pack files.

        Plain blocks go first, so an XOR-coded block whose reference is among them finds it in hand
        instead of reading it a second time (and the count does not depend on thread timing).
        """
        wanted = [b for b in dict.fromkeys(blocks) if b not in cache]
        self.result.blocks_read += len(wanted)
        locs = self.store.locations(wanted)
        plain = [b for b in wanted if locs[b].codec != Codec.XOR_GROUPED_ZSTD]
        coded = [b for b in wanted if locs[b].codec == Codec.XOR_GROUPED_ZSTD]
        if self.dry:
            self.raw_bytes += sum(locs[b].raw_len for b in wanted)
            projected = self._projected(plain, coded, locs, cache)
            cache.update(dict.fromkeys(wanted, b""))
            return projected
        if self.limit is not None:
            projected = self._projected(plain, coded, locs, cache)
            if self.total + projected > self.limit:
                raise MergeError(f"reading {projected} more bytes would exceed the I/O budget of {self.limit} bytes")
            self.total += projected
        before = self.store.packs.bytes_read
        for group in (plain, coded):

            def one(block: bytes) -> bytes:
                loc = locs[block]
                return self.store.read_block(block, loc, cache.get(loc.ref), self.ungroup_xor)

            for block, raw in zip(group, list(self.pool.map(one, group))):
                cache[block] = raw
        return self.store.packs.bytes_read - before


def _count_passthrough(result: MergeResult, entries, passthrough: int, dropped) -> None:
    result.tensors_passed_through += 1
    source = entries[passthrough].blocks
    for k, entry in enumerate(entries):
        if k != passthrough:
            for i, block in enumerate(entry.blocks):
                result.blocks_skipped[_skip_reason(k, i, block, source, dropped)] += 1


def _skip_reason(k: int, i: int, block: bytes, base_blocks, dropped: dict[int, frozenset[int]]) -> str:
    if i in dropped.get(k, ()):
        return "dropped"
    return "same_as_base" if i < len(base_blocks) and base_blocks[i] == block else "shared"


def _dropped(plan: MergePlan, tp: TensorPlan) -> dict[int, frozenset[int]]:
    return {k: plan.drops[(tp.name, k)] for k in range(len(tp.inputs)) if (tp.name, k) in plan.drops}


def _read_inputs(
    reader: _Reader,
    result: MergeResult,
    ranges: list[list[tuple[int, bytes]]],
    base_index: int | None,
    base_blocks: Sequence[bytes],
    dropped: dict[int, frozenset[int]],
    cache: dict[bytes, bytes],
) -> None:
    """Read the blocks of every input into `cache`, each distinct block once: the base's first, then
    the experts' blocks not in hand (the others counted as skipped, by reason). `ranges[k]` is input
    k's (block position, block) pairs to read."""
    if base_index is not None:
        result.bytes_read_base += reader.read([block for _, block in ranges[base_index]], cache)
    wanted: dict[bytes, None] = {}  # ordered set
    for k, pairs in enumerate(ranges):
        if k == base_index:
            continue
        for i, block in pairs:
            if block in cache or block in wanted:
                result.blocks_skipped[_skip_reason(k, i, block, base_blocks, dropped)] += 1
            else:
                wanted[block] = None
    result.bytes_read_experts += reader.read(list(wanted), cache)


def _nbytes(tp: TensorPlan) -> int:
    return dtype_named(tp.out_dtype).nbytes(_numel(tp.shape))


def _carried_files(store: "Store", plan: MergePlan, out_dtypes: set[str], sink: BlockSink) -> list[FileEntry]:
    source = store.manifest(plan.models[plan.files_from])
    files = []
    for entry in source.files:
        if entry.path == "config.json":
            config = json.loads(b"".join(store.read_block(b) for s in entry.segments for b in s.blocks))
            if len(out_dtypes) == 1:
                name = TORCH_NAMES.get(next(iter(out_dtypes)))
                for key in ("torch_dtype", "dtype"):
                    if key in config and name:
                        config[key] = name
            files.append(_literal_file("config.json", json.dumps(config, indent=2).encode() + b"\n", store, sink))
        elif entry.path in TAGALONG:
            files.append(entry)  # same bytes, same blocks: nothing new is stored
    files.append(_literal_file("mergekit_config.yml", plan.query.text.encode(), store, sink))
    return files


def _literal_file(path: str, data: bytes, store: "Store", sink: BlockSink) -> FileEntry:
    return FileEntry(
        path,
        len(data),
        hashlib.sha256(data).hexdigest(),
        (Segment(blocks=store_literal(store, data, sink), size=len(data)),),
    )


def execute_plan(
    store: "Store",
    plan: MergePlan,
    name: str | None,
    seed: int = 0,
    device: str = "cpu",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> MergeResult:
    """Run the plan and commit the merged snapshot (and `name`, if given) atomically."""
    from mpstore.store import check_ref_name

    started = time.monotonic()
    if name is not None:
        check_ref_name(name)
    old = store.index.ref(name) if name else None
    if old is not None and not force:
        raise ConflictError(f"ref {name!r} already exists (points to {old.hex()[:12]}); use --force to move it")
    dev = resolve_device(device)
    reuse_freed_memory()
    collecting = gc.isenabled()
    gc.disable()  # a merge makes many short-lived containers and no cycles: no collector pauses
    try:
        with store.writing().held():  # the store's gc waits until this merge is committed
            return _execute(store, plan, name, old, seed, dev, shard_bytes, progress, started)
    finally:
        _TORCH_THREADS.restore()
        if collecting:
            gc.enable()


@dataclass
class _Job:
    """One output tensor, as the executor will merge it: its inputs and its mode.

    Modes: "pass" (an input's blocks, nothing read), "blocks" (mpexec.blockmerge), "whole" (the
    whole-tensor kernel), "stream" (mpexec.stream, which reads as it goes, one pass after another).
    """

    tp: TensorPlan
    entries: list[TensorEntry]
    base_entry: TensorEntry | None
    passthrough: int | None
    mode: str
    dropped: dict[int, frozenset[int]]
    layout: blockmerge.Layout | None = None
    cost: int = 0  # decoded bytes its reads hold (the reader stage's read-ahead is bounded by them)

    @property
    def reads_ahead(self) -> bool:
        """Whether its reads happen once, before merging (else the merge reads as it goes, per pass)."""
        return self.mode in ("pass", "whole") or (self.mode == "blocks" and len(self.layout.windows) <= 1)


def _job(store: "Store", plan: MergePlan, tp: TensorPlan, manifests, base_manifest) -> _Job:
    entries, base_entry, passthrough = _inputs_of(plan, tp, manifests, base_manifest)
    dropped = _dropped(plan, tp)
    if passthrough is not None:
        return _Job(tp, entries, base_entry, passthrough, "pass", dropped)
    if (
        blockmerge.applicable(plan.method.name, tp.shared, tp.compute_dtype, tp.out_dtype, entries, tp.base_index)
        and base_entry is not None
        and base_entry.blocks == entries[tp.base_index].blocks
    ):
        layout = blockmerge.Layout.of(entries, tp.base_index, store.block_bytes, STREAM_MIN_ELEMENTS)
        blocks = {b for w in layout.windows[:1] for part in layout.reads(entries, w) for b in part}
        return _Job(tp, entries, base_entry, None, "blocks", dropped, layout, len(blocks) * store.block_bytes)
    if _is_streamed(plan, tp):
        return _Job(tp, entries, base_entry, None, "stream", dropped)
    distinct = {b for e in entries for b in e.blocks} | set(base_entry.blocks if base_entry else ())
    return _Job(tp, entries, base_entry, None, "whole", dropped, cost=len(distinct) * store.block_bytes)


def _read_job(job: _Job, reader: _Reader, result: MergeResult) -> dict[bytes, bytes]:
    """Read what a job that reads ahead needs into a new cache, counting bytes and skips (dry readers
    only count)."""
    tp, entries = job.tp, job.entries
    cache: dict[bytes, bytes] = {}
    if job.mode == "pass":
        _count_passthrough(result, entries, job.passthrough, job.dropped)
    elif job.mode == "blocks":
        _skip_unchanged(job, result)
        if job.layout.windows:  # held whole: one window
            cache = _read_positions(job, job.layout.windows[0], reader, result)
    else:
        base_blocks = entries[tp.base_index].blocks if tp.base_index is not None else ()
        ranges = [list(enumerate(e.blocks)) for e in entries]
        _read_inputs(reader, result, ranges, tp.base_index, base_blocks, job.dropped, cache)
        if job.base_entry is not None:  # the writer XOR-codes against the base: read the blocks no input holds
            result.bytes_read_base += reader.read([b for b in job.base_entry.blocks if b not in cache], cache)
    return cache


def _skip_unchanged(job: _Job, result: MergeResult) -> None:
    """Count the expert blocks at positions where no expert differs from the base: none is read."""
    entries, layout = job.entries, job.layout
    for j, changed in enumerate(layout.changed):
        if not changed:
            for k, entry in enumerate(entries):
                if k != job.tp.base_index:
                    result.blocks_skipped[_skip_reason(k, j, entry.blocks[j], layout.base_blocks, job.dropped)] += 1


def _read_positions(job: _Job, positions: list[int], reader: _Reader, result: MergeResult) -> dict[bytes, bytes]:
    """A block-wise job's reads at some positions (all with a change): the base's blocks, then each
    distinct expert block that differs from them; the other expert blocks are counted as skipped."""
    cache: dict[bytes, bytes] = {}
    ranges = [[(j, entry.blocks[j]) for j in positions] for entry in job.entries]
    _read_inputs(reader, result, ranges, job.tp.base_index, job.layout.base_blocks, job.dropped, cache)
    return cache


class _ReadAhead:
    """The reader stage: a thread that reads the jobs' blocks in plan order, ahead of the job being
    merged, holding at most `limit` decoded bytes (always at least one job). A job that reads as it
    goes (streamed, or block-wise in windows) reads while it is merged: the reader waits for it to
    finish, so reads (and the I/O budget) are counted in one order, whatever the timing."""

    def __init__(self, jobs: list[_Job], reader: _Reader, result: MergeResult, limit: int):
        self.jobs, self.reader, self.result, self.limit = jobs, reader, result, limit
        self.ready: queue.Queue = queue.Queue()
        self.cond = threading.Condition()
        self.held = 0
        self.stopped = False
        self.resume = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mpexec-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for job in self.jobs:
                if not job.reads_ahead:
                    self.resume.clear()
                    self.ready.put((job, None))
                    self.resume.wait()
                    if self.stopped:
                        return
                    continue
                with self.cond:
                    while self.held and self.held + job.cost > self.limit and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                    self.held += job.cost
                self.ready.put((job, _read_job(job, self.reader, self.result)))
        except BaseException as exc:  # handed to the merging thread, which raises it
            self.ready.put((None, exc))

    def next(self) -> tuple[_Job, dict[bytes, bytes] | None]:
        job, payload = self.ready.get()
        if job is None:
            raise payload
        return job, payload

    def done(self, job: _Job) -> None:
        """The merging thread is through with a job: its reads no longer count, a stream may go on."""
        if not job.reads_ahead:
            self.resume.set()
            return
        with self.cond:
            self.held -= job.cost
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.resume.set()
        self.thread.join()


def _execute(
    store: "Store",
    plan: MergePlan,
    name: str | None,
    old: bytes | None,
    seed: int,
    dev: str,
    shard_bytes: int,
    progress: Callable[[str], None] | None,
    started: float,
) -> MergeResult:
    result = MergeResult(id=b"", name=name)
    manifests = {sid: store.manifest(sid) for sid in set(plan.models.values())}
    base_manifest = manifests[plan.base_snapshot] if plan.base_snapshot else None
    by_name = {tp.name: tp for tp in plan.tensors}
    shards = [
        [by_name[n] for n in group]
        for group in plan_shards([(tp.name, _nbytes(tp)) for tp in plan.tensors], shard_bytes)
    ]
    paths = shard_names(len(shards))
    jobs = [_job(store, plan, tp, manifests, base_manifest) for shard in shards for tp in shard]
    kernels = dev == "cpu" and any(job.mode == "blocks" for job in jobs)
    if kernels:
        # loading the compiled kernels takes 0.3-0.5 s: overlap it with the first reads
        dtypes = {job.tp.out_dtype for job in jobs if job.mode == "blocks"}
        threading.Thread(
            target=blockmerge.load_kernels, args=(plan.method.name, dtypes), name="mpexec-kernels", daemon=True
        ).start()
    sink = BlockSink(store)
    out_entries: dict[str, TensorEntry] = {}
    files: list[FileEntry] = []
    # reader threads decode, compute threads merge blocks, writer threads hash and encode; this thread
    # hands work between them in order
    with (
        ThreadPoolExecutor(2, "mpexec-decode") as read_pool,
        ThreadPoolExecutor(2, "mpexec-compute") as compute_pool,
        ThreadPoolExecutor(2, "mpexec-encode") as write_pool,
    ):
        fused = blockmerge.ungroup_xor if kernels else None
        reader = _Reader(store, read_pool, result, limit=plan.io_budget, ungroup_xor=fused)
        ahead = _ReadAhead(jobs, reader, result, PREFETCH_BYTES)
        try:
            for shard_index, shard in enumerate(shards):
                prefix = build_prefix([(tp.name, tp.out_dtype, tp.shape) for tp in shard])
                size = len(prefix)
                for tp in shard:
                    job, cache = ahead.next()
                    assert job.tp is tp
                    out_entries[tp.name] = _merge_one(
                        store, plan, job, cache, reader, write_pool, compute_pool, sink, seed, dev, result
                    )
                    del cache
                    ahead.done(job)
                    size += _nbytes(tp)
                    result.tensors += 1
                    if progress:
                        progress(tp.name)
                path = paths[shard_index]
                segments = (Segment(blocks=store_literal(store, prefix, sink), size=len(prefix)),) + tuple(
                    Segment(tensor=tp.name) for tp in shard
                )
                # No file checksum: it would mean reading every passed-through block; export checks
                # each block against its id instead (FORMAT.md, section 6).
                files.append(FileEntry(path, size, None, segments))
            if len(shards) > 1:
                weight_map = {tp.name: f.path for f, shard in zip(files, shards) for tp in shard}
                index = index_json(weight_map, sum(_nbytes(tp) for tp in plan.tensors))
                files.append(_literal_file("model.safetensors.index.json", index, store, sink))
            files += _carried_files(store, plan, {tp.out_dtype for tp in plan.tensors}, sink)
        finally:
            ahead.close()
            sink.close()
    result.written_bytes = sink.written_bytes
    result.bytes_read = result.bytes_read_base + result.bytes_read_experts
    manifest = Manifest(
        block_bytes=store.block_bytes,
        tensors=tuple(out_entries.values()),
        files=tuple(files),
        base=plan.base_snapshot,
        parents=tuple(plan.input_snapshots()),
        operation={
            "op": "merge",
            "engine": ENGINE_VERSION,
            "method": plan.method.name,
            "query": plan.query.text,
            "seed": seed,
            "inputs": {model: sid.hex() for model, sid in plan.models.items()},
            "base_model": plan.base,
            **({"budget": plan.budget} if plan.budget else {}),
            "resolved": [
                {
                    "tensor": tp.name,
                    "parameters": tp.shared,
                    "inputs": [
                        {"model": i.model, "tensor": i.tensor, "parameters": tp.per_input[k]}
                        for k, i in enumerate(tp.inputs)
                    ],
                }
                for tp in plan.tensors
            ],
        },
    )
    result.id = manifest.id
    store.commit(
        Commit(
            manifests=[manifest.encode()], refs={name: result.id} if name else {}, message=f"merge {plan.method.name}"
        ),
        expect={name: old} if name else None,
    )
    result.seconds = time.monotonic() - started
    return result


def _merge_one(
    store,
    plan: MergePlan,
    job: _Job,
    cache: dict[bytes, bytes] | None,
    reader: _Reader,
    pool: ThreadPoolExecutor,
    compute_pool: ThreadPoolExecutor,
    sink: BlockSink,
    seed: int,
    dev: str,
    result: MergeResult,
) -> TensorEntry:
    """Merge one output tensor from the blocks its job read (a stream reads as it goes); write its blocks
    (hashed and encoded in `pool`; block-wise merges compute in `compute_pool`)."""
    tp, entries, base_entry = job.tp, job.entries, job.base_entry
    if job.mode == "pass":
        source = entries[job.passthrough]
        same_as_base = base_entry is not None and base_entry.blocks == source.blocks
        return TensorEntry(
            tp.name, tp.out_dtype, tp.shape, source.blocks, _zero_stats(source) if same_as_base else None
        )
    writer = _OutputWriter(store, pool, sink, tp, base_entry, reader, result)
    if job.mode == "blocks":
        if job.reads_ahead:
            load = lambda positions: cache  # noqa: E731 -- held whole: read ahead
        else:
            _skip_unchanged(job, result)
            load = lambda positions: _read_positions(job, positions, reader, result)  # noqa: E731
        merged = blockmerge.merge_blocks(
            plan.method.name,
            tp.name,
            entries,
            tp.base_index,
            tp.shared,
            tp.per_input,
            job.layout,
            load,
            seed,
            dev,
            compute_pool,
        )
        for j, block, stats, base_raw in merged:
            if block is None:
                writer.keep(job.layout.base_blocks[j])
            else:
                writer.write_block(block, stats, base_raw)
        return writer.finish()
    from mpstore.torch_dtypes import TORCH_DTYPES, to_torch

    _TORCH_THREADS.limit()
    out_dtype = TORCH_DTYPES[tp.out_dtype]
    if job.mode == "stream":
        cols = tp.shape[-1]
        compute = TORCH_DTYPES[tp.compute_dtype]
        rows = _RowReader(store, tp, entries, reader, result, compute, dev, cols, job.dropped)
        seeds = [tensor_seed(seed, f"{tp.name}#{k}") for k in range(len(entries))]
        for chunk in stream_merge(
            plan.method.name,
            rows,
            _numel(tp.shape) // cols,
            max(1, CHUNK_ELEMENTS // cols),
            tp.base_index,
            tp.shared,
            tp.per_input,
            seeds,
        ):
            writer.write(chunk.to(dtype=out_dtype).to("cpu"), rows.cache)
    else:
        compute = TORCH_DTYPES[tp.compute_dtype]
        # One input at a time: its bytes are joined once and dropped when converted.
        tensors = [
            to_torch(bytearray(b"".join(cache[b] for b in e.blocks)), e.dtype, e.shape).to(device=dev, dtype=compute)
            for e in entries
        ]
        # base blocks in hand are kept for XOR coding
        cache = {b: cache[b] for b in base_entry.blocks} if base_entry is not None else {}
        generator = torch.Generator().manual_seed(tensor_seed(seed, tp.name)) if plan.method.randomized else None
        merged = merge_tensor(plan.method.name, tensors, tp.base_index, tp.shared, tp.per_input, generator)
        del tensors
        writer.write(merged.to(dtype=out_dtype).to("cpu"), cache)
    return writer.finish()


def _inputs_of(plan: MergePlan, tp: TensorPlan, manifests, base_manifest):
    """(input entries, the base's aligned entry or None, index of an input passed through or None)."""
    entries = [manifests[i.snapshot].tensor_map()[i.tensor] for i in tp.inputs]
    if plan.drops and tp.base_index is not None:
        # a dropped expert block is the base's block: a zero delta, never read
        base_blocks = entries[tp.base_index].blocks
        for k, entry in enumerate(entries):
            dropped = plan.drops.get((tp.name, k))
            if dropped:
                blocks = tuple(base_blocks[i] if i in dropped else b for i, b in enumerate(entry.blocks))
                entries[k] = TensorEntry(entry.name, entry.dtype, entry.shape, blocks, entry.delta)
    base_entry = base_manifest.tensor_map().get(tp.name) if base_manifest else None
    if base_entry is not None and (base_entry.dtype != tp.out_dtype or base_entry.shape != tp.shape):
        base_entry = None  # blocks would not line up: no XOR reference, no statistics
    # An output that is exactly one input's tensor keeps that input's blocks: nothing read or written.
    passthrough = tp.copy_from
    if (
        passthrough is None
        and plan.method.name in DELTA_METHODS
        and tp.base_index is not None
        and identity_on_equal_inputs(plan.method.name, tp.shared)
        and all(e.blocks == entries[tp.base_index].blocks for e in entries)
    ):
        passthrough = tp.base_index
    if passthrough is not None and entries[passthrough].dtype != tp.out_dtype:
        passthrough = None
    return entries, base_entry, passthrough


def _is_streamed(plan: MergePlan, tp: TensorPlan) -> bool:
    return (
        _numel(tp.shape) > STREAM_MIN_ELEMENTS
        and len(tp.shape) >= 2
        and streamable(plan.method.name, tp.shared, len(tp.shape))
    )


def estimate_reads(store: "Store", plan: MergePlan) -> tuple[MergeResult, dict[str, dict], int]:
    """What executing the plan would read, without reading: the executor's own read logic, run dry.

    Returns the totals (as a MergeResult), per tensor its mode, passes and bytes read, and the bytes
    that decoding will produce.
    """
    result = MergeResult(id=b"", name=None)
    reader = _Reader(store, None, result, dry=True)
    manifests = {sid: store.manifest(sid) for sid in set(plan.models.values())}
    base_manifest = manifests[plan.base_snapshot] if plan.base_snapshot else None
    rows_of: dict[str, dict] = {}
    for tp in plan.tensors:
        before = result.bytes_read_base + result.bytes_read_experts
        job = _job(store, plan, tp, manifests, base_manifest)
        if job.mode == "stream":
            cols = tp.shape[-1]
            rows = _RowReader(store, tp, job.entries, reader, result, None, None, cols, job.dropped)
            chunk_rows = max(1, CHUNK_ELEMENTS // cols)
            n_rows = _numel(tp.shape) // cols
            passes = stream_passes(plan.method.name, tp.shared, tp.per_input, tp.base_index)
            for _ in range(passes):
                for r0 in range(0, n_rows, chunk_rows):
                    rows(r0, min(n_rows, r0 + chunk_rows))
            if job.base_entry is not None:  # the output writer reads the base blocks no input holds, to XOR-code
                held = {b for e in job.entries for b in e.blocks}
                result.bytes_read_base += reader.read([b for b in job.base_entry.blocks if b not in held], {})
        elif job.reads_ahead:
            _read_job(job, reader, result)
            passes = 0 if job.mode == "pass" else 1
        else:
            _skip_unchanged(job, result)
            passes = blockmerge.read_passes(plan.method.name, tp.shared, tp.per_input, tp.base_index, job.layout)
            for _ in range(passes):
                for positions in job.layout.windows:
                    _read_positions(job, positions, reader, result)
        if job.mode != "pass":
            result.tensors += 1
        rows_of[tp.name] = {
            "mode": {"pass": "passthrough", "stream": "streamed"}.get(job.mode, job.mode),
            "passes": passes,
            "bytes_read": result.bytes_read_base + result.bytes_read_experts - before,
        }
    result.bytes_read = result.bytes_read_base + result.bytes_read_experts
    return result, rows_of, reader.raw_bytes


def block_marks(store: "Store", plan: MergePlan) -> dict[str, list[str]]:
    """The physical plan per block position: for each output tensor, one string per input with a mark
    per block: R read, S skipped (identical to the base's block: a zero delta), H shared with an
    input read already (read once), D dropped by the budget, - not needed (the output passes an
    input's blocks through, or, merged block-wise, takes the base's block where no expert differs)."""
    manifests = {sid: store.manifest(sid) for sid in set(plan.models.values())}
    base_manifest = manifests[plan.base_snapshot] if plan.base_snapshot else None
    marks: dict[str, list[str]] = {}
    for tp in plan.tensors:
        job = _job(store, plan, tp, manifests, base_manifest)
        entries, dropped = job.entries, job.dropped
        if job.mode == "pass":
            marks[tp.name] = ["-" * len(e.blocks) for e in entries]
            continue
        base_blocks = entries[tp.base_index].blocks if tp.base_index is not None else ()
        seen = set(base_blocks)
        rows = []
        for k, entry in enumerate(entries):
            if k == tp.base_index:
                needed = job.layout.changed if job.layout else [True] * len(entry.blocks)
                rows.append("".join("R" if n else "-" for n in needed))
                continue
            row = []
            for i, block in enumerate(entry.blocks):
                if block in seen:
                    row.append(
                        {"dropped": "D", "same_as_base": "S", "shared": "H"}[
                            _skip_reason(k, i, block, base_blocks, dropped)
                        ]
                    )
                else:
                    row.append("R")
                    seen.add(block)
            rows.append("".join(row))
        marks[tp.name] = rows
    return marks


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _RowReader:
    """Rows [r0, r1) of every input, as tensors; each block is read once per pass (base first, blocks
    equal to the base's or to another input's taken from memory), the blocks that straddle the end of
    the chunk kept for the next one."""

    def __init__(
        self, store, tp: TensorPlan, entries, reader: _Reader, result: MergeResult, compute, dev, cols, dropped
    ):
        self.store, self.tp, self.entries, self.reader, self.result = store, tp, entries, reader, result
        self.dropped = dropped
        self.compute, self.dev, self.cols = compute, dev, cols
        self.cache: dict[bytes, bytes] = {}
        self.per_block = [dtype_named(e.dtype).block_elements(store.block_bytes) for e in entries]

    def __call__(self, r0: int, r1: int) -> list[torch.Tensor]:
        e0, e1 = r0 * self.cols, r1 * self.cols
        spans = [(e0 // n, (e1 - 1) // n) for n in self.per_block]
        ids = [list(e.blocks[i0 : i1 + 1]) for e, (i0, i1) in zip(self.entries, spans)]
        b = self.tp.base_index
        cache = dict(self.cache)
        base_ids = self.entries[b].blocks if b is not None else ()
        ranges = [list(enumerate(blocks, start=i0)) for (i0, _), blocks in zip(spans, ids)]
        _read_inputs(self.reader, self.result, ranges, b, base_ids, self.dropped, cache)
        self.cache = {x: cache[x] for blocks in ids for x in blocks}
        if self.reader.dry:
            return []
        tensors = []
        from mpstore.torch_dtypes import to_torch

        for e, blocks, (i0, _), per in zip(self.entries, ids, spans, self.per_block):
            width = dtype_named(e.dtype).bits // 8
            raw = b"".join(cache[x] for x in blocks)[(e0 - i0 * per) * width : (e1 - i0 * per) * width]
            tensors.append(
                to_torch(bytearray(raw), e.dtype, (r1 - r0, self.cols)).to(device=self.dev, dtype=self.compute)
            )
        return tensors  # self.cache keeps this chunk's blocks: the next chunk and the output's XOR coding use them


class _OutputWriter:
    """Cuts a tensor's output bytes into blocks as they arrive and hands each to mpstore.writer."""

    def __init__(
        self,
        store,
        pool: ThreadPoolExecutor,
        sink: BlockSink,
        tp: TensorPlan,
        base_entry,
        reader: _Reader,
        result: MergeResult,
    ):
        self.store, self.pool, self.sink, self.tp = store, pool, sink, tp
        self.reader, self.result = reader, result
        self.base_cache: dict[bytes, bytes] = {}
        self.dtype = dtype_named(tp.out_dtype)
        self.step = self.dtype.nbytes(self.dtype.block_elements(store.block_bytes))
        self.base_blocks = base_entry.blocks if base_entry is not None else None
        self.buffer = bytearray()
        self.jobs: list = []
        self.ids: list[bytes] = []
        self.stats: list = []

    def write(self, out: torch.Tensor, base_cache: dict[bytes, bytes]) -> None:
        """Append output values; `base_cache` holds base blocks already read (for XOR coding)."""
        self.base_cache = base_cache
        flat = out.contiguous().reshape(-1)
        self.buffer += flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        while len(self.buffer) >= self.step:
            self._emit(bytes(self.buffer[: self.step]), base_cache)
            del self.buffer[: self.step]

    def write_block(self, data, stats: tuple, base_raw: bytes) -> None:
        """Append one whole output block (bytes-like) whose delta statistics are known."""
        assert not self.buffer, "write_block() between whole blocks only"
        self._emit(data, {self.base_blocks[len(self.jobs)]: base_raw}, stats)

    def keep(self, block: bytes) -> None:
        """The next output block is the base's block at this position (nothing changed): not written."""
        assert not self.buffer, "keep() between whole blocks only"
        done: Future = Future()
        done.set_result((block, (0.0, 0.0, 0), None))
        self.jobs.append((0, done))

    def _emit(self, chunk, base_cache: dict[bytes, bytes], stats: tuple | None = None) -> None:
        j = len(self.jobs)
        base_block = self.base_blocks[j] if self.base_blocks is not None else None
        if base_block is not None and base_block not in base_cache:
            # the base is not an input of this tensor (or this block was read in an earlier chunk):
            # read it here, so the I/O is counted
            self.result.bytes_read_base += self.reader.read([base_block], base_cache)
        self.jobs.append(
            (
                len(chunk),
                self.pool.submit(
                    process_block,
                    self.store,
                    self.dtype,
                    memoryview(chunk),
                    None,
                    base_block,
                    self.sink,
                    base_cache.get(base_block) if base_block else None,
                    stats,
                ),
            )
        )
        if len(self.jobs) - len(self.ids) > 8:
            self._drain(len(self.jobs) - 4)

    def _drain(self, upto: int) -> None:
        for raw_len, job in self.jobs[len(self.ids) : upto]:
            bid, st, encoded = job.result()
            if encoded is not None and bid not in self.sink.written:
                codec, payload, ref = encoded
                self.sink.add(bid, codec, self.dtype.group_width, raw_len, payload, ref)
            self.ids.append(bid)
            self.stats.append(st)

    def finish(self) -> TensorEntry:
        if self.buffer:
            self._emit(bytes(self.buffer), self.base_cache)
            self.buffer = bytearray()
        self._drain(len(self.jobs))
        tp = self.tp
        return TensorEntry(
            tp.name,
            tp.out_dtype,
            tp.shape,
            tuple(self.ids),
            tuple(self.stats) if self.base_blocks is not None else None,
        )


def _zero_stats(entry: TensorEntry) -> tuple:
    return tuple((0.0, 0.0, 0) for _ in entry.blocks)
