"""Scanning a Hugging Face model folder: which files hold the weights, and every other file.

Weights are chosen the way transformers does, first match wins:
  1. model.safetensors.index.json -> exactly the shards its weight_map names
  2. model.safetensors
  3. pytorch_model.bin.index.json -> exactly the shards its weight_map names
  4. pytorch_model.bin
Every other regular file (index files, configs, tokenizers, subfolders, stray *.safetensors) is an
"other file", stored verbatim. The only things skipped are entries named `.git` (a repository, or a
worktree's gitfile) and `.cache` (huggingface_hub's download bookkeeping), at any depth.

Symlinks to regular files inside the folder are followed; links that leave the folder, dangle, or
point to directories are errors, so a scan never reads outside the folder nor lists a file twice.

No torch import here: torch_bin imports it lazily when a .bin file is actually read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, NotFoundError
from .safetensors_io import MAX_HEADER_BYTES, SafetensorsHeader, loads_strict_json, one_line, read_header
from .torch_bin import TorchBinFile, read_torch_bin

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SKIPPED_NAMES = frozenset({".git", ".cache"})


@dataclass(frozen=True)
class WeightFile:
    relpath: str  # posix path relative to the folder
    kind: str  # "safetensors" or "torch_bin"
    header: SafetensorsHeader | None
    torch_bin: TorchBinFile | None


@dataclass(frozen=True)
class ModelFolder:
    root: Path  # resolved absolute path
    weight_files: tuple[WeightFile, ...]  # sorted by relpath
    other_files: tuple[str, ...]  # every other regular file, posix relpaths, sorted, subfolders included
    tensor_files: dict[str, str]  # tensor name -> relpath of its weight file


def safe_relpath(relpath: str) -> str:
    """Return `relpath` unchanged if it is a safe relative posix path, else raise InvalidInputError.

    Safe means it cannot land outside the folder it is joined to, and means the same on every OS:
    non-empty, not absolute, no backslash, no NUL or other control character, no empty, '.' or '..'
    component, and valid UTF-8 (no surrogate-escaped bytes).
    """
    shown = one_line(relpath) if isinstance(relpath, str) else repr(relpath)

    def bad(why: str) -> InvalidInputError:
        return InvalidInputError(f"{shown}: unsafe relative path: {why}")

    if not isinstance(relpath, str) or not relpath:
        raise bad("empty or not a string")
    if any(ord(c) < 0x20 or c == "\x7f" for c in relpath):
        raise bad("contains a NUL or control character")
    if "\\" in relpath:
        raise bad("contains a backslash")
    if relpath.startswith("/"):
        raise bad("is absolute")
    if any(part in ("", ".", "..") for part in relpath.split("/")):
        raise bad("has an empty, '.' or '..' component")
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("is not valid UTF-8") from None
    return relpath


def scan_model_folder(path: Path) -> ModelFolder:
    """List and validate the model folder at `path`: read every weight file's header or tensors.

    Raises NotFoundError if `path` does not exist, InvalidInputError for anything malformed: the message
    starts with the relative path of the offending file, or with `path` for folder-level problems.
    """
    where = one_line(str(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{where}: no such folder") from None
    except OSError as e:
        raise InvalidInputError(f"{where}: cannot access: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(f"{where}: not a directory")
    root = Path(path).resolve()

    files = list_files(root, where)
    if not files:
        raise InvalidInputError(f"{where}: folder is empty")
    fileset = set(files)

    index_name, index_map = None, None
    if ST_INDEX in fileset:
        kind, index_name = "safetensors", ST_INDEX
    elif ST_SINGLE in fileset:
        kind, shards = "safetensors", [ST_SINGLE]
    elif BIN_INDEX in fileset:
        kind, index_name = "torch_bin", BIN_INDEX
    elif BIN_SINGLE in fileset:
        kind, shards = "torch_bin", [BIN_SINGLE]
    else:
        raise InvalidInputError(
            f"{where}: no weights found (expected {ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
        )
    if index_name is not None:
        index_map = _read_index(root, index_name, fileset)
        shards = sorted(set(index_map.values()))

    weight_files = []
    tensor_files: dict[str, str] = {}
    for rel in shards:
        if kind == "safetensors":
            wf = WeightFile(rel, kind, read_header(root / rel, rel), None)
            names = [t.name for t in wf.header.tensors]
        else:
            wf = WeightFile(rel, kind, None, read_torch_bin(root / rel, rel))
            names = list(wf.torch_bin.tensors)
        for name in names:
            if name in tensor_files:
                raise InvalidInputError(f"{one_line(rel)}: tensor {name!r} is also in {tensor_files[name]}")
            tensor_files[name] = rel
        weight_files.append(wf)

    if index_map is not None:
        _check_index_matches(index_name, index_map, tensor_files)

    weight_set = set(shards)
    return ModelFolder(
        root=root,
        weight_files=tuple(weight_files),
        other_files=tuple(f for f in files if f not in weight_set),
        tensor_files=tensor_files,
    )


def list_files(root: Path, where: str) -> list[str]:
    """Every regular file under `root` (links to regular files inside it included), sorted relpaths."""
    out: list[str] = []
    pending = [""]  # relative dirs still to list; only real directories are entered, so no loops
    while pending:
        reldir = pending.pop()
        try:
            with os.scandir(root / reldir if reldir else root) as it:
                entries = list(it)
        except OSError as e:
            raise InvalidInputError(f"{one_line(reldir) or where}: cannot list: {e.strerror or e}") from None
        for entry in entries:
            if entry.name in SKIPPED_NAMES:
                continue
            rel = f"{reldir}/{entry.name}" if reldir else entry.name
            safe_relpath(rel)  # a name that export could not recreate safely is rejected now
            try:
                if entry.is_symlink():
                    _check_link(root, rel)
                    out.append(rel)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    out.append(rel)
                else:
                    raise InvalidInputError(f"{one_line(rel)}: not a regular file or directory")
            except OSError as e:
                raise InvalidInputError(f"{one_line(rel)}: cannot stat: {e.strerror or e}") from None
    return sorted(out)


def _check_link(root: Path, rel: str) -> None:
    """A symlink must resolve to a regular file.

    It may point outside the folder: the Hugging Face cache links every file of a snapshot folder to
    ../../blobs/. Only the link's own relative path is stored, so nothing can escape at export.
    """
    target = os.path.realpath(root / rel)
    try:
        st = os.stat(target)
    except OSError:
        raise InvalidInputError(f"{one_line(rel)}: broken symlink") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{one_line(rel)}: symlink does not point to a regular file")


def _read_index(root: Path, index_name: str, fileset: set[str]) -> dict[str, str]:
    """The validated weight_map of an index file: tensor name -> shard relpath (an existing file)."""
    try:
        with open(root / index_name, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except OSError as e:
        raise InvalidInputError(f"{index_name}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise InvalidInputError(f"{index_name}: larger than {MAX_HEADER_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{index_name}: not valid UTF-8 (at byte {e.start})") from None
    obj: Any = loads_strict_json(text, index_name, what="index")
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{index_name}: index is a JSON {type(obj).__name__}, not an object")
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict):
        raise InvalidInputError(f"{index_name}: missing weight_map object")
    if not weight_map:
        raise InvalidInputError(f"{index_name}: weight_map is empty")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InvalidInputError(f"{index_name}: weight_map value for {name!r} is not a string")
        try:
            safe_relpath(shard)
        except InvalidInputError:
            raise InvalidInputError(
                f"{index_name}: weight_map maps {name!r} to {one_line(repr(shard))}, a path that is not "
                "a plain relative path inside the folder"
            ) from None
        if shard not in fileset:
            raise InvalidInputError(f"{index_name}: shard {shard!r} (holding {name!r}) does not exist")
    return dict(weight_map)


def _check_index_matches(index_name: str, index_map: dict[str, str], tensor_files: dict[str, str]) -> None:
    """The index and the shards must agree on which tensor lives where, both ways."""
    for name, shard in index_map.items():
        actual = tensor_files.get(name)
        if actual != shard:
            also = f" (it is in {actual})" if actual else ""
            raise InvalidInputError(
                f"{index_name}: tensor {name!r} is mapped to {shard}, which does not contain it{also}"
            )
    for name, rel in tensor_files.items():
        if name not in index_map:
            raise InvalidInputError(f"{one_line(rel)}: tensor {name!r} is not listed in {index_name}")
