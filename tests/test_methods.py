"""mpexec.methods against mergekit 0.1.5's own merge methods, run in-process on small Llama-shaped tensors.

Deterministic methods must agree within float32 rounding; randomized ones (dare_*, della*) must agree at
density 1, be reproducible from the generator's seed and have the right keep statistics. On CPU float32
they even reproduce mergekit's masks when torch's global RNG is seeded like the generator.
"""

from __future__ import annotations

import math

import pytest
import torch

from mpexec.methods import (
    METHODS,
    REQUIRED,
    MergeError,
    QueryError,
    get_method,
    identity_on_equal_inputs,
    merge_tensor,
)
from mpstore.errors import MpstoreError

pytest.importorskip("mergekit")
from mergekit.merge_methods import ParameterScope, TensorGroup, registry
from mergekit.merge_methods.buffers import copy_non_floating_buffer

SHAPES = [(96, 64), (64,)]  # a projection matrix and a norm vector
GTA = [
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]
RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}


# --- helpers ----------------------------------------------------------------------------------------


def reference(name, tensors, base_index, shared, per_input, seed=None):
    """mergekit's result: the registry's method called on one TensorGroup, parameters per mergekit's API."""
    method = registry.get(name)
    parameters = dict(shared)
    for p in method.spec.parameters:
        if p.scope != ParameterScope.SHARED:
            values = [
                per_input[i][p.name]
                for i in range(len(tensors))
                if p.name in per_input[i] and (p.scope == ParameterScope.INPUT or i != base_index)
            ]
            if values:
                parameters[p.name] = values
    if seed is not None:
        torch.manual_seed(seed)
    group = TensorGroup.from_tensors(list(tensors), base_index=base_index)
    (result,) = method((group,), parameters=parameters)
    return result


