"""Tests for scanning Hugging Face model folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mpstore.errors import InvalidInputError, NotFoundError
from mpstore.hf_folder import ModelFolder, safe_relpath, scan_model_folder

INDEX = "model.safetensors.index.json"


def tensors(*names: str) -> dict[str, torch.Tensor]:
    return {n: torch.full((2, 3), float(i)) for i, n in enumerate(names)}


def write_sharded(folder: Path, shards: dict[str, list[str]], weight_map: dict[str, str] | None = None) -> None:
    for shard, names in shards.items():
        save_file(tensors(*names), folder / shard)
    if weight_map is None:
        weight_map = {n: shard for shard, names in shards.items() for n in names}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def scan_error(folder: Path, *fragments: str, prefix: str | None = None) -> str:
    with pytest.raises(InvalidInputError) as info:
        scan_model_folder(folder)
    msg = str(info.value)
    assert "\n" not in msg
    if prefix is not None:
        assert msg.startswith(prefix + ": "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_import_does_not_load_torch() -> None:
    code = "import sys, mpstore.hf_folder, mpstore.safetensors_io, mpstore.torch_bin; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    )
    assert out.stdout.strip() == "False"


# --- accepted folders ----------------------------------------------------------------------------


def test_single_safetensors_file(tmp_path: Path) -> None:
    save_file(tensors("a", "b"), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    mf = scan_model_folder(tmp_path)
    assert isinstance(mf, ModelFolder) and mf.root == tmp_path.resolve()
    assert [w.relpath for w in mf.weight_files] == ["model.safetensors"]
    assert mf.weight_files[0].kind == "safetensors" and mf.weight_files[0].torch_bin is None
    assert mf.other_files == ("config.json",)
    assert mf.tensor_files == {"a": "model.safetensors", "b": "model.safetensors"}


def test_sharded_with_index(tmp_path: Path) -> None:
    write_sharded(tmp_path, {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c"]})
    save_file(tensors("x"), tmp_path / "model.safetensors")  # not named by the index: an other file
    mf = scan_model_folder(tmp_path)
    assert [w.relpath for w in mf.weight_files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert mf.other_files == ("model.safetensors", "model.safetensors.index.json")
    assert mf.tensor_files == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }


def test_torch_bin(tmp_path: Path) -> None:
    torch.save(tensors("a", "b"), tmp_path / "pytorch_model.bin")
    mf = scan_model_folder(tmp_path)
    (wf,) = mf.weight_files
    assert wf.kind == "torch_bin" and wf.header is None and set(wf.torch_bin.tensors) == {"a", "b"}
    assert mf.tensor_files == {"a": "pytorch_model.bin", "b": "pytorch_model.bin"}
    assert mf.other_files == ()


def test_sharded_torch_bin(tmp_path: Path) -> None:
    torch.save(tensors("a"), tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(tensors("b"), tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    mf = scan_model_folder(tmp_path)
    assert mf.tensor_files == weight_map
    assert mf.other_files == ("pytorch_model.bin.index.json",)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    save_file(tensors("a"), tmp_path / "model.safetensors")
    torch.save(tensors("a"), tmp_path / "pytorch_model.bin")
    mf = scan_model_folder(tmp_path)
    assert [w.relpath for w in mf.weight_files] == ["model.safetensors"]
    assert mf.other_files == ("pytorch_model.bin",)


def test_subfolders_listed_and_git_cache_skipped(tmp_path: Path) -> None:
    save_file(tensors("a"), tmp_path / "model.safetensors")
    (tmp_path / "original").mkdir()
    save_file(tensors("a"), tmp_path / "original" / "consolidated.safetensors")
    (tmp_path / "tokenizer" / "deep").mkdir(parents=True)
    (tmp_path / "tokenizer" / "deep" / "vocab.txt").write_text("x")
    (tmp_path / ".gitattributes").write_text("*.bin lfs")
    for skipped in (".git", ".cache/huggingface"):
        (tmp_path / skipped).mkdir(parents=True)
        (tmp_path / skipped / "f").write_text("x")
    mf = scan_model_folder(tmp_path)
    assert mf.other_files == (
        ".gitattributes",
        "original/consolidated.safetensors",
        "tokenizer/deep/vocab.txt",
    )


def test_symlink_to_file_inside_is_followed(tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    save_file(tensors("a"), tmp_path / "blobs" / "abc")
    os.symlink("blobs/abc", tmp_path / "model.safetensors")
    mf = scan_model_folder(tmp_path)
    assert mf.tensor_files == {"a": "model.safetensors"}
    assert mf.other_files == ("blobs/abc",)


def test_folder_given_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    save_file(tensors("a"), tmp_path / "real" / "model.safetensors")
    os.symlink("real", tmp_path / "link")
    assert scan_model_folder(tmp_path / "link").tensor_files == {"a": "model.safetensors"}


# --- folder errors -------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope: no such folder"):
        scan_model_folder(tmp_path / "nope")


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    scan_error(tmp_path / "f", "not a directory", prefix=str(tmp_path / "f"))


def test_empty_folder(tmp_path: Path) -> None:
    scan_error(tmp_path, "folder is empty", prefix=str(tmp_path))
    (tmp_path / ".git").mkdir()
    scan_error(tmp_path, "folder is empty")


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    save_file(tensors("a"), tmp_path / "sub" / "model.safetensors")
    scan_error(tmp_path, "no weights found (expected model.safetensors", prefix=str(tmp_path))


def test_invalid_weight_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0{}xyz")
    scan_error(tmp_path, "trailing bytes", prefix="model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"junk")
    scan_error(tmp_path, "not a loadable torch zip checkpoint", prefix="pytorch_model.bin")


def test_index_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    scan_error(tmp_path, "not valid JSON", prefix="model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}, "weight_map": {}}')
    scan_error(tmp_path, "duplicate key 'weight_map'", prefix="model.safetensors.index.json")


def test_index_without_weight_map(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    scan_error(tmp_path, "missing weight_map", prefix="model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    scan_error(tmp_path, "not an object", prefix="model.safetensors.index.json")


def test_index_names_missing_shard(tmp_path: Path) -> None:
    write_sharded(tmp_path, {"a.safetensors": ["a"]}, {"a": "a.safetensors", "b": "b.safetensors"})
    scan_error(tmp_path, "shard 'b.safetensors' (holding 'b') does not exist", prefix=INDEX)


@pytest.mark.parametrize("shard", ["../out.safetensors", "/etc/passwd", "sub\\x.st", "./a.safetensors"])
def test_index_shard_escaping_folder(tmp_path: Path, shard: str) -> None:
    write_sharded(tmp_path, {"a.safetensors": ["a"]}, {"a": shard})
    scan_error(tmp_path, "not a plain relative path", prefix="model.safetensors.index.json")


def test_index_maps_tensor_that_shard_lacks(tmp_path: Path) -> None:
    weight_map = {"a": "a.safetensors", "b": "a.safetensors", "x": "b.safetensors"}
    write_sharded(tmp_path, {"a.safetensors": ["a"], "b.safetensors": ["b"]}, weight_map)
    msg = scan_error(
        tmp_path,
        "tensor 'b' is mapped to a.safetensors, which does not contain it",
        prefix="model.safetensors.index.json",
    )
    assert "(it is in b.safetensors)" in msg


def test_shard_has_tensor_missing_from_index(tmp_path: Path) -> None:
    write_sharded(tmp_path, {"a.safetensors": ["a", "extra"]}, {"a": "a.safetensors"})
    scan_error(tmp_path, f"tensor 'extra' is not listed in {INDEX}", prefix="a.safetensors")


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    weight_map = {"w": "a.safetensors", "v": "b.safetensors"}
    write_sharded(tmp_path, {"a.safetensors": ["w"], "b.safetensors": ["w", "v"]}, weight_map)
    scan_error(tmp_path, "tensor 'w' is also in a.safetensors", prefix="b.safetensors")


def test_symlinks_into_a_hub_cache_blob_folder_are_followed(tmp_path: Path) -> None:
    # The Hugging Face cache links snapshots/<rev>/model.safetensors to ../../blobs/<hash>.
    blobs, model = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    model.mkdir(parents=True)
    save_file(tensors("a"), blobs / "abc123")
    os.symlink("../../blobs/abc123", model / "model.safetensors")
    folder = scan_model_folder(model)
    assert [wf.relpath for wf in folder.weight_files] == ["model.safetensors"]


def test_broken_symlink_and_symlinked_directory(tmp_path: Path) -> None:
    save_file(tensors("a"), tmp_path / "model.safetensors")
    os.symlink("missing", tmp_path / "dangling")
    scan_error(tmp_path, "broken symlink", prefix="dangling")
    os.unlink(tmp_path / "dangling")
    (tmp_path / "d").mkdir()
    os.symlink("d", tmp_path / "dlink")
    scan_error(tmp_path, "does not point to a regular file", prefix="dlink")


def test_special_file_rejected(tmp_path: Path) -> None:
    save_file(tensors("a"), tmp_path / "model.safetensors")
    os.mkfifo(tmp_path / "fifo")
    scan_error(tmp_path, "not a regular file", prefix="fifo")


def test_unsafe_file_name_on_disk(tmp_path: Path) -> None:
    save_file(tensors("a"), tmp_path / "model.safetensors")
    (tmp_path / "a\\b").write_text("x")
    scan_error(tmp_path, "contains a backslash")


# --- safe_relpath --------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "config.json", "sub/dir/file.bin", ".gitattributes", "a..b", "ü.txt"])
def test_safe_relpath_accepts(good: str) -> None:
    assert safe_relpath(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "/abs", "../x", "a/../../x", "a/..", "..", "a\\b", "a\0b", "a//b", "a/", "./a", "a\nb", "\udcff"],
)
def test_safe_relpath_rejects(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="unsafe relative path") as info:
        safe_relpath(bad)
    assert "\n" not in str(info.value)
