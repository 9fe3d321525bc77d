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


from .lazy_torch import torch
from .methods import TASK_ARITHMETIC_FAMILY, _bernoulli_, _della_, combine_deltas, merge_tensor

ChunkReader = Callable[[int, int], "list[torch.Tensor]"]  # rows [r0, r1) of every input, [r1 - r0, cols]
HIGH_BINS = 1 << 16


def streamable(method: str, shared: dict[str, Any], ndim: int) -> bool:
    """Whether `stream_merge` handles this method and parameters (else merge the whole tensor)."""
    if method == "nuslerp" and not shared.get("nuslerp_flatten", True) and shared.get("nuslerp_row_wise"):
        return ndim == 2  # vectors along axis 0: per-column statistics
    return method in STREAMED


def _prunes(family: tuple[str | None, bool], base_index: int | None, per_input: Sequence[dict]) -> bool:
    """Whether a task-arithmetic method sparsifies any input (else it is elementwise)."""
    return (
        family[0] is not None
        and base_index is not None
        and any(p.get("density", 1) < 1 for k, p in enumerate(per_input) if k != base_index)
    )


def stream_passes(method: str, shared: dict[str, Any], per_input: Sequence[dict], base_index: int | None) -> int:
    """How many times stream_merge reads the tensor (the cost model counts them)."""
    family = TASK_ARITHMETIC_FAMILY.get(method)
    if _row_local(method, shared) or (family is not None and not _prunes(family, base_index, per_input)):
        return 1
    if family is not None:
        selecting = 2 if family[0] in ("magnitude", "magnitude_outliers") else 0  # radix select: two passes
        return selecting + (1 if shared["rescale"] else 0) + 1
    others = len(per_input) - (base_index is not None)
    if method == "multislerp" and others == 1 or method == "karcher" and len(per_input) == 1:
        return 1
    if method == "sce":
        topk = float(shared["select_topk"])
        return (2 if 0 < topk < 1 else 0) + 2
    return 2  # a statistics pass, then the output pass


def _row_local(method: str, shared: dict[str, Any]) -> bool:
    """The kernel applied to whole rows gives the same rows as applied to the whole tensor."""
    if method in ("linear", "task_arithmetic", "nearswap", "passthrough"):
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
    family = TASK_ARITHMETIC_FAMILY.get(method)
    if _row_local(method, shared) or (family is not None and not _prunes(family, base_index, per_input)):
        for r0, r1 in spans:  # the kernel itself, chunk by chunk
            yield merge_tensor(method, read(r0, r1), base_index, shared, per_input)
        return
    if method in _GLOBAL:
        yield from _GLOBAL[method](read, spans, base_index, shared, per_input)
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
        return _l1_scales(self)