def ours(name, tensors, base_index, shared, per_input, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return merge_tensor(name, list(tensors), base_index, shared, per_input, generator)


def assert_matches(out, ref):
    """Equal within float32 rounding: a few ulp relative, or of the largest magnitude near zero."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7 * scale)


def assert_matches_topk(out, ref):
    """Top-k selections may keep different ones of equal magnitudes at the cut: at most 0.1% differ."""
    scale = max(1.0, ref.abs().max().item())
    close = torch.isclose(out, ref, rtol=1e-5, atol=1e-7 * scale)
    assert (~close).sum().item() <= 0.001 * ref.numel()
    if not close.all():  # elsewhere exactly as mergekit
        torch.testing.assert_close(out[close], ref[close], rtol=1e-5, atol=1e-7 * scale)


def fine_tunes(shape, n, seed=0, scale=0.02):
    """A base and n fine-tunes of it (index 0 is the base)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def independent(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def gta_inputs(
    name, weights=(0.7, -0.3, 1.2), densities=(1.0, 1.0, 1.0), gammas=(0.05, 0.01, 0.1), epsilons=(0.1, 0.2, 0.05)
):
    """Per-input dicts for a base at index 0 and len(weights) fine-tunes."""
    per = [{}]
    for k, w in enumerate(weights):
        p = {"weight": w, "density": densities[k]}
        if name.startswith("breadcrumbs"):
            p["gamma"] = gammas[k]
        if name.startswith("della"):
            p["epsilon"] = epsilons[k]
        per.append(p)
    return per


# --- specs, parameters, input contracts -------------------------------------------------------------

_KIND = {float: float, int: int, bool: bool, str: str}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_spec_matches_mergekit(name):
    spec, theirs = METHODS[name], registry.get(name).spec
    assert [p.name for p in spec.params] == [p.name for p in theirs.parameters]
    for mine, their in zip(spec.params, theirs.parameters):
        assert mine.scope == their.scope.value, mine.name
        if their.value_type in _KIND:
            assert mine.kind is their.value_type, mine.name
        else:  # passthrough's Optional[float]
            assert mine.kind is float and mine.default is None, mine.name
        assert (mine.default is REQUIRED) == their.required, mine.name
        if not their.required:
            assert mine.default == their.default and type(mine.default) is type(their.default), mine.name
    c = theirs.contract
    assert (spec.base, spec.min_inputs, spec.max_inputs, spec.min_non_base, spec.max_non_base) == (
        c.base.value,
        c.min_inputs,
        c.max_inputs,
        c.min_non_base,
        c.max_non_base,
    )
    assert spec.optional_policy == theirs.optional_tensor_policy.value
    assert spec.randomized == (name in RANDOMIZED)
    assert get_method(name) is spec


def test_unknown_method_and_parameter():
    with pytest.raises(QueryError, match=r"unknown merge method 'frankenmerge' \(known: .*breadcrumbs") as e:
        get_method("frankenmerge")
    assert isinstance(e.value, MpstoreError) and isinstance(e.value, ValueError)
    with pytest.raises(QueryError, match="ties has no parameter 'alpha'"):
        get_method("ties").param("alpha")
    assert get_method("ties").param("density").default == 1.0


VALUES = [
    1,
    0,
    2,
    -3,
    1.0,
    0.0,
    1.5,
    -0.0,
    True,
    False,
    "1e-3",
    "3",
    "3.0",
    "3.00",
    "3.",
    " 4 ",
    "+3",
    "1_000",
    "true",
    "TRUE",
    "Yes",
    "off",
    " true",
    "t",
    "nan",
    "inf",
    "-inf",
    "abc",
    "",
    None,
    float("nan"),
    float("inf"),
    10**30,
    1e20,
    [1],
    {"a": 1},
]


@pytest.mark.parametrize("kind", [float, int, bool, str])
def test_validate_coerces_like_pydantic(kind):
    from pydantic import TypeAdapter, ValidationError

    from mpexec.methods import ParamSpec

    adapter, spec = TypeAdapter(kind), ParamSpec("p", kind, "shared", REQUIRED)
    for value in VALUES:
        try:
            expected = adapter.validate_python(value)
        except ValidationError:
            with pytest.raises(QueryError) as e:
                spec.validate(value, "models[1].parameters.p")
            message = str(e.value)
            assert message.startswith("models[1].parameters.p: ") and "'p'" in message and "\n" not in message
            continue
        got = spec.validate(value, "x")
        assert type(got) is type(expected), value
        assert got == expected or (math.isnan(got) and math.isnan(expected)), value


def test_validate_optional_and_messages():
    scale = get_method("passthrough").param("scale")
    assert scale.validate(None, "w") is None and scale.validate("2", "w") == 2.0
    with pytest.raises(QueryError, match=r"^parameters.weight: parameter 'weight' expects a number, got 'heavy'$"):
        get_method("ties").param("weight").validate("heavy", "parameters.weight")
    with pytest.raises(QueryError, match="'max_iter' expects an integer, got 2.5"):
        get_method("karcher").param("max_iter").validate(2.5, "parameters.max_iter")
    with pytest.raises(QueryError, match="'normalize' expects a boolean"):
        get_method("ties").param("normalize").validate(2, "parameters.normalize")
    long = "x" * 500 + "\nsecond line"
    with pytest.raises(QueryError) as e:
        get_method("ties").param("density").validate(long, "p")
    assert "\n" not in str(e.value) and len(str(e.value)) < 150


@pytest.mark.parametrize("name", sorted(METHODS))
def test_input_counts_match_mergekit(name):
    spec, contract = METHODS[name], registry.get(name).spec.contract
    for n in range(6):
        for has_base in (False, True):
            if has_base and n == 0:
                continue
            ids = list(range(n))
            try:
                contract.validate_ids(ids, 0 if has_base else None)
                theirs_ok = True
            except ValueError:
                theirs_ok = False
            try:
                spec.check_inputs(n, has_base, "slices[0]")
                mine_ok = True
            except QueryError as e:
                mine_ok = False
                message = str(e)
                assert message.startswith(f"slices[0]: {name} requires ") and "\n" not in message
            assert mine_ok == theirs_ok, (n, has_base)


def test_input_count_messages():
    with pytest.raises(QueryError, match=r"^slerp requires exactly 2 inputs; got 3$"):
        get_method("slerp").check_inputs(3, True, "")
    with pytest.raises(QueryError, match=r"^models: model_stock requires at least 3 inputs; got 2$"):
        get_method("model_stock").check_inputs(2, True, "models")
    with pytest.raises(QueryError, match=r"^ties requires a base model$"):
        get_method("ties").check_inputs(3, False, "")
    with pytest.raises(QueryError, match=r"nuslerp requires exactly 2 non-base inputs; got 3"):
        get_method("nuslerp").check_inputs(4, True, "")
    with pytest.raises(QueryError, match=r"passthrough requires exactly 1 input; got 2"):
        get_method("passthrough").check_inputs(2, False, "")
    with pytest.raises(QueryError, match=r"multislerp requires at least 1 non-base input; got 0"):
        get_method("multislerp").check_inputs(1, True, "")
    get_method("linear").check_inputs(1, True, "")  # a base is an ordinary input for linear
    ts = fine_tunes((4, 4), 2)
    with pytest.raises(QueryError, match="slerp requires exactly 2 inputs; got 3"):
        merge_tensor("slerp", ts, 0, {"t": 0.5}, [{}] * 3)
    with pytest.raises(QueryError, match="missing required parameter 'weight' for input 1 of ties"):
        merge_tensor("ties", ts, 0, {}, [{}, {}, {"weight": 1.0}])
    with pytest.raises(QueryError, match="missing required parameter 't' for slerp"):
        merge_tensor("slerp", ts[:2], 0, {}, [{}] * 2)


# --- deterministic parity ---------------------------------------------------------------------------


def _cases():
    cases = []
    lin = [{"weight": w} for w in (0.3, 0.5, 0.9, 0.1)]
    for normalize in (True, False):
        cases += [
            ("linear", "ft", 4, 0, {"normalize": normalize}, lin),
            ("linear", "ft", 4, None, {"normalize": normalize}, lin),
        ]
    cases.append(("linear", "ft", 4, None, {}, [{"weight": w} for w in (1.0, -0.5, 0.25, 2.0)]))
    for shared in ({}, {"normalize": True}, {"lambda": 0.5}, {"lambda": 1.5, "normalize": True}):
        cases.append(("task_arithmetic", "ft", 4, 0, shared, gta_inputs("task_arithmetic")))
    cases.append(("task_arithmetic", "ft", 4, 2, {}, [{"weight": 1.0}, {"weight": 0.5}, {}, {"weight": -1.0}]))
    for name in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        dens = (0.5, 0.7, 0.3) if name == "ties" else (0.8, 0.9, 0.7)
        for shared in (
            {},
            {"normalize": True},
            {"normalize": False, "lambda": 0.8},
            {"rescale": True},
            {"int8_mask": True, "normalize": True},
        ):
            cases.append((name, "ft", 4, 0, shared, gta_inputs(name, densities=dens)))
        cases.append((name, "ft", 4, 0, {}, gta_inputs(name)))  # density 1: no sparsification
    cases.append(("breadcrumbs", "ft", 3, 0, {}, gta_inputs("breadcrumbs", (1.0, 1.0), (0.5, 0.2), (0.7, 0.9))))
    for name in RANDOMIZED:  # density 1 (the default): deterministic
        for shared in ({}, {"normalize": True, "lambda": 0.7}, {"rescale": False}):
            cases.append((name, "ft", 4, 0, shared, gta_inputs(name)))
    for t in (0.0, 0.3, 0.75, 1.0):
        for b in (0, 1):
            cases.append(("slerp", "ind", 2, b, {"t": t}, [{}, {}]))
            cases.append(("slerp", "ft", 2, b, {"t": t}, [{}, {}]))  # nearly colinear: linear branch
    for row_wise in (False, True):
        for flatten in (False, True):
            shared = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
            cases.append(("nuslerp", "ft", 3, 0, shared, [{}, {"weight": 0.3}, {"weight": 0.9}]))
            cases.append(("nuslerp", "ind", 2, None, shared, [{"weight": 0.3}, {"weight": 0.9}]))
    cases.append(("nuslerp", "ind", 2, None, {}, [{"weight": 1.0}, {"weight": -1.0}]))  # t falls back to 0.5
    for normalize_weights in (True, False):
        shared = {"normalize_weights": normalize_weights}
        cases.append(("multislerp", "ft", 4, 0, shared, [{}] + [{"weight": w} for w in (0.3, 0.5, 0.9)]))
        cases.append(("multislerp", "ind", 3, None, shared, [{"weight": w} for w in (0.3, 0.5, 0.9)]))
    cases.append(("multislerp", "ft", 2, 0, {}, [{}, {"weight": 0.4}]))  # one non-base: returned as is
    cases.append(("multislerp", "ind", 3, None, {"eps": 1e-6}, [{"weight": 1.0}] * 3))
    for shared in ({}, {"max_iter": 3, "tol": 1e-3}, {"max_iter": "20", "tol": "1e-7"}):
        cases.append(("karcher", "ft", 4, 0, shared, [{}] * 4))
        cases.append(("karcher", "ind", 3, None, shared, [{}] * 3))
    for filter_wise in (False, True):
        cases.append(("model_stock", "ft", 3, 0, {"filter_wise": filter_wise}, [{}] * 3))
        cases.append(("model_stock", "ft", 4, 0, {"filter_wise": filter_wise}, [{}] * 4))
    for select_topk in (1.0, 0.5, 0.1, 0.0):
        cases.append(("sce", "ft", 4, 0, {"select_topk": select_topk}, [{}] * 4))
    cases += [
        ("sce", "ft", 4, 0, {"int8_mask": True, "select_topk": 0.3}, [{}] * 4),
        ("sce", "ft", 2, 0, {"select_topk": 0.5}, [{}] * 2),
        ("sce", "ft", 1, 0, {}, [{}]),
    ]
    for t in (0.0, 1e-7, 0.001, 0.01, 0.5):
        cases.append(("nearswap", "ft", 2, 0, {"t": t}, [{}, {}]))
    cases += [("passthrough", "ft", 1, None, {}, [{}]), ("passthrough", "ft", 1, None, {}, [{"scale": 2.5}])]
    return cases


CASES = _cases()


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "1d"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parity(case, shape):
    name, kind, n, b, shared, per = case
    tensors = fine_tunes(shape, n - 1, seed=len(per)) if kind == "ft" else independent(shape, n, seed=3)
    ref = reference(name, tensors, b, shared, per)
    out = ours(name, tensors, b, shared, per, seed=0 if name in RANDOMIZED else None)
    if name in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        assert_matches_topk(out, ref)
    else:
        assert_matches(out, ref)


def test_inputs_not_modified():
    for name, b, shared, per in [
        ("ties", 0, {"rescale": True}, gta_inputs("ties", densities=(0.5, 0.5, 0.5))),
        ("dare_ties", 0, {}, gta_inputs("dare_ties", densities=(0.5, 0.5, 0.5))),
        ("multislerp", 0, {}, [{}] + [{"weight": 1.0}] * 3),
        ("sce", 0, {"select_topk": 0.5}, [{}] * 4),
        ("linear", None, {}, [{"weight": 1.0}] * 4),
    ]:
        tensors = fine_tunes((16, 8), 3)
        copies = [t.clone() for t in tensors]
        ours(name, tensors, b, shared, per, seed=1)
        assert all(torch.equal(t, c) for t, c in zip(tensors, copies)), name


def _quantized_delta(shape, dtype, seed=4):
    # deltas of bfloat16 checkpoints are multiples of a few ulps: many equal magnitudes at every cut
    g = torch.Generator().manual_seed(seed)
    return (torch.round(torch.randn(shape, generator=g) * 3) / 3 * 0.01 + 0.001).to(dtype)  # no zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tied_magnitudes_keep_the_same_elements_as_mergekit(dtype):
    delta = _quantized_delta((128, 128), dtype)
    base = torch.zeros_like(delta)
    for name in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        per = gta_inputs(name, (1.0,), (0.3,), (0.05,))
        for shared in ({}, {"rescale": True}):
            assert torch.equal(
                ours(name, [base, delta], 0, shared, per), reference(name, [base, delta], 0, shared, per)
            ), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_magnitudes_in_large_tensors(dtype):
    # Above 2**20 elements ties uses top-k: the same magnitudes are kept, but of those equal to the
    # smallest one kept it may pick others than mergekit's argsort.
    delta = _quantized_delta((1100, 1000), dtype)
    base = torch.zeros_like(delta)  # the merge is then the pruned delta itself, exactly
    per = gta_inputs("ties", (1.0,), (0.3,))
    out, ref = ours("ties", [base, delta], 0, {}, per), reference("ties", [base, delta], 0, {}, per)
    k = int(0.3 * delta.numel())
    assert (out != 0).sum() == (ref != 0).sum() == k
    assert torch.equal(out[out != 0].float().abs().sort().values, ref[ref != 0].float().abs().sort().values)
    differ = out != ref
    assert torch.all(delta[differ].abs().float() == delta.abs().float().reshape(-1).topk(k).values.min())
    assert differ.sum() <= 0.001 * delta.numel()


def test_sparsification_edge_densities():
    tensors = fine_tunes((32, 16), 3, seed=5)
    for name, dens, gam in [
        ("ties", (1e-9, 0.0, -1.0), (0, 0, 0)),
        ("breadcrumbs", (0.5, -0.5, 0.0), (0.7, 1.7, 0.1)),
        ("breadcrumbs_ties", (0.99, 0.5, 0.3), (0.0, 0.5, 0.9)),
    ]:
        per = gta_inputs(name, (1.0, 0.5, -0.7), dens, gam)
        assert torch.equal(ours(name, tensors, 0, {}, per), reference(name, tensors, 0, {}, per)), name


def test_big_slerp_uses_mergekits_chunked_norms():
    a, b = independent((1100, 1000), 2, seed=9)  # more than 2**20 elements: several chunks
    assert_matches(ours("slerp", [a, b], 0, {"t": 0.3}, [{}, {}]), reference("slerp", [a, b], 0, {"t": 0.3}, [{}, {}]))


def test_degenerate_inputs_like_mergekit():
    x = independent((5, 4), 1, seed=2)[0]
    cases = [
        ("slerp", [x, -0.5 * x], 0, {"t": 0.3}, [{}, {}]),  # antipodal: linear branch
        ("slerp", [torch.zeros(10), x.reshape(-1)[:10]], 1, {"t": 0.3}, [{}, {}]),
        ("multislerp", [x, -x], None, {}, [{"weight": 1.0}] * 2),  # zero mean: linear fallback
        ("karcher", [x * 1e-7, x * 2e-7], None, {}, [{}, {}]),  # norms below tol: zero
        ("karcher", [x * 0, x], None, {}, [{}, {}]),
        ("karcher", [x, -x], None, {}, [{}, {}]),
        ("model_stock", [x, x + 1, x - 1], 0, {}, [{}] * 3),  # singular ratio: the base
        ("model_stock", [x, x + 1, x - 1], 0, {"filter_wise": True}, [{}] * 3),
        ("nuslerp", [x, x + 1, x - 2], 0, {}, [{}, {"weight": 1.0}, {"weight": -1.0}]),
        ("task_arithmetic", [x, x + 1, x - 1], 0, {"normalize": True}, [{}, {"weight": 1.0}, {"weight": -1.0}]),
        ("ties", [x, x], 0, {}, [{}, {"weight": 1.0, "density": 0.5}]),  # zero delta
        ("sce", [x], 0, {}, [{}]),
    ]
    for name, tensors, b, shared, per in cases:
        assert_matches(ours(name, tensors, b, shared, per), reference(name, tensors, b, shared, per))
    with pytest.raises(ValueError):
        reference("multislerp", [x, -x, 0 * x], None, {}, [{"weight": 1.0}] * 3)
    with pytest.raises(MergeError, match="multislerp: the weighted sum"):
        ours("multislerp", [x, -x, 0 * x], None, {}, [{"weight": 1.0}] * 3)


def test_linear_normalize_with_zero_weight_sum_is_an_error():
    tensors = fine_tunes((4, 4), 1)
    with pytest.raises(QueryError, match="linear: the weights sum to 0"):
        ours("linear", tensors, None, {}, [{"weight": 1.0}, {"weight": -1.0}])
    assert_matches(
        ours("linear", tensors, None, {"normalize": False}, [{"weight": 1.0}, {"weight": -1.0}]),
        tensors[0] - tensors[1],
    )
    with pytest.raises(QueryError, match="^models: linear: the weights sum to 0"):  # at plan time
        get_method("linear").check_values({"normalize": True}, [{"weight": 0.5}, {"weight": -0.5}], "models")
    get_method("linear").check_values({"normalize": False}, [{"weight": 0.5}, {"weight": -0.5}], "models")


def test_unknown_parameters_are_errors():
    tensors = fine_tunes((4, 4), 1)
    with pytest.raises(QueryError, match="unknown shared parameter.s. densty for ties"):
        merge_tensor("ties", tensors, 0, {"densty": 0.5}, [{}, {"weight": 1.0}])
    with pytest.raises(QueryError, match="unknown input 1 parameter.s. t for ties"):
        merge_tensor("ties", tensors, 0, {}, [{}, {"weight": 1.0, "t": 0.5}])
    with pytest.raises(QueryError, match="'density' expects a number"):
        merge_tensor("ties", tensors, 0, {}, [{}, {"weight": 1.0, "density": "half"}])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_computation_dtypes(dtype):
    tensors = [t.to(dtype) for t in fine_tunes((64, 48), 3, seed=6)]
    cases = [
        ("linear", None, {}, [{"weight": w} for w in (0.3, 0.5, 0.9, 0.1)]),
        ("task_arithmetic", 0, {"lambda": 0.7}, gta_inputs("task_arithmetic")),
        ("breadcrumbs_ties", 0, {}, gta_inputs("breadcrumbs_ties", densities=(0.8, 0.9, 0.7))),
        ("slerp", 0, {"t": 0.4}, [{}, {}]),
        ("nuslerp", 0, {}, [{}, {"weight": 0.3}, {"weight": 0.6}]),
        ("multislerp", 0, {}, [{}] + [{"weight": w} for w in (0.3, 0.5, 0.9)]),
        ("karcher", None, {}, [{}] * 4),
        ("model_stock", 0, {}, [{}] * 4),
        ("sce", 0, {"select_topk": 0.3}, [{}] * 4),
        ("nearswap", 0, {"t": 0.01}, [{}, {}]),
    ]
    if dtype != torch.float64:  # mergekit samples float64 deltas in float32 on CPU; we keep float64
        cases.append(("dare_ties", 0, {}, gta_inputs("dare_ties", densities=(0.4, 0.6, 0.3))))
    for name, b, shared, per in cases:
        ts = tensors[: len(per)]
        out, ref = ours(name, ts, b, shared, per, seed=5), reference(name, ts, b, shared, per, seed=5)
        assert out.dtype == ref.dtype == dtype, name
        assert torch.equal(out, ref), name


def test_non_floating_buffers():
    ids = torch.arange(12).reshape(3, 4)
    out = merge_tensor("ties", [ids, ids.clone(), ids.clone()], 0, {}, [{}, {"weight": 1.0}, {"weight": 2.0}])
    assert torch.equal(out, copy_non_floating_buffer([ids, ids])) and out.data_ptr() != ids.data_ptr()
    with pytest.raises(MergeError, match="non-floating buffer differs"):
        merge_tensor("linear", [ids, ids + 1], None, {}, [{"weight": 1.0}] * 2, where="model.position_ids")
    with pytest.raises(ValueError):
        copy_non_floating_buffer([ids, ids + 1])
    mask = torch.ones(5, dtype=torch.bool)
    assert torch.equal(merge_tensor("slerp", [mask, mask], 1, {"t": 0.5}, [{}, {}]), mask)


# --- randomized methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RANDOMIZED))
def test_randomized_is_reproducible(name):
    tensors = fine_tunes((64, 48), 3, seed=7)
    per = gta_inputs(name, densities=(0.5, 0.3, 0.7))
    a = ours(name, tensors, 0, {}, per, seed=11)
    assert torch.equal(a, ours(name, tensors, 0, {}, per, seed=11))
    assert not torch.equal(a, ours(name, tensors, 0, {}, per, seed=12))


@pytest.mark.parametrize("name", sorted(RANDOMIZED))
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "1d"])
def test_randomized_reproduces_mergekits_masks(name, shape):
    # On CPU float32, u < p on uniforms from the seeded generator is exactly torch.bernoulli's stream.
    tensors = fine_tunes(shape, 3, seed=8)
    per = gta_inputs(name, densities=(0.5, 1.0, 0.3))
    for shared in ({}, {"rescale": False, "normalize": True}):
        assert torch.equal(
            ours(name, tensors, 0, shared, per, seed=21), reference(name, tensors, 0, shared, per, seed=21)
        )


