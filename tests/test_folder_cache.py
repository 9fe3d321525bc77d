"""Folders already ingested (mpstore.folders): a merge naming a folder takes the snapshot its ingest
made while the folder's files are unchanged and the snapshot is stored; otherwise it ingests again."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mpexec.merge import plan_merge, run_merge
from mpexec.methods import QueryError
from mpstore import Store
from mpstore.folders import CACHE_FILE, known_snapshot


def _yaml(base, expert) -> str:
    return (
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {expert}\n    parameters: {{weight: 0.5}}\n"
    )


@pytest.fixture
def folders(tmp_path, suite):
    """Copies of the tiny suite's base and lora-0, free to be touched."""
    base, expert = tmp_path / "base", tmp_path / "lora"
    shutil.copytree(suite["base"], base)
    shutil.copytree(suite["lora-0"], expert)
    return base, expert


def _ingests(monkeypatch) -> list:
    """Watch Store.ingest: the folders each call reads."""
    calls = []
    ingest = Store.ingest

    def watched(self, folder, *args, **kwargs):
        calls.append(folder)
        return ingest(self, folder, *args, **kwargs)

    monkeypatch.setattr(Store, "ingest", watched)
    return calls


def test_merge_by_folder_takes_the_snapshot_its_ingest_made(store, folders, monkeypatch):
    base, expert = folders
    base_id = store.ingest(base, name="base").id
    expert_id = store.ingest(expert, name="lora", base="base").id
    calls = _ingests(monkeypatch)
    plan = plan_merge(store, _yaml(base, expert))
    assert calls == []  # nothing read again
    assert plan.models == {str(base): base_id, str(expert): expert_id}
    explained = plan_merge(store, _yaml(base, expert), ingest=False)  # EXPLAIN reads no data either
    assert explained.models == plan.models
    by_refs = run_merge(store, plan_merge(store, _yaml("base", "lora")), name="by-refs")
    by_folders = run_merge(store, plan, name="by-folders")
    tensors = lambda result: {t.name: t.blocks for t in store.manifest(result.id).tensors}  # noqa: E731
    assert tensors(by_folders) == tensors(by_refs)  # the same merge (the ids differ: the query text does)


def test_a_folder_merge_ingested_is_known_to_the_next_merge(store, folders, monkeypatch):
    base, expert = folders
    calls = _ingests(monkeypatch)
    first = plan_merge(store, _yaml(base, expert))
    assert sorted(map(str, calls)) == sorted([str(base), str(expert)])
    second = plan_merge(store, _yaml(base, expert))
    assert len(calls) == 2 and second.models == first.models


def test_a_changed_file_means_ingesting_again(store, folders, monkeypatch):
    base, expert = folders
    store.ingest(base, name="base")
    old = store.ingest(expert, name="lora", base="base").id
    config = expert / "config.json"
    settings = json.loads(config.read_text())
    settings["note"] = "retrained"
    config.write_text(json.dumps(settings))
    assert known_snapshot(store, expert) is None
    calls = _ingests(monkeypatch)
    plan = plan_merge(store, _yaml(base, expert))
    assert calls == [expert] and plan.models[str(expert)] != old
    assert known_snapshot(store, expert) == plan.models[str(expert)]

    stat = config.stat()  # the same bytes with a new mtime: stat data differs, so it is read again
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert known_snapshot(store, expert) is None


def test_a_collected_snapshot_is_not_taken(store, folders):
    base, _ = folders
    unnamed = store.ingest(base).id  # no ref: the next gc collects it
    assert known_snapshot(store, base) == unnamed
    store.gc()
    assert known_snapshot(store, base) is None
    with pytest.raises(QueryError, match="folder not in the store, or changed since its ingest"):
        plan_merge(store, _yaml(base, base), ingest=False)


@pytest.mark.parametrize("text", ["not json", '{"version": 99, "folders": {}}', '{"version": 1, "folders": []}'])
def test_an_unreadable_cache_is_an_empty_one(store, folders, text):
    base, _ = folders
    store.ingest(base, name="base")
    (store.path / CACHE_FILE).write_text(text)
    assert known_snapshot(store, base) is None
    again = store.ingest(base, name="base", force=True).id  # rewrites the cache whole
    assert known_snapshot(store, base) == again
    assert json.loads((store.path / CACHE_FILE).read_text())["version"] == 1
