"""I/O budgets: drop the expert blocks worth least per stored byte until the merge fits the budget.

Only methods for which a dropped block is an omitted update qualify: the task-arithmetic family and
sce, where a block equal to the base's is a zero delta. A dropped block is taken as the base's block
at the same position and never read. Its value is |weight| x the L2 norm of its delta, from the
catalog statistics recorded at ingest (never from the data); its cost is the bytes it would take
from the packs (its record and, if not in hand, its XOR reference) times the passes its tensor needs.
The bound on what is omitted is the sum of |weight| x ||delta|| over the dropped blocks (triangle
inequality on the merged task vector, before normalization and sparsification). The `random` policy
drops uniformly at random instead (the published MergePipe strategy), as a baseline.

Methods whose statistics span whole tensors of every input (slerp, nuslerp, multislerp, karcher,
model_stock, linear, nearswap, passthrough) cannot omit a block without changing everything else:
under a budget smaller than their whole cost they are refused, naming that cost as the minimum.
Within a pruning method (ties, dare, della, breadcrumbs), dropped blocks count as zero deltas: the
top-k cut and the L1 rescale are taken over what is read.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from mpstore.codecs import Codec

from .execute import estimate_reads
from .methods import TASK_ARITHMETIC_FAMILY, QueryError
from .plan import MergePlan
from .stream import stream_passes

if TYPE_CHECKING:
    from mpstore import Store

BUDGET_METHODS = set(TASK_ARITHMETIC_FAMILY) | {"sce"}
POLICIES = ("value", "random")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB ({int(n)} bytes)"


def _candidates(store: "Store", plan: MergePlan) -> list[tuple[str, int, int, float, int]]:
    """Droppable expert blocks: (tensor, input index, block position, value, cost in bytes)."""
    from .execute import _is_streamed

    manifests = {sid: store.manifest(sid) for sid in set(plan.models.values())}
    out = []
    for tp in plan.tensors:
        if tp.base_index is None or tp.copy_from is not None:
            continue
        entries = [manifests[i.snapshot].tensor_map()[i.tensor] for i in tp.inputs]
        base = entries[tp.base_index]
        passes = (
            stream_passes(plan.method.name, tp.shared, tp.per_input, tp.base_index) if _is_streamed(plan, tp) else 1
        )
        for k, entry in enumerate(entries):
            if k == tp.base_index or entry.dtype != base.dtype or entry.shape != base.shape:
                continue
            weight = abs(float(tp.per_input[k].get("weight", 1.0)))
            own_base = manifests[tp.inputs[k].snapshot].base
            stats_valid = entry.delta is not None and own_base == tp.inputs[tp.base_index].snapshot
            for i, block in enumerate(entry.blocks):
                if block == base.blocks[i]:
                    continue
                loc = store.location(block)
                cost = loc.record_len
                if loc.codec == Codec.XOR_GROUPED_ZSTD and loc.ref != base.blocks[i]:
                    cost += store.location(loc.ref).record_len
                value = weight * entry.delta[i][0] if stats_valid else math.inf  # unknown: dropped last
                out.append((tp.name, k, i, value, cost * passes))
    return out


def _with_drops(plan: MergePlan, chosen) -> dict[tuple[str, int], frozenset[int]]:
    drops: dict[tuple[str, int], set[int]] = {}
    for name, k, i, _, _ in chosen:
        drops.setdefault((name, k), set()).add(i)
    return {key: frozenset(v) for key, v in drops.items()}


def apply_budget(store: "Store", plan: MergePlan, budget: int, policy: str = "value", seed: int = 0) -> dict:
    """Fit `plan` into `budget` bytes read, dropping expert blocks; returns a report (also kept in
    plan.budget when anything is dropped, for the lineage). Raises QueryError below the minimum."""
    if policy not in POLICIES:
        raise QueryError(f"--budget-policy {policy!r}: use one of {', '.join(POLICIES)}")
    plan.io_budget = budget
    full, _, _ = estimate_reads(store, plan)
    report = {
        "io_budget": budget,
        "policy": policy,
        "full_bytes_read": full.bytes_read,
        "dropped_blocks": 0,
        "error_bound": 0.0,
    }
    if full.bytes_read <= budget:
        return report  # nothing to drop: exactly the unbudgeted merge
    if plan.method.name not in BUDGET_METHODS:
        raise QueryError(
            f"--io-budget {_mb(budget)} is below what {plan.method.name} needs: it uses every block of its "
            f"inputs (whole-tensor statistics), so the minimum is the full merge, {_mb(full.bytes_read)}"
        )
    candidates = _candidates(store, plan)
    if policy == "value":
        candidates.sort(key=lambda c: (c[3] / max(c[4], 1), c[0], c[1], c[2]))
    else:
        random.Random(seed).shuffle(candidates)
        candidates.sort(key=lambda c: math.isinf(c[3]))  # unknown values still go last

    def cost(m: int) -> int:
        plan.drops = _with_drops(plan, candidates[:m])
        return estimate_reads(store, plan)[0].bytes_read

    minimum = cost(len(candidates))
    if minimum > budget:
        plan.drops = {}
        raise QueryError(
            f"--io-budget {_mb(budget)} is below the minimum this merge must read, {_mb(minimum)} "
            f"(the base's blocks, and blocks that cannot be dropped)"
        )
    lo, hi = 0, len(candidates)  # the fewest drops that fit: cost is non-increasing in m
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    chosen = candidates[:lo]
    plan.drops = _with_drops(plan, chosen)
    bound = sum(c[3] for c in chosen)
    report.update(
        dropped_blocks=len(chosen),
        error_bound=None if math.isinf(bound) else float(f"{bound:.6g}"),
        dropped=[[name, plan.tensors_by_name()[name].inputs[k].model, i] for name, k, i, _, _ in chosen],
    )
    plan.budget = report
    return report
