"""Export: a snapshot -> a Hugging Face model folder, every file rebuilt byte for byte.

Blocks are decoded by a thread pool with bounded read-ahead and written in order. Each file is
written under a temporary name, checked against the size and SHA-256 recorded at ingest, and only
then renamed into place, so a crash or a damaged block never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CorruptionError, InvalidInputError
from .hf_folder import safe_relpath
from .safetensors_io import build_prefix, index_json, plan_shards, shard_names
from .snapshot import FileEntry, Manifest, Segment
from .ids import block_id

if TYPE_CHECKING:
    from .store import Progress, Store

PARTIAL_SUFFIX = ".mpstore-partial"


@dataclass
class ExportResult:
    id: bytes
    files: int
    bytes: int
    seconds: float


def export_snapshot(
    store: "Store", ref: str | bytes, outdir: Path, progress: "Progress | None" = None, shard_bytes: int | None = None
) -> ExportResult:
    """Write snapshot `ref` into `outdir` (new or empty).

    Files come back as stored. With `shard_bytes`, safetensors weights are written instead as new
    Hugging Face shards of at most that size (with an index when there are several).
    """
    started = time.monotonic()
    sid = store.resolve(ref)
    manifest = store.manifest(sid)
    tensors = manifest.tensor_map()
    entries = list(manifest.files) if shard_bytes is None else _resharded(manifest, shard_bytes)
    plan = []  # (destination, entry, parts in order: block ids, or literal bytes for new headers)
    for entry in entries:
        try:
            rel = safe_relpath(entry.path)
        except InvalidInputError as exc:
            raise InvalidInputError(f"snapshot {sid.hex()[:12]}: {exc}") from None
        parts: list[bytes] = []
        for seg in entry.segments:
            if seg.tensor is not None:
                if seg.tensor not in tensors:
                    raise CorruptionError(
                        f"snapshot {sid.hex()[:12]}: file {entry.path} names missing tensor {seg.tensor!r}"
                    )
                parts.extend(tensors[seg.tensor].blocks)
            elif seg.literal is not None:
                parts.append(_Literal(seg.literal))
            else:
                parts.extend(seg.blocks)
        plan.append((outdir / rel, entry, parts))
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise InvalidInputError(f"{outdir}: already exists and is not an empty folder")
    outdir.mkdir(parents=True, exist_ok=True)

    stream = store.read_blocks(b for _, _, parts in plan for b in parts if not isinstance(b, _Literal))
    written = 0
    for dest, entry, parts in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
        digest, size = hashlib.sha256(), 0
        try:
            with open(partial, "wb") as out:
                for part in parts:
                    if isinstance(part, _Literal):
                        raw = bytes(part)
                    else:
                        raw = next(stream)
                        if block_id(raw) != part:  # cheap (XXH3), and the only check for merged files
                            raise CorruptionError(
                                f"{entry.path}: block {part.hex()} does not match its id (run `mpstore fsck`)"
                            )
                    out.write(raw)
                    if entry.sha256 is not None:
                        digest.update(raw)
                    size += len(raw)
                    if progress:
                        progress(len(raw))
            if size != entry.size or (entry.sha256 is not None and digest.hexdigest() != entry.sha256):
                raise CorruptionError(
                    f"{entry.path}: rebuilt file does not match its recorded size and sha256 (run `mpstore fsck`)"
                )
        except BaseException:
            partial.unlink(missing_ok=True)  # never leave a file that could pass for complete
            raise
        os.replace(partial, dest)
        written += size
    return ExportResult(sid, len(plan), written, time.monotonic() - started)


class _Literal(bytes):
    """Bytes written as they are (a new safetensors header), as opposed to a block id."""


def _resharded(manifest: Manifest, shard_bytes: int) -> list[FileEntry]:
    """The snapshot's files with its safetensors weights laid out anew in shards of <= shard_bytes."""
    weight_files = [
        f for f in manifest.files if f.path.endswith(".safetensors") and any(s.tensor is not None for s in f.segments)
    ]
    if any(f.path.endswith(".bin") and any(s.tensor for s in f.segments) for f in manifest.files):
        raise InvalidInputError(
            "--shard-size: this snapshot stores pytorch_model.bin weights; re-sharding applies to safetensors only"
        )
    if not weight_files:
        raise InvalidInputError("--shard-size: this snapshot has no safetensors weights to shard")
    tmap = manifest.tensor_map()
    order = [s.tensor for f in weight_files for s in f.segments if s.tensor is not None]
    groups = plan_shards([(n, tmap[n].nbytes) for n in order], shard_bytes)
    names = shard_names(len(groups))
    files = [f for f in manifest.files if f not in weight_files and f.path != "model.safetensors.index.json"]
    for path, group in zip(names, groups):
        prefix = build_prefix([(n, tmap[n].dtype, tmap[n].shape) for n in group])
        segments = (Segment(literal=prefix, size=len(prefix)),) + tuple(Segment(tensor=n) for n in group)
        files.append(FileEntry(path, len(prefix) + sum(tmap[n].nbytes for n in group), None, segments))
    if len(groups) > 1:
        index = index_json(
            {n: path for path, group in zip(names, groups) for n in group}, sum(tmap[n].nbytes for n in order)
        )
        files.append(
            FileEntry(
                "model.safetensors.index.json",
                len(index),
                hashlib.sha256(index).hexdigest(),
                (Segment(literal=index, size=len(index)),),
            )
        )
    return files
