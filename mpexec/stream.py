"""Streaming merge of one large tensor in chunks, so memory does not grow with the tensor.

A chunk is a range of whole rows (the tensor viewed as [rows, last dim]) of every input at once.
Methods fall in four kinds:

* elementwise (linear, task_arithmetic, nearswap, passthrough) and row-local ones (model_stock with
  filter_wise, nuslerp row by row): the whole-tensor kernel applied to each chunk gives the same result;
* the task-arithmetic family with pruning: a first pass gathers what the pruning needs over the whole
  tensor -- exact order statistics of |delta| for ties and breadcrumbs (a radix select on the float
  bits: a histogram of the high 16 bits, then of the low 16 bits inside the boundary bin), and the L1
  norms before and after a random mask for DARE and DELLA (the mask is drawn again, identically, in the
  last pass from a generator per input) -- then each chunk is pruned and combined as the kernel does;
* slerp: a first pass sums the squares and the dot product, then each chunk is interpolated.

Everything else (multislerp, karcher, sce, model_stock across the whole tensor, flattened nuslerp)
needs the whole tensor and is merged whole. Among elements tied in magnitude at a top-k threshold,
the streamed TIES keeps the first ones in element order (mergekit keeps an arbitrary subset).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .methods import TASK_ARITHMETIC_FAMILY, _bernoulli_, _della_, combine_deltas, merge_tensor

ChunkReader = Callable[[int, int], list[torch.Tensor]]  # rows [r0, r1) of every input, [r1 - r0, cols]
HIGH_BINS = 1 << 16


def streamable(method: str, shared: dict[str, Any]) -> bool:
    """Whether `stream_merge` handles this method and parameters (else merge the whole tensor)."""
    if method in ("linear", "task_arithmetic", "nearswap", "passthrough", "slerp") or method in TASK_ARITHMETIC_FAMILY:
        return True
    if method == "model_stock":
        return bool(shared.get("filter_wise"))
    if method == "nuslerp":
        return not shared.get("nuslerp_flatten", True) and not shared.get("nuslerp_row_wise", False)
    return False


def stream_merge(
    method: str,
    read: ChunkReader,
    rows: int,
    chunk_rows: int,
    base_index: int | None,
    shared: dict[str, Any],
    per_input: Sequence[dict[str, Any]],
    seeds: Sequence[int],
) -> Iterator[torch.Tensor]:
    """Yield the merged tensor chunk by chunk ([chunk rows, cols], in the computation dtype).

    `seeds[i]` seeds input i's random mask (randomized methods); `read` may be called several times
    for the same rows (one call per pass).
    """
    spans = [(r, min(rows, r + chunk_rows)) for r in range(0, rows, chunk_rows)]
    if method == "slerp":
        yield from _slerp(read, spans, base_index, shared)
        return
    family = TASK_ARITHMETIC_FAMILY.get(method)
    if family is None or family[0] is None or base_index is None:
        for r0, r1 in spans:  # elementwise or row-local: the kernel itself, chunk by chunk
            yield merge_tensor(method, read(r0, r1), base_index, shared, per_input)
        return
    sparsification, consensus = family
    others = [i for i in range(len(per_input)) if i != base_index]
    if sparsification in ("magnitude", "magnitude_outliers"):
        prune = _RankWindowPruner(read, spans, base_index, others, per_input, sparsification)
    else:
        prune = _RandomPruner(read, spans, base_index, others, per_input, sparsification, seeds)
    scales = prune.l1_scales() if shared["rescale"] else {i: 1.0 for i in others}
    prune.restart()
    for r0, r1 in spans:
        tensors = read(r0, r1)
        base = tensors[base_index]
        deltas = torch.stack([tensors[i] - base for i in others])
        for k, i in enumerate(others):
            prune.apply_(i, deltas[k])
            if scales[i] != 1.0:
                deltas[k].mul_(scales[i])
        yield combine_deltas(base, deltas, [per_input[i]["weight"] for i in others], consensus, shared)


class _RandomPruner:
    """DARE / DELLA masks drawn from one generator per input, in element order, chunk after chunk."""

    def __init__(self, read, spans, base_index, others, per_input, sparsification, seeds):
        self.read, self.spans, self.base_index, self.others = read, spans, base_index, others
        self.per_input, self.sparsification, self.seeds = per_input, sparsification, seeds
        self.restart()

    def restart(self) -> None:
        self.generators = {i: torch.Generator().manual_seed(self.seeds[i]) for i in self.others}

    def apply_(self, i: int, delta: torch.Tensor) -> None:
        p = self.per_input[i]
        if self.sparsification == "random":
            _bernoulli_(delta, p["density"], False, self.generators[i])
        else:
            _della_(delta, p["density"], p["epsilon"], False, self.generators[i])

    def l1_scales(self) -> dict[int, float]:
        """mergekit's rescale: |delta|_1 / |pruned delta|_1 over the whole tensor (1 below 1e-7)."""
        before = dict.fromkeys(self.others, 0.0)
        after = dict.fromkeys(self.others, 0.0)
        for r0, r1 in self.spans:
            tensors = self.read(r0, r1)
            for i in self.others:
                delta = tensors[i] - tensors[self.base_index]
                before[i] += float(delta.abs().sum(dtype=torch.float64))
                self.apply_(i, delta)
                after[i] += float(delta.abs().sum(dtype=torch.float64))
        return {i: before[i] / after[i] if before[i] >= 1e-7 and after[i] >= 1e-7 else 1.0 for i in self.others}


