"""Mapping between safetensors dtype names and torch dtypes (imports torch; only for tensor work)."""

from __future__ import annotations

import torch

_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
# Only dtypes this torch build has; sub-byte floats (F4, F6_*) come back as their packed bytes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _NAMES.items() if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(raw: bytes | bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A CPU tensor over a copy of `raw` (little-endian), with the given safetensors dtype and shape."""
    buf = bytearray(raw) if not isinstance(raw, bytearray) else raw
    if dtype not in TORCH_DTYPES:
        return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    torch_dtype = TORCH_DTYPES[dtype]
    if not buf:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)


def from_torch(tensor: torch.Tensor) -> tuple[str, bytes]:
    """(safetensors dtype name, raw little-endian bytes) of a tensor."""
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise TypeError(f"dtype {tensor.dtype} has no safetensors name")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return name, flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
