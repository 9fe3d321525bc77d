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


def export_snapshot(store: "Store", ref: str | bytes, outdir: Path, progress: "Progress | None" = None) -> ExportResult:
    started = time.monotonic()
    sid = store.resolve(ref)
    manifest = store.manifest(sid)
    tensors = manifest.tensor_map()
    plan = []  # (destination, entry, block ids in order)
    for entry in manifest.files:
        try:
            rel = safe_relpath(entry.path)
        except InvalidInputError as exc:
            raise InvalidInputError(f"snapshot {sid.hex()[:12]}: {exc}") from None
        blocks = []
        for seg in entry.segments:
            if seg.tensor is not None:
                if seg.tensor not in tensors:
                    raise CorruptionError(f"snapshot {sid.hex()[:12]}: file {entry.path} names missing tensor {seg.tensor!r}")
                blocks.extend(tensors[seg.tensor].blocks)
            else:
                blocks.extend(seg.blocks)
        plan.append((outdir / rel, entry, blocks))
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise InvalidInputError(f"{outdir}: already exists and is not an empty folder")
    outdir.mkdir(parents=True, exist_ok=True)

    stream = store.read_blocks(b for _, _, blocks in plan for b in blocks)
    written = 0
    for dest, entry, blocks in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
        digest, size = hashlib.sha256(), 0
        try:
            with open(partial, "wb") as out:
                for block in blocks:
                    raw = next(stream)
                    if block_id(raw) != block:  # cheap (XXH3), and the only check for merged files
                        raise CorruptionError(f"{entry.path}: block {block.hex()} does not match its id "
                                              f"(run `mpstore fsck`)")
                    out.write(raw)
                    if entry.sha256 is not None:
                        digest.update(raw)
                    size += len(raw)
                    if progress:
                        progress(len(raw))
            if size != entry.size or (entry.sha256 is not None and digest.hexdigest() != entry.sha256):
                raise CorruptionError(f"{entry.path}: rebuilt file does not match its recorded size and sha256 "
                                      f"(run `mpstore fsck`)")
        except BaseException:
            partial.unlink(missing_ok=True)  # never leave a file that could pass for complete
            raise
        os.replace(partial, dest)
        written += size
    return ExportResult(sid, len(plan), written, time.monotonic() - started)
