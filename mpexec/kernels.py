"""Fused CPU kernels of the block executor (numba): one pass over a block does what torch does in ~15.

Blocks come as their stored words (uint16 for bfloat16, uint32 for float32); `shift` widens a word to
float32 bits (16 for bfloat16, 0 for float32). Arithmetic is float32, in the order of
methods.combine_deltas, so results match the torch path within float32 rounding. Elements are taken
in tiles, widened into scratch first, so the inner loops run on float32 arrays.

The kernels release the GIL: the executor runs them for several blocks at once in worker threads.
The first call compiles them (cached on disk next to this file afterwards).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

TILE = 4096
_SIGN = np.uint32(0x7FFFFFFF)


@numba.njit(nogil=True, cache=True, inline="always")
def _widen(words, shift, out_bits):
    """float32 bits of stored words. (Loops index slices from 0: an offset index defeats vectorizing.)"""
    for i in range(words.shape[0]):
        out_bits[i] = np.uint32(words[i]) << shift


@numba.njit(nogil=True, cache=True, inline="always")
def _scratch():
    """Per-call tile buffers: expert and base words widened to float32 bits, and |expert - base|."""
    return np.empty(TILE, np.uint32), np.empty(TILE, np.uint32), np.empty(TILE, np.float32)


@numba.njit(nogil=True, cache=True, inline="always")
def _magnitudes(expert, base, sh, e_bits, b_bits, mag):
    """|expert - base| of a tile of words, in float32, into `mag`."""
    _widen(expert, sh, e_bits)
    _widen(base, sh, b_bits)
    e_val = e_bits.view(np.float32)
    b_val = b_bits.view(np.float32)
    for i in range(expert.shape[0]):
        mag[i] = abs(e_val[i] - b_val[i])


@intrinsic
def _hash32(typingctx, key, index):
    """murmur3's finalizer of ((index * golden ratio + low half of key) ^ high half of key), in 32-bit
    arithmetic, as 24 bits in a float32 in [0, 1). Written in LLVM IR because numba widens uint32
    arithmetic to 64 bits, and 64-bit multiplies vectorize at half the lanes and a third the speed."""

    def codegen(context, builder, signature, args):
        key, index = args
        i32 = ir.IntType(32)
        x = builder.mul(builder.trunc(index, i32), ir.Constant(i32, 0x9E3779B9))
        x = builder.add(x, builder.trunc(key, i32))
        x = builder.xor(x, builder.trunc(builder.lshr(key, ir.Constant(ir.IntType(64), 32)), i32))
        for multiplier, shift in ((0x85EBCA6B, 16), (0xC2B2AE35, 13)):
            x = builder.xor(x, builder.lshr(x, ir.Constant(i32, shift)))
            x = builder.mul(x, ir.Constant(i32, multiplier))
        x = builder.xor(x, builder.lshr(x, ir.Constant(i32, 16)))
        bits = builder.uitofp(builder.lshr(x, ir.Constant(i32, 8)), ir.FloatType())
        return builder.fmul(bits, ir.Constant(ir.FloatType(), 1.0 / (1 << 24)))

    return types.float32(types.uint64, types.int64), codegen


@intrinsic
def _voidptr(typingctx, address):
    """An int64 address as a pointer, for numba.carray."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(types.int64), codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _uniform(key, index):
    """A uniform float32 in [0, 1) (24 random bits) from a 64-bit key and an element index (see
    _hash32). blockmerge.dare_uniforms is the same hash in torch, so every device draws the same
    numbers."""
    return _hash32(key, np.int64(index))


@numba.njit(nogil=True, cache=True)
def ungroup_xor(planes, ref, out):
    """An XOR-coded block decoded in one pass: `out` gets the words whose bytes are `planes` (byte
    planes, lowest first, as mpstore.codecs.group_bytes writes them; 2 or 4 bytes a word), XOR `ref`.
    """
    n = out.shape[0]
    if planes.shape[0] == 2 * n:
        b0, b1 = planes[:n], planes[n:]
        for i in range(n):
            out[i] = ref[i] ^ (np.uint32(b0[i]) | (np.uint32(b1[i]) << 8))
    else:
        b0, b1, b2, b3 = planes[:n], planes[n : 2 * n], planes[2 * n : 3 * n], planes[3 * n :]
        for i in range(n):
            out[i] = ref[i] ^ (
                np.uint32(b0[i]) | (np.uint32(b1[i]) << 8) | (np.uint32(b2[i]) << 16) | (np.uint32(b3[i]) << 24)
            )


