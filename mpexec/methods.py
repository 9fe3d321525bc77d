"""The merge operators of mergekit 0.1.5, as whole-tensor torch kernels.

Each method keeps mergekit's name, parameters (name, type, scope, default), input contract, optional-
tensor policy and numerical semantics; the kernels were written against mergekit 0.1.5's source
(``mergekit/merge_methods/*.py`` and ``mergekit/sparsify.py``) and are checked against it by
``tests/test_methods.py``. Things worth knowing about 0.1.5 (some differ from the papers):

* ``linear`` ignores the base model: a configured base is just one more weighted input. It computes in
  float32 (float64 for float64 inputs) and returns the input dtype; weights are rounded to float32.
* Task-arithmetic methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*) subtract the base,
  sparsify each delta on its own, then multiply it by its ``weight``. The TIES sign election ("sum")
  votes with the *weighted* deltas; a zero delta never agrees with the elected sign, so it is left out
  of the ``normalize`` divisor (per element). Without a consensus step the divisor is the plain sum of
  weights (1 when it is below 1e-8). ``lambda`` scales the merged delta after normalization.
* DARE and DELLA rescale a pruned delta so that its L1 norm equals the unpruned one (``rescale``), for
  the whole tensor -- not by 1/p per element as in the papers. DELLA's keep probability is
  ``density - epsilon + 2 * epsilon * rank / (n - 1)`` with ranks by magnitude *within each row*
  (a 1-D tensor is one row), so larger entries are kept more often.
* ``breadcrumbs`` drops the ``gamma`` fraction of largest and then the smallest magnitudes to keep
  ``density``; with the default density 1 it does nothing at all. ``magnitude`` (ties) keeps at least one
  element whenever density > 0.
* ``slerp`` interpolates whole flattened tensors (the raw tensors, not the unit vectors), falls back to
  linear interpolation when |cos| > 0.9995; ``nuslerp`` by default flattens too, and with a base it
  interpolates the two task vectors; ``nuslerp_row_wise`` only matters with ``nuslerp_flatten: false``
  and then treats the *columns* (axis 0) as the vectors.
* ``multislerp`` with a single non-base input returns that input (the base is not added back).
* ``karcher`` ignores the base (it is averaged like any other input) and uses equal weights; tensors
  with norm <= tol are left out of the mean (all of them: the result is zero).
* ``sce`` has no weights: each task vector is weighted by its mean square; ``select_topk`` keeps the
  elements with the largest variance across inputs. With a single non-base input and select_topk < 1
  everything is dropped (variance 0) and the result is the base.
* ``model_stock`` keeps the base where its interpolation ratio is singular.
* Non-floating tensors (buffers) are never merged: they are copied when every input agrees exactly and
  are an error otherwise (``buffers.copy_non_floating_buffer``).

Deliberate differences from mergekit 0.1.5:

* Randomness (dare_*, della*) comes from a caller-supplied CPU ``torch.Generator``; uniforms are drawn on
  the CPU and compared with the keep probability (float32), so CPU and CUDA keep the same elements. On a
  CPU float32 tensor this consumes the stream exactly like mergekit's ``torch.bernoulli`` does, so a
  generator seeded like ``torch.manual_seed`` reproduces mergekit's masks bit for bit.
* DELLA ranks equal magnitudes by position (a stable sort, the same on every device); mergekit's
  unstable sort may order them differently, so where a row has equal magnitudes the masks can differ.
  A row of length 1 gets keep probability ``density`` (mergekit divides 0 by 0 there and fails).
* Keep probabilities are rounded to bfloat16 for bfloat16 tensors and to float32 otherwise, and
  float16 deltas are sampled in float32: mergekit's CPU behaviour, on every device. float64 deltas stay
  float64 (mergekit on CPU rounds them to float32 when it samples).
* ``linear`` with ``normalize`` and weights summing to 0 is an error (mergekit divides by zero).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


from mpstore.errors import MpstoreError

from .lazy_torch import torch

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeError",
    "MethodSpec",
    "ParamSpec",
    "QueryError",
    "get_method",
    "identity_on_equal_inputs",
    "merge_tensor",
]


class QueryError(MpstoreError, ValueError):
    """The merge query is wrong: unknown method, bad parameter value, wrong number of inputs."""


class MergeError(MpstoreError, ValueError):
    """These tensor values cannot be merged (differing non-floating buffers, degenerate multislerp)."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # ParamSpec.default of a parameter without default