def _bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as float32 bit patterns: for non-negative floats, integer order is value order."""
    return delta.abs().float().reshape(-1).view(torch.int32).long()


class _RadixSelect:
    """Exact order statistics of a stream of non-negative float32 values, in two passes: a histogram
    of the high 16 bits, then of the low 16 bits inside the bins that hold the wanted ranks."""

    def __init__(self) -> None:
        self.high = torch.zeros(HIGH_BINS, dtype=torch.int64)
        self.count = 0
        self.low: dict[int, torch.Tensor] = {}
        self.wanted: list[tuple[int, int, int]] = []  # (rank, high bin, rank inside the bin)

    def first(self, bits: torch.Tensor) -> None:
        self.high += torch.bincount(bits >> 16, minlength=HIGH_BINS)
        self.count += bits.numel()

    def want(self, ranks: Sequence[int]) -> None:
        """Ranks (0 = largest) to find; call between the passes."""
        greater = _counts_above(self.high)
        for rank in ranks:
            b = int(torch.nonzero((greater <= rank) & (rank < greater + self.high))[0])
            self.wanted.append((rank, b, rank - int(greater[b])))
            self.low.setdefault(b, torch.zeros(HIGH_BINS, dtype=torch.int64))

    def second(self, bits: torch.Tensor) -> None:
        high = bits >> 16
        for b, counts in self.low.items():
            counts += torch.bincount(bits[high == b] & 0xFFFF, minlength=HIGH_BINS)

    def results(self) -> list[tuple[int, int]]:
        """(value bits, number of values strictly greater) for each wanted rank."""
        out = []
        for rank, b, r in self.wanted:
            counts = self.low[b]
            above = _counts_above(counts)
            lo = int(torch.nonzero((above <= r) & (r < above + counts))[0])
            out.append(((b << 16) | lo, rank - r + int(above[lo])))
        return out


def _counts_above(counts: torch.Tensor) -> torch.Tensor:
    """For each bin, the count in the bins above it."""
    return torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0]) - counts


class _RankKeeper:
    """Keeps the values whose rank (descending, ties broken by element order) lies in [start, stop),
    given the two edge values from a _RadixSelect; equal values at an edge are counted off as the
    chunks arrive in element order."""

    def __init__(self, start: int, stop: int, edges: list[tuple[int, int]]):
        self.start, self.stop, self.edges = start, stop, edges
        self.restart()

    def restart(self) -> None:
        self.seen_equal: dict[int, int] = {}

    def keep(self, bits: torch.Tensor) -> torch.Tensor:
        if self.start >= self.stop:
            return torch.zeros(bits.shape, dtype=torch.bool)
        (top, top_greater), (bottom, bottom_greater) = self.edges
        keep = (bits < top) & (bits > bottom)
        for value, greater in {(top, top_greater), (bottom, bottom_greater)}:
            equal = bits == value
            before = self.seen_equal.get(value, 0)
            ranks = greater + before + torch.cumsum(equal.long(), 0) - 1  # the j-th equal one has rank greater + j
            keep |= equal & (ranks >= self.start) & (ranks < self.stop)
            self.seen_equal[value] = before + int(equal.sum())
        return keep


class _RankWindowPruner:
    """Keeps, per input, the elements whose rank by descending |delta| lies in a window: [0, k) for
    ties, the middle band for breadcrumbs (mergekit's magnitude and magnitude_outliers)."""

    def __init__(self, read, spans, base_index, others, per_input, sparsification):
        self.read, self.spans, self.base_index, self.others = read, spans, base_index, others
        self.per_input, self.sparsification = per_input, sparsification
        self.keepers: dict[int, _RankKeeper | None] = {}
        select = {i: _RadixSelect() for i in others}
        for r0, r1 in spans:
            tensors = read(r0, r1)
            for i in others:
                select[i].first(_bits(tensors[i] - tensors[base_index]))
        windows = {i: self._window(i, select[i].count) for i in others}
        pruning = [i for i in others if windows[i] is not None and windows[i][0] < windows[i][1]]
        for i in pruning:
            select[i].want([windows[i][0], windows[i][1] - 1])
        if pruning:
            for r0, r1 in spans:
                tensors = read(r0, r1)
                for i in pruning:
                    select[i].second(_bits(tensors[i] - tensors[base_index]))
        for i in others:
            window = windows[i]
            if window is None:
                self.keepers[i] = None
            else:
                edges = select[i].results() if i in pruning else []
                self.keepers[i] = _RankKeeper(window[0], window[1], edges)

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

    def restart(self) -> None:
        for keeper in self.keepers.values():
            if keeper is not None:
                keeper.restart()

    def apply_(self, i: int, delta: torch.Tensor) -> None:
        keeper = self.keepers[i]
        if keeper is not None:
            delta.mul_(keeper.keep(_bits(delta)).reshape(delta.shape))

    def l1_scales(self) -> dict[int, float]:
        self.restart()
        return _l1_scales(self)


def _l1_scales(pruner) -> dict[int, float]:
    """mergekit's rescale: |delta|_1 / |pruned delta|_1 over the whole tensor (1 when either < 1e-7)."""
    before = dict.fromkeys(pruner.others, 0.0)
    after = dict.fromkeys(pruner.others, 0.0)
    for r0, r1 in pruner.spans:
        tensors = pruner.read(r0, r1)
        for i in pruner.others:
            delta = tensors[i] - tensors[pruner.base_index]
            before[i] += float(delta.abs().sum(dtype=torch.float64))
            pruner.apply_(i, delta)
            after[i] += float(delta.abs().sum(dtype=torch.float64))
    return {i: before[i] / after[i] if before[i] >= 1e-7 and after[i] >= 1e-7 else 1.0 for i in pruner.others}


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


# --- methods that need whole-tensor statistics: a first pass, then linear combinations -----------


def _gram(read: ChunkReader, spans, vectors: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> torch.Tensor:
    """G[i, j] = <v_i, v_j> over the whole tensor (float64), for the vectors `vectors` makes of a chunk."""
    gram = None
    for r0, r1 in spans:
        vs = vectors(read(r0, r1))
        flat = torch.stack([v.reshape(-1).to(torch.float64) for v in vs])
        part = flat @ flat.T
        gram = part if gram is None else gram + part
    return gram


def _combine(read: ChunkReader, spans, vectors, coefficients: Sequence[float], offset: int | None):
    """Yield sum_i c_i v_i (+ input `offset`, e.g. the base) chunk by chunk, in the inputs' dtype."""
    for r0, r1 in spans:
        tensors = read(r0, r1)
        vs = vectors(tensors)
        out = torch.zeros_like(vs[0])
        for c, v in zip(coefficients, vs):
            out += float(c) * v
        yield out + tensors[offset] if offset is not None else out


def _others(n: int, base_index: int | None) -> list[int]:
    return [i for i in range(n) if i != base_index]


def _model_stock(read, spans, base_index, shared, per_input):
    others = _others(len(per_input), base_index)

    def offsets(tensors):
        return [tensors[i] - tensors[base_index] for i in others]

    gram = _gram(read, spans, offsets)
    norms = gram.diagonal().sqrt()
    cosines = [
        max(-1.0, min(1.0, float(gram[a, b]) / max(float(norms[a] * norms[b]), 1e-6)))
        for a in range(len(others))
        for b in range(a + 1, len(others))
    ]
    cos = sum(cosines) / len(cosines)
    count = len(others)
    denominator = 1 + (count - 1) * cos
    t = 0.0 if abs(denominator) < 1e-6 else count * cos / denominator
    # t * average + (1 - t) * w0 = w0 + (t / count) * sum of offsets
    yield from _combine(read, spans, offsets, [t / count] * count, base_index)


def _multislerp(read, spans, base_index, shared, per_input):
    others = _others(len(per_input), base_index)

    def vectors(tensors):
        return [tensors[i] - tensors[base_index] if base_index is not None else tensors[i] for i in others]

    if len(others) == 1:  # mergekit returns the only non-base input itself
        for r0, r1 in spans:
            yield read(r0, r1)[others[0]]
        return
    eps = float(shared["eps"])
    w = torch.tensor([float(per_input[i]["weight"]) for i in others], dtype=torch.float64)
    if shared["normalize_weights"]:
        w = w / w.sum()
    gram = _gram(read, spans, vectors)
    norms = gram.diagonal().clamp(min=0).sqrt()
    a = w / (norms + eps)  # mean = sum_i a_i v_i
    mean_norm = float(a @ gram @ a) ** 0.5
    if mean_norm < eps:
        if len(others) != 2:
            from .methods import MergeError

            raise MergeError("multislerp: the weighted sum of the input directions is zero; use different weights")
        yield from _combine(read, spans, vectors, w.tolist(), base_index)
        return
    m = a / mean_norm  # the unit mean
    dots = (gram @ m) / (norms + eps)  # <u_i, mean>
    c = a - float((w * dots).sum()) * m  # the weighted tangent vector
    tangent_norm = float(c @ gram @ c) ** 0.5 + eps
    r = m * math.cos(tangent_norm) + c * (math.sin(tangent_norm) / tangent_norm)
    yield from _combine(read, spans, vectors, (r * float((norms * w).sum())).tolist(), base_index)


def _karcher(read, spans, base_index, shared, per_input):
    n = len(per_input)

    def vectors(tensors):
        return list(tensors)  # karcher ignores the base: every input is averaged

    if n == 1:
        for r0, r1 in spans:
            yield read(r0, r1)[0]
        return
    max_iter, tol = int(shared["max_iter"]), float(shared["tol"])
    gram = _gram(read, spans, vectors)
    norms = gram.diagonal().clamp(min=0).sqrt()
    alphas = torch.full((n,), 1.0 / n, dtype=torch.float64)
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        yield from _combine(read, spans, vectors, [0.0] * n, None)
        return
    unit = torch.zeros((n, n), dtype=torch.float64)  # row i: coefficients of the unit vector u_i
    for i in range(n):
        if float(norms[i]) != 0.0:
            unit[i, i] = 1.0 / float(norms[i])
    valid_alphas = alphas[valid] / alphas[valid].sum()

    def norm(coef: torch.Tensor) -> float:
        return max(float(coef @ gram @ coef), 0.0) ** 0.5

    mean = (valid_alphas[:, None] * unit[valid]).sum(0)
    mean_norm = norm(mean)
    mean = unit[valid[0]].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        for alpha, i in zip(valid_alphas.tolist(), valid):
            dot = max(-1.0, min(1.0, float(mean @ gram @ unit[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (unit[i] - dot * mean)
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float((alphas * norms).sum())
    yield from _combine(read, spans, vectors, (scale * mean).tolist(), None)


def _nuslerp(read, spans, base_index, shared, per_input):
    others = _others(len(per_input), base_index)
    weights = [float(per_input[i]["weight"]) for i in others]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total

    def vectors(tensors):
        return [tensors[i] - tensors[base_index] if base_index is not None else tensors[i] for i in others]

    per_column = not shared["nuslerp_flatten"]  # streamable() allows only the row-wise (axis 0) case then
    sums = None
    for r0, r1 in spans:
        v0, v1 = (v.to(torch.float64) for v in vectors(read(r0, r1)))
        dim = 0 if per_column else None
        part = torch.stack([(v0 * v0).sum(dim), (v1 * v1).sum(dim), (v0 * v1).sum(dim)])
        sums = part if sums is None else sums + part
    n0, n1 = sums[0].sqrt().clamp(min=1e-7), sums[1].sqrt().clamp(min=1e-7)
    cos = (sums[2] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    for r0, r1 in spans:
        tensors = read(r0, r1)
        v0, v1 = vectors(tensors)
        out = c0.to(v0.dtype) * v0 + c1.to(v1.dtype) * v1
        yield out + tensors[base_index] if base_index is not None else out


def _sce(read, spans, base_index, shared, per_input):
    from .methods import _sign_consensus

    others = _others(len(per_input), base_index)
    if not others:
        for r0, r1 in spans:
            yield read(r0, r1)[base_index]
        return

    def task_vectors(tensors):
        return torch.stack([tensors[i] - tensors[base_index] for i in others])

    topk = float(shared["select_topk"])
    keeper = None
    if 0 < topk < 1:  # keep the elements that vary most across inputs: an exact top-k by variance
        select = _RadixSelect()
        zeros = 0
        for r0, r1 in spans:
            variance = torch.var(task_vectors(read(r0, r1)), dim=0, unbiased=False)
            select.first(_bits(variance))
            zeros += int((variance == 0).sum())
        k = int((select.count - zeros) * topk)
        if k > 0:
            select.want([0, k - 1])
            for r0, r1 in spans:
                select.second(_bits(torch.var(task_vectors(read(r0, r1)), dim=0, unbiased=False)))
            keeper = _RankKeeper(0, k, select.results())
        else:
            keeper = _RankKeeper(0, 0, [])

    def masked(tensors):
        tv = task_vectors(tensors)
        if topk <= 0:
            tv.zero_()
        elif keeper is not None:
            keep = keeper.keep(_bits(torch.var(tv, dim=0, unbiased=False))).reshape(tv.shape[1:])
            tv.mul_(keep)
        return tv

    squares = torch.zeros(len(others), dtype=torch.float64)
    count = 0
    for r0, r1 in spans:
        tv = masked(read(r0, r1))
        squares += tv.to(torch.float64).square().reshape(len(others), -1).sum(1)
        count += tv[0].numel()
    if keeper is not None:
        keeper.restart()
    mean_squares = squares / max(count, 1)
    total = float(mean_squares.sum())
    tv_weights = torch.full_like(mean_squares, 1.0 / len(others)) if abs(total) < 1e-6 else mean_squares / total
    for r0, r1 in spans:
        tensors = read(r0, r1)
        tv = masked(tensors)
        erased = tv_weights.to(tv.dtype).reshape((-1,) + (1,) * (tv.ndim - 1)) * _sign_consensus(tv)
        merged = tv.mul_(erased).sum(dim=0)
        yield tensors[base_index] + merged / erased.sum(dim=0).clamp(min=1e-6)


_GLOBAL = {
    "slerp": lambda read, spans, b, shared, per: _slerp(read, spans, b, shared),
    "model_stock": _model_stock,
    "multislerp": _multislerp,
    "karcher": _karcher,
    "nuslerp": _nuslerp,
    "sce": _sce,
}
STREAMED = {"linear", "task_arithmetic", "nearswap", "passthrough", *TASK_ARITHMETIC_FAMILY, *_GLOBAL}
