"""Crash safety: real `mpstore` processes killed with SIGKILL at random moments, torn log tails, and
flipped bytes in pack files. Nothing is mocked: every crash is a kill -9 of a separate process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from mpstore import Store
from mpstore.codecs import Codec
from mpstore.manifest_log import RECORD_HEAD
from mpstore.pack import RECORD_HEADER_SIZE

from . import crashutil as cu

# Override to explore more kill points: MPSTORE_CRASH_SEED=n MPSTORE_CRASH_ROUNDS=m pytest ...
KILL_ROUNDS = int(os.environ.get("MPSTORE_CRASH_ROUNDS", 10))
SEED = int(os.environ.get("MPSTORE_CRASH_SEED", 20240917))


def _check_store(
    path: Path,
    expected: dict[str, tuple[bytes, Path]],
    allowed_extra_refs: set[str],
    extra_snapshots: set[bytes],
    scratch: Path,
) -> dict[str, bytes]:
    """Open the store and check everything a crash must never break; returns its refs."""
    with Store.open(path) as s:
        assert s.log.valid_end() == s.log.size(), "a torn log tail survived Store.open"
        refs = s.refs()
        for name, (sid, _) in expected.items():
            assert refs.get(name) == sid, f"committed ref {name} lost or moved"
        assert set(refs) <= set(expected) | allowed_extra_refs, f"unexpected refs {sorted(refs)}"
        visible = set(s.index.snapshot_ids())
        assert visible == {sid for sid, _ in expected.values()} | extra_snapshots | {
            refs[n] for n in allowed_extra_refs if n in refs
        }, "an uncommitted snapshot became visible"
        report = s.fsck()
        assert report.ok, report.problems
        for name, (sid, src) in expected.items():
            assert cu.export_digests(s, name, cu.fresh_dir(scratch, name)) == cu.digests(src), name
    return refs


def test_kill9_during_ingest_never_damages_the_store_and_the_rerun_reuses_blocks(small_suite, tmp_path):
    store = tmp_path / "store"
    cu.run_ok(store, "init", "--block-size", cu.BLOCK)
    base = cu.run_json(store, "ingest", small_suite["base"], "--name", "base")
    lora = cu.run_json(store, "ingest", small_suite["lora-0"], "--name", "lora", "--base", "base")
    expected = {
        "base": (bytes.fromhex(base["id"]), small_suite["base"]),
        "lora": (bytes.fromhex(lora["id"]), small_suite["lora-0"]),
    }
    victim = small_suite["full-0"]  # every block differs from the base: ~2600 XOR-coded records to write
    ingest_args = ("ingest", victim, "--name", "X", "--base", "base", "--json")

    # An uninterrupted run into a copy of the store: its duration bounds the kill delays, and its
    # result is what every later run must reproduce.
    fresh_store = tmp_path / "fresh"
    shutil.copytree(store, fresh_store)
    t0 = time.monotonic()
    fresh = json.loads(cu.run_ok(fresh_store, *ingest_args).stdout)
    duration = time.monotonic() - t0
    assert fresh["blocks_new"] > 1000 and fresh["written_bytes"] > 0

    rng = random.Random(SEED)
    scratch = tmp_path / "exports"
    killed_running = 0
    extra_snapshots: set[bytes] = set()
    for round_no in range(KILL_ROUNDS):
        # Half the rounds publish blocks to the index every 64 KiB (as a multi-GB ingest does with
        # the default interval), half use the default (one publish at the end, for a 10 MB model).
        sync = 64 << 10 if round_no % 2 == 0 else None
        with Store.open(store) as s:
            ends_before = s.index.pack_ends()
        proc = cu.start(store, *ingest_args, sync_bytes=sync)
        if round_no % 3 == 2:
            # Kill shortly after the run has published at least one batch of blocks.
            def published() -> bool:
                with Store.open(store) as s:
                    return s.index.pack_ends() != ends_before or proc.poll() is not None

            assert cu.wait_until(published, timeout=60)
            time.sleep(rng.uniform(0, duration / 4))
        else:
            time.sleep(rng.uniform(0, duration))
        killed_running += proc.poll() is None
        cu.kill9(proc)

        refs = _check_store(store, expected, {"X"}, extra_snapshots, scratch)
        if "X" in refs:  # killed after its commit: the snapshot must be complete and correct
            assert refs["X"].hex() == fresh["id"]
            with Store.open(store) as s:
                assert cu.export_digests(s, "X", cu.fresh_dir(scratch, "X")) == cu.digests(victim)
                extra_snapshots.add(s.delete_ref("X"))
    assert killed_running >= KILL_ROUNDS // 2, "too few kills landed while the ingest was running"

    final = json.loads(cu.run_ok(store, *ingest_args).stdout)
    assert final["id"] == fresh["id"]
    assert final["blocks"] == fresh["blocks"]
    # Blocks durably written by killed runs are found again instead of being rewritten.
    assert final["blocks_dedup"] > 0, final
    assert final["written_bytes"] < fresh["written_bytes"], (final, fresh)
    out = tmp_path / "final-export"
    cu.run_ok(store, "export", "X", out)
    assert cu.digests(out) == cu.digests(victim)
    cu.run_ok(store, "fsck")
    _check_store(store, {**expected, "X": (bytes.fromhex(final["id"]), victim)}, set(), extra_snapshots, scratch)


_RENAME_LOOP = """
import sys
from mpstore import Store
s = Store.open(sys.argv[1])
print("ready", flush=True)
while True:
    s.rename_ref("a", "b")
    s.rename_ref("b", "a")
    s.pin("a")
    s.unpin("a")