def _kept(delta_out):
    return (delta_out != 0).float().mean().item()


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_rate_and_l1_rescale(density):
    n = 256 * 256
    delta = independent((256, 256), 1, seed=12)[0]
    zero = torch.zeros_like(delta)  # base 0: the output is the sparsified delta itself
    per = [{}, {"weight": 1.0, "density": density}]
    out = ours("dare_linear", [zero, delta], 0, {}, per, seed=13)
    assert abs(_kept(out) - density) <= 4 * math.sqrt(density * (1 - density) / n)
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    kept = out != 0
    scale = (out[kept] / delta[kept]).mean()
    torch.testing.assert_close(out[kept], delta[kept] * scale, rtol=1e-5, atol=0)  # one factor for all
    raw = ours("dare_linear", [zero, delta], 0, {"rescale": False}, per, seed=13)
    assert torch.equal(raw != 0, kept) and torch.equal(raw[kept], delta[kept])


def test_della_keep_probability_rises_with_magnitude_rank():
    rows, cols, density, epsilon = 512, 100, 0.5, 0.3
    delta = independent((rows, cols), 1, seed=14)[0]
    zero = torch.zeros_like(delta)
    per = [{}, {"weight": 1.0, "density": density, "epsilon": epsilon}]
    outs = {
        "ours": ours("della_linear", [zero, delta], 0, {}, per, seed=15),
        "mergekit": reference("della_linear", [zero, delta], 0, {}, per, seed=16),
    }
    rank = delta.abs().argsort(dim=1).argsort(dim=1).float() / (cols - 1)  # 0 .. 1 within each row
    for who, out in outs.items():
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
        assert abs(_kept(out) - density) <= 4 * math.sqrt(density * (1 - density) / delta.numel()), who
        kept = (out != 0).float()
        rates = []
        for lo in (0.0, 0.2, 0.4, 0.6, 0.8):
            bucket = (rank >= lo) & (rank < lo + 0.2 if lo < 0.8 else rank <= 1.0)
            expected = (density - epsilon + 2 * epsilon * rank[bucket]).mean().item()
            rate = kept[bucket].mean().item()
            assert abs(rate - expected) <= 4 * math.sqrt(expected * (1 - expected) / bucket.sum().item()), who
            rates.append(rate)
        assert rates == sorted(rates), (who, rates)


