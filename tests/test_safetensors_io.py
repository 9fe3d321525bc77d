"""Tests for the validating safetensors header reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from mpstore.dtypes import DTYPES
from mpstore.errors import InvalidInputError, NotFoundError
from mpstore.safetensors_io import MAX_HEADER_BYTES, SafetensorsHeader, parse_prefix, read_header

NAME = "model-00002-of-00003.safetensors"


def _bases() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    return [
        save(
            {
                "w": torch.randn(3, 4, generator=g).to(torch.bfloat16),
                "b": torch.randn(4, generator=g),
                "i": torch.tensor(7),
                "e": torch.zeros(0, 3, dtype=torch.float16),
                "m": torch.tensor([True, False, True]),
            },
            metadata={"format": "pt"},
        ),
        save({}),
        save({"x": torch.arange(7, dtype=torch.uint8), "y": torch.zeros(2, 3).to(torch.float8_e4m3fn)}),
    ]


BASES = _bases()


def st_file(header: dict | str | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file from a header (dict, JSON text or raw bytes), data, optional length override."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def read_bytes(tmp_path: Path, blob: bytes) -> SafetensorsHeader:
    path = tmp_path / NAME
    path.write_bytes(blob)
    return read_header(path, NAME)


def expect_error(tmp_path: Path, blob: bytes, *fragments: str) -> str:
    with pytest.raises(InvalidInputError) as info:
        read_bytes(tmp_path, blob)
    msg = str(info.value)
    assert msg.startswith(NAME + ": "), msg
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def assert_agrees_with_safetensors(path: Path, header: SafetensorsHeader, blob: bytes) -> None:
    """The reference implementation reads the same tensors, dtypes, shapes, bytes and metadata."""
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(t.name for t in header.tensors)
        assert (f.metadata() or None) == (header.metadata or None)
        for t in header.tensors:
            sl = f.get_slice(t.name)
            assert sl.get_dtype() == t.dtype.name
            assert tuple(sl.get_shape()) == t.shape
            if t.dtype.name in ("BF16", "F32", "I64", "F16", "BOOL", "U8", "F8_E4M3", "I8", "F64", "I32"):
                got = f.get_tensor(t.name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                assert got == blob[t.start : t.start + t.nbytes]


# --- valid files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(BASES)))
def test_valid_files_match_safe_open(tmp_path: Path, index: int) -> None:
    blob = BASES[index]
    h = read_bytes(tmp_path, blob)
    assert h.file_size == len(blob)
    assert h.prefix == blob[: len(h.prefix)]
    assert [t.start for t in h.tensors] == sorted(t.start for t in h.tensors)
    assert_agrees_with_safetensors(tmp_path / NAME, h, blob)
    assert parse_prefix(h.prefix, h.file_size, NAME) == h


def test_details_of_a_valid_file(tmp_path: Path) -> None:
    h = read_bytes(tmp_path, BASES[0])
    by_name = {t.name: t for t in h.tensors}
    assert h.metadata == {"format": "pt"}
    assert by_name["w"].dtype.name == "BF16" and by_name["w"].shape == (3, 4) and by_name["w"].nbytes == 24
    assert by_name["i"].shape == () and by_name["i"].numel == 1
    assert by_name["e"].numel == 0 and by_name["e"].nbytes == 0


def test_empty_tensor_list_and_padding_kept_verbatim(tmp_path: Path) -> None:
    blob = st_file("{}" + " " * 14)
    h = read_bytes(tmp_path, blob)
    assert h.tensors == () and h.metadata is None and h.prefix == blob
    h = read_bytes(tmp_path, st_file({"__metadata__": {}}))
    assert h.metadata == {} and h.tensors == ()


def test_zero_size_tensors_share_an_offset(tmp_path: Path) -> None:
    hdr = {"a": entry("F32", [0], 0, 0), "b": entry("F32", [2], 0, 8), "c": entry("F32", [0, 4], 8, 8)}
    h = read_bytes(tmp_path, st_file(hdr, b"\0" * 8))
    assert [t.name for t in h.tensors] == ["a", "b", "c"]


def test_sub_byte_dtype(tmp_path: Path) -> None:
    h = read_bytes(tmp_path, st_file({"q": entry("F4", [2, 2], 0, 2)}, b"\0\0"))
    assert h.tensors[0].nbytes == 2


def test_display_name_defaults_to_path(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(InvalidInputError, match=f"^{path}: "):
        read_header(path)


# --- one test per malformed case -----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope.safetensors: no such file"):
        read_header(tmp_path / "nope.safetensors", "nope.safetensors")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="^d: cannot read"):
        read_header(tmp_path, "d")


def test_shorter_than_8_bytes(tmp_path: Path) -> None:
    expect_error(tmp_path, b"\x01\x02\x03", "3 bytes, shorter than the 8-byte header length")


def test_header_length_zero(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file(b"", header_len=0), "header length is 0")


def test_header_length_over_limit(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file("{}", header_len=MAX_HEADER_BYTES + 1), "exceeds the limit")


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file("{}", header_len=50), "header length 50 runs past the end of the file (10")


def test_header_not_utf8(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file(b'{"\xff":1}'), "not valid UTF-8")


def test_header_not_json(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file('{"a": '), "not valid JSON")


def test_header_not_an_object(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file("{}"[:0] + "[1]"), "does not start with '{'")
    expect_error(tmp_path, st_file(" {}"), "does not start with '{'")


def test_header_json_trailing_garbage(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file("{} x"), "not valid JSON")


def test_duplicate_keys(tmp_path: Path) -> None:
    e = json.dumps(entry("F32", [1], 0, 4))
    expect_error(tmp_path, st_file(f'{{"a":{e},"a":{e}}}', b"\0" * 4), "duplicate key 'a'")
    dup_inner = '{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    expect_error(tmp_path, st_file(dup_inner, b"\0" * 4), "duplicate key 'dtype'")


def test_metadata_not_an_object(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"__metadata__": ["x"]}), "__metadata__ is a JSON list")


def test_metadata_value_not_a_string(tmp_path: Path) -> None:
    blob = st_file({"__metadata__": {"step": 5}})
    expect_error(tmp_path, blob, "__metadata__ value of 'step'", "not a string")


def test_entry_not_an_object(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"a": [1, 2]}), "tensor 'a' entry is a JSON list")


def test_entry_missing_key(tmp_path: Path) -> None:
    blob = st_file({"a": {"dtype": "F32", "shape": [0]}})
    expect_error(tmp_path, blob, "tensor 'a'", "missing ['data_offsets']")


def test_entry_extra_key(tmp_path: Path) -> None:
    e = entry("F32", [0], 0, 0) | {"stride": [1]}
    expect_error(tmp_path, st_file({"a": e}), "tensor 'a'", "unexpected ['stride']")


def test_unknown_dtype(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"a": entry("F7", [0], 0, 0)}), "tensor 'a' has unknown dtype 'F7'")
    expect_error(tmp_path, st_file({"a": entry(3, [0], 0, 0)}), "tensor 'a' has unknown dtype 3")


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], "2", None, [[2]]])
def test_bad_shape(tmp_path: Path, shape: object) -> None:
    blob = st_file({"a": entry("F32", shape, 0, 4)}, b"\0" * 4)
    expect_error(tmp_path, blob, "tensor 'a' shape", "non-negative")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4], [-1, 3], [False, 4], "0,4", None])
def test_bad_data_offsets_type(tmp_path: Path, offsets: object) -> None:
    e = {"dtype": "F32", "shape": [1], "data_offsets": offsets}
    blob = st_file({"a": e}, b"\0" * 4)
    expect_error(tmp_path, blob, "tensor 'a' data_offsets", "two non-negative integers")


def test_data_offsets_reversed(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"a": entry("F32", [1], 4, 0)}, b"\0" * 4), "[4, 0] end before they begin")


def test_data_offsets_do_not_match_size(tmp_path: Path) -> None:
    msg = expect_error(tmp_path, st_file({"lm_head.weight": entry("BF16", [10, 10], 0, 100)}, b"\0" * 100))
    assert msg == (
        f"{NAME}: tensor 'lm_head.weight' data_offsets [0, 100] do not match dtype BF16 and shape [10, 10] (200 bytes)"
    )


def test_sub_byte_shape_not_whole_bytes(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"q": entry("F4", [3], 0, 2)}, b"\0\0"), "does not fill whole bytes")


def test_huge_shape(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"a": entry("U8", [2**40, 2**40], 0, 4)}, b"\0" * 4), "more than 2**64")


def test_first_tensor_not_at_zero(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"a": entry("F32", [1], 4, 8)}, b"\0" * 8), "first tensor 'a' begins at 4")


def test_gap_between_tensors(tmp_path: Path) -> None:
    hdr = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}
    expect_error(tmp_path, st_file(hdr, b"\0" * 12), "gap of 4 bytes between tensor 'a'", "tensor 'b'")


def test_overlapping_tensors(tmp_path: Path) -> None:
    hdr = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}
    expect_error(tmp_path, st_file(hdr, b"\0" * 8), "tensor 'b' data_offsets [4, 8] overlap tensor 'a'")


def test_trailing_bytes(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"a": entry("F32", [1], 0, 4)}, b"\0" * 6), "2 trailing bytes")
    expect_error(tmp_path, st_file({}, b"x"), "1 trailing bytes")


def test_truncated(tmp_path: Path) -> None:
    blob = BASES[0][:-3]
    n = len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]
    expect_error(tmp_path, blob, f"truncated: tensors expect {n + 3} bytes of data, file has {n}")


def test_names_with_newlines_stay_on_one_line(tmp_path: Path) -> None:
    expect_error(tmp_path, st_file({"a\nb": entry("F7", [0], 0, 0)}), "tensor 'a\\nb'")


def test_parse_prefix_checks_its_own_length(tmp_path: Path) -> None:
    h = read_bytes(tmp_path, BASES[0])
    with pytest.raises(InvalidInputError, match="^x: header is"):
        parse_prefix(h.prefix[:-1], h.file_size, "x")
    with pytest.raises(InvalidInputError, match="^x: truncated"):
        parse_prefix(h.prefix, h.file_size - 1, "x")


# --- property test: mutated files never raise anything but InvalidInputError -----------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**66) | st.floats() | st.text(max_size=4),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=6,
)
PLAUSIBLE = {
    "dtype": st.sampled_from(sorted(DTYPES)) | st.text(max_size=4),
    "shape": st.lists(st.integers(-1, 6), max_size=3),
    "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2),
}


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


@st.composite
def json_edit(draw: st.DrawFn, blob: bytes) -> bytes:
    hdr, data = _split(blob)
    names = [k for k in hdr if k != "__metadata__"]
    ops = ["set", "delete_field", "add_field", "drop", "add", "metadata", "rename", "dup"]
    op = draw(st.sampled_from(ops))
    if op in ("set", "delete_field", "add_field", "drop", "rename") and not names:
        op = "add"
    if op == "set":
        name, field = draw(st.sampled_from(names)), draw(st.sampled_from(sorted(PLAUSIBLE)))
        hdr[name][field] = draw(PLAUSIBLE[field] | JSON_VALUES)
    elif op == "delete_field":
        del hdr[draw(st.sampled_from(names))][draw(st.sampled_from(sorted(PLAUSIBLE)))]
    elif op == "add_field":
        hdr[draw(st.sampled_from(names))][draw(st.text(max_size=5))] = draw(JSON_VALUES)
    elif op == "drop":
        del hdr[draw(st.sampled_from(names))]
    elif op == "add":
        hdr[draw(st.text(max_size=5))] = draw(st.fixed_dictionaries(PLAUSIBLE) | JSON_VALUES)
    elif op == "metadata":
        hdr["__metadata__"] = draw(JSON_VALUES | st.dictionaries(st.text(max_size=3), st.text(max_size=3)))
    elif op == "rename":
        hdr[draw(st.text(max_size=5))] = hdr.pop(draw(st.sampled_from(names)))
    text = json.dumps(hdr, ensure_ascii=draw(st.booleans()))
    if op == "dup" and hdr:
        key, value = draw(st.sampled_from(list(hdr.items())))
        text = "{" + json.dumps(key) + ":" + json.dumps(value) + ("," if len(text) > 2 else "") + text[1:]
    text += " " * draw(st.integers(0, 9))
    data_edit = draw(st.sampled_from(["keep", "cut", "grow"]))
    if data_edit == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif data_edit == "grow":
        data += draw(st.binary(min_size=1, max_size=8))
    return st_file(text, data)


@st.composite
def mutated_file(draw: st.DrawFn) -> bytes:
    blob = draw(st.sampled_from(BASES))
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    kind = draw(st.sampled_from(["flip", "truncate", "append", "header_len", "json"]))
    if kind == "flip":
        out = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            # Mostly flip header bytes: data bytes never make a file invalid.
            pos = draw(st.integers(0, header_end - 1) | st.integers(0, len(blob) - 1))
            out[pos] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "append":
        return blob + draw(st.binary(min_size=1, max_size=16))
    if kind == "header_len":
        n = header_end - 8
        interesting = [0, 1, n - 1, n + 1, len(blob) - 8, len(blob) - 7, MAX_HEADER_BYTES + 1, 2**64 - 1]
        new = draw(st.sampled_from(interesting) | st.integers(0, 2**64 - 1))
        return struct.pack("<Q", new) + blob[8:]
    return draw(json_edit(blob))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=mutated_file())
def test_mutated_files_raise_only_invalid_input(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    folder = tmp_path_factory.getbasetemp()
    path = folder / NAME
    path.write_bytes(blob)
    try:
        header = read_header(path, NAME)
    except InvalidInputError as e:
        assert str(e).startswith(NAME + ": ") and "\n" not in str(e)
        return
    # Accepted: the reference implementation must accept it too and read the same thing.
    assert_agrees_with_safetensors(path, header, blob)
    assert parse_prefix(header.prefix, len(blob), NAME) == header
