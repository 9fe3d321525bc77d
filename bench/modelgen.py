"""Synthetic Hugging Face model folders (Llama-shaped) for tests, the demo and benchmarks.

Nothing is downloaded: a base model is drawn at random with the statistics of a trained model
(matrices ~N(0, 0.02), norm weights near 1.0), and "experts" are derived from it the way real
fine-tunes relate to their base:

- ``lora``: a rank-8 LoRA merged into the attention projections, every other tensor bit-identical;
- ``partial``: embeddings and the lower half of the layers frozen, the rest slightly changed;
- ``full``: small dense deltas everywhere, growing with depth.

Deltas are computed in float32 and cast back to the stored dtype (bf16), like a real fine-tune, so
the bytes have the same structure a merge tool sees in practice. Every tensor is drawn from its own
generator keyed by (seed, kind, tensor name), so output is deterministic and independent of sharding.

CLI: ``python -m bench.modelgen OUT [--preset tiny|small|bench|268m|550m] [--lora 3 --partial 3 --full 2]
[--seed 0] [--shard-bytes N]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REF_STD = 0.02  # std of a trained model's matrices; delta sizes below are stated relative to it
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = tuple(f"self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o"))
EXPERT_KINDS = ("lora", "partial", "full")
TRANSFORMERS_VERSION = "4.44.2"  # what the written configs claim; any recent version loads them

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------- configs


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int) -> dict:
    """A Hugging Face LlamaConfig dict that `AutoModelForCausalLM.from_pretrained` accepts."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": REF_STD,
        "intermediate_size": intermediate,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab,
    }


PRESETS: dict[str, dict] = {
    "tiny": llama_config(hidden=64, intermediate=176, layers=4, vocab=512, heads=4, kv_heads=2),
    "small": llama_config(hidden=256, intermediate=704, layers=4, vocab=4096, heads=4, kv_heads=4),
    "bench": llama_config(hidden=512, intermediate=1408, layers=8, vocab=32000, heads=8, kv_heads=8),
    "268m": llama_config(hidden=1024, intermediate=2816, layers=16, vocab=32000, heads=16, kv_heads=16),
    # 268m widened to twice the parameters (each layer matrix ~2.2x, the embeddings 1.5x): for memory
    # that must not grow with the model
    "550m": llama_config(hidden=1536, intermediate=4096, layers=16, vocab=32000, heads=16, kv_heads=16),
}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama checkpoint, in the order of the HF model's state_dict."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def param_count(config: dict) -> int:
    """Number of parameters of a model with this Llama config."""
    return sum(math.prod(shape) for shape in tensor_shapes(config).values())


# ---------------------------------------------------------------------------- helpers


def _generator(seed: int, *key: object) -> torch.Generator:
    """A generator seeded from (seed, key): each tensor gets its own stream, so order doesn't matter."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _randn(shape: Iterable[int], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _write_json(path: Path, obj: dict) -> None:
    # The same formatting transformers uses for config.json and the shard index.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _empty_folder(folder: str | Path) -> Path:
    """Create `folder` (or accept an empty one): refusing non-empty folders avoids stale shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty")
    return folder