def test_della_vector_is_one_row_and_single_columns_keep_density():
    vector = independent((4096,), 1, seed=17)[0]
    per = [{}, {"weight": 1.0, "density": 0.4, "epsilon": 0.35}]
    out = ours("della_linear", [torch.zeros_like(vector), vector], 0, {}, per, seed=18)
    top, bottom = vector.abs().argsort()[-1024:], vector.abs().argsort()[:1024]
    assert (out[top] != 0).float().mean() > 0.6 and (out[bottom] != 0).float().mean() < 0.2
    column = independent((20000, 1), 1, seed=19)[0]  # mergekit fails here (0/0 rank normalization)
    out = ours("della_linear", [torch.zeros_like(column), column], 0, {}, per, seed=20)
    assert abs(_kept(out) - 0.4) <= 4 * math.sqrt(0.24 / column.numel())


def test_della_epsilon_must_fit_density():
    tensors = fine_tunes((8, 8), 1)
    per = [{}, {"weight": 1.0, "density": 0.1, "epsilon": 0.15}]
    with pytest.raises(ValueError, match="Epsilon must be chosen"):
        reference("della", tensors, 0, {}, per, seed=1)
    with pytest.raises(
        QueryError,
        match=r"^layers.0.w: input 1: epsilon must be chosen such that density \+/- "
        r"epsilon is in \(0, 1\); got density=0.1, epsilon=0.15$",
    ):
        merge_tensor("della", tensors, 0, {}, per, torch.Generator(), where="layers.0.w")
    with pytest.raises(QueryError, match="epsilon must be chosen"):
        get_method("della").check_values({}, per, "")
    get_method("della").check_values({}, [{}, {"weight": 1.0, "density": 1.0, "epsilon": 0.15}], "")


