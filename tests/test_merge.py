"""`mpstore merge`: bad queries, EXPLAIN, lineage, determinism, randomized methods, export, crash."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mpcli.main import cli
from mpexec.merge import plan_merge, run_merge
from mpstore import Store

from tests import crashutil as cu
from tests.conftest import store_state

TA = """
merge_method: task_arithmetic
base_model: base
models:
  - model: lora
    parameters: {weight: 0.5}
  - model: full
    parameters: {weight: [0.2, 1.0]}
"""


def _write(tmp_path: Path, text: str, name: str = "q.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _merge(store: Path, config: Path, *args: str):
    return CliRunner().invoke(cli, ["--store", str(store), "merge", str(config), *args])


BAD_QUERIES = {
    "unknown method": ("merge_method: frobnicate\nmodels:\n  - model: base\n", "unknown merge method 'frobnicate'"),
    "unknown parameter": (TA + "parameters: {wieght: 1}\n", "unknown parameter 'wieght'"),
    "missing weight": (
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: lora\n",
        "missing required parameter 'weight' for model lora",
    ),
    "slerp with three models": (
        "merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n  - model: lora\n"
        "  - model: full\nparameters: {t: 0.5}\n",
        "slerp",
    ),
    "nuslerp with one model": (
        "merge_method: nuslerp\nmodels:\n  - model: lora\n    parameters: {weight: 1}\n",
        "nuslerp",
    ),
    "missing base": ("merge_method: ties\nmodels:\n  - model: lora\n    parameters: {weight: 1}\n", "base"),
    "unknown ref": (
        "merge_method: linear\nmodels:\n  - model: nosuchmodel\n    parameters: {weight: 1}\n",
        "nosuchmodel",
    ),
    "yaml syntax": ("merge_method: linear\nmodels: [\n", "YAML syntax error at line"),
    "unknown key": (TA + "dtpye: float32\n", "unknown key(s) dtpye"),
    "bad dtype": (TA + "dtype: float8\n", "unknown dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
def test_bad_queries_fail_in_one_line_before_reading_data(merge_store, tmp_path, case):
    text, needle = BAD_QUERIES[case]
    before = store_state(merge_store)
    result = _merge(merge_store, _write(tmp_path, text), "--name", "out")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("mpstore: error: ") and needle in lines[0], lines[0]
    assert store_state(merge_store) == before


def _tamper(tmp_path: Path, suite, name: str, change) -> Path:
    """A copy of the base folder with one tensor changed by `change(dict)`."""
    from safetensors.torch import load_file

    folder = tmp_path / name
    folder.mkdir()
    for f in suite["base"].iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(suite["base"] / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "kind, needle",
    [("shape", "differs in shape"), ("missing", "has no tensor"), ("vocab", "mismatched vocabulary sizes")],
)
def test_mismatched_inputs_are_refused_naming_model_and_tensor(merge_store, tmp_path, suite, kind, needle):
    def change(t):
        if kind == "shape":
            t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-1].clone()
        elif kind == "missing":
            del t["model.layers.2.self_attn.q_proj.weight"]
        else:
            t["model.embed_tokens.weight"] = torch.cat([t["model.embed_tokens.weight"]] * 2)

    odd = _tamper(tmp_path, suite, f"odd-{kind}", change)
    with Store.open(merge_store) as s:
        s.ingest(odd, name="odd")
    before = store_state(merge_store)
    text = (
        "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 1}\n"
        "  - model: odd\n    parameters: {weight: 1}\n"
    )
    result = _merge(merge_store, _write(tmp_path, text), "--name", "out")
    assert result.exit_code == 1 and needle in result.output and "odd" in result.output + needle
    assert store_state(merge_store) == before


def test_explain_reads_no_tensor_data(merge_store, tmp_path):
    with Store.open(merge_store) as s:
        plan = plan_merge(s, TA, ingest=False)
        assert s.packs.bytes_read == 0
        assert len(plan.tensors) == len(s.manifest("base").tensors)
    doc = json.loads(_merge(merge_store, _write(tmp_path, TA), "--explain", "--json").output)
    row = next(r for r in doc["tensors"] if r["tensor"] == "model.layers.3.mlp.up_proj.weight")
    weights = [i["parameters"].get("weight") for i in row["inputs"]]
    assert weights == [0.5, 1.0, None]  # full's gradient at the last layer; the base has no weight
    text_out = _merge(merge_store, _write(tmp_path, TA), "--explain").output
    assert "model.layers.0.self_attn.q_proj.weight" in text_out and "task_arithmetic" in text_out


def test_merge_records_lineage_and_same_query_gives_same_snapshot(merge_store, tmp_path):
    config = _write(tmp_path, TA)
    first = json.loads(_merge(merge_store, config, "--name", "m1", "--json").output)
    second = json.loads(_merge(merge_store, config, "--name", "m2", "--json").output)
    assert first["id"] == second["id"]
    assert second["written_bytes"] == 0
    with Store.open(merge_store) as s:
        m = s.manifest("m1")
        op = m.operation
        assert op["op"] == "merge" and op["method"] == "task_arithmetic" and op["query"] == TA
        assert op["seed"] == 0 and op["engine"].startswith("mpexec")
        assert set(op["inputs"]) == {"base", "lora", "full"}
        assert set(m.parents) == {s.resolve("base"), s.resolve("lora"), s.resolve("full")}
        assert m.base == s.resolve("base")
    log = json.loads(CliRunner().invoke(cli, ["--store", str(merge_store), "log", "m1", "--json"]).output)
    assert log[0]["id"] == first["id"] and len(log) == 4
    dot = CliRunner().invoke(cli, ["--store", str(merge_store), "log", "m1", "--dot"]).output
    assert dot.startswith("digraph") and f'"{first["id"][:12]}" ->' in dot


def test_lora_merge_reads_only_the_changed_blocks(merge_store, tmp_path):
    text = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: lora\n    parameters: {weight: 1}\n"
    with Store.open(merge_store) as s:
        result = run_merge(s, plan_merge(s, text), name="lm")
        lora = s.manifest("lora").tensor_map()
        changed = sum(1 for t in lora.values() if "proj" in t.name and "self_attn" in t.name)
        assert result.tensors_passed_through == len(lora) - changed
        total = sum(
            loc.record_len
            for loc in s.index.get_blocks({b for t in s.manifest("lora").tensors for b in t.blocks}).values()
        )
        assert 0 < result.bytes_read < total
        assert result.blocks_skipped["same_as_base"] > 0


def test_randomized_methods_are_seeded_and_rescale_by_l1(merge_store, tmp_path):
    text = (
        "merge_method: dare_linear\nbase_model: base\nmodels:\n  - model: full\n"
        "    parameters: {weight: 1.0, density: 0.3}\ndtype: float32\nout_dtype: float32\n"
    )
    config = _write(tmp_path, text)
    a = json.loads(_merge(merge_store, config, "--name", "d1", "--seed", "7", "--json").output)
    b = json.loads(_merge(merge_store, config, "--name", "d2", "--seed", "7", "--json").output)
    c = json.loads(_merge(merge_store, config, "--name", "d3", "--seed", "8", "--json").output)
    assert a["id"] == b["id"] != c["id"]
    with Store.open(merge_store) as s:
        merged = dict(s.tensors("d1"))
        base = dict(s.tensors("base"))
        full = dict(s.tensors("full"))
    name = "model.layers.3.mlp.down_proj.weight"
    delta = full[name].float() - base[name].float()
    kept = merged[name] - base[name].float()
    nonzero = int((delta != 0).sum())
    fraction = int((kept != 0).sum()) / nonzero
    se = (0.3 * 0.7 / nonzero) ** 0.5
    assert abs(fraction - 0.3) < 5 * se
    assert float(kept.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)


def test_export_of_a_merge_loads_in_transformers_and_shards(merge_store, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = _write(tmp_path, TA)
    assert _merge(merge_store, config, "--name", "m", "--shard-size", "200KB").exit_code == 0
    out = tmp_path / "export"
    assert CliRunner().invoke(cli, ["--store", str(merge_store), "export", "m", str(out)]).exit_code == 0
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "config.json").exists() and (out / "mergekit_config.yml").read_text() == TA
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with Store.open(merge_store) as s:
        expected = dict(s.tensors("m"))
    state = model.state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name].to(value.dtype), value), name


def test_export_reshards_a_merge_on_request(merge_store, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert _merge(merge_store, _write(tmp_path, TA), "--name", "m").exit_code == 0
    out = tmp_path / "resharded"
    result = CliRunner().invoke(cli, ["--store", str(merge_store), "export", "m", str(out), "--shard-size", "150KB"])
    assert result.exit_code == 0, result.output
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 150_000 + 4096 for p in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with Store.open(merge_store) as s:
        expected = dict(s.tensors("m"))
    assert set(index["weight_map"]) == set(expected)
    state = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name].to(value.dtype), value), name


def test_device_cuda_without_a_gpu_is_a_clear_error(merge_store, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path cannot occur")
    result = _merge(merge_store, _write(tmp_path, TA), "--name", "g", "--device", "cuda")
    assert result.exit_code == 1 and "no CUDA device" in result.output


def test_cpu_and_auto_devices_give_the_same_snapshot(merge_store, tmp_path):
    config = _write(tmp_path, TA)
    cpu = json.loads(_merge(merge_store, config, "--name", "c", "--json", "--device", "cpu").output)
    auto = json.loads(_merge(merge_store, config, "--name", "a", "--json", "--device", "auto").output)
    assert cpu["id"] == auto["id"]


def test_kill9_during_merge_leaves_no_snapshot_and_fsck_clean(small_suite, tmp_path):
    path = tmp_path / "store"
    cu.run_ok(path, "init", "--block-size", cu.BLOCK)
    cu.run_ok(path, "ingest", small_suite["base"], "--name", "base")
    cu.run_ok(path, "ingest", small_suite["full-0"], "--name", "full", "--base", "base")
    config = _write(
        tmp_path,
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: full\n    parameters: {weight: 0.7, density: 0.5}\n",
    )
    rng = random.Random(3)
    for round_ in range(4):
        proc = cu.start(path, "merge", config, "--name", "merged")
        time.sleep(rng.uniform(0.2, 1.5))
        cu.kill9(proc)
        with Store.open(path) as s:
            assert s.fsck().ok
            refs = s.refs()
            assert set(refs) <= {"base", "full", "merged"}
            if "merged" in refs:
                break  # the kill came after the commit: then it must be complete (checked below)
    cu.run_ok(path, "merge", config, "--name", "merged", "--force")
    with Store.open(path) as s:
        assert s.fsck().ok
        assert len(dict(s.tensors("merged"))) == len(s.manifest("base").tensors)


def test_config_and_tokenizer_come_from_the_tokenizer_source(merge_store, tmp_path, suite):
    import shutil

    tok_model = tmp_path / "with-tokenizer"
    shutil.copytree(suite["full-0"], tok_model)
    (tok_model / "tokenizer.json").write_text('{"model": "from full"}')
    (tok_model / "README.md").write_text("not carried along")
    with Store.open(merge_store) as s:
        s.ingest(tok_model, name="tok", base="base")
    for source, expect_tokenizer in (("tok", True), ("base", False)):
        text = TA.replace("  - model: full\n", "  - model: tok\n") + f"tokenizer_source: {source}\n"
        out = tmp_path / f"out-{source}"
        assert _merge(merge_store, _write(tmp_path, text, f"{source}.yml"), "--name", f"t-{source}").exit_code == 0
        assert CliRunner().invoke(cli, ["--store", str(merge_store), "export", f"t-{source}", str(out)]).exit_code == 0
        assert (out / "tokenizer.json").exists() == expect_tokenizer
        assert not (out / "README.md").exists()
        if expect_tokenizer:
            assert (out / "tokenizer.json").read_text() == '{"model": "from full"}'
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_base_that_is_not_an_input_still_serves_as_xor_reference(merge_store, tmp_path):
    # linear ignores the base; in slices form the base need not be among the sources at all
    text = (
        "merge_method: linear\nbase_model: base\nslices:\n  - sources:\n"
        "      - model: lora\n        layer_range: [0, 4]\n        parameters: {weight: 0.5}\n"
        "      - model: full\n        layer_range: [0, 4]\n        parameters: {weight: 0.5}\n"
    )
    with Store.open(merge_store) as s:
        result = run_merge(s, plan_merge(s, text), name="lin")
        assert result.bytes_read_base > 0  # base blocks read only to XOR-code the output
        assert s.fsck().ok
        merged = dict(s.tensors("lin"))
        lora, full = dict(s.tensors("lora")), dict(s.tensors("full"))
    name = "model.layers.2.mlp.up_proj.weight"
    expected = ((lora[name].float() * 0.5 + full[name].float() * 0.5) / 1.0).to(torch.bfloat16)
    assert torch.equal(merged[name], expected)


def _rchar() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("streamed", [False, True])
def test_reported_bytes_read_match_the_process_io_counters(merge_store, tmp_path, monkeypatch, streamed):
    if streamed:
        import mpexec.execute

        monkeypatch.setattr(mpexec.execute, "STREAM_MIN_ELEMENTS", 0)
        monkeypatch.setattr(mpexec.execute, "CHUNK_ELEMENTS", 2048)
    text = TA.replace("task_arithmetic", "ties").replace("{weight: 0.5}", "{weight: 0.5, density: 0.5}")
    text = text.replace("{weight: [0.2, 1.0]}", "{weight: [0.2, 1.0], density: 0.7}")
    with Store.open(merge_store) as s:
        plan = plan_merge(s, text)
        run_merge(s, plan, name=f"warm-{streamed}")  # the first merge of a process loads compiled kernels
        before = _rchar()
        result = run_merge(s, plan, name=f"io-{streamed}")
        read = _rchar() - before
    assert result.bytes_read == result.bytes_read_base + result.bytes_read_experts > 0
    # the process read the packs (pread) and a few small files (log tail, config.json blocks)
    assert result.bytes_read <= read <= result.bytes_read * 1.01 + 64 * 1024, (result.bytes_read, read)


ESTIMATE_CASES = {
    "task_arithmetic": TA,
    "ties": TA.replace("task_arithmetic", "ties")
    .replace("{weight: 0.5}", "{weight: 0.5, density: 0.5}")
    .replace("{weight: [0.2, 1.0]}", "{weight: [0.2, 1.0], density: 0.6}"),
    "dare_ties": TA.replace("task_arithmetic", "dare_ties").replace("{weight: 0.5}", "{weight: 0.5, density: 0.5}"),
    "slerp": "merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n  - model: full\nparameters: {t: 0.3}\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: lora\n  - model: partial\n  - model: full\n",
    "sce": "merge_method: sce\nbase_model: base\nmodels:\n  - model: lora\n  - model: partial\n  - model: full\n"
    "parameters: {select_topk: 0.5}\n",
}


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("case", sorted(ESTIMATE_CASES))
def test_explain_estimates_bytes_read_within_5_percent(merge_store, monkeypatch, case, streamed):
    from mpexec.cost import explain_costs

    if streamed:
        import mpexec.execute

        monkeypatch.setattr(mpexec.execute, "STREAM_MIN_ELEMENTS", 0)
        monkeypatch.setattr(mpexec.execute, "CHUNK_ELEMENTS", 2048)
    with Store.open(merge_store) as s:
        plan = plan_merge(s, ESTIMATE_CASES[case])
        costs = explain_costs(s, plan)
        assert s.packs.bytes_read == 0  # estimating reads nothing
        result = run_merge(s, plan, name=f"est-{case}-{streamed}")
    assert abs(costs["estimated_bytes_read"] - result.bytes_read) <= 0.05 * result.bytes_read
    assert costs["estimated_blocks_skipped"] == result.blocks_skipped
    assert costs["estimated_seconds"] > 0


def test_explain_json_has_estimates_and_calibrate_keeps_rates(merge_store, tmp_path):
    out = CliRunner().invoke(cli, ["--store", str(merge_store), "calibrate", "--json"])
    rates = json.loads(out.output)
    assert set(rates) == {"read_bytes_per_s", "decode_bytes_per_s", "encode_bytes_per_s", "compute_elements_per_s"}
    assert json.loads((merge_store / "calibration.json").read_text()) == rates
    doc = json.loads(_merge(merge_store, _write(tmp_path, TA), "--explain", "--json").output)
    assert doc["estimated_bytes_read"] > 0 and doc["estimated_seconds"] > 0 and doc["rates"] == rates
    assert {"mode", "passes", "bytes_read"} <= set(doc["tensors"][0])