def _bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as float32 bit patterns: for non-negative floats, integer order is value order."""
    return delta.abs().float().reshape(-1).view(torch.int32).long()


class _RankWindowPruner:
    """Keeps, per input, the elements whose rank by descending |delta| (ties broken by position) lies
    in a window: [0, k) for ties, the middle band for breadcrumbs. Ranks come from an exact radix
    select over the whole tensor; equal magnitudes at a window edge are counted off chunk by chunk."""

    def __init__(self, read, spans, base_index, others, per_input, sparsification):
        self.read, self.spans, self.base_index, self.others = read, spans, base_index, others
        self.windows: dict[int, tuple[int, int] | None] = {}
        self.sparsification = sparsification
        self.per_input = per_input
        self._select()
        self.restart()

    def _window(self, i: int, n: int) -> tuple[int, int] | None:
        p = self.per_input[i]
        if p["density"] >= 1:
            return None  # no pruning
        if self.sparsification == "magnitude":
            if p["density"] <= 0 or n == 0:
                return (0, 0)
            return (0, max(1, int(p["density"] * n)))
        target = int(p["density"] * n)
        n_top = int(p["gamma"] * n)
        n_bot = max(0, n - target - n_top)
        # ascending ranks [n_bot, n_bot + target) are descending ranks [n - n_bot - target, n - n_bot)
        return (n - n_bot - target, n - n_bot)

    def _select(self) -> None:
        high = {i: torch.zeros(HIGH_BINS, dtype=torch.int64) for i in self.others}
        count = 0
        for r0, r1 in self.spans:
            tensors = self.read(r0, r1)
            for i in self.others:
                bits = _bits(tensors[i] - tensors[self.base_index])
                high[i] += torch.bincount(bits >> 16, minlength=HIGH_BINS)
            count += tensors[self.base_index].numel()
        self.edges: dict[int, list[tuple[int, int]]] = {}  # input -> [(value bits, count greater)]
        wanted: dict[int, list[tuple[int, int, int]]] = {}  # input -> [(rank, high bin, rank in bin)]
        for i in self.others:
            window = self.windows[i] = self._window(i, count)
            if window is None or window[0] >= window[1]:
                continue
            greater = torch.flip(torch.cumsum(torch.flip(high[i], [0]), 0), [0]) - high[i]  # count in bins above
            wanted[i] = []
            for rank in (window[0], window[1] - 1):
                b = int(torch.nonzero((greater <= rank) & (rank < greater + high[i]))[0])
                wanted[i].append((rank, b, rank - int(greater[b])))
        if not wanted:
            return
        low = {(i, b): torch.zeros(HIGH_BINS, dtype=torch.int64) for i, w in wanted.items() for _, b, _ in w}
        for r0, r1 in self.spans:
            tensors = self.read(r0, r1)
            for i, w in wanted.items():
                bits = _bits(tensors[i] - tensors[self.base_index])
                for b in {b for _, b, _ in w}:
                    inside = bits[(bits >> 16) == b]
                    low[(i, b)] += torch.bincount(inside & 0xFFFF, minlength=HIGH_BINS)
        for i, w in wanted.items():
            edges = []
            for rank, b, r in w:
                counts = low[(i, b)]
                above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0]) - counts
                lo = int(torch.nonzero((above <= r) & (r < above + counts))[0])
                edges.append(((b << 16) | lo, rank - r + int(above[lo])))
            self.edges[i] = edges

    def restart(self) -> None:
        self.seen_equal: dict[tuple[int, int], int] = {}  # (input, value bits) -> equal elements passed

    def apply_(self, i: int, delta: torch.Tensor) -> None:
        window = self.windows.get(i)
        if window is None:
            return
        start, stop = window
        if start >= stop:
            delta.zero_()
            return
        bits = _bits(delta).reshape(delta.shape)
        (top, top_greater), (bottom, bottom_greater) = self.edges[i]
        keep = (bits < top) & (bits > bottom)
        for value, greater in {(top, top_greater), (bottom, bottom_greater)}:
            equal = bits == value
            before = self.seen_equal.get((i, value), 0)
            # rank of the j-th equal element (in element order) is greater + j
            ranks = greater + before + torch.cumsum(equal.reshape(-1).long(), 0).reshape(delta.shape) - 1
            keep |= equal & (ranks >= start) & (ranks < stop)
            self.seen_equal[(i, value)] = before + int(equal.sum())
        delta.mul_(keep)

    def l1_scales(self) -> dict[int, float]:
        before = dict.fromkeys(self.others, 0.0)
        after = dict.fromkeys(self.others, 0.0)
        self.restart()
        for r0, r1 in self.spans:
            tensors = self.read(r0, r1)
            for i in self.others:
                delta = tensors[i] - tensors[self.base_index]
                before[i] += float(delta.abs().sum(dtype=torch.float64))
                self.apply_(i, delta)
                after[i] += float(delta.abs().sum(dtype=torch.float64))
        return {i: before[i] / after[i] if before[i] >= 1e-7 and after[i] >= 1e-7 else 1.0 for i in self.others}


def _slerp(read: ChunkReader, spans, base_index, shared) -> Iterator[torch.Tensor]:
    """mergekit's slerp over the whole flattened tensor: norms and cosine from a first pass."""
    b, o = base_index, 1 - base_index
    sq_a = sq_c = dot = 0.0
    dtype = None
    for r0, r1 in spans:
        tensors = read(r0, r1)
        dtype = torch.float64 if tensors[b].dtype == torch.float64 else torch.float32
        a, c = tensors[b].to(torch.float64), tensors[o].to(torch.float64)
        sq_a += float((a * a).sum())
        sq_c += float((c * c).sum())
        dot += float((a * c).sum())
    norm_a = math.sqrt(sq_a) if math.sqrt(sq_a) > 1e-8 else 1.0
    norm_c = math.sqrt(sq_c) if math.sqrt(sq_c) > 1e-8 else 1.0
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_c)))
    t = float(shared["t"])
    if abs(cos) > 0.9995:
        coef_a, coef_c = 1 - t, t
    else:
        theta = math.acos(cos)
        coef_a, coef_c = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    for r0, r1 in spans:
        tensors = read(r0, r1)
        yield coef_a * tensors[b].to(dtype) + coef_c * tensors[o].to(dtype)
