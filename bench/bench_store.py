"""Store benchmark (issue 2): size on disk, ingest and export throughput, byte-identical export.

Data: ``bench.modelgen.make_suite(DATA, preset)``: 1 base + 3 LoRA + 3 partial + 2 full bf16 experts
(the ``bench`` preset is 58.5M parameters, ~117 MB per folder, ~1.05 GB in all), cached in DATA.

Every figure is measured next to a baseline on the same files, in the same run:

- size: ``Store.du().total_bytes`` (packs + index + log) / raw bytes of the folders; for comparison,
  plain zstd of every file, independently (no base, no byte grouping);
- ingest: raw input bytes / wall seconds of ingesting all folders into a fresh store through the
  Python API (base first without a base, experts with ``base="base"``; a second fresh store with
  ``base="auto"`` for the experts); baselines: a sequential read + SHA-256 of the same files
  (``cat | sha256sum``-like) and ``safetensors.torch.load_file`` of every weight file;
- export: bytes / wall seconds of exporting all folders; baseline ``shutil.copytree`` of the folders;
- correctness: every exported file has the SHA-256 of its source, same relative paths; fsck is clean.

The inputs are read once before timing, so every figure is with a warm page cache (caches are not
dropped: that is global to the machine). ``os.sync()`` runs before each timed phase so writeback
of one phase does not land in the next. mpstore fsyncs its packs, log and index; export and
copytree do not fsync. Timed phases run ``--repeat`` times; the median is reported.

Usage: ``python -m bench.bench_store [--preset bench] [--data bench/data] [--out bench/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.modelgen import PRESETS, make_suite, param_count
from mpstore.store import Store

SECTION = "## Store (issue 2)"
TARGET_SIZE_RATIO = 0.35
TARGET_INGEST_MBPS = 150.0
TARGET_EXPORT_MBPS = 300.0
CHUNK = 8 << 20
MB = 1e6


# ---------------------------------------------------------------------------- helpers


def folder_files(folder: Path) -> dict[str, Path]:
    """Every regular file under folder, by posix relative path (dotfiles and subfolders included)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            out[path.relative_to(folder).as_posix()] = path
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    return {rel: sha256_file(path) for rel, path in folder_files(folder).items()}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder_files(folder).values())


def compare_folders(src: Path, dst: Path, src_digests: dict[str, str] | None = None) -> list[str]:
    """Differences between two folders (missing/extra files, differing SHA-256); empty if identical."""
    want = src_digests if src_digests is not None else folder_digests(src)
    got = folder_digests(dst)
    problems = [f"{dst.name}: missing {rel}" for rel in sorted(want.keys() - got.keys())]
    problems += [f"{dst.name}: extra {rel}" for rel in sorted(got.keys() - want.keys())]
    problems += [f"{dst.name}: {rel} differs" for rel in sorted(want.keys() & got.keys()) if want[rel] != got[rel]]
    return problems


@dataclass
class Timing:
    wall: float
    cpu: float  # user + system seconds of this process (all threads); kernel writeback not included


def timed(fn: Callable[[], object]) -> tuple[Timing, object]:
    os.sync()  # flush the previous phase's dirty pages so they are not charged to this one
    cpu0, start = os.times(), time.perf_counter()
    value = fn()
    wall, cpu1 = time.perf_counter() - start, os.times()
    return Timing(wall, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)), value


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
                break
    except OSError:
        pass
    import numpy
    import safetensors
    import torch
    import zstandard

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "mem": mem,
        "python": platform.python_version(),
        "libs": f"torch {torch.__version__}, safetensors {safetensors.__version__}, "
        f"zstandard {zstandard.__version__}, numpy {numpy.__version__}",
    }


def suite_order(paths: dict[str, Path]) -> list[str]:
    """base first, then the experts in make_suite order."""
    return ["base"] + [n for n in paths if n != "base"]


# ---------------------------------------------------------------------------- phases


def baseline_read_sha256(files: list[Path]) -> int:
    total = 0
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                total += len(chunk)
    return total


def baseline_load_file(files: list[Path]) -> int:
    """safetensors.torch.load_file of every file, each tensor then cloned into process memory.

    Recent safetensors versions return tensors backed by a lazy mmap of the file: load_file alone
    reads almost nothing, so the clone() is what makes every byte actually get read.
    """
    from safetensors.torch import load_file

    total = 0
    for path in files:
        tensors = {name: t.clone() for name, t in load_file(path).items()}
        total += path.stat().st_size
        del tensors
    return total


