"""The store through its Python API: round trips, dedup, deltas, refs, auto base, rebuild."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mpstore import AmbiguousRefError, ConflictError, FormatVersionError, NotFoundError, Store
from mpstore.codecs import Codec
from mpstore.dtypes import DTYPES, as_float32

from .conftest import SMALL_BLOCK, folder_digest


def test_ingest_then_export_is_byte_identical(store, suite, tmp_path):
    for name in ("base", "lora-0", "partial-0", "full-0"):
        store.ingest(suite[name], name=name, base=None if name == "base" else "base")
    for name in ("base", "lora-0", "partial-0", "full-0"):
        out = tmp_path / "out" / name
        store.export(name, out)
        assert folder_digest(out) == folder_digest(suite[name])


def test_sharded_model_and_index_come_back_identical(store, sharded_suite, tmp_path):
    assert (sharded_suite["base"] / "model.safetensors.index.json").exists()
    store.ingest(sharded_suite["base"], name="base")
    store.ingest(sharded_suite["full-0"], name="full", base="base")
    store.export("full", tmp_path / "full")
    assert folder_digest(tmp_path / "full") == folder_digest(sharded_suite["full-0"])


def test_pytorch_bin_model_round_trips(store, tmp_path):
    folder = tmp_path / "binmodel"
    folder.mkdir()
    state = {"a.weight": torch.randn(64, 32).bfloat16(), "b.bias": torch.arange(10), "c": torch.randn(3, 3)}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text('{"model_type": "toy"}')
    result = store.ingest(folder, name="bin")
    store.export("bin", tmp_path / "out")
    assert folder_digest(tmp_path / "out") == folder_digest(folder)
    tensors = dict(store.tensors("bin"))
    assert set(tensors) == set(state)
    for name, value in state.items():
        assert torch.equal(tensors[name], value)
    assert result.tensors == 3


def test_lora_expert_shares_every_untouched_block_with_its_base(store, suite):
    base = store.ingest(suite["base"], name="base")
    lora = store.ingest(suite["lora-0"], name="lora", base="base")
    base_m, lora_m = store.manifest("base").tensor_map(), store.manifest("lora").tensor_map()
    for name, entry in lora_m.items():
        same = entry.blocks == base_m[name].blocks
        assert same == (not any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj"))), name
    assert lora.blocks_same_as_base > 0
    assert lora.written_bytes < base.written_bytes / 3


def test_changed_blocks_are_xor_coded_against_the_base(store, suite):
    store.ingest(suite["base"], name="base")
    store.ingest(suite["full-0"], name="full", base="base")
    base_m, full_m = store.manifest("base").tensor_map(), store.manifest("full").tensor_map()
    entry = full_m["model.layers.0.mlp.up_proj.weight"]
    loc = store.location(entry.blocks[0])
    assert loc.codec == Codec.XOR_GROUPED_ZSTD
    assert loc.ref == base_m["model.layers.0.mlp.up_proj.weight"].blocks[0]


def test_delta_statistics_match_numpy(store, suite):
    store.ingest(suite["base"], name="base")
    store.ingest(suite["full-0"], name="full", base="base")
    name = "model.layers.1.self_attn.q_proj.weight"
    entry = store.manifest("full").tensor_map()[name]
    base_raw = store.tensor_bytes(store.manifest("base").tensor_map()[name])
    full_raw = store.tensor_bytes(entry)
    step = SMALL_BLOCK
    for i, (l2, peak, changed) in enumerate(entry.delta):
        a = as_float32(DTYPES["BF16"], full_raw[i * step : (i + 1) * step])
        b = as_float32(DTYPES["BF16"], base_raw[i * step : (i + 1) * step])
        d = (a - b).astype(np.float64)
        assert l2 == pytest.approx(np.linalg.norm(d), rel=1e-5)
        assert peak == pytest.approx(np.abs(d).max(), rel=1e-5)
        assert changed == int(np.count_nonzero(a != b))
    assert sum(s[2] for s in entry.delta) > 0


def test_tensors_read_back_equal_the_source(store, suite):
    store.ingest(suite["base"], name="base")
    store.ingest(suite["partial-0"], name="partial", base="base")
    source = load_file(suite["partial-0"] / "model.safetensors")
    got = dict(store.tensors("partial"))
    assert set(got) == set(source)
    for name in source:
        assert torch.equal(got[name], source[name]), name


def test_same_folder_twice_gives_the_same_snapshot_and_writes_nothing(store, suite):
    first = store.ingest(suite["base"], name="base")
    again = store.ingest(suite["base"], name="base-again")
    assert again.id == first.id
    assert again.written_bytes == 0 and again.blocks_new == 0


def test_auto_base_picks_the_closest_root(store, suite, tmp_path):
    other = tmp_path / "other-base"
    from bench.modelgen import PRESETS, write_base

    write_base(other, PRESETS["tiny"], seed=99)
    store.ingest(other, name="other")
    store.ingest(suite["base"], name="base")
    for name in ("lora-0", "partial-0", "full-0"):
        result = store.ingest(suite[name], name=name, base="auto")
        assert result.base == store.resolve("base"), name


def test_auto_base_without_candidates_stores_a_root(store, suite):
    result = store.ingest(suite["full-0"], name="full", base="auto")
    assert result.base is None
    assert store.manifest("full").base is None


def test_existing_ref_is_not_moved_without_force(store, suite):
    store.ingest(suite["base"], name="m")
    with pytest.raises(ConflictError, match="already exists"):
        store.ingest(suite["full-0"], name="m")
    moved = store.ingest(suite["full-0"], name="m", force=True)
    assert store.resolve("m") == moved.id


def test_refs_set_rename_delete_and_prefixes(store, suite):
    base = store.ingest(suite["base"], name="base").id
    store.set_ref("experts/copy", "base")
    assert store.resolve("experts/copy") == base
    with pytest.raises(ConflictError):
        store.rename_ref("experts/copy", "base")
    store.rename_ref("experts/copy", "renamed")
    assert "experts/copy" not in store.refs() and store.refs()["renamed"] == base
    assert store.resolve(base.hex()[:8]) == base
    store.delete_ref("renamed")
    with pytest.raises(NotFoundError):
        store.resolve("renamed")
    with pytest.raises(NotFoundError):
        store.delete_ref("renamed")


def test_ambiguous_id_prefix_is_refused(store, suite):
    ids = [store.ingest(suite[n], name=n).id for n in ("base", "lora-0", "partial-0", "full-0")]
    # Find the longest common hex prefix of two ids, pad to 4 digits if they differ earlier.
    a, b = sorted(i.hex() for i in ids)[:2]
    common = next((k for k in range(64) if a[k] != b[k]), 64)
    if common >= 4:
        with pytest.raises(AmbiguousRefError):
            store.resolve(a[:common])
    with pytest.raises(NotFoundError):
        store.resolve("ffff" if not any(i.hex().startswith("ffff") for i in ids) else "0000")


def test_index_rebuilt_from_packs_and_log_serves_the_same_data(store, suite, tmp_path):
    store.ingest(suite["base"], name="base")
    store.ingest(suite["lora-0"], name="lora", base="base")
    refs = store.refs()
    path = store.path
    store.close()
    shutil.rmtree(path / "index")
    reopened = Store.open(path)
    reopened.rebuild_index()
    assert reopened.refs() == refs
    assert reopened.fsck().ok
    reopened.export("lora", tmp_path / "lora")
    assert folder_digest(tmp_path / "lora") == folder_digest(suite["lora-0"])
    reopened.close()


def test_newer_store_version_is_refused(store):
    path = store.path
    store.close()
    desc = json.loads((path / "mpstore.json").read_text())
    desc["version"] = 99
    (path / "mpstore.json").write_text(json.dumps(desc))
    with pytest.raises(FormatVersionError, match="newer"):
        Store.open(path)


def test_store_ratio_is_reported_by_du(store, suite):
    for name in ("base", "lora-0", "partial-0", "full-0"):
        store.ingest(suite[name], name=name, base=None if name == "base" else "base")
    usage = store.du().as_dict()
    assert usage["logical_bytes"] == sum(
        sum(f.stat().st_size for f in suite[n].rglob("*") if f.is_file())
        for n in ("base", "lora-0", "partial-0", "full-0")
    )
    assert usage["ratio"] < 0.7  # four models with three deltas: well under their raw size
    assert set(usage["by_codec"]) >= {"grouped_zstd", "xor_grouped_zstd"}


def test_every_safetensors_dtype_round_trips(store, tmp_path):
    folder = tmp_path / "dtypes"
    folder.mkdir()
    tensors = {}
    for name, dtype in [
        ("bf16", torch.bfloat16),
        ("f16", torch.float16),
        ("f32", torch.float32),
        ("f64", torch.float64),
        ("i8", torch.int8),
        ("u8", torch.uint8),
        ("i16", torch.int16),
        ("i32", torch.int32),
        ("i64", torch.int64),
        ("bool", torch.bool),
        ("f8e4m3", torch.float8_e4m3fn),
        ("f8e5m2", torch.float8_e5m2),
        ("u16", torch.uint16),
        ("u32", torch.uint32),
        ("u64", torch.uint64),
        ("c64", torch.complex64),
    ]:
        base = torch.randn(3000) * 10
        tensors[name] = base.to(dtype) if dtype not in (torch.bool,) else base > 0
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", "note": "all dtypes"})
    store.ingest(folder, name="dtypes")
    store.export("dtypes", tmp_path / "out")
    assert folder_digest(tmp_path / "out") == folder_digest(folder)
    got = dict(store.tensors("dtypes"))
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_init_builds_aside_so_a_crashed_init_leaves_nothing_behind(tmp_path):
    target = tmp_path / "fresh"
    stale = tmp_path / f".fresh.init-{os.getpid()}"  # what a killed init of this process id would leave
    stale.mkdir()
    (stale / "junk").write_text("half made")
    store = Store.init(target)
    assert (target / "mpstore.json").exists() and not stale.exists()
    assert sorted(p.name for p in target.iterdir()) == ["index", "manifest.log", "mpstore.json", "packs"]
    store.close()
