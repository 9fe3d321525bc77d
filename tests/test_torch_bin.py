"""Tests for the pytorch_model.bin reader."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import pytest
import torch

from mpstore.errors import InvalidInputError, NotFoundError
from mpstore.torch_bin import FileSegment, TorchBinFile, read_torch_bin


def rebuild_bytes(
    segments: tuple[FileSegment, ...],
    file_bytes_reader: Callable[[int, int], bytes],
    tensor_bytes: Callable[[str], bytes],
) -> bytes:
    """The file described by `segments`: literal ranges from the file, tensor ranges from the tensors."""
    out = bytearray()
    for seg in segments:
        out += file_bytes_reader(seg.start, seg.end) if seg.kind == "bytes" else tensor_bytes(seg.name)
    return bytes(out)


def check_segments(tb: TorchBinFile, blob: bytes) -> None:
    pos = 0
    for seg in tb.segments:  # in order, no gaps, no adjacent literal segments
        assert seg.start == pos and seg.end > seg.start
        assert seg.kind in ("bytes", "tensor") and (seg.name is None) == (seg.kind == "bytes")
        pos = seg.end
    assert pos == tb.file_size == len(blob)
    assert all(not (a.kind == b.kind == "bytes") for a, b in zip(tb.segments, tb.segments[1:]))
    rebuilt = rebuild_bytes(tb.segments, lambda s, e: blob[s:e], lambda name: bytes(tb.tensors[name][2]))
    assert rebuilt == blob


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_state_dict_roundtrip_and_segments(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=g)
    sd = OrderedDict(
        emb=torch.randn(16, 8, generator=g).to(torch.bfloat16),
        w=base,
        ids=torch.arange(40, dtype=torch.int64),
        view=base[2],  # a view of another tensor: shares its storage
        transposed=torch.randn(5, 7, generator=g).t(),  # non-contiguous
        scalar=torch.tensor(3.5),
        flags=torch.tensor([True, False]),
        fp8=torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        empty=torch.zeros(0, 3),
    )
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    blob = path.read_bytes()

    tb = read_torch_bin(path, "pytorch_model.bin")
    assert list(tb.tensors) == list(sd)
    names = {"emb": "BF16", "w": "F32", "ids": "I64", "transposed": "F32", "flags": "BOOL", "fp8": "F8_E4M3"}
    for name, dtype_name in names.items():
        assert tb.tensors[name][0].name == dtype_name
    for name, t in sd.items():
        dtype, shape, data = tb.tensors[name]
        assert shape == tuple(t.shape)
        assert bytes(data) == raw(t), name
        assert data.readonly
    check_segments(tb, blob)

    # Tensors that own their whole storage are referenced; the view and the transposed one are not.
    referenced = {s.name for s in tb.segments if s.kind == "tensor"}
    assert {"emb", "w", "ids", "scalar", "flags", "fp8"} <= referenced
    assert "view" not in referenced and "transposed" not in referenced
    # Little literal data beyond the transposed tensor's storage (5*7*4 bytes) and the zip structure.
    literal = sum(s.end - s.start for s in tb.segments if s.kind == "bytes")
    assert literal < 35 * 4 + 500 * len(sd)


def test_tied_weights_share_one_storage(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    path = tmp_path / "p.bin"
    torch.save({"embed": w, "lm_head": w}, path)
    tb = read_torch_bin(path)
    check_segments(tb, path.read_bytes())
    assert sum(s.kind == "tensor" for s in tb.segments) == 1


def test_equal_contents_in_separate_storages(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    torch.save({"a": torch.zeros(10), "b": torch.zeros(10)}, path)
    tb = read_torch_bin(path)
    check_segments(tb, path.read_bytes())


def test_parameters_are_tensors(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    torch.save(torch.nn.Linear(3, 2).state_dict(keep_vars=True), path)
    tb = read_torch_bin(path)
    assert set(tb.tensors) == {"weight", "bias"}
    check_segments(tb, path.read_bytes())


class Custom:
    pass


def _error(path: Path) -> str:
    with pytest.raises(InvalidInputError) as info:
        read_torch_bin(path, "pytorch_model.bin")
    msg = str(info.value)
    assert msg.startswith("pytorch_model.bin: ") and "\n" not in msg
    return msg


def test_custom_class_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    torch.save({"w": torch.zeros(2), "obj": Custom()}, path)
    assert "Custom" in _error(path)


def test_nested_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    assert "key 'model' holds a dict, not a tensor" in _error(path)


def test_non_dict_and_non_string_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    torch.save([torch.zeros(2)], path)
    assert "checkpoint is a list" in _error(path)
    torch.save({1: torch.zeros(2)}, path)
    assert "key 1 is not a string" in _error(path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    torch.save({"c": torch.zeros(2, dtype=torch.complex128)}, path)
    assert "tensor 'c' has unsupported dtype torch.complex128" in _error(path)


def test_sparse_tensor_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    torch.save({"s": torch.eye(3).to_sparse()}, path)
    assert "tensor 's' is not a dense tensor" in _error(path)


def test_garbage_legacy_and_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    path.write_bytes(b"not a checkpoint at all")
    assert "not a loadable torch zip checkpoint" in _error(path)
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    assert "not a loadable torch zip checkpoint" in _error(path)
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:300])
    _error(path)
    path.write_bytes(b"")
    _error(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="x.bin: no such file"):
        read_torch_bin(tmp_path / "x.bin", "x.bin")
