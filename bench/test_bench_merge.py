"""bench/bench_merge.py end to end on the tiny preset: 2 experts, task_arithmetic, both tools: `pytest bench/`.

Asserts only that the benchmark runs and reports, and that mpstore's merged tensors equal mergekit's
within float32 tolerance when both compute in float32 (`dtype: float32`); never a time. The figures
come from `python -m bench.bench_merge` on the bench preset (see bench/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mergekit", reason="the merge benchmark needs the mergekit extra: pip install -e '.[mergekit]'")

from bench.bench_merge import (  # noqa: E402
    PLOT_IO,
    PLOT_TIME,
    SECTION,
    merge_yaml,
    parse_args,
    pick_experts,
    report,
    run,
    suite_counts,
    table,
)
from bench.modelgen import PRESETS, tensor_shapes  # noqa: E402


@pytest.fixture(scope="module")
def fig(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench-merge")
    fig = run(
        "tiny",
        root / "data",
        experts=[2],
        methods=["task_arithmetic"],
        repeat=1,
        dtype="float32",
        log=lambda _line: None,
    )
    fig.update(
        machine={"nproc": "1", "cpu": "test", "mem": "", "python": "3", "libs": "test"},
        date="today",
        command="python -m bench.bench_merge --preset tiny",
    )
    fig["data"] = root / "data"
    return fig


@pytest.mark.slow
def test_rows_and_cleanup(fig):
    assert [(r["method"], r["n"]) for r in fig["rows"]] == [("task_arithmetic", 2)]
    row = fig["rows"][0]
    assert row["experts"] == ["lora-0", "partial-0"]
    assert row["mergekit_s"] > 0 and row["mpstore_s"] > 0 and row["mergekit_rss"] > 0 and row["mpstore_rss"] > 0
    assert row["mergekit_rchar"] > 0 and row["mpstore_rchar"] > 0 and row["rchar_exact"]
    assert 0 < row["mpstore"]["bytes_read"] < row["input_bytes"]  # blocks equal to the base are never read
    lines = table(fig).splitlines()
    assert lines[0].startswith("| method | N | mergekit s | mpstore s | speedup |")
    assert len(lines) == 3 and lines[2].startswith("| task_arithmetic | 2 |")
    assert not any(p.name.startswith(".bench-merge-") for p in fig["data"].iterdir())  # work folder removed


@pytest.mark.slow
def test_mpstore_equals_mergekit_in_float32(fig):
    agree = fig["rows"][0]["agree"]
    assert agree["names_match"] and agree["dtype_shape_match"]
    assert agree["tensors"] == len(tensor_shapes(PRESETS["tiny"]))
    assert agree["elements"] > 0
    assert agree["bad_f32"] == 0, agree


@pytest.mark.slow
def test_report_writes_section_and_plots(fig, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## Earlier\n\nuntouched\n")
    report(fig, out, tmp_path, log=lambda _line: None)
    text = out.read_text()
    assert "## Earlier\n\nuntouched\n" in text and text.count(SECTION) == 1
    assert "| task_arithmetic | 2 |" in text and "`dtype: float32`" in text
    if _has_matplotlib():
        assert (tmp_path / PLOT_TIME).stat().st_size > 0 and (tmp_path / PLOT_IO).stat().st_size > 0
        assert f"]({PLOT_TIME})" in text and f"]({PLOT_IO})" in text
    report(fig, out, tmp_path, log=lambda _line: None)
    assert out.read_text() == text  # replacing the section again changes nothing


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_expert_choice_and_yaml():
    assert suite_counts(8) == (3, 3, 2) and suite_counts(16) == (6, 6, 4) and suite_counts(2) == (3, 3, 2)
    names = {"base": Path("b")} | {
        f"{k}-{i}": Path(k) for k, n in zip(("lora", "partial", "full"), (6, 6, 4)) for i in range(n)
    }
    eight = pick_experts(names, 8)
    assert eight == ["lora-0", "partial-0", "full-0", "lora-1", "partial-1", "full-1", "lora-2", "partial-2"]
    sixteen = pick_experts(names, 16)
    assert sorted(sixteen) == sorted(n for n in names if n != "base")
    with pytest.raises(ValueError):
        pick_experts(names, 17)
    paths = merge_yaml("ties", "/d/base", ["/d/lora-0", "/d/full-0"])
    refs = merge_yaml("ties", "base", ["lora-0", "full-0"])
    # the two YAMLs differ only in the model values
    assert paths.replace("/d/", "") == refs
    assert "density: 0.5, weight: 0.5" in refs and "dtype" not in refs
    slerp = merge_yaml("slerp", "base", ["full-0"])
    assert slerp.count("- model:") == 2 and "t: 0.5" in slerp
    args = parse_args(["--experts", "2,16", "--methods", "ties,slerp"])
    assert args.experts == [2, 16] and args.methods == ["ties", "slerp"] and args.preset == "bench"
