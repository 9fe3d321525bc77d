"""Tests for bench.modelgen: the synthetic Llama base models and their fine-tuned experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.modelgen import (
    PRESETS,
    _plan_shards,
    main,
    make_suite,
    param_count,
    tensor_shapes,
    write_base,
    write_expert,
    write_finetuned_copy,
)

TINY = PRESETS["tiny"]
N_LAYERS = TINY["num_hidden_layers"]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_suite(tmp_path_factory.mktemp("suite"), "tiny", n_lora=1, n_partial=1, n_full=1, seed=0)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) model folder."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _rel_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_base_is_a_llama_checkpoint(suite: dict[str, Path]) -> None:
    base = suite["base"]
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    assert (base / "generation_config.json").is_file()
    with safe_open(base / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    tensors = _load(base)
    shapes = tensor_shapes(TINY)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == shapes
    assert "model.layers.3.self_attn.k_proj.weight" in shapes and "lm_head.weight" in shapes
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads of 16
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == param_count(TINY)
    # Trained-model statistics: matrices ~N(0, 0.02), norm weights near 1.
    q = tensors["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    norm = tensors["model.layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.01 and 0 < norm.std().item() < 0.05


def test_bench_preset_is_large_enough() -> None:
    assert param_count(PRESETS["bench"]) >= 30_000_000
    assert 250e6 < param_count(PRESETS["268m"]) < 290e6


def test_lora_changes_only_attention_projections(suite: dict[str, Path]) -> None:
    base, lora = _load(suite["base"]), _load(suite["lora-0"])
    assert base.keys() == lora.keys()
    for name, tensor in base.items():
        if name.endswith(tuple(f"{p}.weight" for p in ATTN)):
            assert not torch.equal(lora[name], tensor), name
            delta = lora[name].float() - tensor.float()
            assert 5e-4 < delta.std().item() < 2e-3, name
            # Rank-8 LoRA: the top 8 singular values carry almost all the energy (bf16 rounding aside).
            energy = torch.linalg.svdvals(delta) ** 2
            assert energy[:8].sum() / energy.sum() > 0.99, name
        else:
            assert torch.equal(lora[name], tensor), name


def test_partial_freezes_embeddings_and_lower_half(suite: dict[str, Path]) -> None:
    base, partial = _load(suite["base"]), _load(suite["partial-0"])
    for name, tensor in base.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        frozen = name == "model.embed_tokens.weight" or (layer is not None and layer < N_LAYERS // 2)
        if frozen:
            assert torch.equal(partial[name], tensor), name
        else:
            assert not torch.equal(partial[name], tensor), name
            assert _rel_delta(partial[name], tensor) < 0.05, name


def test_full_changes_every_tensor_slightly(suite: dict[str, Path]) -> None:
    base, full = _load(suite["base"]), _load(suite["full-0"])
    for name, tensor in base.items():
        assert not torch.equal(full[name], tensor), name
        assert full[name].dtype == tensor.dtype
        assert _rel_delta(full[name], tensor) < 0.05, name
    # Deltas grow with depth.
    down = "mlp.down_proj.weight"
    bottom = _rel_delta(full[f"model.layers.0.{down}"], base[f"model.layers.0.{down}"])
    top = _rel_delta(full[f"model.layers.{N_LAYERS - 1}.{down}"], base[f"model.layers.{N_LAYERS - 1}.{down}"])
    assert top > 2.5 * bottom


def test_experts_differ_from_each_other(tmp_path: Path, suite: dict[str, Path]) -> None:
    other = write_expert(tmp_path / "lora-other", suite["base"], "lora", seed=12345)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(_load(other)[name], _load(suite["lora-0"])[name])
    with pytest.raises(ValueError):
        write_expert(tmp_path / "bad", suite["base"], "qlora", seed=0)


def test_plan_shards_matches_huggingface_hub() -> None:
    # huggingface_hub's own example: an oversized tensor gets its own shard, appended immediately.
    sizes = {"l1": 6, "l2": 10, "l3": 30, "l4": 2, "l5": 2}
    assert _plan_shards(sizes, 10) == [["l1"], ["l3"], ["l2"], ["l4", "l5"]]
    assert _plan_shards(sizes, None) == [list(sizes)]


def test_sharded_base_and_expert(tmp_path: Path, suite: dict[str, Path]) -> None:
    base = write_base(tmp_path / "base", TINY, seed=0, shard_bytes=100_000)
    assert not (base / "model.safetensors").exists()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    files = sorted(base.glob("model-*.safetensors"))
    assert len(files) > 2 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    stored = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            stored.update(dict.fromkeys(f.keys(), path.name))
    assert index["weight_map"] == stored
    assert set(index["weight_map"]) == set(tensor_shapes(TINY))
    tensors = _load(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Each tensor has its own generator, so sharding does not change the weights.
    unsharded = _load(suite["base"])
    assert all(torch.equal(tensors[name], unsharded[name]) for name in unsharded)

    expert = write_expert(tmp_path / "full", base, "full", seed=0)
    assert (expert / "model.safetensors.index.json").read_bytes() == (
        base / "model.safetensors.index.json"
    ).read_bytes()
    assert sorted(p.name for p in expert.glob("*.safetensors")) == [p.name for p in files]
    expert_tensors = _load(expert)
    assert all(not torch.equal(expert_tensors[n], tensors[n]) for n in tensors)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_base(tmp_path / "a", TINY, seed=7)
    b = write_base(tmp_path / "b", TINY, seed=7)
    c = write_base(tmp_path / "c", TINY, seed=8)
    weights = "model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert (a / weights).read_bytes() != (c / weights).read_bytes()
    for kind in ("lora", "partial", "full"):
        x = write_expert(tmp_path / f"{kind}-x", a, kind, seed=3)
        y = write_expert(tmp_path / f"{kind}-y", b, kind, seed=3)
        assert (x / weights).read_bytes() == (y / weights).read_bytes(), kind


def test_write_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_base(tmp_path / "base", TINY, seed=0)


def _sentence_transformer(folder: Path) -> Path:
    """A small sentence-transformers-style folder: BERT-ish tensors, tokenizer files, a pooling module."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "embeddings.word_embeddings.weight": torch.randn(100, 16, generator=gen) * 0.02,
        "embeddings.position_ids": torch.arange(32).unsqueeze(0),
        "embeddings.token_type_ids": (torch.arange(32) % 2).unsqueeze(0),  # integer, not all zero
        "embeddings.LayerNorm.weight": torch.ones(16),
        "pooler.dense.weight": (torch.randn(16, 16, generator=gen) * 0.02).to(torch.float16),
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", "note": "kept"})
    (folder / "config.json").write_text('{"model_type": "bert"}\n')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (folder / "modules.json").write_text("[]\n")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    return folder


