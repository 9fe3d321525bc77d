"""Reader for `pytorch_model.bin` files (the torch.save zip format), never unpickling code.

Besides the tensors, it describes the file as a sequence of segments: literal byte ranges and ranges
that hold exactly one tensor's raw bytes. Storing the tensors plus the few literal bytes is then
enough to rebuild the original file byte for byte.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from .dtypes import DTYPES, DType
from .errors import InvalidInputError, NotFoundError
from .safetensors_io import one_line

# torch dtype name (str(torch.dtype) without "torch.") -> safetensors dtype name
_TORCH_TO_ST = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
    "complex64": "C64",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    # float4_e2m1fn_x2 is left out: it packs two F4 values per element, so its shape is not the F4 shape.
}

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name length (26), extra length (28)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class FileSegment:
    """A piece of a file; the file is the concatenation of its segments."""

    kind: str  # "bytes": literal bytes of the file [start, end); "tensor": the raw bytes of tensor `name`
    start: int
    end: int
    name: str | None


@dataclass(frozen=True)
class TorchBinFile:
    tensors: dict[str, tuple[DType, tuple[int, ...], memoryview]]  # name -> dtype, shape, raw LE bytes
    segments: tuple[FileSegment, ...]  # covers the whole file, in order, no gaps
    file_size: int


def read_torch_bin(path: Path, display_name: str | None = None) -> TorchBinFile:
    """Load a torch zip checkpoint with weights_only=True and map it into segments.

    The checkpoint must be a flat dict of str -> dense CPU tensor. Raises NotFoundError if the file
    does not exist, InvalidInputError (naming `display_name`, default the path) for anything else.
    """
    where = one_line(display_name if display_name is not None else str(path))
    try:
        file_size = os.stat(path).st_size
    except FileNotFoundError:
        raise NotFoundError(f"{where}: no such file") from None
    except OSError as e:
        raise InvalidInputError(f"{where}: cannot read: {e.strerror or e}") from None

    state = _load(path, where)
    tensors = {name: _raw_tensor(name, value, where) for name, value in _flat_items(state, where)}
    segments = _segments(path, file_size, tensors, where)
    return TorchBinFile(tensors=tensors, segments=segments, file_size=file_size)


def _load(path: Path, where: str) -> Any:
    import torch

    try:
        # weights_only: the restricted unpickler builds tensors and plain containers, never calls code.
        # mmap: tensor bytes stay in the page cache instead of being copied into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except MemoryError:
        raise
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise InvalidInputError(f"{where}: not a loadable torch zip checkpoint: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    """The informative line of a torch error (its weights_only message spans a dozen lines)."""
    text = _ANSI.sub("", str(e))
    marker = "WeightsUnpickler error:"
    if marker in text:  # the reason follows the marker, on the same or a later line
        text = text[text.index(marker) + len(marker) :]
        reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        return reason.split(". ")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if len(line) < 20:  # e.g. a KeyError whose message is just the missing key
        line = f"{type(e).__name__}: {line}".rstrip(": ")
    return line if len(line) <= 200 else line[:197] + "..."


def _flat_items(state: Any, where: str) -> list[tuple[str, Any]]:
    import torch

    if not isinstance(state, dict):
        raise InvalidInputError(f"{where}: checkpoint is a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"{where}: key {one_line(repr(key))} is not a string")
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(
                f"{where}: key {key!r} holds a {type(value).__name__}, not a tensor (nested state dicts "
                "are not supported)"
            )
    return list(state.items())


def _raw_tensor(name: str, t: Any, where: str) -> tuple[DType, tuple[int, ...], memoryview]:
    import torch

    if t.layout != torch.strided or t.is_quantized:
        raise InvalidInputError(f"{where}: tensor {name!r} is not a dense tensor (layout {t.layout})")
    st_name = _TORCH_TO_ST.get(str(t.dtype).removeprefix("torch."))
    if st_name is None:
        raise InvalidInputError(f"{where}: tensor {name!r} has unsupported dtype {t.dtype}")
    # contiguous() copies only non-contiguous tensors; reshape(-1) is then a view, and viewing as
    # uint8 gives the raw bytes (little-endian on every platform torch runs on here).
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    raw = memoryview(flat.view(torch.uint8).numpy()).toreadonly()
    return DTYPES[st_name], tuple(t.shape), raw


def _segments(
    path: Path, file_size: int, tensors: dict[str, tuple[DType, tuple[int, ...], memoryview]], where: str
) -> tuple[FileSegment, ...]:
    """Split the file into literal byte ranges and ranges equal to one tensor's raw bytes."""
    # Index tensors by (length, digest); the first name wins among tensors with identical bytes.
    by_digest: dict[tuple[int, bytes], str] = {}
    for name, (_, _, raw) in tensors.items():
        if raw.nbytes:
            by_digest.setdefault((raw.nbytes, xxhash.xxh3_128_digest(raw)), name)
    lengths = {n for n, _ in by_digest}

    matches: list[tuple[int, int, str]] = []
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if len(parts) != 3 or parts[1] != "data" or info.compress_type != zipfile.ZIP_STORED:
                    continue
                if info.file_size not in lengths:
                    continue  # no tensor has this length: skip reading the entry
                # The central directory's extra field may differ from the local one (torch pads the
                # local extra field to align data), so read the local header for the data offset.
                f.seek(info.header_offset)
                sig, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                if sig != b"PK\x03\x04":
                    continue
                start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                end = start + info.file_size
                if end > file_size:
                    continue
                f.seek(start)
                data = f.read(info.file_size)
                name = by_digest.get((len(data), xxhash.xxh3_128_digest(data)))
                # Compare the bytes too: the segments must rebuild the file exactly, whatever the hash says.
                if name is not None and tensors[name][2] == data:
                    matches.append((start, end, name))
    except MemoryError:
        raise
    except Exception as e:  # zipfile raises BadZipFile, NotImplementedError, ValueError, OSError, ...
        why = f"{type(e).__name__}: {one_line(str(e))}"
        raise InvalidInputError(f"{where}: torch loads it but its zip layout is unreadable: {why}") from None

    segments: list[FileSegment] = []
    pos = 0
    for start, end, name in sorted(matches):
        if start < pos:
            continue  # overlapping entries (a malformed zip): keep the earlier one, the rest stays literal
        if start > pos:
            segments.append(FileSegment("bytes", pos, start, None))
        segments.append(FileSegment("tensor", start, end, name))
        pos = end
    if pos < file_size:
        segments.append(FileSegment("bytes", pos, file_size, None))
    return tuple(segments)
