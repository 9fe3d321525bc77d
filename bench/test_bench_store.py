"""pytest-benchmark version of bench/bench_store.py on the tiny preset: `pytest bench/`.

Times ingest (explicit and automatic base) and export of a small suite; asserts only correctness
(byte-identical export, the right base chosen, a clean fsck), never a time. The issue-2 figures
come from `python -m bench.bench_store` on the bench preset (see bench/RESULTS.md).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bench.bench_store import (
    SECTION,
    compare_folders,
    export_all,
    folder_bytes,
    ingest_all,
    main,
    replace_section,
    suite_order,
)
from bench.modelgen import make_suite
from mpstore import Store

ROUNDS = 3


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict[str, Path]:
    paths = make_suite(tmp_path_factory.mktemp("suite"), preset="tiny", n_lora=2, n_partial=1, n_full=1)
    return {name: paths[name] for name in suite_order(paths)}


@pytest.fixture(scope="module")
def ingested(suite, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ingested") / "store"
    run = ingest_all(path, suite, "base")
    assert run.auto_bases_ok
    return path


def _fresh(root: Path):
    """pedantic setup: a new empty folder per round (a store must be created in an empty folder)."""
    counter = itertools.count()

    def setup():
        return (root / f"round{next(counter)}",), {}

    return setup


@pytest.mark.parametrize("expert_base", ["base", "auto"])
def test_ingest(benchmark, suite, tmp_path, expert_base):
    run = benchmark.pedantic(
        lambda path: ingest_all(path, suite, expert_base), setup=_fresh(tmp_path), rounds=ROUNDS, iterations=1
    )
    benchmark.extra_info["input_bytes"] = sum(m["input_bytes"] for m in run.per_model.values())
    assert run.auto_bases_ok  # every expert's base is the base snapshot, explicit or chosen
    assert set(run.per_model) == set(suite)
    for name, row in run.per_model.items():
        assert row["input_bytes"] == folder_bytes(suite[name])
        if name.startswith("lora"):
            assert row["same_as_base"] > 0  # only the attention projections changed


def test_export(benchmark, suite, ingested, tmp_path):
    benchmark.pedantic(
        lambda path: export_all(ingested, suite, path), setup=_fresh(tmp_path), rounds=ROUNDS, iterations=1
    )
    benchmark.extra_info["output_bytes"] = sum(folder_bytes(p) for p in suite.values())
    rounds = sorted(tmp_path.iterdir())
    assert rounds
    for out in rounds:  # every round, not only the last, rebuilt every file byte for byte
        for name, src in suite.items():
            assert compare_folders(src, out / name) == []


def test_store_is_consistent_and_smaller(suite, ingested):
    with Store.open(ingested) as store:
        report = store.fsck()
        assert report.ok, report.problems
        raw = sum(folder_bytes(p) for p in suite.values())
        assert store.du().total_bytes < raw


def test_replace_section():
    body = "| a | b |\n"
    fresh = replace_section("", SECTION, body)
    assert fresh.startswith("# Benchmark results\n") and fresh.count(SECTION) == 1
    text = "# Results\n\n## Other\n\nkeep me\n\n" + SECTION + "\n\nold figures\n\n## Later\n\nkeep me too\n"
    out = replace_section(text, SECTION, body)
    assert "old figures" not in out and "| a | b |" in out
    assert out.count(SECTION) == 1 and "keep me\n" in out and "## Later\n\nkeep me too\n" in out
    assert out.index("## Other") < out.index(SECTION) < out.index("## Later")
    assert replace_section(out, SECTION, body) == out  # idempotent
    appended = replace_section("# Results\n\n## Other\n\nx\n", SECTION, body)
    assert appended.endswith(SECTION + "\n\n" + body)


def test_script_end_to_end(tmp_path, capsys):
    """The script itself on the tiny preset: runs, checks correctness, writes its section."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## Earlier\n\nuntouched\n")
    assert main(["--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(out), "--repeat", "1"]) == 0
    text = out.read_text()
    assert "## Earlier\n\nuntouched\n" in text and text.count(SECTION) == 1
    assert "9/9 folders" in text and "python -m bench.bench_store --preset tiny" in text
    assert not any(p.name.startswith(".bench-store-") for p in (tmp_path / "data").iterdir())  # cleaned up