# --- identity on equal inputs -------------------------------------------------------------------------

IDENTITY_CASES = [
    (name, {"lambda": lam}, gta_inputs(name, densities=(0.5, 0.3, 0.7))) for name in GTA for lam in (1.0, 0.4)
] + [
    ("ties", {"normalize": True, "rescale": True}, gta_inputs("ties", (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))),
    ("sce", {}, [{}] * 4),
    ("sce", {"select_topk": 0.3}, [{}] * 4),
    ("model_stock", {}, [{}] * 4),
    ("model_stock", {"filter_wise": True}, [{}] * 3),
    ("linear", {}, [{"weight": w} for w in (0.3, 0.5, 0.9, 0.1)]),
    ("slerp", {"t": 0.0}, [{}, {}]),
    ("slerp", {"t": 1.0}, [{}, {}]),
    ("nearswap", {"t": 0.3}, [{}, {}]),
    ("nearswap", {"t": 1e-7}, [{}, {}]),
]


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(IDENTITY_CASES)])
def test_identity_on_equal_inputs_holds_in_mergekit(case):
    name, shared, per = case
    assert identity_on_equal_inputs(name, shared)
    for x in (independent((32, 16), 1, seed=22)[0], torch.full((16,), 3e-9)):
        copies = [x.clone() for _ in per]
        ref = reference(name, copies, 0, shared, per, seed=3)
        if name in ("linear", "nearswap"):  # sum(w x) / sum(w): x up to rounding
            assert_matches(ref, x)
        else:
            assert torch.equal(ref, x), name
        assert_matches(ours(name, copies, 0, shared, per, seed=3), ref)


