"""Block-wise merging for task_arithmetic, ties, dare_ties and dare_linear: only what differs is touched.

A tensor is seen as block positions. Where no expert's block differs from the base's, the merged block
is the base's block: nothing is read, computed or written (a zero delta adds nothing). Elsewhere only
the experts whose block differs are read, and each position is merged in one pass over
[changed experts x block elements] (mpexec.kernels on the CPU, torch on a GPU), in worker threads.

Statistics over the whole tensor are exact and come first:
* TIES keeps the max(1, int(density * numel)) largest |delta| of each expert. The cut is found by a
  radix select on the float32 bits of |delta| (a histogram of the high 16 bits, then of the low 16
  inside the bin of the cut); elements at unchanged positions are zeros and rank last. A delta of
  bfloat16 weights rarely needs more than 8 significant bits, so the cut's bin usually holds one value
  and magnitudes above it: the first histogram counts those, and a held tensor then needs no second
  pass. A held tensor mostly needs no histogram at all: a sample predicts the cut's bin and a pass of
  comparisons confirms it (_predict_cuts). Of the magnitudes equal to the cut, the first ones in
  element order are kept, as many as the count allows.
* DARE keeps each element with probability density, from a hash of (seed, tensor, input, position)
  and the element's index, so masks depend on nothing else (not on chunking, threads or device); its
  L1 rescale divides sum |delta| by the sum over the kept elements, over the whole tensor.

A tensor of at most `window_elements` is held whole: read once, statistics and merge share the
blocks. A larger one is merged in windows of positions, read once per statistics pass and once to
merge, so memory stays flat whatever the tensor's size. The executor (mpexec.execute) reads the blocks
(see Layout.reads) and writes the merged ones; this module only computes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpstore.codecs import ungroup_words
from mpstore.dtypes import dtype_named
from mpstore.snapshot import TensorEntry

from .lazy_torch import torch
from .methods import TASK_ARITHMETIC_FAMILY

SPARSIFICATIONS = (None, "magnitude", "random")  # della and breadcrumbs: the whole-tensor kernels
DTYPES = ("BF16", "F16", "F32")
KERNEL_DTYPES = ("BF16", "F32")  # what mpexec.kernels reads; float16 goes through torch
HIGH_BINS = 1 << 16
SAMPLE_EVERY = 64  # TIES cut prediction: one |delta| in 64 is sampled...
SAMPLE_ALL = 1 << 16  # ...or all of them, in tensors this small
PREDICTED_BINS = 4  # TIES cut prediction: bins counted around the sample's estimate
# Blocks are decoded into bytes objects, which torch can only view read-only; nothing here writes to
# those views, so the warning says nothing.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

Stats = tuple[float, float, int]  # L2 norm, max |out - base|, changed elements (see mpstore.writer)


def applicable(method: str, shared, compute_dtype: str, out_dtype: str, entries: Sequence[TensorEntry], base_index):
    """Whether the tensor can be merged block-wise: a task-arithmetic method this module implements
    (TIES without its rarely used rescale), computed in float32, every input (the base included) stored
    in the output's dtype and shape, so that positions line up and an unchanged one is the base's block."""
    family = TASK_ARITHMETIC_FAMILY.get(method)
    if family is None or family[0] not in SPARSIFICATIONS or base_index is None:
        return False
    if family[0] == "magnitude" and shared["rescale"]:
        return False
    if compute_dtype != "F32" or out_dtype not in DTYPES:
        return False
    base = entries[base_index]
    return all(e.dtype == out_dtype and e.shape == base.shape and len(e.blocks) == len(base.blocks) for e in entries)


@dataclass
class Layout:
    """Which inputs differ from the base at each block position (after budget drops), and the windows
    of positions merged together: one window when the tensor is held whole, else windows of at most
    `window_elements` elements per input, read again for each pass."""

    base_blocks: tuple[bytes, ...]
    changed: list[list[int]]  # per position: input indices whose block differs from the base's
    sizes: list[int]  # elements per position
    windows: list[list[int]]  # positions with a change, grouped

    @classmethod
    def of(cls, entries: Sequence[TensorEntry], base_index: int, block_bytes: int, window_elements: int) -> "Layout":
        base = entries[base_index]
        numel = 1
        for d in base.shape:
            numel *= d
        per = dtype_named(base.dtype).block_elements(block_bytes)
        sizes = [min(per, numel - i * per) for i in range(len(base.blocks))]
        changed = [
            [k for k, e in enumerate(entries) if k != base_index and e.blocks[j] != block]
            for j, block in enumerate(base.blocks)
        ]
        windows: list[list[int]] = []
        size = 0
        for j, ks in enumerate(changed):
            if not ks:
                continue
            if not windows or (numel > window_elements and size + sizes[j] > window_elements):
                windows.append([])
                size = 0
            windows[-1].append(j)
            size += sizes[j]
        return cls(base.blocks, changed, sizes, windows)

    def reads(self, entries: Sequence[TensorEntry], positions: Sequence[int]) -> tuple[list[bytes], list[bytes]]:
        """(base blocks, expert blocks) merging these positions needs."""
        base = [self.base_blocks[j] for j in positions]
        experts = [entries[k].blocks[j] for j in positions for k in self.changed[j]]
        return base, experts

    def held(self, k: int) -> int:
        """Elements of input k at positions where it differs from the base."""
        return sum(n for n, ks in zip(self.sizes, self.changed) if k in ks)


def block_seed(seed: int, tensor: str, k: int, j: int) -> int:
    """The key of input k's DARE mask at block position j of a tensor."""
    digest = hashlib.sha256(f"{seed}:{tensor}#{k}@{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class _Pruning:
    """How one expert is pruned, from the tensor's statistics."""

    cut: int = -1  # TIES: float32 bits of |delta| at the cut (-1: no trimming)
    k: int = 0  # TIES: elements to keep
    above: int = 0  # TIES, between its passes: elements above the high 16 bits of the cut
    tied: int = 0  # TIES: elements equal to the cut still to keep, in element order
    prob: float = -1.0  # DARE: keep probability (-1: no random pruning)
    scale: float = 1.0  # DARE: the L1 rescale
    passes: int = 0  # statistics passes over the tensor still to run (TIES: 2 histograms, then 1)


def _prunings(method: str, shared, per_input, base_index: int, layout: Layout) -> dict[int, _Pruning]:
    sparsification = TASK_ARITHMETIC_FAMILY[method][0]
    numel = sum(layout.sizes)
    out: dict[int, _Pruning] = {}
    for k, p in enumerate(per_input):
        if k == base_index:
            continue
        density = p["density"]
        if sparsification == "magnitude" and density < 1:
            keep = max(1, int(density * numel)) if density > 0 else 0
            if keep == 0:
                out[k] = _Pruning(cut=0x7FFFFFFF)  # no magnitude above it, none of it kept: nothing kept
            elif keep < layout.held(k):  # else every element held is among the top k
                out[k] = _Pruning(k=keep, passes=2)
            else:
                out[k] = _Pruning()
        elif sparsification == "random" and density < 1:
            out[k] = _Pruning(prob=float(np.float32(density)), passes=1 if shared["rescale"] else 0)
        else:
            out[k] = _Pruning()
    return out


def read_passes(method: str, shared, per_input, base_index: int, layout: Layout) -> int:
    """How many times merge_blocks loads each window: once when the tensor is held whole; else once per
    statistics pass (two for the TIES cut, one for DARE's rescale) and once to merge."""
    if len(layout.windows) <= 1:
        return len(layout.windows)
    prunings = _prunings(method, shared, per_input, base_index, layout)
    return 1 + max((p.passes for p in prunings.values()), default=0)


def merge_blocks(
    method: str,
    name: str,
    entries: Sequence[TensorEntry],
    base_index: int,
    shared: dict[str, Any],
    per_input: Sequence[dict[str, Any]],
    layout: Layout,
    load: Callable[[list[int]], dict[bytes, bytes]],
    seed: int,
    device: str,
    pool: ThreadPoolExecutor,
) -> Iterator[tuple[int, Any, Stats | None, bytes | None]]:
    """Yield (position, merged bytes, statistics, base bytes) in position order; merged bytes None where
    the block is the base's. `load(positions)` returns the decoded blocks of Layout.reads: once per
    window and pass (see read_passes). Blocks are merged in `pool`'s threads."""
    backend = _backend(entries[base_index].dtype, device)
    consensus = TASK_ARITHMETIC_FAMILY[method][1]
    prunings = _prunings(method, shared, per_input, base_index, layout)
    keys = {(k, j): block_seed(seed, name, k, j) for j, ks in enumerate(layout.changed) for k in ks}
    held = load(layout.windows[0]) if len(layout.windows) == 1 else None

    def windows():  # (positions, their blocks), the next window read while this one is merged
        if held is not None:
            yield layout.windows[0], held
            return
        with ThreadPoolExecutor(1, "mpexec-window") as reader:
            ahead = reader.submit(load, layout.windows[0])
            for i, positions in enumerate(layout.windows):
                raw = ahead.result()
                if i + 1 < len(layout.windows):
                    ahead = reader.submit(load, layout.windows[i + 1])
                yield positions, raw

    # statistics: TIES's cut, DARE's rescale (sums); one job per expert and window
    ties: dict[int, dict[int, int]] = {}  # per expert, per position: magnitudes equal to the cut, when known
    if held is not None:
        _predict_cuts(prunings, layout, entries, held, backend, pool, ties)
    while any(p.passes for p in prunings.values()):
        high = {k: np.zeros(HIGH_BINS, np.int64) for k, p in prunings.items() if p.k and p.passes == 2}
        inexact = {k: np.zeros(HIGH_BINS, np.int64) for k in high}
        low = {k: np.zeros(HIGH_BINS, np.int64) for k, p in prunings.items() if p.k and p.passes == 1}
        sums: dict[int, list] = {k: [] for k, p in prunings.items() if p.prob >= 0 and p.passes}
        for positions, raw in windows():
            jobs = []
            for k in sorted(set(high) | set(low) | set(sums)):
                mine = [j for j in positions if k in layout.changed[j]]
                blocks = [(raw[entries[k].blocks[j]], raw[layout.base_blocks[j]]) for j in mine]
                if not blocks:
                    continue
                p = prunings[k]
                if k in high:
                    jobs.append((k, pool.submit(backend.high_counts, blocks)))
                elif k in low:
                    jobs.append((k, pool.submit(backend.low_counts, blocks, p.cut >> 16)))
                else:
                    seeds = [keys[(k, j)] for j in mine]
                    jobs.append((k, pool.submit(backend.dare_sums, blocks, seeds, p.prob)))
            for k, job in jobs:
                if k in high:
                    counts, inexact_counts = job.result()
                    high[k] += counts
                    inexact[k] += inexact_counts
                elif k in low:
                    low[k] += job.result()
                else:
                    sums[k] += job.result()
        for k, counts in high.items():  # the high 16 bits of the cut
            p = prunings[k]
            bin_, p.above = _bin_of_rank(counts, p.k - 1)
            p.cut = bin_ << 16
            wanted = p.k - p.above  # from this bin, whose inexact magnitudes all exceed its exact one
            if held is not None and wanted > inexact[k][bin_]:  # the cut is the bin's exact value
                p.tied, p.passes = wanted - int(inexact[k][bin_]), 0
            else:
                p.passes = 1
        for k, counts in low.items():  # the low 16 bits, ranked inside that bin
            p = prunings[k]
            bits, above_low = _bin_of_rank(counts, p.k - 1 - p.above)
            p.cut |= bits
            p.tied = p.k - p.above - above_low
            p.passes = 0
        for k, per_block in sums.items():  # exact sums: the same whatever the windows
            before, after = math.fsum(b for b, _ in per_block), math.fsum(a for _, a in per_block)
            prunings[k].scale = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
            prunings[k].passes = 0

    # the merge, window by window, positions in parallel
    weights = {k: p["weight"] for k, p in enumerate(per_input) if k != base_index}
    total = sum(weights.values())
    done = 0
    for positions, raw in windows():
        quotas = _tie_quotas(prunings, layout, entries, positions, raw, backend, pool, ties)
        jobs = []
        for j in positions:
            ks = layout.changed[j]
            jobs.append(
                pool.submit(
                    backend.combine,
                    raw[layout.base_blocks[j]],
                    [raw[entries[k].blocks[j]] for k in ks],
                    [weights[k] for k in ks],
                    [prunings[k] for k in ks],
                    [quotas.get((k, j), 0) for k in ks],
                    [keys[(k, j)] for k in ks],
                    consensus,
                    shared,
                    total - sum(weights[k] for k in ks),
                )
            )
        for j, job in zip(positions, jobs):
            for skipped in range(done, j):  # positions where nothing changed
                yield skipped, None, None, None
            out, stats = job.result()
            yield j, out, stats, raw[layout.base_blocks[j]]
            done = j + 1
    for skipped in range(done, len(layout.sizes)):
        yield skipped, None, None, None


def _predict_cuts(prunings: dict[int, _Pruning], layout: Layout, entries, held, backend, pool, ties) -> None:
    """The TIES cut of a held tensor without a histogram, most of the time.

    A sample of |delta| predicts a few high-16-bit bins around the cut; one pass of comparisons (which
    vectorize, where a histogram's scattered increments do not) counts, block by block, the magnitudes
    at or above each bin and equal to each bin's exact value (low 16 bits zero). If the cut's rank falls
    in one of the bins, that is its high 16 bits, exactly as the histogram finds them; if moreover the
    rank falls among the bin's exact values (bfloat16 deltas mostly are), the cut is known and so are
    the ties at each position. Otherwise the tensor's histogram passes run as before."""
    jobs = {}
    for k, p in prunings.items():
        mine = [j for j in layout.windows[0] if k in layout.changed[j]]
        if p.k and mine:
            blocks = [(held[entries[k].blocks[j]], held[layout.base_blocks[j]]) for j in mine]
            jobs[k] = (mine, pool.submit(_count_predicted_bins, backend, blocks, p.k - 1, layout.held(k)))
    for k, (mine, job) in jobs.items():
        p = prunings[k]
        first_bin, at_least, equal = job.result()  # per block, per edge
        ge, eq = at_least.sum(axis=0), equal.sum(axis=0)
        found = [r for r in range(len(ge) - 1) if ge[r + 1] <= p.k - 1 < ge[r]]
        if not found:
            continue  # the prediction missed: histograms
        r = found[0]
        p.cut, p.above = (first_bin + r) << 16, int(ge[r + 1])
        inexact = int(ge[r] - ge[r + 1] - eq[r])  # in the bin, above its exact value
        wanted = p.k - p.above
        if wanted > inexact:  # past the bin's inexact magnitudes, among its exact ones
            p.tied, p.passes = wanted - inexact, 0
            ties[k] = {j: int(count) for j, count in zip(mine, equal[:, r])}
        else:
            p.passes = 1  # the low 16 bits still to rank


def _count_predicted_bins(backend, blocks, rank: int, held: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The high-16-bit bins where a sample of |delta| puts descending rank `rank` of `held` magnitudes,
    give or take the sample's error (at most PREDICTED_BINS, from the lowest), and per block and bin
    edge the counts at or above it and equal to it (the last edge is the top of the last bin)."""
    sample = backend.sample(blocks, SAMPLE_EVERY if held > SAMPLE_ALL else 1)
    n = len(sample)
    at = rank * n / held  # descending
    margin = 4 * math.sqrt(at * (1 - at / n)) + 2  # binomial standard deviations of the estimate
    spots = [n - 1 - min(n - 1, max(0, round(x))) for x in (at - margin, at, at + margin)]  # ascending
    top, middle, bottom = (int(v) >> 16 for v in np.partition(sample, sorted(set(spots)))[spots])
    first = max(bottom, middle - (PREDICTED_BINS - 1) // 2)
    last = min(top, first + PREDICTED_BINS - 1)
    edges = np.arange(first, last + 2, dtype=np.int64) << 16
    at_least, equal = backend.edge_counts(blocks, edges)
    return first, at_least, equal


def _sample_indices(n: int, every: int) -> np.ndarray:
    """n // every element indices (all of them for every <= 1) spread over [0, n) by a multiplicative
    hash: a strided sample can fall in step with the rows of a structured delta (a LoRA's)."""
    if every <= 1:
        return np.arange(n)
    spread = np.arange(max(1, n // every), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((spread >> np.uint64(32)) % np.uint64(n)).astype(np.int64)


def _tie_quotas(prunings: dict[int, _Pruning], layout: Layout, entries, positions, raw, backend, pool, ties):
    """How many magnitudes equal to its cut each expert keeps at each of these positions: the first
    ones in element order, so counted block by block, in order, while the expert's quota lasts. `ties`
    has the counts of the experts whose cut was predicted; the others are counted here."""
    mine = {k: [j for j in positions if k in layout.changed[j]] for k in prunings}
    tied = [k for k, p in prunings.items() if p.cut >= 0 and p.tied > 0 and mine[k]]
    jobs = {}
    for k in tied:
        if k not in ties:
            blocks = [(raw[entries[k].blocks[j]], raw[layout.base_blocks[j]]) for j in mine[k]]
            jobs[k] = pool.submit(backend.equal, blocks, prunings[k].cut)
    quotas = {}
    for k in tied:
        counts = jobs[k].result() if k in jobs else [ties[k][j] for j in mine[k]]
        for j, count in zip(mine[k], counts):
            taken = min(count, prunings[k].tied)
            prunings[k].tied -= taken
            quotas[(k, j)] = taken
    return quotas


def _bin_of_rank(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin holding the value of descending rank `rank`, number of values in the bins above it)."""
    above = np.cumsum(counts[::-1])[::-1] - counts
    b = int(np.flatnonzero((above <= rank) & (rank < above + counts))[0])
    return b, int(above[b])


# ---------------------------------------------------------------------------- backends


_decoder_loaded = threading.Event()  # set once load_kernels has loaded kernels.ungroup_xor


def load_kernels(method: str, dtypes: set[str]) -> None:
    """Import mpexec.kernels and load the compiled code a merge by `method` of these dtypes uses (from
    numba's cache after the first run), the readers' decoder first."""
    from . import kernels

    words = sorted(dtypes & set(KERNEL_DTYPES))
    kernels.warm_up(words, ["ungroup_xor"])
    _decoder_loaded.set()
    sparsification = TASK_ARITHMETIC_FAMILY[method][0]
    statistics = {"magnitude": ["edge_counts", "high_counts", "low_counts"], "random": ["dare_sums"]}
    kernels.warm_up(words, ["combine", *statistics.get(sparsification, [])])


def ungroup_xor(planes: np.ndarray, ref: np.ndarray, out: np.ndarray) -> None:
    """The executor's readers decode XOR-coded blocks with kernels.ungroup_xor (codecs.decode) once
    load_kernels has loaded it; until then with numpy, so that reading starts while numba does (its
    import and first load take ~0.4 s)."""
    if _decoder_loaded.is_set():
        from . import kernels

        kernels.ungroup_xor(planes, ref, out)
    else:
        np.bitwise_xor(ungroup_words(planes, out.itemsize), ref, out=out)


def _backend(dtype: str, device: str):
    if device == "cpu" and dtype in KERNEL_DTYPES:
        return _KernelBackend(dtype)
    return _TorchBackend(dtype, device)


class _KernelBackend:
    """The CPU: mpexec.kernels on the stored words (numba, compiled on first use)."""

    def __init__(self, dtype: str):
        from . import kernels

        self.kernels = kernels
        self.word = np.uint16 if dtype == "BF16" else np.uint32
        self.shift = 16 if dtype == "BF16" else 0

    def _words(self, raw: bytes | memoryview) -> np.ndarray:
        words = np.frombuffer(raw, self.word)
        words.flags.writeable = False  # one compiled signature whether the block came as bytes or not
        return words

    def high_counts(self, blocks: list[tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """Over (expert, base) blocks: histogram of the high 16 bits of |expert - base| as float32 bits,
        and per bin, how many of those have low 16 bits that are not zero."""
        # |delta| has no sign bit, so its high 16 bits are below 2**15; a window's counts fit in int32
        counts = np.zeros((4, HIGH_BINS // 2), np.int32)
        inexact = np.zeros(HIGH_BINS // 2, np.int32)
        for expert, base in blocks:
            self.kernels.high_counts(self._words(expert), self._words(base), self.shift, counts, inexact)
        return _padded(counts.sum(axis=0)), _padded(inexact)

    def low_counts(self, blocks: list[tuple[bytes, bytes]], bin_: int) -> np.ndarray:
        """Histogram of the low 16 bits of the |expert - base| whose high 16 bits are `bin_`."""
        counts = np.zeros((4, HIGH_BINS + 1), np.int32)  # the last column: elements outside the bin
        for expert, base in blocks:
            self.kernels.low_counts(self._words(expert), self._words(base), self.shift, bin_, counts)
        return counts[:, :HIGH_BINS].sum(axis=0, dtype=np.int64)

    def sample(self, blocks: list[tuple[bytes, bytes]], every: int) -> np.ndarray:
        """float32 bits of |expert - base| at one element in `every` of each block (_sample_indices)."""
        parts = []
        for expert, base in blocks:
            e_words, b_words = self._words(expert), self._words(base)
            at = _sample_indices(len(b_words), every)
            e = (e_words[at].astype(np.uint32) << self.shift).view(np.float32)
            b = (b_words[at].astype(np.uint32) << self.shift).view(np.float32)
            parts.append(np.abs(e - b).view(np.uint32))
        return np.concatenate(parts)

    def edge_counts(self, blocks: list[tuple[bytes, bytes]], edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per (expert, base) block and edge (float32 bits): how many |expert - base| are at or above
        the edge, and how many equal it; two [blocks, edges] arrays."""
        at_least = np.zeros((len(blocks), len(edges)), np.int64)
        equal = np.zeros((len(blocks), len(edges)), np.int64)
        for (expert, base), ge, eq in zip(blocks, at_least, equal):
            self.kernels.edge_counts(self._words(expert), self._words(base), self.shift, edges, ge, eq)
        return at_least, equal

    def equal(self, blocks: list[tuple[bytes, bytes]], cut: int) -> list[int]:
        """Per (expert, base) block, how many |expert - base| equal the cut."""
        return [int(count) for count in self.edge_counts(blocks, np.array([cut], np.int64))[1][:, 0]]

    def dare_sums(self, blocks: list[tuple[bytes, bytes]], keys: list[int], prob: float) -> list[tuple[float, float]]:
        """Per (expert, base) block: sum |delta|, and its sum over the elements DARE keeps."""
        return [
            self.kernels.dare_sums(self._words(expert), self._words(base), self.shift, np.uint64(key), prob)
            for (expert, base), key in zip(blocks, keys)
        ]

    def combine(self, base, experts, weights, prunings, quotas, keys, consensus, shared, omitted):
        base_words = self._words(base)
        expert_words = [self._words(raw) for raw in experts]  # referenced until the kernel returns
        assert all(len(words) == len(base_words) for words in expert_words)  # the kernel reads that many
        out = np.empty_like(base_words)
        stats = np.zeros(3)
        self.kernels.combine(
            base_words,
            np.array([words.ctypes.data for words in expert_words], np.int64),
            self.shift,
            np.array(weights, np.float64),
            np.array([p.scale for p in prunings], np.float64),
            np.array([p.cut for p in prunings], np.int64),
            np.array(quotas, np.int64),
            np.array(keys, np.uint64),
            np.array([p.prob for p in prunings], np.float32),
            bool(consensus),
            bool(shared["normalize"]),
            float(shared["lambda"]),
            float(omitted),
            out,
            stats,
        )
        return memoryview(out).cast("B"), (float(stats[0]), float(stats[1]), int(stats[2]))


def _padded(counts: np.ndarray) -> np.ndarray:
    """Counts over the high bins a magnitude can have, as int64 over all HIGH_BINS."""
    total = np.zeros(HIGH_BINS, np.int64)
    total[: len(counts)] = counts
    return total


def _on_worker_stream(method):
    """Run a backend method on its worker thread's own CUDA stream: one thread's copies then overlap
    another's arithmetic (on the default stream they would wait for each other). Each method ends by
    bringing its result to the host, which waits for that stream only."""

    @functools.wraps(method)
    def on_stream(self, *args):
        if self.device == "cpu":
            return method(self, *args)
        stream = getattr(self.local, "stream", None)
        if stream is None:
            stream = self.local.stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(stream):
            return method(self, *args)

    return on_stream


class _TorchBackend:
    """A GPU (or float16): the same arithmetic as mpexec.kernels in torch, blocks moved to the device
    through pinned memory, each worker thread on its own stream. Also run on the CPU by the tests,
    against the kernels."""

    def __init__(self, dtype: str, device: str):
        from mpstore.torch_dtypes import TORCH_DTYPES

        self.dtype, self.device = TORCH_DTYPES[dtype], device
        self.word = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[self.dtype]
        self.local = threading.local()

    def _stored(self, raw: bytes) -> torch.Tensor:
        stored = torch.frombuffer(raw, dtype=self.dtype)
        if self.device != "cpu":
            stored = stored.pin_memory().to(self.device, non_blocking=True)  # the copy overlaps compute
        return stored

    def _magnitudes(self, expert: bytes, base: bytes) -> torch.Tensor:
        """float32 bits of |expert - base| (non-negative: integer order is value order)."""
        return (self._stored(expert).float() - self._stored(base).float()).abs().view(torch.int32)

    @_on_worker_stream
    def high_counts(self, blocks: list[tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        total = torch.zeros(HIGH_BINS, dtype=torch.int64, device=self.device)
        inexact = torch.zeros(HIGH_BINS, dtype=torch.int64, device=self.device)
        for expert, base in blocks:
            bits = self._magnitudes(expert, base)
            total += torch.bincount(bits >> 16, minlength=HIGH_BINS)
            inexact += torch.bincount(bits[(bits & 0xFFFF) != 0] >> 16, minlength=HIGH_BINS)
        return total.cpu().numpy(), inexact.cpu().numpy()

    @_on_worker_stream
    def low_counts(self, blocks: list[tuple[bytes, bytes]], bin_: int) -> np.ndarray:
        total = torch.zeros(HIGH_BINS, dtype=torch.int64, device=self.device)
        for expert, base in blocks:
            bits = self._magnitudes(expert, base)
            total += torch.bincount(bits[(bits >> 16) == bin_] & 0xFFFF, minlength=HIGH_BINS)
        return total.cpu().numpy()

    @_on_worker_stream
    def sample(self, blocks: list[tuple[bytes, bytes]], every: int) -> np.ndarray:
        parts = []
        for expert, base in blocks:
            bits = self._magnitudes(expert, base)
            parts.append(bits[torch.from_numpy(_sample_indices(bits.numel(), every)).to(self.device)])
        return torch.cat(parts).cpu().numpy().view(np.uint32)

    @_on_worker_stream
    def edge_counts(self, blocks: list[tuple[bytes, bytes]], edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at_least, equal = [], []
        for expert, base in blocks:
            bits = self._magnitudes(expert, base)
            at_least.append([int((bits.long() >= int(edge)).sum()) for edge in edges])  # edges reach 2**31
            equal.append([int((bits == int(edge)).sum()) for edge in edges])
        return np.array(at_least, np.int64).reshape(-1, len(edges)), np.array(equal, np.int64).reshape(-1, len(edges))

    @_on_worker_stream
    def equal(self, blocks: list[tuple[bytes, bytes]], cut: int) -> list[int]:
        return [int((self._magnitudes(e, b) == cut).sum()) for e, b in blocks]

    @_on_worker_stream
    def dare_sums(self, blocks: list[tuple[bytes, bytes]], keys: list[int], prob: float) -> list[tuple[float, float]]:
        sums = []
        for (expert, base), key in zip(blocks, keys):
            magnitudes = self._magnitudes(expert, base).view(torch.float32).double()
            keep = dare_uniforms(key, magnitudes.numel(), self.device) < prob
            sums.append((float(magnitudes.sum()), float((magnitudes * keep).sum())))
        return sums

    @_on_worker_stream
    def combine(self, base, experts, weights, prunings, quotas, keys, consensus, shared, omitted):
        b = self._stored(base).float()
        deltas = torch.stack([self._stored(raw).float() for raw in experts]) - b
        zero = torch.zeros((), device=self.device)
        for row, p, quota, key in zip(deltas, prunings, quotas, keys):
            if p.cut >= 0:
                bits = row.abs().view(torch.int32)
                tied = bits == p.cut
                keep = (bits > p.cut) | (tied & (tied.cumsum(0) <= quota))
                row.copy_(torch.where(keep, row, zero))
            if p.prob >= 0:
                row.copy_(torch.where(dare_uniforms(key, row.numel(), self.device) < p.prob, row, zero))
        scales = torch.tensor([p.scale for p in prunings], dtype=torch.float32, device=self.device)
        w = torch.tensor(weights, dtype=torch.float32, device=self.device)
        deltas = deltas * scales[:, None] * w[:, None]
        if consensus:
            positive = deltas.sum(0) >= 0
            agree = torch.where(positive, deltas > 0, deltas < 0)
            mixed = torch.where(agree, deltas, zero).sum(0)
            if shared["normalize"]:
                divisor = torch.where(agree, w[:, None], zero).sum(0)
                mixed = mixed / torch.where(divisor != 0, divisor, torch.ones((), device=self.device))
        else:
            mixed = deltas.sum(0)
            if shared["normalize"]:
                divisor = w.sum() + np.float32(omitted)
                mixed = mixed / (divisor if abs(float(divisor)) >= 1e-8 else 1.0)
        if shared["lambda"] != 1:
            mixed = mixed * np.float32(shared["lambda"])
        out = (b + mixed).to(self.dtype)
        diff = out.float() - b
        changed = out.view(self.word) != self._stored(base).view(self.word)
        diff = torch.where(changed & torch.isfinite(diff), diff, zero).double()
        stats = (float(diff.square().sum().sqrt()), float(diff.abs().max()), int(changed.sum()))
        return out.cpu().view(torch.uint8).numpy(), stats


def dare_uniforms(key: int, n: int, device: str, start: int = 0) -> "torch.Tensor":
    """float32 uniforms in [0, 1) of elements start..start+n of a DARE mask: mpexec.kernels' hash."""
    mask = 0xFFFFFFFF
    x = (torch.arange(start, start + n, dtype=torch.int64, device=device) * 0x9E3779B9 + (key & mask)) & mask
    x = x ^ (key >> 32)
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & mask
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & mask
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))
