"""The cost model: bytes from the index (the executor's read logic run dry), seconds from rates
calibrated on this machine (`mpstore calibrate`, kept in the store as calibration.json)."""

from __future__ import annotations

import itertools
import json
import time
from typing import TYPE_CHECKING

import numpy as np

from mpstore.codecs import encode
from mpstore.dtypes import dtype_named
from mpstore.durable import write_atomic
from mpstore.errors import CorruptionError

from .lazy_torch import torch
from .execute import _numel, block_marks, estimate_reads
from .plan import MergePlan

if TYPE_CHECKING:
    from mpstore import Store

CALIBRATION_FILE = "calibration.json"
# Sensible defaults for a 2-core x86 machine with the packs in page cache (measured here).
DEFAULT_RATES = {
    "read_bytes_per_s": 1.5e9,  # pread of pack bytes
    "decode_bytes_per_s": 4.0e8,  # zstd + ungrouping + XOR, per decoded byte
    "encode_bytes_per_s": 2.5e8,  # hashing, statistics, XOR + grouping + zstd, per output byte
    "compute_elements_per_s": 3.0e8,  # input elements through a merge kernel, per pass
}


def load_rates(store: "Store") -> dict[str, float]:
    path = store.path / CALIBRATION_FILE
    if not path.exists():
        return dict(DEFAULT_RATES)
    try:
        rates = json.loads(path.read_text())
        return {k: float(rates.get(k, v)) for k, v in DEFAULT_RATES.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise CorruptionError(f"{path}: unreadable calibration ({exc}); run `mpstore calibrate` again") from None


def calibrate(store: "Store", sample_blocks: int = 32) -> dict[str, float]:
    """Measure this machine's rates on the store's own blocks and keep them in the store."""
    rates = dict(DEFAULT_RATES)
    sample = [b for b, _ in itertools.islice(store.index.iter_blocks(), sample_blocks)]
    if sample:
        locs = store.index.get_blocks(sample)
        started = time.perf_counter()
        raws = [store.read_block(b, locs[b]) for b in sample]
        decoded = sum(len(r) for r in raws)
        rates["decode_bytes_per_s"] = decoded / max(time.perf_counter() - started, 1e-9)
        started = time.perf_counter()
        read = 0
        for b in sample:
            read += len(store.packs.read_record(locs[b])[5])
        rates["read_bytes_per_s"] = read / max(time.perf_counter() - started, 1e-9)
        started = time.perf_counter()
        for raw in raws:
            encode(raw, 2, store.zstd_level, None)
        rates["encode_bytes_per_s"] = decoded / max(time.perf_counter() - started, 1e-9)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 1 << 20), dtype=np.float32))
    started = time.perf_counter()
    for _ in range(3):
        base = x[0]
        (base + ((x[1:] - base) * 0.1).sum(0)).to(torch.bfloat16)
    rates["compute_elements_per_s"] = 3 * x.numel() / max(time.perf_counter() - started, 1e-9)
    write_atomic(store.path / CALIBRATION_FILE, json.dumps(rates, indent=2).encode() + b"\n")
    return rates


def explain_costs(store: "Store", plan: MergePlan) -> dict:
    """EXPLAIN's estimates: bytes read by kind, output bytes, seconds, per-tensor rows, skip counts."""
    reads, per_tensor, decoded = estimate_reads(store, plan)
    for name, rows in block_marks(store, plan).items():
        per_tensor[name]["blocks"] = rows
    rates = load_rates(store)
    compute_elements = output_bytes = 0
    for tp in plan.tensors:
        row = per_tensor[tp.name]
        if row["mode"] != "passthrough":
            compute_elements += _numel(tp.shape) * len(tp.inputs) * row["passes"]
            output_bytes += dtype_named(tp.out_dtype).nbytes(_numel(tp.shape))
    seconds = (
        reads.bytes_read / rates["read_bytes_per_s"]
        + decoded / rates["decode_bytes_per_s"]
        + compute_elements / rates["compute_elements_per_s"]
        + output_bytes / rates["encode_bytes_per_s"]
    )
    return {
        "estimated_bytes_read": reads.bytes_read,
        "estimated_bytes_read_base": reads.bytes_read_base,
        "estimated_bytes_read_experts": reads.bytes_read_experts,
        "estimated_blocks_read": reads.blocks_read,
        "estimated_blocks_skipped": dict(reads.blocks_skipped),
        "estimated_output_bytes": output_bytes,
        "estimated_seconds": round(seconds, 3),
        "rates": rates,
        "tensors": per_tensor,
    }
