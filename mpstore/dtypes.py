"""The safetensors dtypes: their width in bits and how to read them as numbers (numpy only).

The store never imports torch: statistics for the planner are computed here with numpy, widening
bf16 and fp8 to float32 by bit manipulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class DType:
    name: str  # the safetensors spelling, e.g. "BF16"
    bits: int  # width of one element
    is_float: bool

    @property
    def group_width(self) -> int:
        """Bytes per element for byte-grouping (1 for sub-byte and byte types)."""
        return max(1, self.bits // 8)

    def nbytes(self, numel: int) -> int:
        """Bytes that `numel` elements occupy (sub-byte types pack densely)."""
        total_bits = numel * self.bits
        if total_bits % 8:
            raise InvalidInputError(f"{numel} elements of {self.name} do not fill whole bytes")
        return total_bits // 8

    def block_elements(self, block_bytes: int) -> int:
        """Elements in one block: as many as fit in block_bytes, a multiple of 8 so blocks are whole bytes."""
        return max(8, (block_bytes * 8 // self.bits) // 8 * 8)


_ALL = [
    DType("BOOL", 8, False),
    DType("U8", 8, False),
    DType("I8", 8, False),
    DType("F8_E5M2", 8, True),
    DType("F8_E4M3", 8, True),
    DType("F8_E4M3FNUZ", 8, True),
    DType("F8_E5M2FNUZ", 8, True),
    DType("F8_E8M0", 8, True),
    DType("I16", 16, False),
    DType("U16", 16, False),
    DType("F16", 16, True),
    DType("BF16", 16, True),
    DType("I32", 32, False),
    DType("U32", 32, False),
    DType("F32", 32, True),
    DType("F64", 64, True),
    DType("I64", 64, False),
    DType("U64", 64, False),
    DType("C64", 64, True),
    DType("F4", 4, True),
    DType("F6_E2M3", 6, True),
    DType("F6_E3M2", 6, True),
]
DTYPES: dict[str, DType] = {d.name: d for d in _ALL}


def dtype_named(name: str, where: str = "") -> DType:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        prefix = f"{where}: " if where else ""
        raise InvalidInputError(f"{prefix}unknown dtype {name!r}") from None


def _fp8_table(exp_bits: int, man_bits: int, bias: int, fn: bool, fnuz: bool = False) -> np.ndarray:
    """float32 value of every fp8 bit pattern.

    fn: no infinities, the all-ones pattern is NaN; fnuz: no infinities, no negative zero, 0x80 is NaN.
    """
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    normal = (1 + man / (1 << man_bits)) * np.power(2.0, exp.astype(np.float64) - bias)
    subnormal = (man / (1 << man_bits)) * 2.0 ** (1 - bias)
    values = sign * np.where(exp == 0, subnormal, normal)
    top = (1 << exp_bits) - 1
    if fnuz:
        values[0x80] = np.nan
    elif fn:
        values[(exp == top) & (man == (1 << man_bits) - 1)] = np.nan
    else:
        values[(exp == top) & (man == 0)] = sign[(exp == top) & (man == 0)] * np.inf
        values[(exp == top) & (man != 0)] = np.nan
    return values.astype(np.float32)


_F8_TABLES = {
    "F8_E4M3": _fp8_table(4, 3, 7, fn=True),
    "F8_E5M2": _fp8_table(5, 2, 15, fn=False),
    "F8_E4M3FNUZ": _fp8_table(4, 3, 8, fn=True, fnuz=True),
    "F8_E5M2FNUZ": _fp8_table(5, 2, 16, fn=True, fnuz=True),
}
_PLAIN = {
    "BOOL": np.uint8,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "U64": np.uint64,
    "C64": np.complex64,
}


def as_float32(dtype: DType, raw: bytes | memoryview | np.ndarray) -> np.ndarray:
    """Little-endian raw bytes of `dtype` as float32 values, for delta statistics.

    Types without an exact numeric reading here (sub-byte floats, F8_E8M0) are read byte by byte:
    their statistics then describe the change of the stored bytes, which is what the planner needs.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    name = dtype.name
    if name == "BF16":
        return (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if name in _F8_TABLES:
        return _F8_TABLES[name][buf]
    if name == "C64":
        return buf.view("<f4")  # real and imaginary parts as separate elements
    if name in _PLAIN:
        return buf.view(np.dtype(_PLAIN[name]).newbyteorder("<")).astype(np.float32)
    return buf.astype(np.float32)