BASE_POLICIES = ("required", "optional", "ignored", "forbidden")
OPTIONAL_POLICIES = ("error", "passthrough_singleton", "passthrough_base_singleton", "base_or_skip")
SCOPES = ("shared", "input", "non_base")


def _where(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


# --- parameter values, coerced the way pydantic 2 (lax mode) does for mergekit's annotations ---------

_BOOL_WORDS = {
    "0": False,
    "off": False,
    "f": False,
    "false": False,
    "n": False,
    "no": False,
    "1": True,
    "on": True,
    "t": True,
    "true": True,
    "y": True,
    "yes": True,
}
_INT_TEXT = re.compile(r"[+-]?\d+(?:_\d+)*(?:\.0+)?")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (bool, int, float, str)):
        try:
            return float(value)  # str: Python's float syntax matches pydantic's (" 4 ", "1e-3", "1_000", "nan")
        except (ValueError, OverflowError):
            return None
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
            return int(value)
        return None
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text.split(".")[0])
    return None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):  # 0, 1, 0.0, 1.0 only; not 2, 0.5, nan
        return bool(value)
    if isinstance(value, str):
        return _BOOL_WORDS.get(value.lower())
    return None


def _as_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


_COERCE: dict[type, tuple[Callable[[Any], Any], str]] = {
    float: (_as_float, "a number"),
    int: (_as_int, "an integer"),
    bool: (_as_bool, "a boolean (true/false)"),
    str: (_as_str, "a string"),
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method, as mergekit declares it."""

    name: str
    kind: type  # float, int, bool or str
    scope: str  # "shared", "input" (every input, base included) or "non_base"
    default: Any = REQUIRED  # REQUIRED, a value of `kind`, or None (accepted as "not set")

    def __post_init__(self):
        if self.kind not in _COERCE:
            raise TypeError(f"parameter kind must be float, int, bool or str, not {self.kind!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"parameter scope must be one of {SCOPES}, not {self.scope!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str = "") -> Any:
        """The value coerced to `kind` like pydantic would (1 -> 1.0, "1e-3" -> 0.001, "yes" -> True,
        2.0 -> 2 for int); a QueryError naming the parameter when it cannot be."""
        if value is None and self.default is None:
            return None
        coerce, expected = _COERCE[self.kind]
        result = coerce(value)
        if result is None:
            raise QueryError(_where(where, f"parameter {self.name!r} expects {expected}, got {_short(value)}"))
        return result


@dataclass(frozen=True)
class MethodSpec:
    """A merge method's parameters and input contract (mergekit's MergeMethodSpec + InputContract)."""

    name: str
    params: tuple[ParamSpec, ...]
    base: str  # "required" | "optional" | "ignored" (a base is one more ordinary input) | "forbidden"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    optional_policy: str = "error"  # what mergekit does with an optional weight some inputs lack
    randomized: bool = False  # draws random numbers (dare_*, della*)

    def __post_init__(self):
        if self.base not in BASE_POLICIES or self.optional_policy not in OPTIONAL_POLICIES:
            raise ValueError(f"bad base or optional policy for {self.name}")

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise QueryError(f"{self.name} has no parameter {name!r} (known: {known})")

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "shared")

    @property
    def input_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope != "shared")

    def check_inputs(self, n_inputs: int, has_base: bool, where: str = "") -> None:
        """mergekit's InputContract.validate_ids on counts: n_inputs includes the base when has_base."""
        if self.base == "ignored":
            has_base = False  # the base, if any, counts as an ordinary input
        if self.base == "required" and not has_base:
            raise QueryError(_where(where, f"{self.name} requires a base model"))
        if self.base == "forbidden" and has_base:
            raise QueryError(_where(where, f"{self.name} does not accept a base model"))
        self._check_count("inputs", n_inputs, self.min_inputs, self.max_inputs, where)
        if self.min_non_base is not None or self.max_non_base is not None:
            self._check_count(
                "non-base inputs", n_inputs - int(has_base), self.min_non_base or 0, self.max_non_base, where
            )

    def _check_count(self, what: str, count: int, minimum: int, maximum: int | None, where: str) -> None:
        if count < minimum or (maximum is not None and count > maximum):
            if maximum == minimum:
                bound, expectation = minimum, f"exactly {minimum}"
            elif count < minimum:
                bound, expectation = minimum, f"at least {minimum}"
            else:
                bound, expectation = maximum, f"at most {maximum}"
            noun = what[:-1] if bound == 1 else what  # "1 input", "2 inputs"
            raise QueryError(_where(where, f"{self.name} requires {expectation} {noun}; got {count}"))

    def check_values(self, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]], where: str = "") -> None:
        """Checks that involve several resolved parameters (mergekit fails on them only while merging):
        della's density +/- epsilon must lie in (0, 1) whenever 0 < density < 1, and linear's weights must
        not sum to 0 when it normalizes (mergekit would divide by zero)."""
        if self.name == "linear" and shared.get("normalize", True):
            weights = [params["weight"] for params in per_input if "weight" in params]
            if weights and math.fsum(weights) == 0:
                raise QueryError(_where(where, _ZERO_LINEAR))
        if self.name in ("della", "della_linear"):
            for i, params in enumerate(per_input):
                if "density" in params:
                    _check_della(params["density"], params.get("epsilon", 0.15), _where(where, f"input {i}"))


