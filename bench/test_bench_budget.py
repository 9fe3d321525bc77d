"""bench_budget end to end on the tiny preset: every run within its budget, value no worse than random."""

from __future__ import annotations

import pytest

from bench.bench_budget import render, run


@pytest.mark.slow
def test_budget_benchmark_runs_within_budget(tmp_path):
    fig = run("tiny", tmp_path / "data", tmp_path / "work", log=lambda _line: None)
    assert len(fig["rows"]) == 10
    for row in fig["rows"]:
        assert row["bytes_read"] <= row["budget"]
    full = [r for r in fig["rows"] if r["fraction"] == 1.0]
    assert all(r["error"] == 0 and r["dropped"] == 0 for r in full)
    assert "value error <= 0.7x random error" in render(fig, "python -m bench.bench_budget", None)
