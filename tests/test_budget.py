"""I/O budgets: a hard cap on bytes read, the best merge it can buy, and what was left out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mpcli.main import cli
from mpexec.budget import apply_budget
from mpexec.execute import estimate_reads
from mpexec.merge import plan_merge, run_merge
from mpstore import Store

from tests.conftest import store_state

TA = """
merge_method: task_arithmetic
base_model: base
models:
  - model: lora
    parameters: {weight: 0.5}
  - model: partial
    parameters: {weight: 0.7}
  - model: full
    parameters: {weight: 0.9}
dtype: float32
out_dtype: float32
"""


def _full_and_minimum(s: Store) -> tuple[int, int]:
    plan = plan_merge(s, TA)
    full = estimate_reads(s, plan)[0]
    return full.bytes_read, full.bytes_read_base


def _task_vector_error(s: Store, ref: str, exact: str) -> float:
    merged, reference, base = dict(s.tensors(ref)), dict(s.tensors(exact)), dict(s.tensors("base"))
    num = sum(float((merged[n] - reference[n]).double().square().sum()) for n in reference)
    den = sum(float((reference[n] - base[n].float()).double().square().sum()) for n in reference)
    return (num / den) ** 0.5


def test_a_budget_covering_the_merge_gives_the_unbudgeted_snapshot(merge_store):
    with Store.open(merge_store) as s:
        exact = run_merge(s, plan_merge(s, TA), name="exact")
        full, _ = _full_and_minimum(s)
        plan = plan_merge(s, TA)
        report = apply_budget(s, plan, full)
        result = run_merge(s, plan, name="budgeted")
        assert report["dropped_blocks"] == 0 and result.id == exact.id
        assert "budget" not in s.manifest("budgeted").operation


def test_a_budget_below_the_minimum_is_refused_naming_it(merge_store, tmp_path):
    config = tmp_path / "q.yml"
    config.write_text(TA)
    before = store_state(merge_store)
    result = CliRunner().invoke(
        cli, ["--store", str(merge_store), "merge", str(config), "--name", "x", "--io-budget", "1KB"]
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "below the minimum this merge must read" in lines[0]
    assert store_state(merge_store) == before


@pytest.mark.parametrize("policy", ["value", "random"])
def test_a_budget_is_never_exceeded_and_the_omission_is_bounded(merge_store, policy):
    with Store.open(merge_store) as s:
        run_merge(s, plan_merge(s, TA), name="exact")
        full, base = _full_and_minimum(s)
        budget = base + (full - base) // 4
        plan = plan_merge(s, TA)
        report = apply_budget(s, plan, budget, policy, seed=1)
        result = run_merge(s, plan, name=f"b-{policy}")
        assert result.bytes_read <= budget < full
        assert report["dropped_blocks"] > 0 and result.blocks_skipped["dropped"] > 0
        lineage = s.manifest(f"b-{policy}").operation["budget"]
        assert lineage["io_budget"] == budget and lineage["policy"] == policy
        assert len(lineage["dropped"]) == report["dropped_blocks"]
        # the omitted update is at most the reported bound (triangle inequality), in float32
        merged, exact = dict(s.tensors(f"b-{policy}")), dict(s.tensors("exact"))
        omitted = sum(float((merged[n] - exact[n]).double().square().sum()) for n in exact) ** 0.5
        assert 0 < omitted <= report["error_bound"] * 1.0001


def test_value_policy_loses_less_than_random_at_the_same_budget(merge_store):
    with Store.open(merge_store) as s:
        run_merge(s, plan_merge(s, TA), name="exact")
        full, base = _full_and_minimum(s)
        budget = base + (full - base) // 4
        errors = {}
        for policy in ("value", "random"):
            plan = plan_merge(s, TA)
            apply_budget(s, plan, budget, policy, seed=3)
            run_merge(s, plan, name=f"p-{policy}")
            errors[policy] = _task_vector_error(s, f"p-{policy}", "exact")
    assert errors["value"] < errors["random"]


def test_whole_tensor_methods_refuse_a_budget_below_their_cost(merge_store):
    slerp = "merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n  - model: full\nparameters: {t: 0.5}\n"
    with Store.open(merge_store) as s:
        plan = plan_merge(s, slerp)
        full = estimate_reads(s, plan)[0].bytes_read
        with pytest.raises(Exception, match="slerp needs"):
            apply_budget(s, plan, full // 2)


def test_explain_under_a_budget_reports_drops_and_reads_nothing(merge_store, tmp_path):
    config = tmp_path / "q.yml"
    config.write_text(TA)
    with Store.open(merge_store) as s:
        full, base = _full_and_minimum(s)
    budget = base + (full - base) // 2
    out = CliRunner().invoke(
        cli, ["--store", str(merge_store), "merge", str(config), "--explain", "--json", "--io-budget", str(budget)]
    )
    doc = json.loads(out.output)
    assert doc["budget"]["dropped_blocks"] > 0 and doc["estimated_bytes_read"] <= budget
    assert doc["estimated_blocks_skipped"]["dropped"] > 0


def test_explain_marks_every_block_position(merge_store):
    from mpexec.cost import explain_costs

    with Store.open(merge_store) as s:
        full, base = _full_and_minimum(s)
        plan = plan_merge(s, TA)
        apply_budget(s, plan, base + (full - base) // 2)
        costs = explain_costs(s, plan)
        lora = s.manifest("lora").tensor_map()
    marks = {n: row["blocks"] for n, row in costs["tensors"].items()}
    tensors = plan.tensors_by_name()
    dropped = sum(r.count("D") for n, rows in marks.items() for k, r in enumerate(rows) if k != tensors[n].base_index)
    assert dropped == costs["estimated_blocks_skipped"]["dropped"] > 0
    q = "model.layers.0.self_attn.q_proj.weight"
    assert [i.model for i in tensors[q].inputs] == ["lora", "partial", "full", "base"]
    assert len(marks[q]) == 4 and all(len(r) == len(lora[q].blocks) for r in marks[q])
    mlp = "model.layers.0.mlp.up_proj.weight"  # LoRA leaves MLPs alone: its blocks are the base's
    assert set(marks[mlp][0]) <= {"S", "-"}