_ZERO_LINEAR = (
    "linear: the weights sum to 0, so normalize: true would divide by zero (set normalize: false or change the weights)"
)


def _check_della(density: float, epsilon: float, where: str) -> None:
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise QueryError(
            _where(
                where,
                f"epsilon must be chosen such that density +/- epsilon is in (0, 1); "
                f"got density={density}, epsilon={epsilon}",
            )
        )


# --- the registry ---------------------------------------------------------------------------------


def _gta_spec(
    name: str, normalize: bool, rescale: bool, extra: tuple[ParamSpec, ...] = (), randomized: bool = False
) -> MethodSpec:
    return MethodSpec(
        name,
        (
            ParamSpec("int8_mask", bool, "shared", False),
            ParamSpec("normalize", bool, "shared", normalize),
            ParamSpec("rescale", bool, "shared", rescale),
            ParamSpec("lambda", float, "shared", 1.0),
            ParamSpec("weight", float, "non_base"),
            ParamSpec("density", float, "non_base", 1.0),
        )
        + extra,
        base="required",
        randomized=randomized,
    )


_GAMMA = (ParamSpec("gamma", float, "non_base", 0.01),)
_EPSILON = (ParamSpec("epsilon", float, "non_base", 0.15),)

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear",
            (ParamSpec("weight", float, "input"), ParamSpec("normalize", bool, "shared", True)),
            base="ignored",
        ),
        _gta_spec("task_arithmetic", normalize=False, rescale=False),
        _gta_spec("ties", normalize=True, rescale=False),
        _gta_spec("dare_ties", normalize=False, rescale=True, randomized=True),
        _gta_spec("dare_linear", normalize=False, rescale=True, randomized=True),
        _gta_spec("breadcrumbs", normalize=False, rescale=False, extra=_GAMMA),
        _gta_spec("breadcrumbs_ties", normalize=False, rescale=False, extra=_GAMMA),
        _gta_spec("della", normalize=True, rescale=True, extra=_EPSILON, randomized=True),
        _gta_spec("della_linear", normalize=False, rescale=True, extra=_EPSILON, randomized=True),
        MethodSpec(
            "slerp",
            (ParamSpec("t", float, "shared"),),
            base="required",
            min_inputs=2,
            max_inputs=2,
            optional_policy="passthrough_singleton",
        ),
        MethodSpec(
            "nuslerp",
            (
                ParamSpec("weight", float, "non_base"),
                ParamSpec("nuslerp_row_wise", bool, "shared", False),
                ParamSpec("nuslerp_flatten", bool, "shared", True),
            ),
            base="optional",
            min_non_base=2,
            max_non_base=2,
            optional_policy="passthrough_singleton",
        ),
        MethodSpec(
            "multislerp",
            (
                ParamSpec("weight", float, "non_base"),
                ParamSpec("normalize_weights", bool, "shared", True),
                ParamSpec("eps", float, "shared", 1e-8),
            ),
            base="optional",
            min_non_base=1,
        ),
        MethodSpec(
            "karcher",
            (ParamSpec("max_iter", int, "shared", 10), ParamSpec("tol", float, "shared", 1e-5)),
            base="ignored",
        ),
        MethodSpec(
            "model_stock",
            (ParamSpec("filter_wise", bool, "shared", False),),
            base="required",
            min_inputs=3,
            optional_policy="base_or_skip",
        ),
        MethodSpec(
            "sce",
            (ParamSpec("int8_mask", bool, "shared", False), ParamSpec("select_topk", float, "shared", 1.0)),
            base="required",
        ),
        MethodSpec(
            "nearswap",
            (ParamSpec("t", float, "shared"),),
            base="required",
            min_inputs=2,
            max_inputs=2,
            optional_policy="passthrough_base_singleton",
        ),
        MethodSpec("passthrough", (ParamSpec("scale", float, "input", None),), base="ignored", max_inputs=1),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise QueryError(f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})") from None


