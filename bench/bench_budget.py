"""Issue 4's targets: bytes read by an exact merge, and what an I/O budget buys, value vs random.

    python -m bench.bench_budget [--preset bench] [--data bench/data] [--out bench/RESULTS.md]

A task_arithmetic merge of the 8 mixed experts (3 LoRA, 3 partial, 2 full) of the store benchmark's
data, in float32 so bf16 rounding does not hide small differences. The exact merge is run once; then,
for budgets of the base's bytes plus 10, 25, 50, 75 and 100% of the experts' bytes, both policies:
`value` (least |weight| x delta norm per stored byte dropped first) and `random` (seeded; the
published MergePipe strategy). Reported: bytes read (never above the budget: checked), blocks
dropped, the bound on the omitted update, and the relative L2 error of the merged task vector against
the exact merge's. mergekit reads every input file in full: its bytes are the input files' sizes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_store import folder_bytes, machine, replace_section
from bench.modelgen import make_suite
from mpexec.budget import apply_budget
from mpexec.execute import estimate_reads
from mpexec.merge import plan_merge, run_merge
from mpstore import Store

SECTION = "## I/O budgets (issue 4)"
FRACTIONS = (0.10, 0.25, 0.50, 0.75, 1.00)
EXPERTS = ["lora-0", "lora-1", "lora-2", "partial-0", "partial-1", "partial-2", "full-0", "full-1"]


def query(experts: list[str]) -> str:
    lines = ["merge_method: task_arithmetic", "base_model: base", "models:"]
    for name in experts:
        lines += [f"  - model: {name}", f"    parameters: {{weight: {1 / len(experts):.6g}}}"]
    return "\n".join(lines + ["dtype: float32", "out_dtype: float32", ""])


def task_vector_error(store: Store, ref: str, exact: dict, base: dict) -> float:
    merged = dict(store.tensors(ref))
    num = sum(float((merged[n].double() - exact[n].double()).square().sum()) for n in exact)
    den = sum(float((exact[n].double() - base[n].double()).square().sum()) for n in exact)
    return (num / den) ** 0.5


def run(preset: str, data: Path, work: Path, log=print) -> dict:
    paths = make_suite(data, preset=preset, n_lora=3, n_partial=3, n_full=2)
    store = Store.init(work / "store")
    store.ingest(paths["base"], name="base")
    for name in EXPERTS:
        store.ingest(paths[name], name=name, base="base")
    text = query(EXPERTS)
    exact_run = run_merge(store, plan_merge(store, text), name="exact")
    exact, base = dict(store.tensors("exact")), dict(store.tensors("base"))
    full = estimate_reads(store, plan_merge(store, text))[0]
    base_bytes, expert_bytes = full.bytes_read_base, full.bytes_read_experts
    mergekit_bytes = sum(folder_bytes(paths[n]) for n in ["base", *EXPERTS])
    rows = []
    for fraction in FRACTIONS:
        budget = base_bytes + int(fraction * expert_bytes)
        for policy in ("value", "random"):
            plan = plan_merge(store, text)
            report = apply_budget(store, plan, budget, policy, seed=0)
            started = time.monotonic()
            result = run_merge(store, plan, name=f"b-{policy}-{int(fraction * 100)}", force=True)
            seconds = time.monotonic() - started
            if result.bytes_read > budget:
                raise AssertionError(f"read {result.bytes_read} bytes over a budget of {budget}")
            error = task_vector_error(store, f"b-{policy}-{int(fraction * 100)}", exact, base)
            rows.append(
                {
                    "fraction": fraction,
                    "policy": policy,
                    "budget": budget,
                    "bytes_read": result.bytes_read,
                    "dropped": report["dropped_blocks"],
                    "bound": report["error_bound"],
                    "error": error,
                    "seconds": seconds,
                }
            )
            log(
                f"{policy:6} {fraction:4.0%}: read {result.bytes_read / 1e6:7.1f} MB of {budget / 1e6:7.1f} MB, "
                f"dropped {report['dropped_blocks']:4}, relative error {error:.4f}"
            )
    store.close()
    return {
        "rows": rows,
        "exact_bytes": exact_run.bytes_read,
        "mergekit_bytes": mergekit_bytes,
        "base_bytes": base_bytes,
        "expert_bytes": expert_bytes,
        "exact_seconds": exact_run.seconds,
    }


def plot(fig: dict, out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig_, ax = plt.subplots(figsize=(6, 4))
    for policy, style in (("value", "o-"), ("random", "s--")):
        rows = [r for r in fig["rows"] if r["policy"] == policy]
        ax.plot([100 * r["fraction"] for r in rows], [r["error"] for r in rows], style, label=policy)
    ax.set_xlabel("budget: base bytes + % of expert bytes")
    ax.set_ylabel("relative L2 error of the merged task vector")
    ax.set_title("task_arithmetic of 8 experts under an I/O budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig_.tight_layout()
    fig_.savefig(out, dpi=110)
    return out.name


def render(fig: dict, command: str, image: str | None) -> str:
    m = machine()
    at25 = {r["policy"]: r["error"] for r in fig["rows"] if r["fraction"] == 0.25}
    ratio = at25["value"] / at25["random"] if at25["random"] else float("nan")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['nproc']} cores ({m['cpu']}, "
        f"{m['mem']}), Python {m['python']}; {m['libs']}.",
        "",
        f"Command: `{command}`",
        "",
        "Data: the store benchmark's 9 models (58.5M bf16 parameters each); task_arithmetic of the 8 experts, "
        "weights 1/8, `dtype: float32`, `out_dtype: float32`.",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
        f"| exact merge reads >= 3x fewer bytes than mergekit | {fig['mergekit_bytes'] / 1e6:.1f} MB (mergekit reads "
        f"every input file) / {fig['exact_bytes'] / 1e6:.1f} MB = {fig['mergekit_bytes'] / fig['exact_bytes']:.2f}x | "
        f"{'yes' if fig['mergekit_bytes'] >= 3 * fig['exact_bytes'] else 'no'} |",
        f"| at base + 25% of expert bytes, value error <= 0.7x random error | {at25['value']:.4f} / "
        f"{at25['random']:.4f} = {ratio:.2f}x | {'yes' if ratio <= 0.7 else 'no'} |",
        "| no run reads more than its budget | checked on every run | yes |",
        "",
        f"Base bytes {fig['base_bytes'] / 1e6:.1f} MB, expert bytes {fig['expert_bytes'] / 1e6:.1f} MB (the exact "
        "merge's reads).",
        "",
        "| budget | policy | budget MB | read MB | blocks dropped | bound on omitted update | relative error | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in fig["rows"]:
        lines.append(
            f"| base + {r['fraction']:.0%} | {r['policy']} | {r['budget'] / 1e6:.1f} | {r['bytes_read'] / 1e6:.1f} | "
            f"{r['dropped']} | {r['bound']} | {r['error']:.4f} | {r['seconds']:.2f} |"
        )
    if image:
        lines += ["", f"![error vs budget]({image})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--data", type=Path, default=Path("bench/data"))
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix=".bench-budget-", dir=args.data.parent if args.data.parent.exists() else None))
    try:
        fig = run(args.preset, args.data, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = plot(fig, args.out.parent / "budget_error.png")
    command = "python -m bench.bench_budget" + (f" --preset {args.preset}" if args.preset != "bench" else "")
    body = render(fig, command, image)
    print(body)
    text = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(replace_section(text, SECTION, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