"""


def test_kill9_during_commit_loop_keeps_every_commit_atomic(suite, tmp_path):
    path = tmp_path / "store"
    with Store.init(path, block_bytes=cu.BLOCK_BYTES) as s:
        sid = s.ingest(suite["base"], name="a").id
        other = s.ingest(suite["lora-0"], name="other", base="a").id
    rng = random.Random(SEED + 1)
    log_sizes = []
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _RENAME_LOOP, str(path)],
            env=cu.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.4))
        assert proc.poll() is None, proc.stderr.read()
        cu.kill9(proc)
        with Store.open(path) as s:
            refs = s.refs()
            assert refs["other"] == other
            # A rename is one commit: exactly one of the two names exists, never both or neither.
            assert set(refs) in ({"a", "other"}, {"b", "other"}), refs
            assert next(v for k, v in refs.items() if k != "other") == sid
            assert s.pins() <= {sid}
            assert s.log.valid_end() == s.log.size()
            assert s.fsck().ok
            log_sizes.append(s.log.size())
            if "b" in refs:
                s.rename_ref("b", "a")
            if s.pins():
                s.unpin("a")
    assert log_sizes == sorted(log_sizes) and log_sizes[-1] > log_sizes[0], "the loop made no commits"


def _last_record(path: Path) -> bytes:
    with Store.open(path) as s:
        records = list(s.log.records())
    offset, end, _ = records[-1]
    return (path / "manifest.log").read_bytes()[offset:end]


@pytest.mark.parametrize("tail", ["garbage", "torn-record", "huge-length-header", "bad-checksum"])
def test_torn_log_tail_is_cut_on_open(suite, tmp_path, tail):
    path = tmp_path / "store"
    with Store.init(path, block_bytes=cu.BLOCK_BYTES) as s:
        base = s.ingest(suite["base"], name="base").id
        lora = s.ingest(suite["lora-0"], name="lora", base="base").id
    log = path / "manifest.log"
    good_size = log.stat().st_size
    record = _last_record(path)
    junk = {
        "garbage": bytes(random.Random(7).randrange(256) for _ in range(333)),
        "torn-record": record[: len(record) // 2],  # a crash in the middle of an append
        "huge-length-header": RECORD_HEAD.pack(b"MPLR", 1, 1 << 30) + b"\x01" * 40,
        "bad-checksum": record[:-1] + bytes([record[-1] ^ 0xFF]),  # a whole record whose checksum fails
    }[tail]
    with open(log, "ab") as f:
        f.write(junk)

    with Store.open(path) as s:
        assert log.stat().st_size == good_size, "Store.open did not cut the torn tail"
        assert s.refs() == {"base": base, "lora": lora}
        assert set(s.index.snapshot_ids()) == {base, lora}
        report = s.fsck()
        assert report.ok, report.problems
        for name, src in (("base", suite["base"]), ("lora", suite["lora-0"])):
            assert cu.export_digests(s, name, tmp_path / f"out-{name}") == cu.digests(src)
        s.set_ref("after-cut", "lora")  # the log takes appends again after the cut
    res = cu.run_ok(path, "fsck")
    assert res.stdout.startswith("ok")
    with Store.open(path) as s:
        assert s.refs()["after-cut"] == lora
        assert s.log.valid_end() == s.log.size() > good_size


# ---------------------------------------------------------------------------- damaged packs


@pytest.fixture(scope="module")
def damaged_setup(suite, tmp_path_factory):
    path = tmp_path_factory.mktemp("damage") / "store"
    with Store.init(path, block_bytes=cu.BLOCK_BYTES) as s:
        s.ingest(suite["base"], name="base")
        s.ingest(suite["lora-0"], name="experts/lora", base="base")
        base_blocks = s.manifest("base").all_blocks()
        # A block only the expert uses: an XOR delta of a LoRA-changed projection.
        target = None
        for t in s.manifest("experts/lora").tensors:
            for b in t.blocks:
                loc = s.location(b)
                if b not in base_blocks and loc.codec == Codec.XOR_GROUPED_ZSTD and loc.stored_len > 64:
                    target = (t.name, b, loc)
                    break
            if target:
                break
    assert target is not None
    return path, target


_WHERE = {
    "payload": lambda loc: RECORD_HEADER_SIZE + loc.stored_len // 2,
    "header-stored-len": lambda loc: 13,  # stored_len is bytes 12..15 of the record header
    "header-block-id": lambda loc: 20,  # the block id is bytes 16..31
    "header-magic": lambda loc: 1,
}


@contextmanager
def _flipped_bit(store: Path, loc, where: str):
    """Flip one bit of the record at `loc` for the duration of the block, then restore it."""
    offset = loc.offset + _WHERE[where](loc)
    pack = store / "packs" / f"pack-{loc.pack:08d}.mpk"
    with open(pack, "r+b") as f:
        f.seek(offset)
        original = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([original ^ 0x01]))
    try:
        yield
    finally:
        with open(pack, "r+b") as f:
            f.seek(offset)
            f.write(bytes([original]))


@pytest.mark.parametrize("where", list(_WHERE))
def test_flipped_pack_byte_is_found_by_fsck_and_fails_export(damaged_setup, suite, tmp_path, where):
    path, (tensor, block, loc) = damaged_setup
    with _flipped_bit(path, loc, where):
        res = cu.run(path, "fsck")
        assert res.returncode != 0, res.stdout
        damage = [line for line in res.stdout.splitlines() if line.startswith("DAMAGE:")]
        assert any("experts/lora" in line and f"tensor {tensor}" in line and block.hex() in line for line in damage), (
            res.stdout
        )
        assert not any("(base)" in line for line in damage), "the base does not use the damaged block"
        as_json = json.loads(cu.run(path, "fsck", "--json").stdout)
        assert as_json["ok"] is False and as_json["problems"]

        out = tmp_path / "lora-out"
        res = cu.run(path, "export", "experts/lora", out)
        assert res.returncode != 0
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mpstore: error:"), res.stderr
        left = cu.digests(out) if out.exists() else {}
        assert "model.safetensors" not in left, "a damaged export left a complete-looking weight file"
        src = cu.digests(suite["lora-0"])
        for rel, digest in left.items():  # anything under its final name must be right
            assert rel.endswith(".mpstore-partial") or src.get(rel) == digest, rel

        out = tmp_path / "base-out"
        cu.run_ok(path, "export", "base", out)
        assert cu.digests(out) == cu.digests(suite["base"])
    assert cu.run(path, "fsck").returncode == 0


def test_export_that_hits_a_damaged_block_removes_its_partial_file(damaged_setup, tmp_path):
    """A block that fails to read must not leave a half-written `*.mpstore-partial` behind (export
    once removed it only when the rebuilt file failed its sha256 check)."""
    path, (_, _, loc) = damaged_setup
    out = tmp_path / "out"
    with _flipped_bit(path, loc, "payload"):
        res = cu.run(path, "export", "experts/lora", out)
    assert res.returncode != 0 and res.stderr.startswith("mpstore: error:")
    partials = sorted(p.name for p in out.rglob("*.mpstore-partial")) if out.exists() else []
    assert partials == [], f"failed export left {partials}"


def test_kill9_during_export_leaves_no_wrong_file_under_a_final_name(small_suite, tmp_path):
    store = tmp_path / "store"
    cu.run_ok(store, "init", "--block-size", cu.BLOCK)
    cu.run_ok(store, "ingest", small_suite["base"], "--name", "base")
    cu.run_ok(store, "ingest", small_suite["full-0"], "--name", "full", "--base", "base")
    want = cu.digests(small_suite["full-0"])
    t0 = time.monotonic()
    cu.run_ok(store, "export", "full", tmp_path / "timed")
    duration = time.monotonic() - t0
    rng = random.Random(SEED + 2)
    killed_running = 0
    for i in range(5):
        out = tmp_path / f"out-{i}"
        proc = cu.start(store, "export", "full", out)
        time.sleep(rng.uniform(0, duration))
        killed_running += proc.poll() is None
        cu.kill9(proc)
        left = cu.digests(out) if out.exists() else {}
        for rel, digest in left.items():
            assert rel.endswith(".mpstore-partial") or want.get(rel) == digest, f"{rel} is wrong after a kill"
    assert killed_running >= 2, "too few kills landed while the export was running"
    assert cu.run(store, "fsck").returncode == 0
