"""The block executor (mpexec.blockmerge, mpexec.kernels): kernels against torch, windows against whole
tensors, unchanged positions against the base, and results that do not depend on how work is cut."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import mpexec.blockmerge as blockmerge
import mpexec.execute
from mpexec import kernels
from mpexec.blockmerge import _KernelBackend, _Pruning, _TorchBackend, dare_uniforms
from mpexec.merge import plan_merge, run_merge
from mpstore import Store

METHODS = {
    "task_arithmetic": "{weight: 0.6}",
    "ties": "{weight: 0.6, density: 0.4}",
    "dare_ties": "{weight: 0.6, density: 0.5}",
    "dare_linear": "{weight: 0.6, density: 0.7}",
}


def _query(method: str, extra: str = "") -> str:
    params = METHODS[method]
    return (
        f"merge_method: {method}\nbase_model: base\nmodels:\n"
        f"  - model: lora\n    parameters: {params}\n"
        f"  - model: partial\n    parameters: {params}\n"
        f"  - model: full\n    parameters: {params}\n{extra}"
    )


def _blocks(dtype: torch.dtype, n: int, m: int, seed: int = 0) -> tuple[bytes, list[bytes]]:
    """A base block and m expert blocks: small deltas, some exactly zero, many equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    experts = []
    for k in range(m):
        delta = torch.randn(n, generator=g) * 1e-3 * (k + 1)
        delta[torch.rand(n, generator=g) < 0.2] = 0
        experts.append((base.float() + delta).to(dtype))
    raw = lambda t: t.view(torch.uint8).numpy().tobytes()  # noqa: E731
    return raw(base), [raw(e) for e in experts]


def _ulps(a, b, dtype: torch.dtype) -> int:
    word = torch.int16 if dtype == torch.bfloat16 else torch.int32
    x = torch.frombuffer(bytearray(bytes(a)), dtype=word).long()
    y = torch.frombuffer(bytearray(bytes(b)), dtype=word).long()
    return int((x - y).abs().max())


def _combine_args(dtype: torch.dtype, n: int, tied_fraction: float, consensus: bool):
    """combine's arguments for 3 experts: TIES with a share of the ties at its cut to keep in element
    order, DARE with a rescale, and one kept whole."""
    base, experts = _blocks(dtype, n, 3)
    magnitudes = (
        torch.frombuffer(bytearray(experts[0]), dtype=dtype).float()
        - torch.frombuffer(bytearray(base), dtype=dtype).float()
    ).abs()
    cut = magnitudes.median()
    ties = int((magnitudes == cut).sum())
    assert ties > 100 or dtype == torch.float32  # bfloat16 deltas: many equal magnitudes
    prunings = [_Pruning(cut=int(cut.view(torch.int32))), _Pruning(prob=0.5, scale=1.7), _Pruning()]
    quotas = [int(ties * tied_fraction), 0, 0]
    return (base, experts, [0.5, -0.3, 0.9], prunings, quotas, [11, 22, 33], consensus)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("tied_fraction", [0.01, 0.6])  # the quota runs out in the first tile, or later
def test_kernel_combine_equals_torch_combine(dtype, consensus, normalize, tied_fraction):
    name = "BF16" if dtype == torch.bfloat16 else "F32"
    args = _combine_args(dtype, 10_000, tied_fraction, consensus)
    shared = {"normalize": normalize, "lambda": 0.8}
    ours, our_stats = _KernelBackend(name).combine(*args, shared, 0.25)
    theirs, their_stats = _TorchBackend(name, "cpu").combine(*args, shared, 0.25)
    assert _ulps(ours, theirs, dtype) == 0
    assert our_stats[2] == their_stats[2] > 0
    assert our_stats[0] == pytest.approx(their_stats[0], rel=1e-9)
    assert our_stats[1] == pytest.approx(their_stats[1], rel=1e-9)


