"""Merge queries: a mergekit YAML file, parsed and checked for structure.

The YAML is taken unchanged (mergekit 0.1.5's schema): `merge_method`, `base_model`, `models` or
`slices`, `parameters` at global, model and slice level, `dtype`, `out_dtype`, `tokenizer_source` or
`tokenizer.source`. Unknown keys are errors here (mergekit ignores them silently), so a typo never
changes a merge without notice. Parameter values are checked against the method later, in the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .methods import QueryError

TOP_LEVEL_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
}
DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "fp32": "F32",
    "fp16": "F16",
    "bf16": "BF16",
}

# A parameter setting as written: a scalar, a gradient (list of scalars), or conditional values
# ({value, filter} or a list of them). Kept as plain data; the planner evaluates it per tensor.
Setting = Any


@dataclass(frozen=True)
class InputSlice:
    model: str
    layer_range: tuple[int, int] | None  # None: the whole model (a `models:` entry)
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[InputSlice, ...]
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeQuery:
    text: str
    merge_method: str
    base_model: str | None
    slices: tuple[OutputSlice, ...]  # `models:` becomes one slice of whole models
    uses_slices: bool
    parameters: dict[str, Setting]
    dtype: str | None  # safetensors dtype name to compute in, or None (float32, see README)
    out_dtype: str | None
    tokenizer_source: str | None

    def referenced_models(self) -> list[str]:
        """Every model string, in first-mention order (base first)."""
        seen: list[str] = []
        for m in (
            [self.base_model]
            + [s.base_model for s in self.slices]
            + [src.model for s in self.slices for src in s.sources]
        ):
            if m is not None and m not in seen:
                seen.append(m)
        return seen


def _model_string(value: Any, where: str) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict) and set(value) == {"model"}:
        return _model_string(value["model"], where)
    raise QueryError(f"{where}: expected a model (store ref, snapshot id or folder path), got {value!r}")


def _parameters(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise QueryError(f"{where}: expected a mapping of parameter names to values")
    for name, setting in value.items():
        _check_setting(setting, f"{where}.{name}")
    return dict(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _check_setting(setting: Any, where: str) -> None:
    if _is_scalar(setting):
        return
    if isinstance(setting, dict):
        unknown = set(setting) - {"value", "filter"}
        if unknown or "value" not in setting:
            raise QueryError(
                f"{where}: a conditional value needs 'value' and optional 'filter', got keys {sorted(setting)}"
            )
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise QueryError(f"{where}.filter: must be a string")
        _check_setting(setting["value"], f"{where}.value")
        return
    if isinstance(setting, list):
        if all(_is_scalar(x) for x in setting):
            return
        for i, item in enumerate(setting):
            if not isinstance(item, dict):
                raise QueryError(f"{where}[{i}]: mix of conditional and plain values")
            _check_setting(item, f"{where}[{i}]")
        return
    raise QueryError(f"{where}: unsupported value {setting!r}")


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise QueryError(f"{where}: unknown dtype {value!r} (use float32, float16 or bfloat16)")
    return DTYPES[value]


def parse_query(text: str, source: str = "config") -> MergeQuery:
    """Parse a mergekit YAML merge configuration; raises QueryError naming the key that is wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise QueryError(f"{source}: YAML syntax error{at}: {problem}") from None
    if not isinstance(doc, dict):
        raise QueryError(f"{source}: expected a mapping at the top level")
    unknown = set(doc) - TOP_LEVEL_KEYS
    if unknown:
        raise QueryError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    if "merge_method" not in doc or not isinstance(doc["merge_method"], str):
        raise QueryError(f"{source}: merge_method is missing")
    has_models, has_slices = doc.get("models") is not None, doc.get("slices") is not None
    if has_models == has_slices:
        raise QueryError(f"{source}: give exactly one of 'models' or 'slices'")
    base = _model_string(doc["base_model"], f"{source}: base_model") if doc.get("base_model") is not None else None
    slices: list[OutputSlice] = []
    if has_models:
        entries = doc["models"]
        if not isinstance(entries, list) or not entries:
            raise QueryError(f"{source}: models must be a non-empty list")
        sources = []
        for i, entry in enumerate(entries):
            where = f"{source}: models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
                raise QueryError(f"{where}: expected {{model: ..., parameters: ...}}")
            sources.append(
                InputSlice(
                    _model_string(entry["model"], where),
                    None,
                    _parameters(entry.get("parameters"), f"{where}.parameters"),
                )
            )
        slices.append(OutputSlice(tuple(sources)))
    else:
        if not isinstance(doc["slices"], list) or not doc["slices"]:
            raise QueryError(f"{source}: slices must be a non-empty list")
        for i, out in enumerate(doc["slices"]):
            where = f"{source}: slices[{i}]"
            if (
                not isinstance(out, dict)
                or "sources" not in out
                or set(out) - {"sources", "base_model", "parameters", "residual_weight"}
            ):
                raise QueryError(f"{where}: expected {{sources: [...], base_model: ..., parameters: ...}}")
            if out.get("residual_weight") is not None:
                raise QueryError(f"{where}.residual_weight: not supported")
            if not isinstance(out["sources"], list) or not out["sources"]:
                raise QueryError(f"{where}.sources: must be a non-empty list")
            sources = []
            for j, src in enumerate(out["sources"]):
                swhere = f"{where}.sources[{j}]"
                if (
                    not isinstance(src, dict)
                    or "model" not in src
                    or "layer_range" not in src
                    or set(src) - {"model", "layer_range", "parameters"}
                ):
                    raise QueryError(f"{swhere}: expected {{model: ..., layer_range: [start, end], parameters: ...}}")
                lr = src["layer_range"]
                if not (
                    isinstance(lr, list)
                    and len(lr) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    and 0 <= lr[0] < lr[1]
                ):
                    raise QueryError(f"{swhere}.layer_range: expected [start, end] with 0 <= start < end, got {lr!r}")
                sources.append(
                    InputSlice(
                        _model_string(src["model"], swhere),
                        (lr[0], lr[1]),
                        _parameters(src.get("parameters"), f"{swhere}.parameters"),
                    )
                )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) != 1:
                raise QueryError(f"{where}: all sources of a slice must span the same number of layers")
            slice_base = _model_string(out["base_model"], f"{where}.base_model") if out.get("base_model") else None
            slices.append(
                OutputSlice(tuple(sources), slice_base, _parameters(out.get("parameters"), f"{where}.parameters"))
            )
    tokenizer_source = doc.get("tokenizer_source")
    if doc.get("tokenizer") is not None:
        if tokenizer_source is not None:
            raise QueryError(f"{source}: give tokenizer_source or tokenizer, not both")
        tok = doc["tokenizer"]
        if not isinstance(tok, dict) or set(tok) - {"source"}:
            raise QueryError(f"{source}: tokenizer: only 'source' is supported")
        tokenizer_source = tok.get("source")
    if tokenizer_source is not None:
        if tokenizer_source == "union":
            raise QueryError(f"{source}: tokenizer_source 'union' is not supported (use base or a model)")
        tokenizer_source = (
            _model_string(tokenizer_source, f"{source}: tokenizer_source") if tokenizer_source != "base" else "base"
        )
    return MergeQuery(
        text=text,
        merge_method=doc["merge_method"],
        base_model=base,
        slices=tuple(slices),
        uses_slices=has_slices,
        parameters=_parameters(doc.get("parameters"), f"{source}: parameters"),
        dtype=_dtype(doc.get("dtype"), f"{source}: dtype"),
        out_dtype=_dtype(doc.get("out_dtype"), f"{source}: out_dtype"),
        tokenizer_source=tokenizer_source,
    )
