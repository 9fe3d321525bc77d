"""Logical planning: a parsed query + the catalog (manifests only) -> one TensorPlan per output tensor.

Nothing here reads tensor data. Every check that can fail on user input (unknown parameters, missing
weights, input counts, missing tensors, shape and vocabulary mismatches) happens here, before the
executor reads a block. Parameter resolution follows mergekit 0.1.5: per-input settings, then the
output slice's, then the global ones; filters match substrings of the tensor name; gradients are
interpolated by the layer's position t in its slice (0 for weights outside the layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mpstore.snapshot import Manifest, TensorEntry

from .methods import REQUIRED, MethodSpec, ParamSpec, QueryError, get_method
from .query import InputSlice, MergeQuery, OutputSlice

if TYPE_CHECKING:
    from mpstore import Store

# Weights inside a numbered layer: model.layers.3.mlp.up_proj.weight, encoder.layer.0..., h.11...
LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks))\.(?P<index>\d+)\.(?P<suffix>.+)$")
# Weights outside the layers that come before them (mergekit's "pre_weights"); the rest are "post".
PRE_WEIGHT = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings")
# Weights whose first axis is the vocabulary: a mismatch there means different tokenizers.
VOCAB_WEIGHT = re.compile(r"embed_tokens|lm_head|wte|word_embeddings")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class PlanInput:
    model: str  # as written in the query
    snapshot: bytes
    tensor: str
    dtype: str


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    inputs: tuple[PlanInput, ...]
    base_index: int | None
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]
    compute_dtype: str
    out_dtype: str
    copy_from: int | None = None  # non-floating buffers are copied from this input, not merged

    def describe(self) -> dict:
        return {
            "tensor": self.name,
            "shape": list(self.shape),
            "out_dtype": self.out_dtype,
            "operator": "copy" if self.copy_from is not None else None,
            "inputs": [
                {"model": i.model, "tensor": i.tensor, "base": k == self.base_index, "parameters": self.per_input[k]}
                for k, i in enumerate(self.inputs)
            ],
            "parameters": self.shared,
        }


@dataclass
class MergePlan:
    query: MergeQuery
    method: MethodSpec
    models: dict[str, bytes]  # model string -> snapshot id
    base: str | None
    tensors: list[TensorPlan] = field(default_factory=list)
    files_from: str | None = None  # model whose config.json and tokenizer files the output takes
    # Under an I/O budget: (output tensor, input index) -> block positions dropped (taken as the base's)
    drops: dict[tuple[str, int], frozenset[int]] = field(default_factory=dict)
    budget: dict | None = None  # what the budget did, for the lineage (None when nothing was dropped)
    io_budget: int | None = None  # hard cap on the bytes the executor may read

    @property
    def base_snapshot(self) -> bytes | None:
        return self.models[self.base] if self.base else None

    def tensors_by_name(self) -> dict[str, TensorPlan]:
        return {tp.name: tp for tp in self.tensors}

    def input_snapshots(self) -> list[bytes]:
        return list(dict.fromkeys(self.models[m] for m in self.query.referenced_models()))


def evaluate_setting(setting: Any, tensor_name: str, t: float, spec: ParamSpec, where: str) -> Any:
    """mergekit's evaluate_setting: a scalar, a gradient over t, or the first matching conditional."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return spec.validate(setting, where)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [spec.validate(e, where) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]  # discrete values are picked, not interpolated
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return spec.validate((1 - frac) * values[i0] + frac * values[i1], where)
    for cond in setting:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, spec, where)
    return None


def _resolve(spec: ParamSpec, scopes: list[tuple[str, dict]], tensor_name: str, t: float, who: str) -> Any:
    for where, scope in scopes:
        if spec.name in scope:
            value = evaluate_setting(scope[spec.name], tensor_name, t, spec, f"{where}.{spec.name}")
            if value is not None:
                return value
    if spec.default is REQUIRED:
        raise QueryError(f"missing required parameter {spec.name!r} for {who} (tensor {tensor_name})")
    return spec.default


def _check_parameter_names(query: MergeQuery, method: MethodSpec) -> None:
    known = {p.name for p in method.params}
    scopes = [("parameters", query.parameters)]
    for i, out in enumerate(query.slices):
        label = f"slices[{i}]" if query.uses_slices else "models"
        scopes.append((f"{label}.parameters", out.parameters))
        for j, src in enumerate(out.sources):
            scopes.append(
                (
                    f"{label}[{j}] ({src.model}).parameters"
                    if not query.uses_slices
                    else f"{label}.sources[{j}].parameters",
                    src.parameters,
                )
            )
    for where, scope in scopes:
        for name in scope:
            if name not in known:
                raise QueryError(
                    f"{where}: unknown parameter {name!r} for {method.name} "
                    f"(known: {', '.join(sorted(known)) or 'none'})"
                )


def _promoted(dtypes: list[str]) -> str:
    if len(set(dtypes)) == 1:
        return dtypes[0]
    if "F64" in dtypes:
        return "F64"
    return "F32"


class _Architecture:
    """Layer structure inferred from tensor names (no config.json needed)."""

    def __init__(self, manifest: Manifest):
        self.tensors = manifest.tensor_map()
        self.layers: dict[int, list[tuple[str, str]]] = {}  # index -> [(prefix, suffix)]
        self.pre: list[str] = []
        self.post: list[str] = []
        for name in sorted(self.tensors):
            m = LAYER_NAME.match(name)
            if m:
                self.layers.setdefault(int(m["index"]), []).append((m["prefix"], m["suffix"]))
            elif PRE_WEIGHT.search(name):
                self.pre.append(name)
            else:
                self.post.append(name)

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0


