"""Concurrency: several real `mpstore` processes writing one store, readers (and fsck) beside a
writer, a writer killed beside another, and compare-and-swap refs raced by two processes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


from mpstore import Store

from . import crashutil as cu


def _together(store: Path, *commands: tuple[str, ...]) -> list[dict]:
    """Start every command at once, wait for all; each must exit 0. Returns their --json outputs."""
    procs = [cu.start(store, *cmd, "--json") for cmd in commands]
    outs = [p.communicate(timeout=120) for p in procs]
    for cmd, p, (out, err) in zip(commands, procs, outs):
        assert p.returncode == 0, f"{cmd} exited {p.returncode}: {err}"
    return [json.loads(out) for out, _ in outs]


def _assert_exports(store: Path, expected: dict[str, Path], scratch: Path) -> None:
    with Store.open(store) as s:
        for ref, src in expected.items():
            out = cu.fresh_dir(scratch, ref.replace("/", "_"))
            assert cu.export_digests(s, ref, out) == cu.digests(src), ref


def test_two_ingests_of_different_models_at_once(small_suite, tmp_path):
    store = tmp_path / "store"
    cu.run_ok(store, "init", "--block-size", cu.BLOCK)
    a, b = _together(
        store,
        ("ingest", small_suite["base"], "--name", "models/a"),
        ("ingest", small_suite["full-0"], "--name", "models/b"),
    )
    assert a["blocks_new"] > 1000 and b["blocks_new"] > 1000
    with Store.open(store) as s:
        assert s.refs() == {"models/a": bytes.fromhex(a["id"]), "models/b": bytes.fromhex(b["id"])}
        assert len(s.index.snapshot_ids()) == 2
    _assert_exports(store, {"models/a": small_suite["base"], "models/b": small_suite["full-0"]}, tmp_path / "out")
    assert cu.run(store, "fsck").returncode == 0


def test_concurrent_ingests_sharing_blocks_dedup_and_match_a_sequential_store(small_suite, tmp_path):
    store = tmp_path / "store"
    cu.run_ok(store, "init", "--block-size", cu.BLOCK)
    cu.run_json(store, "ingest", small_suite["base"], "--name", "base")
    sequential = tmp_path / "sequential"
    shutil.copytree(store, sequential)

    # Two experts of one base at once: most of their blocks are the base's.
    experts = {"e/lora": small_suite["lora-0"], "e/partial": small_suite["partial-0"]}
    commands = [("ingest", src, "--name", name, "--base", "base") for name, src in experts.items()]
    together = _together(store, *commands)
    alone = [cu.run_json(sequential, *cmd) for cmd in commands]
    for t, a in zip(together, alone):
        assert t["id"] == a["id"], "a concurrent ingest produced another snapshot than a sequential one"
        assert t["blocks_same_as_base"] == a["blocks_same_as_base"] > 1000
        assert t["blocks_new"] == a["blocks_new"]

    # The same model twice at once: both race to store the very same blocks.
    f1, f2 = _together(
        store, ("ingest", small_suite["full-0"], "--name", "f1"), ("ingest", small_suite["full-0"], "--name", "f2")
    )
    assert f1["id"] == f2["id"]
    with Store.open(store) as s:
        refs = s.refs()
        assert refs["f1"] == refs["f2"] == bytes.fromhex(f1["id"])
        every = set()
        for sid in set(refs.values()):
            every |= s.manifest(sid).all_blocks()
        indexed = {b for b, _ in s.index.iter_blocks()}
        assert every <= indexed
        assert indexed == every, "an indexed block belongs to no snapshot"
    # Dedup still works: a third copy stores nothing new.
    again = cu.run_json(store, "ingest", small_suite["full-0"], "--name", "f3")
    assert again["id"] == f1["id"]
    assert again["blocks_new"] == 0 and again["written_bytes"] == 0
    assert again["blocks_dedup"] == again["blocks"]
    _assert_exports(
        store,
        {**experts, "f1": small_suite["full-0"], "f2": small_suite["full-0"], "base": small_suite["base"]},
        tmp_path / "out",
    )
    assert cu.run(store, "fsck").returncode == 0


def test_readers_see_only_committed_snapshots_while_a_writer_ingests(small_suite, suite, tmp_path):
    store = tmp_path / "store"
    with Store.init(store, block_bytes=cu.BLOCK_BYTES) as s:
        committed = s.ingest(suite["base"], name="committed").id
    want = cu.digests(suite["base"])
    plan = [
        ("w1", small_suite["base"], None),
        ("w2", small_suite["full-0"], "w1"),
        ("w3", small_suite["partial-0"], "w1"),
    ]
    writer_done = threading.Event()
    writer_errors: list[str] = []

    def writer() -> None:
        try:
            for name, src, base in plan:
                args = ["ingest", src, "--name", name] + (["--base", base] if base else [])
                res = cu.run(store, *args)
                if res.returncode:
                    writer_errors.append(res.stderr)
                    return
        finally:
            writer_done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[tuple[str, ...]] = []
    reads = 0
    try:
        while not writer_done.is_set():
            with Store.open(store) as s:
                # Each call is its own read transaction and the writer may commit in between, so
                # read snapshots first and refs after: refs are then at least as new.
                sids = {info.id for info in s.snapshots()}
                refs = s.refs()
                names = tuple(sorted(n for n in refs if n != "committed"))
                # Writes commit in order; a reader sees a prefix of them, never a half-made snapshot.
                assert names in [(), ("w1",), ("w1", "w2"), ("w1", "w2", "w3")], names
                assert refs["committed"] == committed
                # A snapshot and its ref appear in one commit: no snapshot is visible without it.
                assert sids <= set(refs.values()), "a snapshot is visible before its commit"
                for sid in sids:
                    m = s.manifest(sid)
                    missing = m.all_blocks() - set(s.index.get_blocks(m.all_blocks()))
                    assert not missing, f"snapshot {sid.hex()[:12]} is visible before its blocks"
                assert cu.export_digests(s, "committed", cu.fresh_dir(tmp_path / "out", "committed")) == want
            seen.append(names)
            reads += 1
    finally:
        thread.join(timeout=300)
    assert not writer_errors, writer_errors
    assert reads >= 5, f"only {reads} reads overlapped the writer"
    assert any(len(n) < 3 for n in seen), "no read happened before the last commit"
    ls = json.loads(cu.run_ok(store, "ls", "--json").stdout)
    assert sorted(r for row in ls for r in row["refs"]) == ["committed", "w1", "w2", "w3"]
    _assert_exports(
        store,
        {"w1": small_suite["base"], "w2": small_suite["full-0"], "w3": small_suite["partial-0"]},
        tmp_path / "out",
    )


def test_a_killed_ingest_does_not_harm_a_concurrent_one(small_suite, tmp_path):
    store = tmp_path / "store"
    cu.run_ok(store, "init", "--block-size", cu.BLOCK)
    cu.run_ok(store, "ingest", small_suite["base"], "--name", "base")
    rng = random.Random(77)
    duration = 1.0
    survivors = [small_suite["partial-0"], small_suite["lora-0"], small_suite["partial-0"]]
    for i, src in enumerate(survivors):
        survivor = cu.start(store, "ingest", src, "--name", f"p{i}", "--base", "base", "--json")
        victim = cu.start(
            store, "ingest", small_suite["full-0"], "--name", "victim", "--base", "base", sync_bytes=64 << 10
        )
        t0 = time.monotonic()
        time.sleep(rng.uniform(0, duration))
        cu.kill9(victim)
        out, err = survivor.communicate(timeout=120)
        duration = max(duration, time.monotonic() - t0)
        assert survivor.returncode == 0, err
        with Store.open(store) as s:
            assert s.refs()[f"p{i}"].hex() == json.loads(out)["id"]
            if "victim" in s.refs():  # killed after its commit
                s.delete_ref("victim")
            assert s.fsck().ok
    final = cu.run_json(store, "ingest", small_suite["full-0"], "--name", "victim", "--base", "base")
    assert final["blocks"] > 1000
    _assert_exports(
        store,
        {"p0": small_suite["partial-0"], "p1": small_suite["lora-0"], "victim": small_suite["full-0"]},
        tmp_path / "out",
    )
    assert cu.run(store, "fsck").returncode == 0


_CAS_RACER = """
import json, sys, time
from mpstore import Store
from mpstore.errors import ConflictError
path, target, start_at, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
s = Store.open(path)
sid = s.resolve(target)
while time.time() < start_at:
    pass