@numba.njit(nogil=True, cache=True, inline="always")
def _count_interleaved(keys, counts):
    """counts[i % 4, keys[i]] += 1: four interleaved histograms, so runs of equal keys (common in
    bfloat16 deltas) do not wait on one counter; sum them over axis 0."""
    t = keys.shape[0]
    for i in range(0, t - 3, 4):
        counts[0, keys[i]] += 1
        counts[1, keys[i + 1]] += 1
        counts[2, keys[i + 2]] += 1
        counts[3, keys[i + 3]] += 1
    for i in range(t - t % 4, t):
        counts[0, keys[i]] += 1


@numba.njit(nogil=True, cache=True)
def high_counts(expert, base, shift, counts, inexact):
    """Histogram of the high 16 bits of |expert - base| as float32 bits, added to `counts` ([4, bins],
    see _count_interleaved). `inexact` counts, per bin, the magnitudes whose low 16 bits are not
    zero: a bin without any holds a single value, so its rank needs no second pass."""
    n = base.shape[0]
    e_bits, b_bits, mag = _scratch()
    mag_bits = mag.view(np.uint32)
    keys = np.empty(TILE, np.uint32)
    sh = np.uint32(shift)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
        t = stop - start
        _magnitudes(expert[start:stop], base[start:stop], sh, e_bits, b_bits, mag)
        for i in range(t):
            keys[i] = mag_bits[i] >> np.uint32(16)
        _count_interleaved(keys[:t], counts)
        for i in range(t):  # rare for bfloat16: a delta rarely needs more than its operands' 8 bits
            if mag_bits[i] & 0xFFFF:
                inexact[keys[i]] += 1


@numba.njit(nogil=True, cache=True)
def low_counts(expert, base, shift, bin_, counts):
    """Histogram of the low 16 bits of the |expert - base| (float32 bits) whose high 16 bits are
    `bin_`, added to `counts` ([4, 65537], see _count_interleaved). The others count in the last
    column: no branch to mispredict on whether an element is in the bin."""
    n = base.shape[0]
    e_bits, b_bits, mag = _scratch()
    mag_bits = mag.view(np.uint32)
    keys = np.empty(TILE, np.uint32)
    sh = np.uint32(shift)
    high = np.uint32(bin_)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
        t = stop - start
        _magnitudes(expert[start:stop], base[start:stop], sh, e_bits, b_bits, mag)
        for i in range(t):
            bits = mag_bits[i]
            keys[i] = (bits & np.uint32(0xFFFF)) if (bits >> np.uint32(16)) == high else np.uint32(0x10000)
        _count_interleaved(keys[:t], counts)


@numba.njit(nogil=True, cache=True)
def edge_counts(expert, base, shift, edges, at_least, equal):
    """Of the |expert - base| (float32 bits): how many are >= each of `edges`, and how many equal each,
    added to `at_least` and `equal`. Comparisons only, so they vectorize (a histogram's scattered
    increments do not)."""
    n = base.shape[0]
    e_bits, b_bits, mag = _scratch()
    mag_bits = mag.view(np.uint32)
    sh = np.uint32(shift)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
        _magnitudes(expert[start:stop], base[start:stop], sh, e_bits, b_bits, mag)
        for r in range(edges.shape[0]):
            edge = np.uint32(edges[r])
            ge = 0
            eq = 0
            for i in range(stop - start):
                ge += mag_bits[i] >= edge
                eq += mag_bits[i] == edge
            at_least[r] += ge
            equal[r] += eq


SUM_LANES = 64  # dare_sums' accumulators: element i adds into lane i % 64 of its tile


@numba.njit(nogil=True, cache=True)
def dare_sums(expert, base, shift, seed, prob):
    """(sum |delta|, sum |delta| over the elements DARE keeps), in float64: its L1 rescale. Sums run
    in SUM_LANES lanes, added in order at the end: a fixed order, so the same on every run, that the
    compiler vectorizes."""
    n = base.shape[0]
    e_bits, b_bits, mag = _scratch()
    kept = np.empty(TILE, np.float32)
    lanes_before = np.zeros(SUM_LANES, np.float64)
    lanes_after = np.zeros(SUM_LANES, np.float64)
    p = np.float32(prob)
    sh = np.uint32(shift)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
        t = stop - start
        _magnitudes(expert[start:stop], base[start:stop], sh, e_bits, b_bits, mag)
        for i in range(t):
            kept[i] = mag[i] if _uniform(seed, start + i) < p else np.float32(0)
        whole = t - t % SUM_LANES
        for first in range(0, whole, SUM_LANES):
            mag_run = mag[first : first + SUM_LANES]
            kept_run = kept[first : first + SUM_LANES]
            for lane in range(SUM_LANES):
                lanes_before[lane] += np.float64(mag_run[lane])
                lanes_after[lane] += np.float64(kept_run[lane])
        for i in range(whole, t):
            lanes_before[0] += np.float64(mag[i])
            lanes_after[0] += np.float64(kept[i])
    before = 0.0
    after = 0.0
    for lane in range(SUM_LANES):
        before += lanes_before[lane]
        after += lanes_after[lane]
    return before, after