def baseline_zstd_size(files: list[Path], level: int) -> int:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level, threads=-1)
    total = 0
    for path in files:
        total += len(compressor.compress(path.read_bytes()))
    return total


def baseline_copytree(paths: dict[str, Path], dest: Path) -> None:
    for name, src in paths.items():
        shutil.copytree(src, dest / name)


@dataclass
class IngestRun:
    seconds: float
    per_model: dict[str, dict] = field(default_factory=dict)
    auto_bases_ok: bool = True


def ingest_all(store_path: Path, paths: dict[str, Path], expert_base: str) -> IngestRun:
    """Ingest base (no base) then every expert with `expert_base` into a fresh store; timed in full."""
    per_model: dict[str, dict] = {}
    start = time.perf_counter()
    with Store.init(store_path) as store:
        base_id = None
        for name in suite_order(paths):
            t0 = time.perf_counter()
            result = store.ingest(paths[name], name=name, base=None if name == "base" else expert_base)
            per_model[name] = {
                "seconds": time.perf_counter() - t0,
                "input_bytes": result.input_bytes,
                "written_bytes": result.written_bytes,
                "blocks": result.blocks,
                "same_as_base": result.blocks_same_as_base,
                "new": result.blocks_new,
                "base_ok": name == "base" or result.base == base_id,
            }
            if name == "base":
                base_id = result.id
    seconds = time.perf_counter() - start
    return IngestRun(seconds, per_model, all(m["base_ok"] for m in per_model.values()))


def export_all(store_path: Path, paths: dict[str, Path], dest: Path) -> dict[str, float]:
    per_model = {}
    with Store.open(store_path) as store:
        for name in suite_order(paths):
            t0 = time.perf_counter()
            store.export(name, dest / name)
            per_model[name] = time.perf_counter() - t0
    return per_model


# ---------------------------------------------------------------------------- report


