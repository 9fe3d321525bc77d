"""Helpers for the crash-safety and concurrency tests: real `mpstore` processes, digests, kills.

Nothing here mocks the store: every writer runs as a separate OS process, and crashes are real
SIGKILLs delivered to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mpstore import Store
from tests.conftest import folder_digest as digests

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "4KiB"  # small blocks: a small-preset model spans ~2600 of them, so there are many kill points
BLOCK_BYTES = 4096

# The `mpstore` console script is `mpcli.main:main`; this runs the same entry point but can first
# lower the publish interval (mpstore.writer.SYNC_BYTES, 64 MiB by default) so that an ingest of a
# ~10 MB test model fsyncs and publishes its blocks to the index many times, as a multi-GB ingest
# does with the default. The process and its crash are still real.
_ENTRY = """\
import os, sys
sync = os.environ.get("MPSTORE_TEST_SYNC_BYTES")
if sync:
    import mpstore.writer
    mpstore.writer.SYNC_BYTES = int(sync)
sys.argv[0] = "mpstore"
from mpcli.main import main
main()
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("MPSTORE_PATH", None)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def mpstore_argv(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", _ENTRY, "--store", str(store), *map(str, args)]


def start(store: Path, *args: str, sync_bytes: int | None = None) -> subprocess.Popen:
    e = env()
    if sync_bytes:
        e["MPSTORE_TEST_SYNC_BYTES"] = str(sync_bytes)
    return subprocess.Popen(
        mpstore_argv(store, *args), env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(store: Path, *args: str, sync_bytes: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = start(store, *args, sync_bytes=sync_bytes)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_ok(store: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    res = run(store, *args, **kw)
    assert res.returncode == 0, (
        f"mpstore {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    )
    return res


def run_json(store: Path, *args: str, **kw) -> dict:
    return json.loads(run_ok(store, *args, "--json", **kw).stdout)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (if it is still running) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def export_digests(store: Store, ref: str | bytes, out: Path) -> dict[str, str]:
    store.export(ref, out)
    return digests(out)


_counter = [0]


def fresh_dir(base: Path, stem: str) -> Path:
    _counter[0] += 1
    return base / f"{stem}-{_counter[0]}"


def wait_until(predicate, timeout: float, interval: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pack_bytes(store_path: Path) -> int:
    return sum(p.stat().st_size for p in (store_path / "packs").iterdir())
