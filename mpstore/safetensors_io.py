"""Validating reader for safetensors headers (no torch).

A safetensors file is: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (possibly padded
with trailing spaces), then the tensor data. Every way a file can break that layout is reported as an
InvalidInputError whose one-line message starts with the file's display name.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .dtypes import DTYPES, DType, dtype_named
from .errors import InvalidInputError, NotFoundError

MAX_HEADER_BYTES = 100 * 1024 * 1024

_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_U64 = 2**64


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's data lies in its file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated safetensors header."""

    prefix: bytes  # the file's first 8 + header_len bytes, verbatim (export rebuilds the file from it)
    metadata: dict[str, str] | None  # "__metadata__"
    tensors: tuple[TensorSpan, ...]  # sorted by data offset
    file_size: int


def one_line(text: str) -> str:
    """`text` with line breaks escaped, so an error message built from it stays one line."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _fail(where: str, what: str) -> NoReturn:
    raise InvalidInputError(f"{one_line(where)}: {what}")


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook for json: plain json keeps the last of duplicate keys silently."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads_strict_json(text: str, where: str, what: str = "header") -> Any:
    """json.loads that rejects duplicate object keys; any failure becomes InvalidInputError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        _fail(where, f"{what} has duplicate key {e.key!r}")
    except RecursionError:
        _fail(where, f"{what} JSON is nested too deeply")
    except ValueError as e:  # JSONDecodeError, and int literals over Python's digit limit
        _fail(where, f"{what} is not valid JSON: {one_line(str(e))}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # json true/false are bools, which are ints


def read_header(path: Path, display_name: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at `path`.

    Reads only the header, not the tensor data. Errors name `display_name` (default: the path).
    Raises NotFoundError if the file does not exist, InvalidInputError for anything malformed.
    """
    where = display_name if display_name is not None else str(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                _fail(where, f"file is {file_size} bytes, shorter than the 8-byte header length")
            header_len = struct.unpack("<Q", head)[0]
            # Validate the length before reading so a bogus length never makes us read 100 MiB.
            _check_header_len(header_len, file_size, where)
            prefix = head + f.read(header_len)
    except FileNotFoundError:
        raise NotFoundError(f"{one_line(where)}: no such file") from None
    except OSError as e:
        _fail(where, f"cannot read: {e.strerror or e}")
    return parse_prefix(prefix, file_size, where)


def _check_header_len(header_len: int, file_size: int, where: str) -> None:
    if header_len == 0:
        _fail(where, "header length is 0")
    if header_len > MAX_HEADER_BYTES:
        _fail(where, f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + header_len > file_size:
        _fail(where, f"header length {header_len} runs past the end of the file ({file_size} bytes)")


def parse_prefix(prefix: bytes, file_size: int, display_name: str) -> SafetensorsHeader:
    """Validate `prefix` (length field + header JSON) of a file of `file_size` bytes.

    The pure part of read_header: export calls it on a stored prefix to recover the tensor layout.
    """
    where = display_name
    if len(prefix) < 8:
        _fail(where, f"file is {len(prefix)} bytes, shorter than the 8-byte header length")
    header_len = struct.unpack("<Q", prefix[:8])[0]
    _check_header_len(header_len, file_size, where)
    if len(prefix) != 8 + header_len:
        _fail(where, f"header is {len(prefix) - 8} bytes, its length field says {header_len}")

    try:
        text = prefix[8:].decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(where, f"header is not valid UTF-8 (at header byte {e.start})")
    if not text.startswith("{"):  # the spec requires it; json.loads alone would accept leading blanks
        _fail(where, "header does not start with '{'")
    obj = loads_strict_json(text, where)
    if not isinstance(obj, dict):
        _fail(where, f"header is a JSON {type(obj).__name__}, not an object")

    metadata = None
    spans: list[tuple[int, int, TensorSpan]] = []  # (begin, end, span)
    for name, entry in obj.items():
        if name == "__metadata__":
            metadata = _check_metadata(entry, where)
        else:
            spans.append(_check_entry(name, entry, where))

    data_start = 8 + header_len
    spans.sort(key=lambda s: (s[0], s[1], s[2].name))
    _check_layout(spans, file_size - data_start, where)
    tensors = tuple(TensorSpan(s.name, s.dtype, s.shape, data_start + begin, s.nbytes) for begin, _, s in spans)
    return SafetensorsHeader(prefix=bytes(prefix), metadata=metadata, tensors=tensors, file_size=file_size)


def _check_metadata(entry: Any, where: str) -> dict[str, str]:
    if not isinstance(entry, dict):
        _fail(where, f"__metadata__ is a JSON {type(entry).__name__}, not an object")
    for key, value in entry.items():
        if not isinstance(value, str):
            _fail(where, f"__metadata__ value of {key!r} is a JSON {type(value).__name__}, not a string")
    return dict(entry)


def _check_entry(name: str, entry: Any, where: str) -> tuple[int, int, TensorSpan]:
    """Validate one tensor entry; returns (begin, end, span with start relative to the data)."""
    t = f"tensor {name!r}"
    if not isinstance(entry, dict):
        _fail(where, f"{t} entry is a JSON {type(entry).__name__}, not an object")
    if set(entry) != _TENSOR_KEYS:
        missing = sorted(_TENSOR_KEYS - set(entry))
        extra = sorted(set(entry) - _TENSOR_KEYS)
        problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        _fail(where, f"{t} entry must have exactly dtype, shape, data_offsets: {', '.join(problems)}")

    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        _fail(where, f"{t} has unknown dtype {one_line(repr(dtype_name))}")
    dtype = DTYPES[dtype_name]

    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        _fail(where, f"{t} shape {_short(shape)} is not a list of non-negative integers")

    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        _fail(where, f"{t} data_offsets {_short(offsets)} is not a list of two non-negative integers")
    begin, end = offsets
    if begin > end:
        _fail(where, f"{t} data_offsets [{begin}, {end}] end before they begin")

    numel = _numel(shape, limit=_U64)
    if numel is None:
        _fail(where, f"{t} shape {_short(shape)} has more than 2**64 elements")
    if (numel * dtype.bits) % 8:
        _fail(where, f"{t} shape {_short(shape)} of dtype {dtype.name} does not fill whole bytes")
    nbytes = numel * dtype.bits // 8
    if end - begin != nbytes:
        _fail(
            where,
            f"{t} data_offsets [{begin}, {end}] do not match dtype {dtype.name} and shape "
            f"{_short(shape)} ({nbytes} bytes)",
        )
    return begin, end, TensorSpan(name, dtype, tuple(shape), begin, nbytes)


def _numel(shape: list[int], limit: int) -> int | None:
    """Product of `shape`, or None if it exceeds `limit` (stops early: a header may hold huge ints)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def _short(value: Any) -> str:
    """A JSON value for an error message: one line, at most ~80 characters."""
    text = one_line(json.dumps(value) if _jsonable(value) else repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (ValueError, TypeError, RecursionError):
        return False


def _check_layout(spans: list[tuple[int, int, TensorSpan]], data_len: int, where: str) -> None:
    """Tensor data must tile [0, data_len) exactly: no gap, no overlap, no trailing or missing bytes."""
    pos, prev = 0, None
    for begin, end, span in spans:
        t = f"tensor {span.name!r}"
        if begin > pos:
            if prev is None:
                _fail(where, f"data of the first {t} begins at {begin}, not 0")
            _fail(
                where, f"gap of {begin - pos} bytes between tensor {prev!r} (ends at {pos}) and {t} (begins at {begin})"
            )
        if begin < pos:
            _fail(where, f"{t} data_offsets [{begin}, {end}] overlap tensor {prev!r} (ends at {pos})")
        pos, prev = end, span.name
    if pos < data_len:
        _fail(
            where,
            f"{data_len - pos} trailing bytes after the tensor data (tensors use {pos} bytes "
            f"of data, file has {data_len})",
        )
    if pos > data_len:
        _fail(where, f"truncated: tensors expect {pos} bytes of data, file has {data_len}")


# -- writing --------------------------------------------------------------------------------------


def build_prefix(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `tensors` (name, dtype, shape)
    back to back in the given order; padded with spaces so data starts 8-byte aligned, as safetensors does."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        numel = 1
        for d in shape:
            numel *= d
        n = dtype_named(dtype).nbytes(numel)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def plan_shards(tensors: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Group (name, nbytes) in order into shards of at most shard_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in tensors:
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """Hugging Face file names for `count` shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_json(weight_map: dict[str, str], total_size: int) -> bytes:
    """A model.safetensors.index.json as transformers writes it."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2).encode() + b"\n"