@numba.njit(nogil=True, cache=True)
def combine(
    base,
    experts,
    shift,
    weights,
    scales,
    cuts,
    quotas,
    seeds,
    probs,
    consensus,
    normalize,
    lam,
    omitted,
    out,
    stats,
):
    """One merged block: base + lam * mix(weight_k * prune_k(expert_k - base)), written to `out` (words).

    `experts` holds the addresses of the experts' blocks (int64; each as many words as `base`, alive
    for the call): read where the reader decoded them, they need no copy into one array first.
    Per expert k: `cuts[k]` >= 0 trims to magnitudes (float32 bits) above the cut, plus the first
    `quotas[k]` equal to it; `probs[k]` >= 0 keeps each element with that probability (DARE), drawn
    from `seeds[k]` and the element's index; `scales[k]` rescales what is kept. mix: a sum, or with
    `consensus` a sum over the deltas whose sign matches the elected one (the sign of the sum).
    `normalize` divides by the weights summed (with `omitted`, the weight of experts whose delta is
    zero here and are left out) or, with consensus, by the weights of the deltas that agree.
    `stats` gets (L2 norm, max |out - base|, changed words)."""
    m, n = experts.shape[0], base.shape[0]
    b_bits = np.empty(TILE, np.uint32)
    b_val = b_bits.view(np.float32)
    e_bits = np.empty(TILE, np.uint32)
    e_val = e_bits.view(np.float32)
    d = np.empty(m * TILE, np.float32)  # pruned, weighted deltas: expert k at [k * TILE, (k + 1) * TILE)
    mag = np.empty(TILE, np.float32)
    mag_bits = mag.view(np.uint32)
    total = np.empty(TILE, np.float32)
    acc = np.empty(TILE, np.float32)
    div = np.empty(TILE, np.float32)
    o = np.empty(TILE, np.float32)
    o_bits = o.view(np.uint32)
    taken = np.zeros(m, np.int64)
    weight_sum = np.float32(0)
    for k in range(m):
        weight_sum += np.float32(weights[k])
    weight_sum += np.float32(omitted)
    if abs(weight_sum) < 1e-8:
        weight_sum = np.float32(1)
    zero = np.float32(0)
    sq = np.zeros(SUM_LANES, np.float64)  # lanes, as in dare_sums: sums the compiler can vectorize
    peak = np.zeros(SUM_LANES, np.float64)
    changed = 0
    sh = np.uint32(shift)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
        t = stop - start
        base_tile = base[start:stop]
        out_tile = out[start:stop]
        _widen(base_tile, sh, b_bits)
        for k in range(m):
            row = d[k * TILE : k * TILE + t]
            _widen(numba.carray(_voidptr(experts[k]), n, base.dtype)[start:stop], sh, e_bits)
            for i in range(t):
                row[i] = e_val[i] - b_val[i]
            if cuts[k] >= 0:  # TIES: the top magnitudes, ties at the cut first in element order
                cut = np.uint32(cuts[k])
                for i in range(t):
                    mag[i] = abs(row[i])
                ties = 0
                if taken[k] < quotas[k]:
                    for i in range(t):
                        ties += mag_bits[i] == cut
                if ties and taken[k] + ties <= quotas[k]:  # every magnitude equal to the cut here is kept
                    taken[k] += ties
                    for i in range(t):
                        row[i] = row[i] if mag_bits[i] >= cut else zero
                elif ties:  # the quota runs out in this tile: keep the first ones, in element order
                    for i in range(t):
                        bits = mag_bits[i]
                        if bits == cut and taken[k] < quotas[k]:
                            taken[k] += 1
                        elif bits <= cut:
                            row[i] = zero
                else:
                    for i in range(t):
                        row[i] = row[i] if mag_bits[i] > cut else zero
            if probs[k] >= 0:  # DARE
                key = np.uint64(seeds[k])
                p = probs[k]
                for i in range(t):
                    row[i] = row[i] if _uniform(key, start + i) < p else zero
            s = np.float32(scales[k])
            w = np.float32(weights[k])
            for i in range(t):
                row[i] = row[i] * s * w
        if consensus:
            total[:t] = zero
            for k in range(m):
                row = d[k * TILE : k * TILE + t]
                for i in range(t):
                    total[i] += row[i]
            acc[:t] = zero
            div[:t] = zero
            for k in range(m):
                row = d[k * TILE : k * TILE + t]
                w = np.float32(weights[k])
                for i in range(t):
                    x = row[i]
                    agree = (x > 0) if total[i] >= 0 else (x < 0)
                    acc[i] += x if agree else zero
                    div[i] += w if agree else zero
            if normalize:
                for i in range(t):
                    acc[i] = acc[i] / (div[i] if div[i] != 0 else np.float32(1))
        else:
            acc[:t] = zero
            for k in range(m):
                row = d[k * TILE : k * TILE + t]
                for i in range(t):
                    acc[i] += row[i]
            if normalize:
                for i in range(t):
                    acc[i] = acc[i] / weight_sum
        lam32 = np.float32(lam)
        for i in range(t):
            o[i] = b_val[i] + (acc[i] * lam32 if lam != 1.0 else acc[i])
        for i in range(t):
            word = o_bits[i]
            if shift == 16:  # to bfloat16: round to nearest even; NaN as torch rounds it
                rounded = (word + np.uint32(0x7FFF) + ((word >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                word = np.uint32(0x7FC0) if (word & _SIGN) > np.uint32(0x7F800000) else rounded
            out_tile[i] = word
            o_bits[i] = word << sh  # the stored value, for the statistics
        for i in range(t):
            differs = out_tile[i] != base_tile[i]
            changed += differs
            diff = o[i] - b_val[i]
            o[i] = diff if differs and np.isfinite(diff) else zero
        whole = t - t % SUM_LANES
        for first in range(0, whole, SUM_LANES):
            run = o[first : first + SUM_LANES]
            for lane in range(SUM_LANES):
                sq[lane] += np.float64(run[lane]) * np.float64(run[lane])
                peak[lane] = max(peak[lane], abs(np.float64(run[lane])))
        for i in range(whole, t):
            sq[0] += np.float64(o[i]) * np.float64(o[i])
            peak[0] = max(peak[0], abs(np.float64(o[i])))
    total_sq = 0.0
    for lane in range(SUM_LANES):
        total_sq += sq[lane]
    stats[0] = np.sqrt(total_sq)
    stats[1] = peak.max()
    stats[2] = changed


WORDS = {"BF16": (np.uint16, 16), "F32": (np.uint32, 0)}  # stored word and shift of each dtype


def warm_up(dtypes=tuple(WORDS), only=None) -> None:
    """Load the compiled code of the kernels (all, or those named in `only`) for these dtypes' words,
    compiling on the first run. Each signature takes ~20 ms to load, so a merge loads what it uses."""
    for dtype in dtypes:
        word, shift = WORDS[dtype]
        base = np.frombuffer(bytes(32), word)  # read-only, as the executor hands blocks in
        ones = np.ones(1)
        calls = {
            "ungroup_xor": lambda: ungroup_xor(np.frombuffer(bytes(32), np.uint8), base, np.empty_like(base)),
            "high_counts": lambda: high_counts(
                base, base, shift, np.zeros((4, 1 << 15), np.int32), np.zeros(1 << 15, np.int32)
            ),
            "low_counts": lambda: low_counts(base, base, shift, 0, np.zeros((4, (1 << 16) + 1), np.int32)),
            "edge_counts": lambda: edge_counts(
                base, base, shift, np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(2, np.int64)
            ),
            "dare_sums": lambda: dare_sums(base, base, shift, np.uint64(1), 0.5),
            "combine": lambda: combine(
                base,
                np.array([base.ctypes.data], np.int64),
                shift,
                ones,
                ones,
                np.full(1, -1, np.int64),
                np.zeros(1, np.int64),
                np.ones(1, np.uint64),
                np.full(1, -1, np.float32),
                True,
                True,
                1.0,
                0.0,
                np.empty(base.shape[0], word),
                np.zeros(3),
            ),
        }
        for name, call in calls.items():
            if only is None or name in only:
                call()