out = {}
for i in range(count):
    try:
        s.set_ref(f"race/{i}", sid)
        out[f"race/{i}"] = "won"
    except ConflictError:
        out[f"race/{i}"] = "conflict"
s.close()
print(json.dumps(out))
"""


def test_compare_and_swap_refs_one_racer_wins(suite, tmp_path):
    path = tmp_path / "store"
    with Store.init(path, block_bytes=cu.BLOCK_BYTES) as s:
        targets = {
            "base": s.ingest(suite["base"], name="base").id,
            "lora": s.ingest(suite["lora-0"], name="lora", base="base").id,
        }
    count = 40
    start_at = time.time() + 1.0  # both have imported and opened the store by then
    procs = {
        t: subprocess.Popen(
            [sys.executable, "-c", _CAS_RACER, str(path), t, str(start_at), str(count)],
            env=cu.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t in targets
    }
    results = {}
    for t, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results[t] = json.loads(out)
    with Store.open(path) as s:
        refs = s.refs()
        for i in range(count):
            name = f"race/{i}"
            outcomes = {t: results[t][name] for t in targets}
            assert sorted(outcomes.values()) == ["conflict", "won"], (name, outcomes)
            winner = next(t for t, o in outcomes.items() if o == "won")
            assert refs[name] == targets[winner], name
        assert s.fsck().ok


_COMMIT_LOOP = """
import dataclasses, sys
from mpstore import Store
from mpstore.manifest_log import Commit
s = Store.open(sys.argv[1])
base = s.manifest("a")
print("ready", flush=True)
i = 0
while True:
    s.rename_ref("a", "b")
    s.rename_ref("b", "a")
    # A new snapshot (same blocks, another operation record) and its ref, in one commit.
    m = dataclasses.replace(base, operation={"op": "test", "n": i})
    s.commit(Commit(manifests=[m.encode()], refs={f"n/{i}": m.id}), expect={f"n/{i}": None})
    i += 1