# --- randomness -------------------------------------------------------------------------------------

_RANDOM_CHUNK = 1 << 22  # uniforms drawn per step: bounds the CPU scratch; the stream does not depend on it


def _random_keep(
    shape: torch.Size, p: float | torch.Tensor, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Bernoulli keep mask (bool, on `device`): element j is kept when u_j < p_j, u_j ~ U[0, 1) drawn in
    float32 on the CPU from `generator` in row-major order (torch.bernoulli's CPU stream).
    `p` is a float (compared in float32) or a tensor of `shape` on `device` (compared as float32)."""
    n = math.prod(shape)
    keep = torch.empty(n, dtype=torch.bool, device=device)
    scalar = not isinstance(p, torch.Tensor)
    p_scalar = torch.tensor(p, dtype=torch.float32) if scalar else None
    p_flat = None if scalar else p.reshape(-1)
    for start in range(0, n, _RANDOM_CHUNK):
        stop = min(n, start + _RANDOM_CHUNK)
        u = torch.rand(stop - start, generator=generator, dtype=torch.float32)
        if scalar:
            keep[start:stop] = (u < p_scalar).to(device)
        else:
            keep[start:stop] = u.to(device) < p_flat[start:stop]
    return keep.reshape(shape)


# --- sparsification of one delta, in place (mergekit/sparsify.py) --------------------------------


def _mask_rescale_(delta: torch.Tensor, keep: torch.Tensor, rescale: bool, eps: float = 1e-7) -> None:
    """delta *= keep; with rescale, then scale it back to its former L1 norm (unless either is < eps)."""
    before = delta.abs().sum() if rescale else None
    delta.mul_(keep)
    if rescale:
        after = delta.abs().sum()
        if before < eps or after < eps:
            return
        delta.mul_(before / after)


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    magnitude = delta.abs().reshape(-1)
    return magnitude.float() if magnitude.device.type == "cpu" else magnitude  # as mergekit sorts them


_EXACT_SORT_MAX = 1 << 20


def _magnitude_(delta: torch.Tensor, density: float, rescale: bool) -> None:
    """TIES trimming: keep the max(1, int(density * n)) largest magnitudes."""
    if density >= 1:
        return
    n = delta.numel()
    if density <= 0 or n == 0:
        delta.zero_()
        return
    k = max(1, int(density * n))
    w = _magnitudes(delta)
    # mergekit keeps the first k of a full descending argsort; which of several equal magnitudes at the
    # cut that keeps is up to the sort. Up to 2**20 elements we sort the same way (the same elements);
    # above, topk is ~3x faster and keeps other ones of the equal magnitudes at the cut (about ten elements
    # of a Llama matrix of bfloat16 deltas), the same magnitudes all the same.
    if n <= _EXACT_SORT_MAX:
        indices = torch.argsort(w, descending=True)[:k]
    else:
        indices = torch.topk(w, k, sorted=False).indices
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[indices] = True
    _mask_rescale_(delta, keep.reshape(delta.shape), rescale)


def _magnitude_outliers_(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> None:
    """Model Breadcrumbs: drop the int(gamma * n) largest, then the smallest, keeping int(density * n)."""
    if density >= 1:
        return
    n = delta.numel()
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    ascending = torch.sort(_magnitudes(delta), descending=False).indices  # mergekit's sort: same ties
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[ascending[n_bot : n_bot + target_n]] = True  # the same slice as mergekit, edge cases included
    _mask_rescale_(delta, keep.reshape(delta.shape), rescale)


def _work_copy(delta: torch.Tensor) -> torch.Tensor:
    # mergekit samples float16 deltas in float32 (torch.bernoulli lacks float16 on CPU)
    return delta.float() if delta.dtype == torch.float16 else delta


def _probability_dtype(work: torch.Tensor) -> torch.dtype:
    # mergekit computes keep probabilities in bfloat16 for bfloat16 tensors (so density 0.3 keeps
    # 0.30078125 of them), in float32 otherwise (on CPU; float64 included)
    return torch.bfloat16 if work.dtype == torch.bfloat16 else torch.float32


def _bernoulli_(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> None:
    """DARE: keep each element with probability density (randomness is used even for density <= 0)."""
    if density >= 1:
        return
    work = _work_copy(delta)
    p = float(torch.tensor(density, dtype=_probability_dtype(work)))
    _mask_rescale_(work, _random_keep(work.shape, p, work.device, generator), rescale)
    if work is not delta:
        delta.copy_(work)


def _della_(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None
) -> None:
    """DELLA MagPrune: keep probability density - epsilon + 2 * epsilon * rank / (n - 1), ranks by
    magnitude along axis 1 (each row of a matrix; a vector is one row)."""
    if density >= 1:
        return
    if density <= 0:
        delta.zero_()
        return
    _check_della(density, epsilon, "della")
    work = _work_copy(delta)
    rows = work if work.ndim >= 2 else work.reshape(1, -1)
    n = rows.shape[1]
    dtype = _probability_dtype(work)
    if n > 1:
        # stable: equal magnitudes are ranked by position, the same on every device
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        positions = torch.arange(n, device=rows.device).reshape((1, n) + (1,) * (rows.ndim - 2))
        ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order)).to(dtype) + 1
        del order
        low = ranks.min(dim=1, keepdim=True).values
        high = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
        del ranks
    else:  # mergekit divides 0 by 0 here and fails; keep with probability density
        rank_norm = torch.full(rows.shape, 0.5, dtype=dtype, device=rows.device)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    del rank_norm
    _mask_rescale_(rows, _random_keep(rows.shape, probs, rows.device, generator), rescale)
    if work is not delta:
        delta.copy_(work)


# --- kernels ----------------------------------------------------------------------------------------
# A kernel gets the tensors (one dtype, one shape), the base index (None when there is no base or the
# method ignores it), the shared parameters, the per-input parameters and the generator.

Kernel = Callable[[list, "int | None", dict, list, "torch.Generator | None"], "torch.Tensor"]


def _sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election ("sum"): True where a delta has the sign of the column sum (ties elect +)."""
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == elected


def combine_deltas(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: Sequence[float],
    consensus: bool,
    shared: Mapping[str, Any],
    omitted_weight: float = 0.0,
) -> torch.Tensor:
    """The task-arithmetic tail: base + lambda * mix(weight_i * delta_i), `deltas` [inputs, ...] already
    sparsified (modified in place). Shared with the streaming and block executors, which sparsify first.
    `omitted_weight` is the summed weight of inputs left out of `deltas` because their delta is zero
    here: they add nothing, but a normalized sum without sign consensus still divides by their weight."""
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    w = w.reshape((-1,) + (1,) * base.ndim)
    deltas.mul_(w)
    if consensus:
        agree = _sign_consensus(deltas)
        mixed = deltas.mul_(agree).sum(dim=0)
        if shared["normalize"]:
            divisor = (w * agree).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed /= divisor
        del agree
    else:
        mixed = deltas.sum(dim=0)
        if shared["normalize"]:
            divisor = w.sum(dim=0) + omitted_weight
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


def _task_arithmetic_kernel(sparsification: str | None, consensus: bool) -> Kernel:
    """mergekit's GeneralizedTaskArithmeticMerge: base + lambda * mix(weight_i * sparsify(x_i - base)),
    mix being a sum (normalized by the sum of weights) or, with sign consensus, a sum over the deltas
    that agree with the elected sign (normalized by their weights, per element). int8_mask only saves
    memory in mergekit; it does not change results."""

    def kernel(tensors, b, shared, per, generator):
        base = tensors[b]
        others = [i for i in range(len(tensors)) if i != b]
        if not others:
            return base
        deltas = base.new_empty((len(others), *base.shape))
        for k, i in enumerate(others):
            delta = deltas[k]
            torch.sub(tensors[i], base, out=delta)
            p = per[i]
            if sparsification == "magnitude":
                _magnitude_(delta, p["density"], shared["rescale"])
            elif sparsification == "magnitude_outliers":
                _magnitude_outliers_(delta, p["density"], p["gamma"], shared["rescale"])
            elif sparsification == "random":
                _bernoulli_(delta, p["density"], shared["rescale"], generator)
            elif sparsification == "della_magprune":
                _della_(delta, p["density"], p["epsilon"], shared["rescale"], generator)
        return combine_deltas(base, deltas, [per[i]["weight"] for i in others], consensus, shared)

    return kernel


def _linear(tensors, b, shared, per, generator):
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in per], dtype=dtype, device=first.device)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(tensors, weights.unbind(0)):
        result.addcmul_(tensor, weight)
    if shared["normalize"]:
        total = weights.sum()
        if total == 0:
            raise QueryError(_ZERO_LINEAR)
        result.div_(total)
    return result.to(first.dtype)


