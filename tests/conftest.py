"""Shared fixtures: small generated models (built once per session) and fresh stores."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bench.modelgen import make_suite
from mpstore import Store

SMALL_BLOCK = 4096  # small blocks so tiny models still span many blocks


@pytest.fixture(scope="session")
def suite(tmp_path_factory) -> dict[str, Path]:
    """base + 1 LoRA + 1 partial + 1 full expert of the tiny preset."""
    return make_suite(tmp_path_factory.mktemp("models"), preset="tiny", n_lora=1, n_partial=1, n_full=1)


@pytest.fixture(scope="session")
def small_suite(tmp_path_factory) -> dict[str, Path]:
    """base + 1 LoRA + 1 partial + 1 full expert of the small preset (~10 MB each)."""
    return make_suite(tmp_path_factory.mktemp("small"), preset="small", n_lora=1, n_partial=1, n_full=1)


@pytest.fixture(scope="session")
def sharded_suite(tmp_path_factory) -> dict[str, Path]:
    return make_suite(
        tmp_path_factory.mktemp("sharded"), preset="tiny", n_lora=0, n_partial=0, n_full=1, shard_bytes=200_000
    )


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store.init(tmp_path / "store", block_bytes=SMALL_BLOCK)
    yield s
    s.close()


def folder_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below folder."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def store_state(path: Path) -> dict:
    """Everything a failed command must leave unchanged: sizes of log and packs, refs and snapshots."""
    s = Store.open(path)
    try:
        return {
            "log": s.log.size(),
            "packs": {p.name: p.stat().st_size for p in sorted((path / "packs").iterdir())},
            "refs": s.refs(),
            "snapshots": sorted(s.index.snapshot_ids()),
        }
    finally:
        s.close()


@pytest.fixture
def merge_store(tmp_path, suite) -> Path:
    """A closed store (4 KiB blocks) holding base, lora, partial and full of the tiny suite."""
    path = tmp_path / "merge-store"
    with Store.init(path, block_bytes=SMALL_BLOCK) as s:
        s.ingest(suite["base"], name="base")
        for name, folder in (("lora", "lora-0"), ("partial", "partial-0"), ("full", "full-0")):
            s.ingest(suite[folder], name=name, base="base")
    return path
