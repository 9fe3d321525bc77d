"""The streamed merge equals the whole-tensor kernels, chunk size notwithstanding.

On continuous random float32 data (no ties), every streamed method must give what merging the whole
tensor gives, within float32 rounding, for several chunk sizes; randomized methods must give the
same result whatever the chunk size (their masks are drawn in element order from one generator per
input).
"""

from __future__ import annotations

import pytest
import torch

from mpexec.methods import merge_tensor
from mpexec.stream import STREAMED, stream_merge, streamable

ROWS, COLS = 96, 40

CASES = {
    "linear": ({"normalize": True}, [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.9}], None),
    "task_arithmetic": (
        {"normalize": False, "lambda": 0.8, "rescale": False, "int8_mask": False},
        [{}, {"weight": 0.5}, {"weight": 0.7}],
        0,
    ),
    "ties": (
        {"normalize": True, "lambda": 1.0, "rescale": False, "int8_mask": False},
        [{}, {"weight": 0.5, "density": 0.3}, {"weight": 0.7, "density": 0.6}],
        0,
    ),
    "ties_rescaled": (
        {"normalize": True, "lambda": 1.0, "rescale": True, "int8_mask": False},
        [{}, {"weight": 0.5, "density": 0.3}, {"weight": 0.7, "density": 0.6}],
        0,
    ),
    "breadcrumbs_ties": (
        {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False},
        [{}, {"weight": 0.5, "density": 0.7, "gamma": 0.05}, {"weight": 0.5, "density": 0.8, "gamma": 0.01}],
        0,
    ),
    "slerp": ({"t": 0.3}, [{}, {}], 0),
    "nuslerp": ({"nuslerp_row_wise": False, "nuslerp_flatten": True}, [{}, {"weight": 0.3}, {"weight": 0.7}], 0),
    "nuslerp_columns": ({"nuslerp_row_wise": True, "nuslerp_flatten": False}, [{"weight": 0.4}, {"weight": 0.6}], None),
    "multislerp": (
        {"normalize_weights": True, "eps": 1e-8},
        [{}, {"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}],
        0,
    ),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, [{}, {}, {}], None),
    "model_stock": ({"filter_wise": False}, [{}, {}, {}, {}], 0),
    "model_stock_filters": ({"filter_wise": True}, [{}, {}, {}], 0),
    "sce": ({"select_topk": 0.4, "int8_mask": False}, [{}, {}, {}, {}], 0),
    "nearswap": ({"t": 0.001}, [{}, {}], 0),
}


def _inputs(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(ROWS, COLS, generator=g) * 0.02
    return [base] + [base + torch.randn(ROWS, COLS, generator=g) * 2e-3 for _ in range(n - 1)]


def _streamed(method, tensors, base_index, shared, per, chunk_rows, seeds=None) -> torch.Tensor:
    def read(r0, r1):
        return [t[r0:r1] for t in tensors]

    seeds = seeds or [11 * (k + 1) for k in range(len(tensors))]
    return torch.cat(list(stream_merge(method, read, ROWS, chunk_rows, base_index, shared, per, seeds)))


def _method(case: str) -> str:
    return case.removesuffix("_rescaled").removesuffix("_columns").removesuffix("_filters")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_rows", [5, 32])
def test_streamed_equals_whole_tensor(case, chunk_rows):
    shared, per, base_index = CASES[case]
    method = _method(case)
    assert streamable(method, shared, 2)
    tensors = _inputs(len(per))
    whole = merge_tensor(method, tensors, base_index, shared, per)
    if method == "karcher":  # ill-conditioned in float32: compare with the exact answer
        whole = merge_tensor(method, [t.double() for t in tensors], base_index, shared, per).float()
    streamed = _streamed(method, tensors, base_index, shared, per, chunk_rows)
    torch.testing.assert_close(streamed, whole, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_randomized_masks_do_not_depend_on_chunk_size(method):
    shared = {"normalize": method == "della", "lambda": 1.0, "rescale": True, "int8_mask": False}
    per = [{}, {"weight": 0.5, "density": 0.4, "epsilon": 0.1}, {"weight": 0.5, "density": 0.6, "epsilon": 0.2}]
    tensors = _inputs(3)
    results = [_streamed(method, tensors, 0, shared, per, rows) for rows in (1, 13, ROWS)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-8)
    # the L1 rescale holds over the whole tensor for each input (merged with one input at a time)
    for k in (1, 2):
        single = [{}, {**per[k], "weight": 1.0}]
        out = _streamed(method, [tensors[0], tensors[k]], 0, {**shared, "normalize": False}, single, 7)
        delta, kept = tensors[k] - tensors[0], out - tensors[0]
        assert float(kept.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
        fraction = float((kept != 0).float().mean())
        assert abs(fraction - per[k]["density"]) < 0.05


def test_every_method_is_streamed():
    from mpexec.methods import METHODS

    assert STREAMED == set(METHODS)