_SLERP_CHUNK = 1 << 20  # mergekit's chunking of norms and dot products (keeps its rounding, bounds scratch)


def _slerp(tensors, b, shared, per, generator):
    v0, v1 = tensors[b], tensors[1 - b]
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    t = torch.tensor(shared["t"], dtype=dtype, device=v0.device).reshape(1, 1)
    a, c = v0.reshape(1, -1), v1.reshape(1, -1)
    n = a.shape[1]
    if n == 0:
        return ((1 - t) * a + t * c).reshape(v0.shape).to(v0.dtype)
    spans = [(s, min(n, s + _SLERP_CHUNK)) for s in range(0, n, _SLERP_CHUNK)]
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]), dim=0
    )
    norm_c = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(c[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]), dim=0
    )
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_c = torch.where(norm_c > 1e-8, norm_c, 1)
    dot = (
        torch.stack(
            [
                ((a[:, s:e].to(dtype) / norm_a) * (c[:, s:e].to(dtype) / norm_c)).sum(dim=1, keepdim=True)
                for s, e in spans
            ]
        )
        .sum(dim=0)
        .clamp(-1, 1)
    )
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_c = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for s, e in spans:
        result[:, s:e] = coef_a * a[:, s:e].to(dtype) + coef_c * c[:, s:e].to(dtype)
    return result.reshape(v0.shape)


