"""Identifiers: block ids (XXH3-128 of a block's raw bytes) and snapshot ids (SHA-256 of a manifest)."""

from __future__ import annotations

import hashlib

import xxhash

BLOCK_ID_BYTES = 16
SNAPSHOT_ID_BYTES = 32
ZERO_BLOCK_ID = bytes(BLOCK_ID_BYTES)


def block_id(raw: bytes | memoryview) -> bytes:
    """XXH3-128 of the raw little-endian bytes, as the 16-byte big-endian digest."""
    return xxhash.xxh3_128_digest(raw)


def snapshot_id(manifest_bytes: bytes) -> bytes:
    return hashlib.sha256(manifest_bytes).digest()


def checksum64(*parts: bytes | memoryview) -> int:
    """XXH3-64 over the concatenation of parts (record checksums)."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()
