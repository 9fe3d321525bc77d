"""Block codecs: raw, zstd, byte-grouped zstd, XOR against a reference block then byte-grouped zstd.

A codec is picked per block by encoded size. Byte grouping splits each element's bytes into planes
(all first bytes, then all second bytes, ...) so the slowly varying exponent bytes of floats sit
together and compress; XOR against the base's block turns a fine-tune's small changes into mostly-zero
high bytes. Delta chains are one level deep: a reference block is never itself XOR-coded.
"""

from __future__ import annotations

import threading
from enum import IntEnum

import numpy as np
import zstandard

from .errors import CorruptionError


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    GROUPED_ZSTD = 2
    XOR_GROUPED_ZSTD = 3


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard contexts are not thread-safe: one per thread and level.
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def group_bytes(raw: bytes | memoryview, width: int) -> bytes:
    """Element bytes split into `width` planes; the identity for width 1."""
    return bytes(_planes(raw, width))


def _planes(raw, width: int) -> memoryview:
    """group_bytes without the copy into bytes (what zstd compresses)."""
    if width == 1:
        return memoryview(raw)
    if width in _WORDS:  # shifts of whole words: ~4x faster than a transposed byte copy
        words = np.frombuffer(raw, dtype=_WORDS[width])
        planes = np.empty((width, len(words)), dtype=np.uint8)
        for j in range(width):
            np.right_shift(words, 8 * j, out=planes[j], casting="unsafe")
        return _byte_view(planes)
    return _byte_view(np.ascontiguousarray(np.frombuffer(raw, dtype=np.uint8).reshape(-1, width).T))


def _byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    return memoryview(array).cast("B") if array.size else memoryview(b"")


def ungroup_words(grouped: bytes, width: int) -> np.ndarray:
    """The inverse of group_bytes for widths 2, 4 and 8, as a writable array of element words."""
    planes = np.frombuffer(grouped, dtype=np.uint8).reshape(width, -1)
    word = _WORDS[width]
    out = planes[width - 1].astype(word)
    for j in range(width - 2, -1, -1):
        out <<= 8
        out |= planes[j]
    return out


def ungroup_bytes(grouped: bytes, width: int) -> bytes:
    if width == 1:
        return grouped
    if width in _WORDS:
        return ungroup_words(grouped, width).tobytes()
    planes = np.frombuffer(grouped, dtype=np.uint8).reshape(width, -1)
    out = np.empty((planes.shape[1], width), dtype=np.uint8)
    for j in range(width):
        out[:, j] = planes[j]
    return out.tobytes()


def xor_bytes(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    return _xor(a, b).tobytes()


def _xor(a, b) -> np.ndarray:
    lane = np.uint64 if len(a) % 8 == 0 else np.uint8
    return np.bitwise_xor(np.frombuffer(a, dtype=lane), np.frombuffer(b, dtype=lane))


def encode(raw: bytes | memoryview, width: int, level: int, ref: bytes | None = None) -> tuple[Codec, bytes]:
    """Encode one block; returns the smallest of the candidates, never larger than raw.

    With a reference (the base's block at the same position, same length), the candidate is XOR then
    byte grouping; without, byte grouping for multi-byte elements and plain zstd for bytes.
    """
    if width > 1 and len(raw) % width:
        width = 1  # a block that is not whole elements (cannot happen for tensors) is grouped as bytes
    if ref is not None and len(ref) == len(raw):
        codec, body = Codec.XOR_GROUPED_ZSTD, _planes(_xor(raw, ref), width)
    elif width > 1:
        codec, body = Codec.GROUPED_ZSTD, _planes(raw, width)
    else:
        codec, body = Codec.ZSTD, raw
    payload = _compressor(level).compress(body)
    if len(payload) >= len(raw):
        return Codec.RAW, bytes(raw)
    return codec, payload


def decode(
    codec: int, payload: bytes, raw_len: int, width: int, ref: bytes | None = None, ungroup_xor=None
) -> bytes | memoryview:
    """Inverse of encode. Raises CorruptionError on any malformed payload.

    `ungroup_xor(planes, ref_words, out_words)` may fuse the ungrouping and XOR of an XOR-coded block
    of 2- or 4-byte elements into one pass (mpexec.kernels.ungroup_xor); that block then comes back
    as a memoryview of the words instead of bytes, saving a copy."""
    try:
        if codec == Codec.RAW:
            body = bytes(payload)  # payload may be a view into a whole record
        else:
            body = _decompressor().decompress(payload, max_output_size=raw_len)
        if len(body) != raw_len:
            raise CorruptionError(f"decoded {len(body)} bytes, expected {raw_len}")
        if codec in (Codec.RAW, Codec.ZSTD):
            return body
        if codec == Codec.GROUPED_ZSTD:
            return ungroup_bytes(body, width)
        if codec == Codec.XOR_GROUPED_ZSTD:
            if ref is None or len(ref) != raw_len:
                raise CorruptionError("XOR-coded block without a matching reference block")
            if ungroup_xor is not None and width in (2, 4):
                words = np.empty(raw_len // width, _WORDS[width])
                ungroup_xor(np.frombuffer(body, np.uint8), np.frombuffer(ref, words.dtype), words)
                return _byte_view(words)
            if width in _WORDS:  # ungroup, then XOR in place: one copy fewer
                words = ungroup_words(body, width)
                words ^= np.frombuffer(ref, dtype=words.dtype)
                return words.tobytes()
            return xor_bytes(ungroup_bytes(body, width), ref)
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"zstd: {exc}") from None
    except ValueError as exc:  # reshape of a body that is not whole elements
        raise CorruptionError(f"malformed block payload: {exc}") from None
    raise CorruptionError(f"unknown codec id {codec}")