def _plan_shards(sizes: dict[str, int], shard_bytes: int | None) -> list[list[str]]:
    """Group tensor names into shards exactly as huggingface_hub's split_state_dict_into_shards does."""
    if shard_bytes is None:
        return [list(sizes)]
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if size > shard_bytes:  # an oversized tensor gets a shard of its own
            shards.append([name])
            continue
        if current_size + size > shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _layer_index(name: str) -> int | None:
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def _add_delta(tensor: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """tensor + N(0, std'), computed in float32 and cast back to tensor's dtype.

    std is meant for weights of magnitude ~REF_STD; tensors of larger magnitude (norm weights near
    1.0) get a proportionally larger delta, as in real fine-tunes, so that it survives bf16 rounding.
    """
    if tensor.numel() == 0:
        return tensor
    work = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    rms = torch.linalg.vector_norm(work).item() / math.sqrt(work.numel())
    scaled_std = std * max(1.0, rms / REF_STD)
    # In place, so a big tensor costs only two float32 temporaries.
    noise = _randn(tensor.shape, gen).to(work.dtype).mul_(scaled_std)
    return noise.add_(work).to(tensor.dtype)


def _merge_lora(weight: torch.Tensor, target_std: float, gen: torch.Generator) -> torch.Tensor:
    """weight + (B @ A) * alpha / r for a random rank-r pair whose product has std ~target_std."""
    out_dim, in_dim = weight.shape
    a = _randn((LORA_RANK, in_dim), gen) * LORA_RANK**-0.5
    # Entries of B @ A have std sqrt(r) * std(A) * std(B) = std(B); alpha / r rescales it.
    b = _randn((out_dim, LORA_RANK), gen) * (target_std * LORA_RANK / LORA_ALPHA)
    return (weight.float() + (b @ a) * (LORA_ALPHA / LORA_RANK)).to(weight.dtype)


Transform = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def _rewrite_folder(src: str | Path, dst: str | Path, transform: Transform) -> Path:
    """Copy every file of src to dst, passing each tensor of each .safetensors file through transform.

    transform returns the tensor to write (the same object keeps it bit-identical) or None to drop
    it; dropped tensors are also removed from any shard index. Only one file's tensors are held in
    memory at a time, and safetensors metadata is preserved.
    """
    src, dst = Path(src), _empty_folder(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    dropped: dict[Path, dict[str, int]] = {}  # folder (relative) -> dropped name -> bytes
    for src_file in sorted(src.rglob("*.safetensors")):
        rel = src_file.relative_to(src)
        out: dict[str, torch.Tensor] = {}
        with safe_open(src_file, framework="pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                tensor = f.get_tensor(name)
                new = transform(name, tensor)
                if new is None:
                    dropped.setdefault(rel.parent, {})[name] = tensor.numel() * tensor.element_size()
                else:
                    out[name] = new
        save_file(out, dst / rel, metadata=metadata)
        del out  # free this file's tensors before reading the next one
    for rel_dir, names in dropped.items():
        for index_path in (dst / rel_dir).glob("*.safetensors.index.json"):
            index = json.loads(index_path.read_text())
            for name in names.keys() & index["weight_map"].keys():
                del index["weight_map"][name]
                index["metadata"]["total_size"] -= names[name]
            _write_json(index_path, index)
    return dst


# ---------------------------------------------------------------------------- writers


def write_base(
    folder: str | Path, config: dict, seed: int, dtype: str = "bfloat16", shard_bytes: int | None = None
) -> Path:
    """Write a random Llama base model (config.json, generation_config.json, weights) into folder.

    Matrices are N(0, 0.02), norm weights 1 + N(0, 0.02). With shard_bytes, weights are split into
    `model-0000i-of-0000N.safetensors` files plus `model.safetensors.index.json` the way
    transformers' save_pretrained(max_shard_size=shard_bytes) does (one shard means no index).
    folder must be absent or empty. Returns folder.
    """
    torch_dtype = _DTYPES[dtype]
    folder = _empty_folder(folder)
    config = {**config, "torch_dtype": dtype}
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "transformers_version": config["transformers_version"],
        },
    )
    shapes = tensor_shapes(config)
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    sizes = {name: math.prod(shape) * itemsize for name, shape in shapes.items()}
    shards = _plan_shards(sizes, shard_bytes)
    if len(shards) == 1:
        filenames = ["model.safetensors"]
    else:
        filenames = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    weight_map: dict[str, str] = {}
    for filename, names in zip(filenames, shards):
        # Draw one shard at a time so a big model never sits in memory twice.
        tensors = {}
        for name in names:
            values = _randn(shapes[name], _generator(seed, "base", name)).mul_(REF_STD)
            if len(shapes[name]) == 1:  # norm weights
                values.add_(1.0)
            tensors[name] = values.to(torch_dtype)
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        _write_json(folder / "model.safetensors.index.json", index)
    return folder


def write_expert(folder: str | Path, base_folder: str | Path, kind: str, seed: int, scale: float = 1.0) -> Path:
    """Write a fine-tuned copy of the Llama base in base_folder: same files and sharding, new weights.

    kind is "lora" (rank-8 LoRA, |delta| ~1e-3*scale, merged into q/k/v/o; all else bit-identical),
    "partial" (embeddings and lower half of the layers bit-identical; upper layers, final norm and
    lm_head get deltas of std ~2e-4*scale) or "full" (deltas everywhere, std ~1e-4*scale at the
    bottom growing linearly to ~4e-4*scale at the top). folder must be absent or empty.
    """
    if kind not in EXPERT_KINDS:
        raise ValueError(f"unknown expert kind {kind!r}; expected one of {EXPERT_KINDS}")
    n_layers = json.loads((Path(base_folder) / "config.json").read_text())["num_hidden_layers"]

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        gen = _generator(seed, kind, name)
        layer = _layer_index(name)
        if kind == "lora":
            return _merge_lora(tensor, 1e-3 * scale, gen) if name.endswith(LORA_TARGETS) else tensor
        if kind == "partial":
            frozen = "embed_tokens" in name or (layer is not None and layer < n_layers // 2)
            return tensor if frozen else _add_delta(tensor, 2e-4 * scale, gen)
        # full: embeddings count as the bottom, final norm and lm_head as the top
        if layer is not None:
            depth = layer / max(1, n_layers - 1)
        else:
            depth = 0.0 if "embed_tokens" in name else 1.0
        return _add_delta(tensor, (1e-4 + 3e-4 * depth) * scale, gen)

    return _rewrite_folder(base_folder, folder, transform)


def write_finetuned_copy(
    src_folder: str | Path,
    dst_folder: str | Path,
    seed: int,
    delta_std: float = 2e-4,
    drop_tensors: Iterable[str] = (),
    skip_tensors: Iterable[str] = (),
) -> Path:
    """Copy any HF model folder (subfolders, tokenizer files, ...) with small deltas on its weights.

    Every *.safetensors file is rewritten: floating tensors get a dense N(0, delta_std) delta (see
    _add_delta), tensors named in skip_tensors and integer tensors are copied bit-identical, and
    tensors named in drop_tensors are left out (and out of the shard index, if any). Every other
    file is copied byte-identical. dst_folder must be absent or empty. Returns dst_folder.
    """
    drop, skip = set(drop_tensors), set(skip_tensors)
    present: set[str] = set()
    for path in Path(src_folder).rglob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            present.update(f.keys())
    if missing := (drop | skip) - present:
        raise KeyError(f"tensors not found in {src_folder}: {sorted(missing)}")

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if name in drop:
            return None
        if name in skip or not tensor.is_floating_point():
            return tensor
        return _add_delta(tensor, delta_std, _generator(seed, "finetune", name))

    return _rewrite_folder(src_folder, dst_folder, transform)


# ---------------------------------------------------------------------------- suites


def _is_complete(folder: Path, config: dict, sharded: bool) -> bool:
    """Whether folder holds a finished model with this config and sharding (seeds are not checked)."""
    try:
        written = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if written != config:
        return False
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        files = set(json.loads(index_path.read_text())["weight_map"].values())
        return sharded and all((folder / f).is_file() for f in files)
    return (folder / "model.safetensors").is_file() and not sharded


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_suite(
    root: str | Path,
    preset: str = "tiny",
    n_lora: int = 3,
    n_partial: int = 3,
    n_full: int = 2,
    seed: int = 0,
    shard_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Build root/base and root/{lora,partial,full}-<i> expert folders; return {name: path}.

    A folder that already holds a complete model of this preset and sharding is reused (so
    benchmarks can cache); seeds are not checked. Models are written to a temporary sibling and
    renamed into place, so an interrupted run never leaves a folder that looks complete. If the base
    is rebuilt, all experts are rebuilt too. log, if given, receives one line per model.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = PRESETS[preset]
    # A one-shard plan is written unsharded, like save_pretrained, so ask the planner (bf16: 2 bytes).
    sizes = {name: math.prod(shape) * 2 for name, shape in tensor_shapes(config).items()}
    sharded = len(_plan_shards(sizes, shard_bytes)) > 1

    jobs: list[tuple[str, Callable[[Path], Path]]] = [
        ("base", functools.partial(write_base, config=config, seed=seed, shard_bytes=shard_bytes))
    ]
    for kind, count in (("lora", n_lora), ("partial", n_partial), ("full", n_full)):
        for i in range(count):
            # Distinct seed per expert; the kind is also part of every tensor's generator key.
            build = functools.partial(write_expert, base_folder=root / "base", kind=kind, seed=seed * 1000 + i)
            jobs.append((f"{kind}-{i}", build))

    paths: dict[str, Path] = {}
    rebuilt_base = False
    for name, build in jobs:
        final = root / name
        paths[name] = final
        if not rebuilt_base and _is_complete(final, config, sharded):
            if log:
                log(f"{name:<10} cached  {final}")
            continue
        start = time.perf_counter()
        tmp = root / f".{name}.tmp"
        for stale in (tmp, final):
            if stale.exists():
                shutil.rmtree(stale)
        build(tmp)
        tmp.rename(final)
        rebuilt_base |= name == "base"
        if log:
            mb = _folder_bytes(final) / 1e6
            log(f"{name:<10} wrote   {final} ({mb:.1f} MB, {time.perf_counter() - start:.2f}s)")
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build a suite and report what was written."""
    parser = argparse.ArgumentParser(prog="python -m bench.modelgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="root folder of the suite")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--lora", type=int, default=3, help="number of LoRA experts")
    parser.add_argument("--partial", type=int, default=3, help="number of partially fine-tuned experts")
    parser.add_argument("--full", type=int, default=2, help="number of fully fine-tuned experts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=None, help="max bytes per safetensors shard")
    args = parser.parse_args(argv)

    n_params = param_count(PRESETS[args.preset])
    print(f"preset {args.preset}: {n_params:,} parameters ({n_params / 1e6:.1f}M) per model, bf16")
    start = time.perf_counter()
    paths = make_suite(
        args.out, args.preset, args.lora, args.partial, args.full, args.seed, args.shard_bytes, log=print
    )
    print(f"{len(paths)} models under {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