def test_identity_on_equal_inputs_is_conservative():
    x = torch.full((16,), 1e-9)  # norm below slerp's and karcher's thresholds
    assert not identity_on_equal_inputs("slerp", {"t": 0.5})
    # norm <= 1e-8 is not normalized, so cos is ~0 and slerp's coefficients sum to sqrt(2), not 1
    torch.testing.assert_close(reference("slerp", [x, x], 0, {"t": 0.5}, [{}, {}]), x * math.sqrt(2), rtol=1e-5, atol=0)
    assert not identity_on_equal_inputs("karcher", {})
    assert torch.equal(reference("karcher", [x, x], None, {}, [{}, {}]), torch.zeros_like(x))
    assert not identity_on_equal_inputs("multislerp", {})
    with pytest.raises(ValueError):
        reference("multislerp", [x] * 4, 0, {}, [{}] + [{"weight": 1.0}] * 3)
    assert not identity_on_equal_inputs("linear", {"normalize": False})
    assert not identity_on_equal_inputs("passthrough", {})
    assert not identity_on_equal_inputs("nuslerp", {})
    assert not identity_on_equal_inputs("ties", {"lambda": float("nan")})
    assert not identity_on_equal_inputs("frankenmerge", {})
    assert not identity_on_equal_inputs("slerp", {})  # t missing
    assert identity_on_equal_inputs("linear", {}) and identity_on_equal_inputs("ties", {"lambda": "0.5"})


# --- CUDA (skipped without a GPU) ---------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("name", sorted(RANDOMIZED))
def test_cuda_masks_equal_cpu_masks(name):
    tensors = fine_tunes((96, 64), 3, seed=23)
    per = gta_inputs(name, densities=(0.5, 0.3, 0.7))
    cpu = ours(name, tensors, 0, {}, per, seed=24)
    gpu = ours(name, [t.cuda() for t in tensors], 0, {}, per, seed=24).cpu()
    assert torch.equal(cpu != tensors[0], gpu != tensors[0])
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("case", CASES[::3], ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES[::3])])
def test_cuda_matches_cpu(case):
    name, kind, n, b, shared, per = case
    tensors = fine_tunes((96, 64), n - 1, seed=len(per)) if kind == "ft" else independent((96, 64), n, seed=3)
    cpu = ours(name, tensors, b, shared, per, seed=0)
    gpu = ours(name, [t.cuda() for t in tensors], b, shared, per, seed=0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