def test_kernel_statistics_equal_torch_statistics():
    base, experts = _blocks(torch.bfloat16, 20_000, 2)
    blocks = [(e, base) for e in experts]
    cpu, ref = _KernelBackend("BF16"), _TorchBackend("BF16", "cpu")
    high, inexact = cpu.high_counts(blocks)
    ref_high, ref_inexact = ref.high_counts(blocks)
    assert np.array_equal(high, ref_high) and high.sum() == 40_000
    assert np.array_equal(inexact, ref_inexact) and 0 < inexact.sum() < 40_000
    b = int(np.flatnonzero(inexact)[-1])
    low = cpu.low_counts(blocks, b)
    assert np.array_equal(low, ref.low_counts(blocks, b)) and low.sum() == high[b]
    assert low[1:].sum() == inexact[b]  # inexact: the low 16 bits are not zero
    assert cpu.equal(blocks, b << 16) == ref.equal(blocks, b << 16)
    edges = np.arange(b - 2, b + 2, dtype=np.int64) << 16
    at_least, equal = cpu.edge_counts(blocks, edges)
    ref_at_least, ref_equal = ref.edge_counts(blocks, edges)
    assert np.array_equal(at_least, ref_at_least) and np.array_equal(equal, ref_equal)
    assert at_least[:, 0].sum() == high[b - 2 :].sum() and equal[:, 2].sum() == high[b] - inexact[b]
    ours, theirs = cpu.dare_sums(blocks, [5, 6], 0.3), ref.dare_sums(blocks, [5, 6], 0.3)
    assert np.allclose(ours, theirs, rtol=1e-12)
    assert all(0.1 < after / before < 0.5 for before, after in ours)  # about 30% kept


def test_dare_uniforms_are_the_kernels_hash_and_look_uniform():
    key = 0x0123456789ABCDEF
    ours = np.array([kernels._uniform(np.uint64(key), i) for i in range(1000)], np.float32)
    assert np.array_equal(ours, dare_uniforms(key, 1000, "cpu").numpy())
    many = dare_uniforms(key, 1 << 20, "cpu")
    assert 0 <= float(many.min()) and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 0.002
    counts = torch.histc(many, bins=16, min=0, max=1)
    assert float(counts.min()) > 0.97 * (1 << 16)  # every sixteenth gets its share
    other = dare_uniforms(key + 1, 1 << 20, "cpu")
    assert abs(float(torch.corrcoef(torch.stack([many, other]))[0, 1])) < 0.01


def _merged(store_path, text: str, name: str) -> tuple[dict[str, torch.Tensor], object, object]:
    with Store.open(store_path) as s:
        plan = plan_merge(s, text)
        result = run_merge(s, plan, name=name, force=True)
        return dict(s.tensors(result.id)), result, s.manifest(result.id)


def test_predicted_ties_cut_is_the_histograms_cut(merge_store, monkeypatch):
    """A held tensor's TIES cut comes from a sample and one counting pass when the sample's bins hold it,
    else from the histograms: both give the same merge."""
    outcomes = []
    predict = blockmerge._count_predicted_bins

    def watched(backend, blocks, rank, held):
        first, at_least, equal = predict(backend, blocks, rank, held)
        ge = at_least.sum(axis=0)
        outcomes.append(any(ge[r + 1] <= rank < ge[r] for r in range(len(ge) - 1)))
        return first, at_least, equal

    monkeypatch.setattr(blockmerge, "_count_predicted_bins", watched)
    predicted, _, manifest = _merged(merge_store, _query("ties"), "predicted")
    assert outcomes and all(outcomes)  # every cut found from its sample

    def missed(backend, blocks, rank, held):  # bins far above any delta: the rank is never in them
        return 0x7F00, *backend.edge_counts(blocks, np.array([0x7F00, 0x7F01], np.int64) << 16)

    monkeypatch.setattr(blockmerge, "_count_predicted_bins", missed)
    counted, _, counted_manifest = _merged(merge_store, _query("ties"), "histograms")
    assert counted_manifest.id == manifest.id
    for name in predicted:
        assert torch.equal(predicted[name], counted[name]), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_windows_give_the_same_merge_as_whole_tensors(merge_store, monkeypatch, method):
    whole, _, manifest = _merged(merge_store, _query(method), "whole")
    monkeypatch.setattr(mpexec.execute, "STREAM_MIN_ELEMENTS", 0)  # every position its own window
    windowed, result, windowed_manifest = _merged(merge_store, _query(method), "windowed")
    assert result.tensors_passed_through == 0
    for name in whole:
        assert torch.equal(whole[name], windowed[name]), name
    assert manifest.id == windowed_manifest.id  # statistics included


