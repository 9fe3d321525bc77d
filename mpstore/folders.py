"""Folders already ingested: which snapshot a model folder's files made, while they are unchanged.

A mergekit YAML names its models by folder. Resolving such a model by ingesting it again reads and
hashes every byte, only to find every block stored already. Each folder ingest therefore records the
folder's fingerprint (path, size, modification time, inode and device of every file ingest lists)
with the snapshot it made, in `folders.json` (FORMAT.md, section 11); `mpstore merge` and EXPLAIN take
that snapshot while the fingerprint still matches and the snapshot is still in the store. It is a
cache, like make's or git's index: stat data that stays the same means the file is taken as
unchanged, and a file rewritten in place with its old size, mtime and inode would be missed.
`mpstore ingest` always reads the folder, and updates the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .durable import write_atomic
from .errors import MpstoreError
from .hf_folder import list_files

if TYPE_CHECKING:
    from .store import Store

CACHE_FILE = "folders.json"
CACHE_VERSION = 1


def fingerprint(folder: Path) -> str:
    """sha256 over the stat data of every file the folder's ingest would list, in order."""
    root = folder.resolve()
    digest = hashlib.sha256()
    for rel in list_files(root, str(folder)):
        st = os.stat(root / rel)  # through links: their targets are what ingest reads
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}\n".encode())
    return digest.hexdigest()


def _load(store: "Store") -> dict[str, dict]:
    """The cache's entries; an unreadable or unknown-version file is an empty cache (it is only a cache)."""
    try:
        data = json.loads((store.path / CACHE_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("folders"), dict):
        return {}
    return {k: v for k, v in data["folders"].items() if isinstance(v, dict)}


def known_snapshot(store: "Store", folder: Path) -> bytes | None:
    """The snapshot the folder's last ingest made, if its files are unchanged and it is still stored."""
    entry = _load(store).get(str(folder.resolve()))
    if entry is None:
        return None
    try:
        sid = bytes.fromhex(entry.get("snapshot", ""))
        same = entry.get("fingerprint") == fingerprint(folder)
    except (ValueError, TypeError, MpstoreError, OSError):
        return None
    if not same or store.index.manifest_bytes(sid) is None:  # changed, or collected since
        return None
    return sid


def remember(store: "Store", folder: Path, folder_fingerprint: str, snapshot: bytes) -> None:
    """Record that the folder, as `folder_fingerprint` saw it, made `snapshot` (replaced atomically;
    of two ingests racing, one entry may be lost, which costs a later merge a re-ingest)."""
    folders = _load(store)
    folders[str(folder.resolve())] = {"fingerprint": folder_fingerprint, "snapshot": snapshot.hex()}
    text = json.dumps({"version": CACHE_VERSION, "folders": folders}, indent=1, sort_keys=True)
    write_atomic(store.path / CACHE_FILE, text.encode())