"""


def test_fsck_beside_a_committing_writer_reports_no_damage(suite, tmp_path):
    """fsck is a reader: commits made by another process while it runs are not damage.

    fsck reads the store in many separate steps without the store lock or one read transaction:
    _check_log takes log.valid_end(), then log.size(), then index.high_water(), so a commit landing
    in between is reported as "manifest.log: damaged or torn record" and "index: applied past the
    last valid log record"; fsck() lists snapshot_ids() and only later refs(), so a snapshot
    committed in between is reported as "ref ... points to missing snapshot".
    """
    path = tmp_path / "store"
    with Store.init(path, block_bytes=cu.BLOCK_BYTES) as s:
        s.ingest(suite["base"], name="a")
    writer = subprocess.Popen(
        [sys.executable, "-c", _COMMIT_LOOP, str(path)],
        env=cu.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    problems: list[list[str]] = []
    runs = 0
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            with Store.open(path) as s:
                report = s.fsck()
            runs += 1
            if not report.ok:
                problems.append(report.problems)
        assert writer.poll() is None, writer.stderr.read()
    finally:
        cu.kill9(writer)
    assert runs >= 5
    kinds = sorted({re.sub(r"[0-9a-f]{12}|\d+|'[^']*'", "_", p) for ps in problems for p in ps})
    assert not problems, f"{len(problems)} of {runs} fsck runs reported damage: {kinds}"
    assert cu.run(path, "fsck").returncode == 0  # and the store is in fact fine
