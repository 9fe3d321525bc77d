"""The `mpstore` command.

Every command that fails on user input prints one line `mpstore: error: ...` and exits non-zero;
no traceback reaches the user for a mistake of theirs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mpstore import MpstoreError, Store, default_store_path
from mpstore.errors import NotFoundError

from .render import ProgressBar, emit_json, human_bytes, short, table, when

EXIT_ERROR = 1


def _folder_size(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in (".git", ".cache")]
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Context:
    def __init__(self, store_path: Path):
        self.store_path = store_path
        self._store: Store | None = None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.store_path)
        return self._store


pass_ctx = click.make_pass_decorator(Context)


class UserError(click.ClickException):
    """An MpstoreError shown as one line, `mpstore: error: ...`, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"mpstore: error: {self.message}", err=True)


class MpstoreGroup(click.Group):
    """Turns the library's errors into one-line messages for every subcommand."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MpstoreError as exc:
            raise UserError(str(exc)) from None
        except BrokenPipeError:
            sys.exit(EXIT_ERROR)


def _parse_size(text: str) -> int:
    units = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "kib": 1024,
        "m": 1000**2,
        "mb": 1000**2,
        "mib": 1024**2,
        "g": 1000**3,
        "gb": 1000**3,
        "gib": 1024**3,
    }
    t = text.strip().lower()
    number = t.rstrip("kmgib")
    unit = t[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size (examples: 1048576, 1MiB, 512KiB)") from None


@click.group(cls=MpstoreGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path),
    default=None,
    envvar="MPSTORE_PATH",
    help="Store folder. Default: $MPSTORE_PATH, else ./.mpstore in the current folder.",
)
@click.version_option(package_name="mergepipe", prog_name="mpstore")
@click.pass_context
def cli(ctx: click.Context, store_path: Path | None) -> None:
    """MergePipe: a parameter store for merging LLMs.

    Ingest a base model and its fine-tuned experts once; identical blocks are stored once and experts
    are kept as compressed XOR deltas of their base. Merge them with mergekit YAML files; every merge
    is a snapshot with its lineage. Every change is an atomic commit.

    \b
    Typical session:
      mpstore init
      mpstore ingest ./llama-base --name base
      mpstore ingest ./llama-math --name experts/math --base base
      mpstore merge merge.yml --explain
      mpstore merge merge.yml --name merged/v1
      mpstore export merged/v1 ./out/merged
      mpstore ls; mpstore log merged/v1; mpstore fsck

    A REF is a name (base, experts/math) or a unique prefix (4+ hex digits) of a snapshot id.
    """
    ctx.obj = Context(store_path or default_store_path())
    ctx.call_on_close(ctx.obj.close)


@cli.command()
@click.option(
    "--block-size", default="1MiB", show_default=True, help="Target size of a block (store-wide, fixed at init)."
)
@click.option(
    "--zstd-level", default=1, show_default=True, type=click.IntRange(1, 19), help="zstd level for block compression."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def init(ctx: Context, block_size: str, zstd_level: int, as_json: bool) -> None:
    """Create an empty store (in a new or empty folder)."""
    store = Store.init(ctx.store_path, block_bytes=_parse_size(block_size), zstd_level=zstd_level)
    if as_json:
        emit_json({"path": str(store.path), "block_bytes": store.block_bytes, "zstd_level": store.zstd_level})
    else:
        click.echo(f"Initialized empty store in {store.path} (blocks of {human_bytes(store.block_bytes)})")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Ref to create for the snapshot, e.g. base or experts/math.")
@click.option(
    "--base",
    help="Base snapshot (a REF, or 'auto' to pick the closest stored model). "
    "Blocks are then stored as XOR deltas and delta statistics are recorded.",
)
@click.option("--force", is_flag=True, help="Move --name if it already points elsewhere.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (no progress bar).")
@pass_ctx
def ingest(ctx: Context, path: Path, name: str | None, base: str | None, force: bool, as_json: bool) -> None:
    """Ingest a Hugging Face model folder at PATH.

    Reads model.safetensors, sharded safetensors with their index, or pytorch_model.bin (loaded
    without unpickling code), and every other file of the folder, subfolders included. Safe to
    interrupt: nothing is visible until the final commit, and a re-run reuses the blocks written.
    """
    store = ctx.store
    with ProgressBar(_folder_size(path) if path.is_dir() else 0, f"ingest {path.name}", not as_json) as bar:
        result = store.ingest(path, name=name, base=base, force=force, progress=bar)
    info = {
        "id": result.id.hex(),
        "name": result.name,
        "base": result.base.hex() if result.base else None,
        "tensors": result.tensors,
        "input_bytes": result.input_bytes,
        "written_bytes": result.written_bytes,
        "blocks": result.blocks,
        "blocks_new": result.blocks_new,
        "blocks_same_as_base": result.blocks_same_as_base,
        "blocks_dedup": result.blocks_dedup,
        "codecs": result.codecs,
        "seconds": round(result.seconds, 3),
    }
    if as_json:
        emit_json(info)
        return
    rate = result.input_bytes / result.seconds / 1e6 if result.seconds else 0
    click.echo(
        f"{short(result.id)} {name or '(no ref)'}: {result.tensors} tensors, "
        f"{human_bytes(result.input_bytes)} read, {human_bytes(result.written_bytes)} written "
        f"({rate:.0f} MB/s)"
    )
    click.echo(
        f"  blocks: {result.blocks} ({result.blocks_new} new, {result.blocks_same_as_base} same as base, "
        f"{result.blocks_dedup} already stored)" + (f"; base {short(result.base)}" if result.base else "")
    )


def _names_by_id(store: Store) -> dict[bytes, list[str]]:
    names: dict[bytes, list[str]] = {}
    for name, sid in sorted(store.refs().items()):
        names.setdefault(sid, []).append(name)
    return names


@cli.command(name="ls")
@click.option("--all", "show_all", is_flag=True, help="Also list snapshots no ref names.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def list_cmd(ctx: Context, show_all: bool, as_json: bool) -> None:
    """List refs and the snapshots they name."""
    store = ctx.store
    names = _names_by_id(store)
    pins = store.pins()
    rows = []
    for info in store.snapshots():
        refs = names.get(info.id, [])
        if not refs and not show_all and info.id not in pins:
            continue
        m = info.manifest
        rows.append(
            {
                "refs": refs,
                "id": info.id.hex(),
                "time": info.time,
                "tensors": len(m.tensors),
                "bytes": m.file_bytes,
                "base": m.base.hex() if m.base else None,
                "pinned": info.id in pins,
                "operation": m.operation.get("op"),
            }
        )
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("No snapshots yet. Add one with: mpstore ingest PATH --name NAME")
        return
    table(
        [
            [
                ", ".join(r["refs"]) or "-",
                r["id"][:12],
                r["operation"] or "",
                str(r["tensors"]),
                human_bytes(r["bytes"]),
                ", ".join(names.get(bytes.fromhex(r["base"]), [r["base"][:12]])) if r["base"] else "-",
                "pinned" if r["pinned"] else "",
                when(r["time"]),
            ]
            for r in rows
        ],
        ["REF", "ID", "OP", "TENSORS", "SIZE", "BASE", "PIN", "CREATED"],
    )


@cli.command()
@click.argument("ref")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (always includes tensors and files).")
@pass_ctx
def show(ctx: Context, ref: str, show_tensors: bool, as_json: bool) -> None:
    """Show one snapshot: its files, tensors, base and lineage."""
    store = ctx.store
    info = store.snapshot(ref)
    m = info.manifest
    names = _names_by_id(store)
    tensors = [
        {
            "name": t.name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "blocks": len(t.blocks),
            "changed_blocks": sum(1 for s in t.delta if s[2]) if t.delta is not None else None,
            "delta_l2": (sum(s[0] ** 2 for s in t.delta) ** 0.5) if t.delta is not None else None,
        }
        for t in m.tensors
    ]
    doc = {
        "id": info.id.hex(),
        "refs": names.get(info.id, []),
        "time": info.time,
        "pinned": info.id in store.pins(),
        "base": m.base.hex() if m.base else None,
        "parents": [p.hex() for p in m.parents],
        "operation": m.operation,
        "block_bytes": m.block_bytes,
        "bytes": m.file_bytes,
        "tensor_bytes": m.tensor_bytes,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in m.files],
        "tensors": tensors,
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(f"snapshot {info.id.hex()}")
    click.echo(f"refs:     {', '.join(doc['refs']) or '-'}")
    click.echo(f"created:  {when(info.time)}" + ("  (pinned)" if doc["pinned"] else ""))
    click.echo(f"base:     {short(m.base)} {', '.join(names.get(m.base, [])) if m.base else ''}".rstrip())
    click.echo(f"op:       {m.operation.get('op', '-')}")
    click.echo(f"size:     {human_bytes(m.file_bytes)} in {len(m.files)} files, {len(m.tensors)} tensors")
    click.echo("files:")
    for f in m.files:
        click.echo(f"  {human_bytes(f.size):>10}  {f.path}")
    if show_tensors:
        click.echo("tensors:")
        table(
            [
                [
                    t["name"],
                    t["dtype"],
                    "x".join(map(str, t["shape"])) or "scalar",
                    str(t["blocks"]),
                    "-" if t["changed_blocks"] is None else f"{t['changed_blocks']}/{t['blocks']}",
                ]
                for t in tensors
            ],
            ["NAME", "DTYPE", "SHAPE", "BLOCKS", "CHANGED"],
        )


@cli.command()
@click.argument("ref")
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option(
    "--shard-size",
    default=None,
    help="Write safetensors weights as new shards of at most this size (e.g. 2GB), with an index; default: as stored.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (no progress bar).")
@pass_ctx
def export(ctx: Context, ref: str, outdir: Path, shard_size: str | None, as_json: bool) -> None:
    """Write snapshot REF as a Hugging Face model folder OUTDIR (new or empty).

    Every file comes back byte for byte as ingested (or as the merge assembled it); every block is
    checked against its id, and each ingested file against its recorded SHA-256.
    """
    store = ctx.store
    manifest = store.manifest(ref)
    shard_bytes = _parse_size(shard_size) if shard_size else None
    with ProgressBar(manifest.file_bytes, f"export {ref}", not as_json) as bar:
        result = store.export(ref, outdir, progress=bar, shard_bytes=shard_bytes)
    if as_json:
        emit_json(
            {
                "id": result.id.hex(),
                "outdir": str(outdir),
                "files": result.files,
                "bytes": result.bytes,
                "seconds": round(result.seconds, 3),
            }
        )
    else:
        rate = result.bytes / result.seconds / 1e6 if result.seconds else 0
        click.echo(
            f"exported {short(result.id)} to {outdir}: {result.files} files, "
            f"{human_bytes(result.bytes)} ({rate:.0f} MB/s)"
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def du(ctx: Context, as_json: bool) -> None:
    """Disk usage of the store, by codec and by snapshot."""
    usage = ctx.store.du()
    if as_json:
        emit_json(usage.as_dict())
        return
    d = usage.as_dict()
    click.echo(
        f"store:    {human_bytes(usage.total_bytes)} on disk (packs {human_bytes(usage.pack_bytes)}, "
        f"index {human_bytes(usage.index_bytes)}, log {human_bytes(usage.log_bytes)})"
    )
    click.echo(
        f"models:   {human_bytes(usage.logical_bytes)} as folders"
        + (f"; stored at {100 * d['ratio']:.1f}% of that" if d["ratio"] else "")
    )
    click.echo(
        f"blocks:   {usage.blocks} distinct, {human_bytes(usage.block_raw_bytes)} raw -> "
        f"{human_bytes(usage.block_stored_bytes)} stored"
    )
    table(
        [
            [
                codec,
                str(v["blocks"]),
                human_bytes(v["raw_bytes"]),
                human_bytes(v["stored_bytes"]),
                f"{v['raw_bytes'] / max(1, v['stored_bytes']):.2f}x",
            ]
            for codec, v in sorted(usage.by_codec.items())
        ],
        ["CODEC", "BLOCKS", "RAW", "STORED", "RATIO"],
    )
    if usage.snapshots:
        click.echo("")
        table(
            [
                [
                    ", ".join(s.refs) or "-",
                    s.id[:12],
                    human_bytes(s.logical_bytes),
                    human_bytes(s.stored_bytes),
                    human_bytes(s.exclusive_bytes),
                ]
                for s in usage.snapshots
            ],
            ["REF", "ID", "LOGICAL", "REFERENCED", "EXCLUSIVE"],
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def fsck(ctx: Context, as_json: bool) -> None:
    """Verify every record and re-hash every reachable block; exits 1 on damage."""
    store = ctx.store
    with ProgressBar(store.du().block_stored_bytes, "fsck", not as_json) as bar:
        report = store.fsck(progress=bar)
    if as_json:
        emit_json(report.as_dict())
    else:
        for problem in report.problems:
            click.echo(f"DAMAGE: {problem}")
        click.echo(
            f"{'ok' if report.ok else 'damaged'}: {report.snapshots} snapshots, {report.packs} packs, "
            f"{report.blocks_checked} blocks ({human_bytes(report.bytes_checked)}) checked, "
            f"{len(report.problems)} problems"
        )
    if not report.ok:
        sys.exit(EXIT_ERROR)


@cli.command()
@pass_ctx
def reindex(ctx: Context) -> None:
    """Rebuild the index from the pack files and the manifest log (after index/ was lost or damaged)."""
    count = ctx.store.rebuild_index()
    click.echo(f"index rebuilt: {count} blocks, {len(ctx.store.index.snapshot_ids())} snapshots")


@cli.command()
@click.argument("ref", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--dot", is_flag=True, help="Print the lineage graph in Graphviz dot format.")
@pass_ctx
def log(ctx: Context, ref: str | None, as_json: bool, dot: bool) -> None:
    """Show the lineage of REF (its parents, back to the roots), or every snapshot when no REF is given."""
    store = ctx.store
    names = _names_by_id(store)
    if ref is None:
        chain = list(reversed(store.snapshots()))
    else:
        chain, seen, todo = [], set(), [store.resolve(ref)]
        while todo:
            sid = todo.pop(0)
            if sid in seen:
                continue
            seen.add(sid)
            try:
                info = store.snapshot(sid)
            except NotFoundError:
                continue
            chain.append(info)
            todo.extend(info.manifest.parents)
    docs = [
        {
            "id": i.id.hex(),
            "refs": names.get(i.id, []),
            "time": i.time,
            "operation": i.manifest.operation,
            "parents": [p.hex() for p in i.manifest.parents],
        }
        for i in chain
    ]
    if as_json:
        emit_json(docs)
        return
    if dot:
        click.echo("digraph lineage {")
        click.echo("  rankdir=BT; node [shape=box, fontname=monospace];")
        for d in docs:
            op = d["operation"]
            what = op.get("method", op.get("op", "?"))
            label = "\\n".join([d["id"][:12], *d["refs"], what])
            click.echo(f'  "{d["id"][:12]}" [label="{label}"];')
            for p in d["parents"]:
                click.echo(f'  "{d["id"][:12]}" -> "{p[:12]}";')
        click.echo("}")
        return
    for d in docs:
        parents = ", ".join(p[:12] for p in d["parents"]) or "(root)"
        label = f" ({', '.join(d['refs'])})" if d["refs"] else ""
        op = d["operation"]
        what = op.get("op", "?") + (f" {op['method']}" if "method" in op else "")
        click.echo(f"{d['id'][:12]}{label}  {when(d['time'])}  {what}  parents: {parents}")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--name", help="Ref to create for the merged snapshot, e.g. merged/v1.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of randomized methods (dare_*, della*): the same seed gives the same merge.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Where the arithmetic runs: cpu (task arithmetic, ties and dare by fused kernels), cuda (torch, "
    "blocks copied through pinned memory; same results within float32 rounding), auto (cuda if present).",
)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest safetensors shard of the output.")
@click.option(
    "--io-budget",
    default=None,
    help="Hard cap on the bytes read from the store (800MB, 2GiB or bytes). Expert blocks worth least "
    "per byte are left out (taken as the base's) and the bound on the omitted update is reported.",
)
@click.option(
    "--budget-policy",
    type=click.Choice(["value", "random"]),
    default="value",
    show_default=True,
    help="Which expert blocks a budget drops: least |weight| x delta norm per byte, or at random (baseline).",
)
@click.option(
    "--explain", is_flag=True, help="Print the plan (per tensor: operator, inputs, parameters); read no data."
)
@click.option("--force", is_flag=True, help="Move --name if it already points elsewhere.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (or the plan) as JSON; no progress bar.")
@pass_ctx
def merge(
    ctx: Context,
    config: Path,
    name: str | None,
    seed: int,
    device: str,
    shard_size: str,
    io_budget: str | None,
    budget_policy: str,
    explain: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Merge models as a mergekit YAML CONFIG says, and commit the result as a snapshot.

    CONFIG is a mergekit configuration, unchanged (merge_method, base_model, models or slices,
    parameters with gradients and filters, dtype, out_dtype, tokenizer_source). A model is a store
    ref, a snapshot id, or a model folder (ingested first, with its base detected). Without `dtype`,
    arithmetic runs in float32 (mergekit would use the inputs' dtype). The snapshot records the YAML,
    the resolved parameters, the input snapshot ids, the seed and the engine version.
    """
    from mpexec.merge import plan_merge, run_merge

    try:
        text = config.read_text()
    except OSError as exc:
        raise UserError(f"{config}: cannot read: {exc.strerror}") from None
    store = ctx.store

    def notify(model: str) -> None:
        if not as_json:
            click.echo(f"ingesting {model} (not in the store, or changed since its ingest)", err=True)

    plan = plan_merge(store, text, source=str(config), config_dir=config.parent, ingest=not explain, on_ingest=notify)
    budget_report = None
    if io_budget is not None:
        from mpexec.budget import apply_budget

        budget_report = apply_budget(store, plan, _parse_size(io_budget), budget_policy, seed)
    if explain:
        from mpexec.cost import explain_costs

        costs = explain_costs(store, plan)
        rows = [{**tp.describe(), **costs["tensors"][tp.name]} for tp in plan.tensors]
        doc = {
            "method": plan.method.name,
            "base_model": plan.base,
            "inputs": {m: sid.hex() for m, sid in plan.models.items()},
            **{k: v for k, v in costs.items() if k != "tensors"},
            "budget": budget_report,
            "tensors": rows,
        }
        if as_json:
            emit_json(doc)
            return
        click.echo(f"merge_method: {plan.method.name}; base: {plan.base or '-'}; {len(rows)} output tensors")
        skipped = costs["estimated_blocks_skipped"]
        if budget_report:
            click.echo(
                f"budget: {human_bytes(budget_report['io_budget'])} ({budget_report['policy']}); dropped "
                f"{budget_report['dropped_blocks']} expert blocks, bound on the omitted update "
                f"{budget_report['error_bound']}"
            )
        click.echo(
            f"estimated: read {human_bytes(costs['estimated_bytes_read'])} (base "
            f"{human_bytes(costs['estimated_bytes_read_base'])}, experts "
            f"{human_bytes(costs['estimated_bytes_read_experts'])}), {costs['estimated_blocks_read']} blocks; "
            f"skip {skipped['same_as_base']} same as base, {skipped['shared']} shared; output "
            f"{human_bytes(costs['estimated_output_bytes'])}; about {costs['estimated_seconds']:.1f} s"
        )
        for m, sid in plan.models.items():
            click.echo(f"  input {m} = {short(sid)}")
        for tp in plan.tensors:
            op = "copy" if tp.copy_from is not None else plan.method.name
            shared = ", ".join(f"{k}={v}" for k, v in tp.shared.items())
            cost = costs["tensors"][tp.name]
            click.echo(
                f"{tp.name} [{'x'.join(map(str, tp.shape))} {tp.out_dtype}] {op}"
                + (f" ({shared})" if shared else "")
                + f"  {cost['mode']}, reads {human_bytes(cost['bytes_read'])}"
            )
            for k, inp in enumerate(tp.inputs):
                params = ", ".join(f"{p}={v}" for p, v in tp.per_input[k].items())
                mark = " (base)" if k == tp.base_index else ""
                click.echo(f"    {inp.model}{mark}: {inp.tensor}" + (f"  {params}" if params else ""))
        return
    with ProgressBar(len(plan.tensors), "merge", not as_json, unit="tensor") as bar:
        result = run_merge(
            store,
            plan,
            name,
            seed=seed,
            device=device,
            shard_bytes=_parse_size(shard_size),
            force=force,
            progress=lambda _t: bar(1),
        )
    if as_json:
        emit_json({**result.as_dict(), "budget": budget_report})
        return
    if budget_report and budget_report["dropped_blocks"]:
        click.echo(
            f"budget {human_bytes(budget_report['io_budget'])}: dropped {budget_report['dropped_blocks']} expert "
            f"blocks ({budget_report['policy']}); bound on the omitted update: {budget_report['error_bound']}"
        )
    click.echo(
        f"{short(result.id)} {name or '(no ref)'}: {plan.method.name} of {len(plan.models)} models, "
        f"{result.tensors} tensors in {result.seconds:.1f} s"
    )
    click.echo(
        f"  read {human_bytes(result.bytes_read)} (base {human_bytes(result.bytes_read_base)}, experts "
        f"{human_bytes(result.bytes_read_experts)}), {result.blocks_read} blocks; skipped "
        f"{result.blocks_skipped['same_as_base']} same as base, {result.blocks_skipped['shared']} shared, "
        f"{result.blocks_skipped['dropped']} dropped; wrote {human_bytes(result.written_bytes)}"
    )