def _nuslerp_pair(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def _nuslerp(tensors, b, shared, per, generator):
    others = [i for i in range(len(tensors)) if i != b]
    weights = [per[i]["weight"] for i in others]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if shared["nuslerp_row_wise"] else -1
    flatten = shared["nuslerp_flatten"]
    x0, x1 = tensors[others[0]], tensors[others[1]]
    if b is None:
        return _nuslerp_pair(t, x0, x1, dim, flatten)
    base = tensors[b]
    return base + _nuslerp_pair(t, x0 - base, x1 - base, dim, flatten)


def _multislerp(tensors, b, shared, per, generator):
    others = [i for i in range(len(tensors)) if i != b]
    if len(others) == 1:
        return tensors[others[0]]  # mergekit returns the only non-base input as is, base or not
    eps = shared["eps"]
    stacked = torch.stack([tensors[i] for i in others])
    if b is not None:
        stacked -= tensors[b]
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor([per[i]["weight"] for i in others], dtype=stacked.dtype, device=stacked.device)
    if shared["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise MergeError(
                "multislerp: the weighted sum of the input directions is zero (antipodal inputs "
                "with balancing weights); use different weights"
            )
        result = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return result + tensors[b] if b is not None else result
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    del units
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    del tangents
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result + tensors[b] if b is not None else result


def _karcher(tensors, b, shared, per, generator):
    """Weighted (here: equal-weight) Karcher mean on the unit sphere, rescaled by the mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    max_iter, tol = shared["max_iter"], shared["tol"]
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    alpha_sum = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    del units
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(valid_alphas, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(valid_alphas, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


def _model_stock(tensors, b, shared, per, generator):
    w0 = tensors[b]
    ws = [tensors[i] for i in range(len(tensors)) if i != b]
    out_shape = w0.shape
    if shared["filter_wise"]:
        if w0.dim() == 1:  # a vector is one filter
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, offset_a in enumerate(offsets):
        for offset_b in offsets[i + 1 :]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cosines.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    t = torch.where(
        singular,
        torch.zeros_like(cos_theta),
        (count * cos_theta) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(out_shape)


def _sce(tensors, b, shared, per, generator):
    base = tensors[b]
    others = [i for i in range(len(tensors)) if i != b]
    if not others:
        return base
    task_vectors = torch.stack([tensors[i] - base for i in others])
    topk = shared["select_topk"]
    if topk < 1:  # select: the elements whose values vary most across inputs
        if topk <= 0:
            task_vectors.zero_()
        else:
            variance = torch.var(task_vectors, dim=0, unbiased=False)
            k = int(torch.count_nonzero(variance) * topk)
            keep = torch.zeros(variance.shape, dtype=torch.bool, device=base.device)
            if k > 0:
                keep.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = True
            del variance
            task_vectors.mul_(keep)
            del keep
    agree = _sign_consensus(task_vectors)  # erase: elements against the elected sign
    mean_squares = task_vectors.square().reshape(len(others), -1).mean(dim=1)
    total = torch.sum(mean_squares).item()
    if abs(total) < 1e-6:
        tv_weights = torch.ones_like(mean_squares) / mean_squares.shape[0]
    else:
        tv_weights = mean_squares / total
    tv_weights = tv_weights.reshape((-1,) + (1,) * base.ndim)
    erased = tv_weights * agree
    del agree
    merged = task_vectors.mul_(erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _nearswap(tensors, b, shared, per, generator):
    a, other = tensors[b], tensors[1 - b]
    weight = (shared["t"] / torch.abs(a - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * a


def _passthrough(tensors, b, shared, per, generator):
    scale = per[0].get("scale")
    return tensors[0] if scale is None else tensors[0] * scale


# The task-arithmetic family: method -> (sparsification, sign consensus).
TASK_ARITHMETIC_FAMILY: dict[str, tuple[str | None, bool]] = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_ties": ("random", True),
    "dare_linear": ("random", False),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
    "della": ("della_magprune", True),
    "della_linear": ("della_magprune", False),
}
_KERNELS: dict[str, Kernel] = {
    "linear": _linear,
    **{name: _task_arithmetic_kernel(sp, consensus=c) for name, (sp, c) in TASK_ARITHMETIC_FAMILY.items()},
    "slerp": _slerp,
    "nuslerp": _nuslerp,
    "multislerp": _multislerp,
    "karcher": _karcher,
    "model_stock": _model_stock,
    "sce": _sce,
    "nearswap": _nearswap,
    "passthrough": _passthrough,
}
assert set(_KERNELS) == set(METHODS)


# --- entry points -----------------------------------------------------------------------------------


def _bind(
    spec: MethodSpec,
    shared: Mapping[str, Any],
    per_input: Sequence[Mapping[str, Any]],
    base_index: int | None,
    where: str,
) -> tuple[dict, list[dict]]:
    """Shared and per-input values with defaults filled in and coerced; required ones must be there."""
    for scope, values in [("shared", shared)] + [(f"input {i}", v) for i, v in enumerate(per_input)]:
        expected = spec.shared_params if scope == "shared" else spec.input_params
        unknown = set(values) - {p.name for p in expected}
        if unknown:
            raise QueryError(
                _where(where, f"unknown {scope} parameter(s) {', '.join(sorted(unknown))} for {spec.name}")
            )
    bound_shared = {}
    for p in spec.shared_params:
        if p.name in shared:
            bound_shared[p.name] = p.validate(shared[p.name], _where(where, p.name))
        elif p.required:
            raise QueryError(_where(where, f"missing required parameter {p.name!r} for {spec.name}"))
        else:
            bound_shared[p.name] = p.default
    bound_per = []
    for i, values in enumerate(per_input):
        bound = {}
        for p in spec.input_params:
            if p.scope == "non_base" and i == base_index:
                continue
            if p.name in values:
                bound[p.name] = p.validate(values[p.name], _where(where, f"input {i}.{p.name}"))
            elif p.required:
                raise QueryError(_where(where, f"missing required parameter {p.name!r} for input {i} of {spec.name}"))
            else:
                bound[p.name] = p.default
        bound_per.append(bound)
    return bound_shared, bound_per


def _copy_buffer(tensors: Sequence[torch.Tensor], where: str) -> torch.Tensor:
    """mergekit's copy_non_floating_buffer: a non-floating tensor is copied when all inputs agree."""
    first = tensors[0]
    if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
        raise MergeError(
            _where(
                where, "non-floating buffer differs between inputs; mergekit does not merge integer or boolean tensors"
            )
        )
    return first.clone()


def merge_tensor(
    method: str,
    tensors: Sequence[torch.Tensor],
    base_index: int | None,
    shared: Mapping[str, Any],
    per_input: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None = None,
    *,
    where: str = "",
) -> torch.Tensor:
    """Merge one tensor with `method`, as mergekit 0.1.5 does.

    tensors: the inputs in input order, one shape, on one device, already in the computation dtype.
    base_index: position of the base model in `tensors`, or None (methods with base "ignored" treat a
    base as an ordinary input). shared / per_input: the resolved parameter values (defaults are filled
    in for missing optional ones; for non_base parameters the base's dict may lack them).
    generator: a CPU generator for the randomized methods (None: torch's default generator).
    Returns the merged tensor (may be one of the inputs itself; inputs are never modified). A
    non-floating input makes this a buffer copy. Raises QueryError for query problems (counts,
    parameters) and MergeError for tensor values that cannot be merged.
    """
    spec = get_method(method)
    tensors = list(tensors)
    if base_index is not None and not 0 <= base_index < len(tensors):
        raise QueryError(_where(where, f"base index {base_index} is out of range for {len(tensors)} inputs"))
    if len(per_input) != len(tensors):
        raise QueryError(_where(where, f"{len(per_input)} per-input parameter sets for {len(tensors)} inputs"))
    spec.check_inputs(len(tensors), base_index is not None, where)
    if spec.base == "ignored":
        base_index = None
    if not all(t.is_floating_point() for t in tensors):
        return _copy_buffer(tensors, where)
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        raise MergeError(_where(where, f"tensor shapes differ: {[tuple(t.shape) for t in tensors]}"))
    if any(t.device != first.device for t in tensors):
        raise MergeError(_where(where, "inputs are on different devices"))
    dtype = first.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = [t.to(dtype) for t in tensors]
    bound_shared, bound_per = _bind(spec, shared, per_input, base_index, where)
    spec.check_values(bound_shared, bound_per, where)
    with torch.no_grad():
        return _KERNELS[spec.name](tensors, base_index, bound_shared, bound_per, generator)


_DELTA_IDENTITY = set(TASK_ARITHMETIC_FAMILY)


def identity_on_equal_inputs(method: str, shared: Mapping[str, Any]) -> bool:
    """True when merging copies of one finite tensor x (every input x, base included) returns x.

    Exactly (up to the sign of zeros) for the task-arithmetic family (the delta is 0; lambda must be
    finite), sce (all-zero task vectors are erased), model_stock (ratio 0 keeps the base) and slerp with
    t = 0 or 1; up to float rounding of the computation for linear with normalize (sum w*x / sum w:
    about sum|w| / |sum w| ulp) and nearswap (a few ulp). False where it may not hold: linear
    without normalize (weights need not sum to 1), slerp with 0 < t < 1 (a tensor of norm <= 1e-8 is
    scaled), nuslerp without base (tiny rows), multislerp (fails with a base and 3+ inputs), karcher
    (norms <= tol become 0), passthrough (scale).
    Random methods hold too: a zero delta stays zero whatever the mask. mergekit itself turns inf - inf
    into NaN, so this does not hold for tensors with inf or NaN.
    """
    spec = METHODS.get(method)
    if spec is None:
        return False
    try:
        values, _ = _bind(spec, shared, [], None, "")
    except QueryError:
        return False
    if method in _DELTA_IDENTITY:
        return math.isfinite(values["lambda"])
    if method in ("sce", "model_stock"):
        return True
    if method == "linear":
        return bool(values["normalize"])
    if method == "slerp":
        return values["t"] in (0.0, 1.0)
    if method == "nearswap":
        return math.isfinite(values["t"])
    return False