def build_plan(store: "Store", query: MergeQuery, models: dict[str, bytes]) -> MergePlan:
    """Plan every output tensor from manifests alone; raises QueryError on any inconsistency."""
    method = get_method(query.merge_method)
    _check_parameter_names(query, method)
    plan = MergePlan(query=query, method=method, models=models, base=query.base_model)
    manifests = {m: store.manifest(sid) for m, sid in models.items()}
    archs = {m: _Architecture(manifests[m]) for m in models}

    slices: list[OutputSlice] = []
    for i, out in enumerate(query.slices):
        base = out.base_model or query.base_model
        sources = list(out.sources)
        if not query.uses_slices and base is not None and base not in [s.model for s in sources]:
            sources.append(InputSlice(base, None, {}))  # mergekit adds the base as an input
        label = f"slices[{i}]" if query.uses_slices else "models"
        names = [s.model for s in sources]
        if len(set(names)) != len(names):
            raise QueryError(f"{label}: a model appears twice")
        uses_base = method.base != "ignored" and base is not None
        if uses_base and base not in names:
            raise QueryError(f"{label}: base model {base} is not among the inputs")
        if method.base == "required" and base is None:
            raise QueryError(f"{method.name} needs a base_model")
        method.check_inputs(len(sources), uses_base, label)
        slices.append(OutputSlice(tuple(sources), base if uses_base else None, out.parameters))

    files_from = query.base_model or slices[0].sources[0].model
    if query.tokenizer_source not in (None, "base"):
        files_from = query.tokenizer_source
        if files_from not in models:
            raise QueryError(f"tokenizer_source {files_from} is not an input of the merge")
    plan.files_from = files_from

    def add(out_name: str, out_slice: OutputSlice, input_names: list[str], t: float) -> None:
        sources = out_slice.sources
        entries: list[TensorEntry] = []
        for src, tname in zip(sources, input_names):
            entry = archs[src.model].tensors.get(tname)
            if entry is None:
                raise QueryError(f"model {src.model} has no tensor {tname!r}")
            entries.append(entry)
        base_index = next((k for k, s in enumerate(sources) if s.model == out_slice.base_model), None)
        shapes = {e.shape for e in entries}
        if len(shapes) > 1:
            detail = ", ".join(f"{s.model}: {list(e.shape)}" for s, e in zip(sources, entries))
            if VOCAB_WEIGHT.search(out_name):
                raise QueryError(
                    f"mismatched vocabulary sizes in {out_name} ({detail}); token alignment "
                    f"across tokenizers is not supported"
                )
            raise QueryError(f"tensor {out_name} differs in shape between inputs ({detail})")
        inputs = tuple(
            PlanInput(s.model, models[s.model], n, e.dtype) for s, n, e in zip(sources, input_names, entries)
        )
        copy_from = None
        if any(e.dtype not in FLOAT_DTYPES for e in entries):
            copy_from = base_index if base_index is not None else 0  # mergekit's non-floating buffer rule
        scopes_shared = [
            (f"slices[{slices.index(out_slice)}].parameters", out_slice.parameters),
            ("parameters", query.parameters),
        ]
        shared = {
            p.name: _resolve(p, scopes_shared, out_name, t, "the merge") for p in method.params if p.scope == "shared"
        }
        per_input = []
        for k, (src, tname) in enumerate(zip(sources, input_names)):
            scopes = [(f"{src.model}.parameters", src.parameters)] + scopes_shared
            per_input.append(
                {
                    p.name: _resolve(p, scopes, tname, t, f"model {src.model}")
                    for p in method.params
                    if p.scope == "input" or (p.scope == "non_base" and k != base_index)
                }
            )
        if copy_from is None:
            method.check_values(shared, per_input, out_name)  # e.g. della's density +- epsilon
        dtypes = [e.dtype for e in entries]
        compute = query.dtype or "F32"
        out_dtype = query.out_dtype or query.dtype or _promoted(dtypes)
        if copy_from is not None:
            compute = out_dtype = entries[copy_from].dtype
        plan.tensors.append(
            TensorPlan(
                out_name, entries[0].shape, inputs, base_index, shared, tuple(per_input), compute, out_dtype, copy_from
            )
        )

    first, last = slices[0], slices[-1]
    ref_arch = archs[first.base_model or first.sources[0].model]
    for name in ref_arch.pre:
        add(name, first, [name] * len(first.sources), 0.0)
    out_layer = 0
    for out_slice in slices:
        ranges = [s.layer_range or (0, archs[s.model].num_layers) for s in out_slice.sources]
        count = ranges[0][1] - ranges[0][0]
        if any(r[1] - r[0] != count for r in ranges):
            raise QueryError("inputs of a slice have different numbers of layers")
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            for src, r in zip(out_slice.sources, ranges):
                if r[0] + offset not in archs[src.model].layers:
                    raise QueryError(f"model {src.model} has no layer {r[0] + offset}")
            template_src = out_slice.sources[0]
            for prefix, suffix in archs[template_src.model].layers[ranges[0][0] + offset]:
                add(
                    f"{prefix}.{out_layer}.{suffix}",
                    out_slice,
                    [f"{prefix}.{r[0] + offset}.{suffix}" for r in ranges],
                    t,
                )
            out_layer += 1
    for name in ref_arch.post:
        add(name, last, [name] * len(last.sources), 0.0)
    return plan
