"""gc: what no ref or pin reaches goes, everything reachable stays intact, even across kill -9."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from mpstore import ConflictError, Store

from tests import crashutil as cu
from tests.conftest import folder_digest


def _exports_match(store: Store, expected: dict[str, Path], scratch: Path) -> None:
    for ref, source in expected.items():
        out = scratch / f"{ref.replace('/', '_')}-{time.monotonic_ns()}"
        store.export(ref, out)
        assert folder_digest(out) == folder_digest(source), ref


def test_gc_removes_unreachable_snapshots_and_frees_space(store, suite, tmp_path):
    store.ingest(suite["base"], name="base")
    full = store.ingest(suite["full-0"], name="full", base="base").id
    store.ingest(suite["lora-0"], name="lora", base="base")
    before = store.du().pack_bytes
    store.delete_ref("full")
    report = store.gc()
    assert report.snapshots_removed == 1 and report.blocks_removed > 0 and report.bytes_freed > 0
    assert store.du().pack_bytes == before - report.bytes_freed
    assert full not in store.index.snapshot_ids()
    assert store.fsck().ok
    _exports_match(store, {"base": suite["base"], "lora": suite["lora-0"]}, tmp_path)


def test_pins_keep_unnamed_snapshots_and_xor_references_survive_their_base(store, suite, tmp_path):
    store.ingest(suite["base"], name="base")
    partial = store.ingest(suite["partial-0"], name="partial", base="base").id
    store.pin(partial)
    store.delete_ref("partial")
    store.delete_ref("base")  # the base snapshot goes; the blocks the expert is XOR-coded against stay
    report = store.gc()
    assert report.snapshots_removed == 1
    assert store.fsck().ok
    out = tmp_path / "partial"
    store.export(partial, out)
    assert folder_digest(out) == folder_digest(suite["partial-0"])


def test_gc_refuses_to_run_beside_a_writer_when_asked_not_to_wait(store, suite):
    store.ingest(suite["base"], name="base")
    with store.writing().held():  # what a running ingest or merge holds
        with pytest.raises(ConflictError, match="running"):
            Store.open(store.path).gc(wait=False)


def test_index_rebuilt_after_gc_keeps_forgotten_snapshots_forgotten(store, suite):
    store.ingest(suite["base"], name="base")
    gone = store.ingest(suite["full-0"], name="full", base="base").id
    store.delete_ref("full")
    store.gc()
    store.rebuild_index()
    assert gone not in store.index.snapshot_ids()
    assert store.fsck().ok


def test_kill9_during_gc_loses_nothing_reachable(small_suite, tmp_path):
    path = tmp_path / "store"
    cu.run_ok(path, "init", "--block-size", cu.BLOCK)
    keep = {"base": small_suite["base"], "lora": small_suite["lora-0"]}
    cu.run_ok(path, "ingest", small_suite["base"], "--name", "base")
    cu.run_ok(path, "ingest", small_suite["lora-0"], "--name", "lora", "--base", "base")
    rng = random.Random(7)
    for round_ in range(4):
        # Make garbage in a fresh pack, then kill gc at a random moment while it sweeps.
        cu.run_ok(path, "ingest", small_suite["full-0"], "--name", "tmp", "--base", "base", "--force")
        cu.run_ok(path, "ingest", small_suite["partial-0"], "--name", "tmp", "--base", "base", "--force")
        cu.run_ok(path, "ref", "rm", "tmp")
        proc = cu.start(path, "gc")
        time.sleep(rng.uniform(0.0, 0.6))
        cu.kill9(proc)
        with Store.open(path) as s:
            assert s.fsck().ok, f"round {round_}"
            _exports_match(s, keep, tmp_path / f"r{round_}")
    cu.run_ok(path, "gc")
    with Store.open(path) as s:
        assert set(s.refs()) == {"base", "lora"}
        assert len(s.index.snapshot_ids()) == 2
        assert s.fsck().ok
        _exports_match(s, keep, tmp_path / "final")