def replace_section(text: str, section: str, body: str) -> str:
    """`text` with the markdown section titled `section` (up to the next '## ' heading) set to body."""
    block = section + "\n\n" + body.strip() + "\n"
    pattern = re.compile(rf"^{re.escape(section)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        return pattern.sub(lambda _m: block + "\n", text, count=1).rstrip() + "\n"
    if not text.strip():
        text = "# Benchmark results\n"
    return text.rstrip() + "\n\n" + block


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else float("inf")


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


PHASES = {  # key: (label, bytes counted)
    "read": ("read + sha256 (`cat`-like)", "raw"),
    "load": ("safetensors `load_file` + clone", "weights"),
    "copy": ("`shutil.copytree`", "raw"),
    "ingest": ('mpstore ingest, experts `base="base"`', "raw"),
    "auto": ('mpstore ingest, experts `base="auto"`', "raw"),
    "export": ("mpstore export", "raw"),
}


def phase_mbps(fig: dict, key: str) -> float:
    nbytes = fig["raw_bytes"] if PHASES[key][1] == "raw" else fig["weight_bytes"]
    return mbps(nbytes, statistics.median(t.wall for t in fig["timings"][key]))


def render(fig: dict) -> str:
    m = fig["machine"]
    ok = lambda b: "yes" if b else "**NO**"  # noqa: E731
    rate = {key: phase_mbps(fig, key) for key in PHASES}
    lines = [
        f"Measured {fig['date']} on {m['nproc']} cores ({m['cpu']}, {m['mem']}), Python {m['python']}; {m['libs']}.",
        "",
        f"Command: `{fig['command']}`",
        "",
        f"Data: `make_suite(preset={fig['preset']!r})`: {fig['models']} folders (1 base + 3 LoRA + 3 partial + "
        f"2 full experts), {fig['params'] / 1e6:.1f}M bf16 parameters each, {fig['raw_bytes'] / MB:.1f} MB in "
        f"{fig['files']} files. Inputs are page-cached (read once before timing; caches not dropped). "
        f"Each timed phase ran {fig['repeat']} times, interleaved with its baselines; MB/s is from the median "
        "wall time. mpstore fsyncs packs, index and log; export and copytree do not fsync.",
        "",
        "| measure | mpstore | baseline (same run) | mpstore / baseline | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| store size (packs + index + log) / raw bytes | {fig['size_ratio']:.1%} ({fig['store_bytes'] / MB:.1f} MB) "
        f"| zstd-{fig['zstd_level']} of each file: {fig['zstd_ratio']:.1%} ({fig['zstd_bytes'] / MB:.1f} MB) "
        f"| {fig['size_ratio'] / fig['zstd_ratio']:.2f}x | <= {TARGET_SIZE_RATIO:.0%} "
        f"| {ok(fig['size_ratio'] <= TARGET_SIZE_RATIO)} |",
    ]
    for key in ("ingest", "auto"):
        lines.append(
            f'| ingest, experts `base="{"base" if key == "ingest" else "auto"}"` | {rate[key]:.0f} MB/s '
            f"| read+sha256 {rate['read']:.0f} MB/s; load_file+clone {rate['load']:.0f} MB/s "
            f"| {rate[key] / rate['read']:.2f}x; {rate[key] / rate['load']:.2f}x "
            f"| >= {TARGET_INGEST_MBPS:.0f} MB/s | {ok(rate[key] >= TARGET_INGEST_MBPS)} |"
        )
    lines += [
        f"| export | {rate['export']:.0f} MB/s | copytree {rate['copy']:.0f} MB/s "
        f"| {rate['export'] / rate['copy']:.2f}x | >= {TARGET_EXPORT_MBPS:.0f} MB/s "
        f"| {ok(rate['export'] >= TARGET_EXPORT_MBPS)} |",
        f"| byte-identical export (sha256 of every file, same paths) | {fig['identical']}/{fig['models']} folders "
        f"in every run | | | all | {ok(fig['identical'] == fig['models'])} |",
        f'| `base="auto"` picked `base` for every expert | {ok(fig["auto_ok"])} | | | yes | {ok(fig["auto_ok"])} |',
        f"| fsck of the store | {'clean' if fig['fsck_ok'] else 'PROBLEMS'} ({fig['fsck_seconds']:.1f} s) "
        f"| | | clean | {ok(fig['fsck_ok'])} |",
        "",
        "Every timed phase (seconds per run: wall, and CPU = user + system of the process, all threads):",
        "",
        "| phase | MB/s (median) | wall s (median, min-max) | CPU s (median) | CPU s per GB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, (label, counted) in PHASES.items():
        ts = fig["timings"][key]
        walls, cpus = [t.wall for t in ts], [t.cpu for t in ts]
        nbytes = fig["raw_bytes"] if counted == "raw" else fig["weight_bytes"]
        lines.append(
            f"| {label} | {rate[key]:.0f} | {statistics.median(walls):.2f} ({spread(walls)}) "
            f"| {statistics.median(cpus):.2f} | {statistics.median(cpus) / (nbytes / 1e9):.2f} |"
        )
    lines += [
        "",
        'Per model (last run, experts `base="base"`):',
        "",
        "| model | ingest s | ingest MB/s | new blocks | blocks = base | written / raw | export s | export MB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in fig["per_model"].items():
        lines.append(
            f"| {name} | {row['seconds']:.2f} | {mbps(row['input_bytes'], row['seconds']):.0f} | {row['new']} "
            f"| {row['same_as_base']} | {row['written_bytes'] / row['input_bytes']:.1%} "
            f"| {row['export_seconds']:.2f} | {mbps(row['input_bytes'], row['export_seconds']):.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def run(preset: str, data: Path, repeat: int, work: Path | None, log: Callable[[str], None] = print) -> dict:
    """Build or reuse the suite, run every phase `repeat` times, check correctness; returns the figures."""
    paths = make_suite(data, preset=preset, log=log)
    order = suite_order(paths)
    paths = {name: paths[name] for name in order}
    all_files = [p for name in order for p in folder_files(paths[name]).values()]
    weight_files = [p for p in all_files if p.suffix == ".safetensors"]
    raw_bytes = sum(p.stat().st_size for p in all_files)
    digests = {name: folder_digests(paths[name]) for name in order}  # also warms the page cache
    workdir = Path(tempfile.mkdtemp(prefix=".bench-store-", dir=work or data))
    log(f"{len(order)} folders, {raw_bytes / MB:.1f} MB in {len(all_files)} files; work folder {workdir}")

    fig: dict = {
        "preset": preset,
        "models": len(order),
        "files": len(all_files),
        "raw_bytes": raw_bytes,
        "weight_bytes": sum(p.stat().st_size for p in weight_files),
        "params": param_count(PRESETS[preset]),
        "repeat": repeat,
        "identical": len(order),
        "auto_ok": True,
        "timings": {key: [] for key in PHASES},
    }
    timings = fig["timings"]
    try:
        for r in range(repeat):
            run_dir = workdir / f"run{r}"
            run_dir.mkdir()
            t, n = timed(lambda: baseline_read_sha256(all_files))
            assert n == raw_bytes
            timings["read"].append(t)
            timings["load"].append(timed(lambda: baseline_load_file(weight_files))[0])
            timings["copy"].append(timed(lambda: baseline_copytree(paths, run_dir / "copy"))[0])
            shutil.rmtree(run_dir / "copy")

            t, ing = timed(lambda: ingest_all(run_dir / "store", paths, "base"))
            timings["ingest"].append(t)
            t, auto = timed(lambda: ingest_all(run_dir / "store-auto", paths, "auto"))
            timings["auto"].append(t)
            fig["auto_ok"] &= auto.auto_bases_ok
            shutil.rmtree(run_dir / "store-auto")

            t, exp = timed(lambda: export_all(run_dir / "store", paths, run_dir / "export"))
            timings["export"].append(t)
            problems = {n: compare_folders(paths[n], run_dir / "export" / n, digests[n]) for n in order}
            identical = sum(not p for p in problems.values())
            for p in [p for ps in problems.values() for p in ps][:20]:
                log(f"EXPORT MISMATCH {p}")
            fig["identical"] = min(fig["identical"], identical)
            log(
                f"run {r + 1}/{repeat}: "
                + "  ".join(f"{k} {v[-1].wall:.2f}s" for k, v in timings.items())
                + f"  identical {identical}/{len(order)}"
            )
            shutil.rmtree(run_dir / "export")
            if r < repeat - 1:
                shutil.rmtree(run_dir)
            else:
                last_store = run_dir / "store"
                fig["per_model"] = {n: {**ing.per_model[n], "export_seconds": exp[n]} for n in order}

        with Store.open(last_store) as store:
            usage = store.du()
            t0 = time.perf_counter()
            report = store.fsck()
            fig["fsck_seconds"] = time.perf_counter() - t0
        fig["fsck_ok"] = report.ok
        for p in report.problems[:20]:
            log(f"FSCK {p}")
        fig["store_bytes"] = usage.total_bytes
        fig["size_ratio"] = usage.total_bytes / raw_bytes
        fig["zstd_level"] = 1
        fig["zstd_bytes"] = baseline_zstd_size(all_files, fig["zstd_level"])
        fig["zstd_ratio"] = fig["zstd_bytes"] / raw_bytes
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for key in PHASES:
        fig[f"{key}_mbps"] = phase_mbps(fig, key)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="bench")
    parser.add_argument("--data", type=Path, default=Path("bench/data"), help="suite cache (default bench/data)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/RESULTS.md"),
        help="markdown file whose '## Store (issue 2)' section is replaced ('-': none)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timed phase (median reported)")
    parser.add_argument(
        "--work", type=Path, default=None, help="where temporary stores and exports go (default: inside --data)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    fig = run(args.preset, args.data, args.repeat, args.work)
    fig["machine"] = machine()
    fig["date"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    given = sys.argv[1:] if argv is None else argv
    fig["command"] = "python -m bench.bench_store" + "".join(" " + shlex.quote(a) for a in given)
    body = render(fig)
    print()
    print(SECTION)
    print()
    print(body)
    if str(args.out) != "-":
        old = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(replace_section(old, SECTION, body))
        print(f"section {SECTION!r} written to {args.out}")
    targets_met = (
        fig["size_ratio"] <= TARGET_SIZE_RATIO
        and fig["ingest_mbps"] >= TARGET_INGEST_MBPS
        and fig["auto_mbps"] >= TARGET_INGEST_MBPS
        and fig["export_mbps"] >= TARGET_EXPORT_MBPS
    )
    correct = fig["identical"] == fig["models"] and fig["fsck_ok"] and fig["auto_ok"]
    if not correct:
        print("CORRECTNESS FAILURE: see above", file=sys.stderr)
        return 1
    if not targets_met:
        print("note: some throughput/size targets are not met on this machine (see table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