@pytest.mark.parametrize("method", sorted(METHODS))
def test_torch_path_gives_the_kernels_merge(merge_store, monkeypatch, method):
    """--device cuda runs the torch backend; here it runs on the CPU, against the kernels."""
    kernels_out, _, _ = _merged(merge_store, _query(method), "kernels")
    monkeypatch.setattr(blockmerge, "_backend", lambda dtype, device: _TorchBackend(dtype, device))
    torch_out, _, _ = _merged(merge_store, _query(method), "torch")
    for name in kernels_out:
        a, b = kernels_out[name], torch_out[name]
        assert (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max() <= 1, name


def test_unchanged_positions_are_the_base_blocks_and_are_not_read(merge_store):
    with Store.open(merge_store) as s:
        base = s.manifest("base").tensor_map()
        lora = s.manifest("lora").tensor_map()
        text = "merge_method: ties\nbase_model: base\nmodels:\n  - model: lora\n"
        text += "    parameters: {weight: 1.0, density: 0.5}\n"
        result = run_merge(s, plan_merge(s, text), name="lora-only")
        merged = s.manifest(result.id).tensor_map()
    changed_positions = skipped = 0
    for name, entry in merged.items():
        for j, block in enumerate(entry.blocks):
            if lora[name].blocks[j] == base[name].blocks[j]:
                assert block == base[name].blocks[j], (name, j)
                skipped += 1
            else:
                changed_positions += 1
    assert skipped and changed_positions
    assert result.blocks_read <= 2 * changed_positions  # the base's and LoRA's block where LoRA differs


def test_merge_does_not_depend_on_read_ahead_or_threads(merge_store, monkeypatch):
    _, _, first = _merged(merge_store, _query("dare_ties"), "a")
    monkeypatch.setattr(mpexec.execute, "PREFETCH_BYTES", 1)  # one tensor at a time
    _, _, second = _merged(merge_store, _query("dare_ties"), "b")
    assert first.id == second.id


def test_seed_moves_dare_masks_and_nothing_else(merge_store):
    text = _query("dare_ties")
    with Store.open(merge_store) as s:
        plan = plan_merge(s, text)
        a = dict(s.tensors(run_merge(s, plan, name="s0", seed=0).id))
        b = dict(s.tensors(run_merge(s, plan, name="s1", seed=1).id))
        c = dict(s.tensors(run_merge(s, plan, name="s0-again", seed=0).id))
    assert all(torch.equal(a[n], c[n]) for n in a)
    assert any(not torch.equal(a[n], b[n]) for n in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_merge_equals_cpu_merge(merge_store, method):
    with Store.open(merge_store) as s:
        plan = plan_merge(s, _query(method))
        cpu = dict(s.tensors(run_merge(s, plan, name="on-cpu", device="cpu").id))
        gpu = dict(s.tensors(run_merge(s, plan, name="on-gpu", device="cuda").id))
    for name in cpu:
        assert (cpu[name].view(torch.int16).int() - gpu[name].view(torch.int16).int()).abs().max() <= 1, name


def test_a_cpu_merge_of_the_task_arithmetic_family_does_not_import_torch(merge_store):
    """Importing torch costs ~1.3 s of every merge; the kernels do without it."""
    code = (
        "import sys\n"
        "from mpstore import Store\n"
        "from mpexec.merge import plan_merge, run_merge\n"
        f"with Store.open({str(merge_store)!r}) as s:\n"
        f"    run_merge(s, plan_merge(s, {_query('ties')!r}), name='no-torch')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
