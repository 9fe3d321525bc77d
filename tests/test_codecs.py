"""Codecs: every encoding decodes to its input; the fast ungrouping equals the plain transpose."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mpexec import blockmerge
from mpstore.codecs import Codec, decode, encode, group_bytes, ungroup_bytes, xor_bytes
from mpstore.errors import CorruptionError

widths = st.sampled_from([1, 2, 4, 8])


@st.composite
def blocks(draw):
    width = draw(widths)
    count = draw(st.integers(0, 600))
    raw = draw(st.binary(min_size=count * width, max_size=count * width))
    return width, raw


@settings(max_examples=200, deadline=None)
@given(blocks())
def test_fast_ungroup_equals_plain_transpose(block):
    width, raw = block
    grouped = group_bytes(raw, width)
    plain = np.frombuffer(grouped, np.uint8).reshape(width, -1).T.tobytes() if width > 1 else grouped
    assert ungroup_bytes(grouped, width) == plain == raw


@settings(max_examples=200, deadline=None)
@given(blocks(), st.data())
def test_encode_then_decode_is_identity(block, data):
    width, raw = block
    ref = data.draw(st.one_of(st.none(), st.binary(min_size=len(raw), max_size=len(raw))))
    codec, payload = encode(raw, width, 1, ref)
    assert len(payload) <= len(raw)
    assert decode(codec, payload, len(raw), width, ref if codec == Codec.XOR_GROUPED_ZSTD else None) == raw


@settings(max_examples=100, deadline=None)
@given(blocks(), st.data())
def test_fused_xor_decode_equals_plain_decode(block, data):
    """The executor's readers decode XOR-coded blocks with mpexec.kernels.ungroup_xor in one pass."""
    from mpexec.kernels import ungroup_xor

    def numpy_ungroup_xor(planes, ref, out):  # what the readers use while the kernels still load
        loaded = blockmerge._decoder_loaded
        blockmerge._decoder_loaded = threading.Event()
        try:
            blockmerge.ungroup_xor(planes, ref, out)
        finally:
            blockmerge._decoder_loaded = loaded

    width, raw = block
    ref = bytes(x ^ (i % width == 0) for i, x in enumerate(raw))  # a fine-tune: low bits differ
    codec, payload = encode(raw, width, 1, ref)
    if len(raw) >= 256:
        assert codec == Codec.XOR_GROUPED_ZSTD
    fused = decode(codec, payload, len(raw), width, ref, ungroup_xor)
    assert bytes(fused) == raw
    assert bytes(decode(codec, payload, len(raw), width, ref, numpy_ungroup_xor)) == raw
    assert isinstance(fused, memoryview) == (codec == Codec.XOR_GROUPED_ZSTD and width in (2, 4))


def test_small_deltas_pick_xor_and_compress_better_than_plain():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(4096).astype(np.float32) * 0.02
    tuned = base + rng.standard_normal(4096).astype(np.float32) * 1e-5
    codec, payload = encode(tuned.tobytes(), 4, 1, base.tobytes())
    _, plain = encode(tuned.tobytes(), 4, 1)
    assert codec == Codec.XOR_GROUPED_ZSTD and len(payload) < len(plain)


def test_incompressible_block_is_stored_raw():
    raw = np.random.default_rng(1).bytes(8192)
    codec, payload = encode(raw, 1, 1)
    assert codec == Codec.RAW and payload == raw


def test_xor_is_its_own_inverse():
    a, b = bytes(range(256)) * 4, bytes(reversed(range(256))) * 4
    assert xor_bytes(xor_bytes(a, b), b) == a


@pytest.mark.parametrize("payload", [b"", b"\x28\xb5\x2f\xfd garbage", b"\x00" * 10])
def test_malformed_payload_raises_corruption_error(payload):
    with pytest.raises(CorruptionError):
        decode(Codec.GROUPED_ZSTD, payload, 64, 2)


def test_xor_block_without_reference_raises():
    codec, payload = encode(b"\x01" * 64, 1, 1, b"\x02" * 64)
    with pytest.raises(CorruptionError):
        decode(codec, payload, 64, 1, None)