def test_finetuned_copy_of_any_folder(tmp_path: Path) -> None:
    src = _sentence_transformer(tmp_path / "src")
    dst = write_finetuned_copy(
        src,
        tmp_path / "dst",
        seed=1,
        drop_tensors=["embeddings.position_ids"],
        skip_tensors=["pooler.dense.weight"],
    )
    other_files = [p.relative_to(src) for p in src.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert Path("1_Pooling/config.json") in other_files
    for rel in other_files:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel

    before, after = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert set(after) == set(before) - {"embeddings.position_ids"}
    assert torch.equal(after["pooler.dense.weight"], before["pooler.dense.weight"])
    assert after["pooler.dense.weight"].dtype == torch.float16
    assert torch.equal(after["embeddings.token_type_ids"], before["embeddings.token_type_ids"])
    for name in ("embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight"):
        assert not torch.equal(after[name], before[name]), name
        assert after[name].dtype == before[name].dtype
        assert _rel_delta(after[name], before[name]) < 0.05, name
    with safe_open(dst / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}

    with pytest.raises(KeyError):
        write_finetuned_copy(src, tmp_path / "typo", seed=1, drop_tensors=["no.such.tensor"])


def test_finetuned_copy_drop_updates_shard_index(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base", TINY, seed=0, shard_bytes=100_000)
    dst = write_finetuned_copy(base, tmp_path / "copy", seed=0, drop_tensors=["lm_head.weight"])
    before = json.loads((base / "model.safetensors.index.json").read_text())
    after = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(after["weight_map"]) == set(before["weight_map"]) - {"lm_head.weight"}
    lm_head_bytes = TINY["vocab_size"] * TINY["hidden_size"] * 2
    assert after["metadata"]["total_size"] == before["metadata"]["total_size"] - lm_head_bytes
    assert set(_load(dst)) == set(after["weight_map"])


def test_make_suite_caches_complete_folders(tmp_path: Path) -> None:
    paths = make_suite(tmp_path, "tiny", n_lora=2, n_partial=1, n_full=1)
    assert list(paths) == ["base", "lora-0", "lora-1", "partial-0", "full-0"]
    assert not list(tmp_path.glob(".*.tmp"))
    mtimes = {name: (p / "model.safetensors").stat().st_mtime_ns for name, p in paths.items()}
    lora_bytes = (paths["lora-1"] / "model.safetensors").read_bytes()

    (paths["lora-1"] / "model.safetensors").unlink()  # an incomplete folder is rebuilt
    again = make_suite(tmp_path, "tiny", n_lora=2, n_partial=1, n_full=1)
    assert again == paths
    for name, p in again.items():
        if name != "lora-1":
            assert (p / "model.safetensors").stat().st_mtime_ns == mtimes[name], name
    assert (paths["lora-1"] / "model.safetensors").read_bytes() == lora_bytes


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "out"), "--lora", "1", "--partial", "0", "--full", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{param_count(TINY):,}" in out and "lora-0" in out
    assert (tmp_path / "out" / "lora-0" / "model.safetensors").is_file()