@cli.command()
@click.option("--no-wait", is_flag=True, help="Fail instead of waiting for running ingests and merges.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def gc(ctx: Context, no_wait: bool, as_json: bool) -> None:
    """Delete snapshots and blocks that no ref or pin reaches, and report the bytes freed.

    Safe to interrupt at any point. Waits for running ingests and merges to commit first.
    """
    report = ctx.store.gc(wait=not no_wait)
    if as_json:
        emit_json(report.as_dict())
        return
    click.echo(
        f"removed {report.snapshots_removed} snapshots and {report.blocks_removed} blocks; rewrote "
        f"{report.packs_rewritten} packs, deleted {report.orphan_packs_removed} orphan packs; "
        f"freed {human_bytes(report.bytes_freed)}"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the rates as JSON.")
@pass_ctx
def calibrate(ctx: Context, as_json: bool) -> None:
    """Measure this machine's read, decode, encode and compute rates for the cost model.

    The rates are kept in the store (calibration.json) and used by `merge --explain`'s estimates.
    """
    from mpexec.cost import calibrate as run_calibration

    rates = run_calibration(ctx.store)
    if as_json:
        emit_json(rates)
        return
    for key, value in rates.items():
        click.echo(f"{key:24} {value / 1e6:10.1f} M/s")


@cli.command()
@click.argument("ref")
@pass_ctx
def pin(ctx: Context, ref: str) -> None:
    """Protect snapshot REF from gc, whether or not a ref names it."""
    sid = ctx.store.pin(ref)
    click.echo(f"pinned {short(sid)}")


@cli.command()
@click.argument("ref")
@pass_ctx
def unpin(ctx: Context, ref: str) -> None:
    """Remove the pin of snapshot REF."""
    sid = ctx.store.unpin(ref)
    click.echo(f"unpinned {short(sid)}")


@cli.group(cls=MpstoreGroup)
def ref() -> None:
    """Create, move, rename and delete refs (names for snapshots)."""


@ref.command(name="set")
@click.argument("name")
@click.argument("target")
@click.option("--force", is_flag=True, help="Move NAME if it already points elsewhere.")
@pass_ctx
def ref_set(ctx: Context, name: str, target: str, force: bool) -> None:
    """Point ref NAME at snapshot TARGET (a REF)."""
    sid = ctx.store.set_ref(name, target, force=force)
    click.echo(f"{name} -> {short(sid)}")


@ref.command(name="rm")
@click.argument("name")
@pass_ctx
def ref_rm(ctx: Context, name: str) -> None:
    """Delete ref NAME (the snapshot stays until gc, if nothing else reaches it)."""
    sid = ctx.store.delete_ref(name)
    click.echo(f"deleted {name} (was {short(sid)})")


@ref.command(name="mv")
@click.argument("old")
@click.argument("new")
@pass_ctx
def ref_mv(ctx: Context, old: str, new: str) -> None:
    """Rename ref OLD to NEW, atomically."""
    sid = ctx.store.rename_ref(old, new)
    click.echo(f"{old} -> {new} ({short(sid)})")


def main() -> None:
    cli.main(prog_name="mpstore")


if __name__ == "__main__":
    main()
