"""Merge benchmark (issues 3-5, baseline): `mergekit-yaml` and `mpstore merge`, the same YAML, side by side.

Data: ``bench.modelgen.make_suite(DATA, preset)``: 1 base + bf16 experts of three kinds (LoRA, partial,
full), 3/3/2 of them (the store benchmark's suite) or 3k/3k/2k when more than 8 experts are asked for
(16: 6/6/4). The N experts of a merge are taken round-robin over the kinds (lora-0, partial-0, full-0,
lora-1, ...), so 8 is the whole 3/3/2 suite. Every folder is ingested once into a fresh store (timed,
reported apart; experts with ``base="base"``). Right before every timed run the case's input folders
and the store's files are read (warm page cache, as in bench_store; this machine pages out file pages
left unused for about a minute, so reading them once at the start is not enough).

Cases: task_arithmetic (weight 1/N), ties and dare_ties (density 0.5, weight 1/N; dare with seed 0 in
both tools), for each N of ``--experts``; slerp of the base and one full expert (t 0.5) once. No
``dtype`` key: mergekit computes in the inputs' dtype (bf16), mpstore in float32; both write bf16.
One YAML text per case, model values absolute folder paths, is what both tools run: mpstore finds the
folders ingested already and unchanged (mpstore.folders, by stat data) and reads none of them again.
A second YAML that differs only in the model values (the store's ref names) is also run through mpstore
once per case and reported apart.

Each tool runs as a whole process (interpreter start-up and imports included), ``--repeat`` times per
case, the two tools interleaved (alternating which goes first); ``os.sync()`` before each run. Measured
per run: wall seconds (until the process exits), peak RSS (``ru_maxrss`` of that child from
``wait4``, what ``/usr/bin/time -f %M`` reports), and ``rchar`` of /proc/PID/io read when the process
has exited but is not reaped yet (exact; polled while it runs as a fallback). ``rchar`` counts
``read()``/``pread()`` bytes only: safetensors (so mergekit) maps files into memory, which it does not
count, so mergekit's input is also given as the sum of its input safetensors files, which it reads in
full. mpstore also reports its own ``bytes_read`` (pack bytes it read). The median of the runs is
reported. After the runs the last outputs of both tools are compared tensor by tensor.

Usage: ``python -m bench.bench_merge [--preset bench] [--experts 2,4,8]
[--methods task_arithmetic,ties,dare_ties,slerp] [--data bench/data] [--out bench/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.bench_store import baseline_read_sha256, folder_files, ingest_all, machine, replace_section
from bench.modelgen import PRESETS, make_suite, param_count
from mpstore.store import Store

SECTION = "## Merge (issue 5)"
METHODS = ("task_arithmetic", "ties", "dare_ties", "slerp")
KINDS = ("lora", "partial", "full")
PLOT_TIME = "merge_time.png"
PLOT_IO = "merge_io.png"
MB = 1e6
GIB = 1 << 30
# Issue 5's targets: speedups over mergekit for 8 experts, whole processes; peak RSS.
TARGET_SPEEDUPS = {"task_arithmetic": 10.0, "ties": 12.0, "dare_ties": 10.0}
TARGET_RSS = GIB
TARGET_IO_RATIO = 3.0  # mergekit bytes / mpstore bytes_read, task_arithmetic of 8 experts


# ---------------------------------------------------------------------------- data and YAML


def suite_counts(max_experts: int) -> tuple[int, int, int]:
    """(n_lora, n_partial, n_full) of the suite: 3/3/2, scaled up by whole multiples for more experts."""
    k = max(1, math.ceil(max_experts / 8))
    return 3 * k, 3 * k, 2 * k


def pick_experts(paths: dict[str, Path], n: int) -> list[str]:
    """n expert names taken round-robin over the kinds: lora-0, partial-0, full-0, lora-1, ..."""
    by_kind = {
        kind: sorted((name for name in paths if name.startswith(kind + "-")), key=lambda s: int(s.rsplit("-", 1)[1]))
        for kind in KINDS
    }
    out: list[str] = []
    for i in range(max(len(v) for v in by_kind.values())):
        out += [names[i] for names in by_kind.values() if i < len(names)]
    if n > len(out):
        raise ValueError(f"{n} experts asked for, the suite has {len(out)}")
    return out[:n]


def _scalar(value: str) -> str:
    return value if re.fullmatch(r"[\w./-]+", value) else json.dumps(value)


def merge_yaml(method: str, base: str, experts: list[str], dtype: str | None = None) -> str:
    """mergekit YAML of one case; base and experts are the `model:` values, written as they are."""
    n = len(experts)
    if method == "slerp":
        if n != 1:
            raise ValueError("slerp merges the base and one expert")
        lines = [
            "merge_method: slerp",
            f"base_model: {_scalar(base)}",
            "models:",
            f"  - model: {_scalar(base)}",
            f"  - model: {_scalar(experts[0])}",
            "parameters:",
            "  t: 0.5",
        ]
    else:
        params = {
            "task_arithmetic": f"weight: {1 / n!r}",
            "ties": f"density: 0.5, weight: {1 / n!r}",
            "dare_ties": f"density: 0.5, weight: {1 / n!r}",
        }[method]
        lines = [f"merge_method: {method}", f"base_model: {_scalar(base)}", "models:"]
        for e in experts:
            lines += [f"  - model: {_scalar(e)}", f"    parameters: {{{params}}}"]
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    method: str
    experts: list[str]  # suite names
    n: int = field(init=False)

    def __post_init__(self):
        self.n = len(self.experts)

    @property
    def key(self) -> str:
        return f"{self.method}-{self.n}"


def cases_for(methods: list[str], experts: list[int], paths: dict[str, Path]) -> list[Case]:
    out = []
    for method in methods:
        if method == "slerp":
            full = [name for name in pick_experts(paths, len(paths) - 1) if name.startswith("full-")][0]
            out.append(Case(method, [full]))
        else:
            out += [Case(method, pick_experts(paths, n)) for n in experts]
    return out


# ---------------------------------------------------------------------------- one measured process


@dataclass
class ProcRun:
    wall: float
    maxrss: int  # bytes
    rchar: int
    rchar_exact: bool  # read after exit (zombie) rather than the last poll
    returncode: int
    stdout: str
    stderr: str


# Runs in a fresh interpreter (no site, a few MB resident) that spawns the measured command. A child
# inherits, in ru_maxrss, the peak RSS of the process it was forked from (Linux carries the old mm's
# high-water mark over exec), so spawning straight from this benchmark process, which holds hundreds of
# MB, would report that instead of the tool's own peak. The launcher waits for the exit without reaping
# (waitid WNOWAIT), so /proc/PID/io still holds the final rchar, then reaps it with wait4 for rusage.
LAUNCHER = r"""
import json, os, sys, threading, time
result, cmd = sys.argv[1], sys.argv[2:]

def rchar(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None

start = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
last, done = [0], threading.Event()

def sample():
    while not done.is_set():
        value = rchar(pid)
        if value is not None:
            last[0] = value
        done.wait(0.05)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
wall = time.perf_counter() - start
done.set()
sampler.join()
final = rchar(pid)
_, status, usage = os.wait4(pid, 0)
with open(result, "w") as f:
    json.dump({"wall": wall, "maxrss": usage.ru_maxrss * 1024, "rchar": last[0] if final is None else final,
               "rchar_exact": final is not None, "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> ProcRun:
    """Run cmd to completion: wall seconds, peak RSS (wait4) and rchar of /proc/PID/io at exit."""
    os.sync()  # the previous run's dirty pages are not charged to this one
    with tempfile.TemporaryDirectory(prefix="bench-merge-run-") as tmp:
        out, err, result = Path(tmp) / "stdout", Path(tmp) / "stderr", Path(tmp) / "result.json"
        with open(out, "w") as fo, open(err, "w") as fe:
            launcher = subprocess.run(
                [sys.executable, "-S", "-c", LAUNCHER, str(result), *cmd], stdout=fo, stderr=fe, env=env
            )
        if launcher.returncode != 0 or not result.exists():
            raise RuntimeError(f"launcher failed for {shlex.join(cmd)}:\n{err.read_text()[-3000:]}")
        r = json.loads(result.read_text())
        return ProcRun(
            r["wall"], r["maxrss"], r["rchar"], r["rchar_exact"], r["returncode"], out.read_text(), err.read_text()
        )


def warm(files: list[Path]) -> None:
    """Read files into the page cache. This machine pages out file pages unused for about a minute
    (DAMON reclaim), so inputs are read again right before every timed run."""
    for path in files:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def _shown(cmd: list[str], workdir: Path) -> str:
    """cmd as the report shows it: the program's name only, the temporary folder as $WORK."""
    return shlex.join([Path(cmd[0]).name] + cmd[1:]).replace(str(workdir), "$WORK")


def drop_output(mpstore_exe: str, store_path: Path, refs: list[str]) -> None:
    """Remove previous runs' merged snapshots of a case (both YAML variants: their blocks are the same)
    and collect their blocks, so the next run writes them again (a merge that finds its output stored
    already writes nothing: timing that would flatter mpstore)."""
    for ref in refs:
        subprocess.run([mpstore_exe, "--store", str(store_path), "ref", "rm", ref], capture_output=True)
    subprocess.run([mpstore_exe, "--store", str(store_path), "gc", "--json"], capture_output=True, check=True)


def code_version() -> str:
    """The commit the merge code was measured at, and whether mpstore/mpexec/mpcli had local changes."""
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            git + ["status", "--porcelain", "--", "mpstore", "mpexec", "mpcli"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + (" (with local changes to mpstore/mpexec/mpcli)" if dirty else "")


def tool(name: str) -> str:
    """A console script of this interpreter's environment, else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (install the mergekit extra: pip install -e '.[mergekit]')")
    return found


# ---------------------------------------------------------------------------- comparison


def compare_outputs(mergekit_dir: Path, store: Store, ref: str) -> dict:
    """Tensor-by-tensor agreement of mergekit's output folder and mpstore's merged snapshot.

    bad_f32: elements outside the parity suite's float32 tolerance (1e-5 relative + 1e-6 of the
    tensor's largest magnitude); beyond_ulp: bf16 elements more than one bf16 ulp apart.
    """
    import torch
    from safetensors.torch import load_file

    theirs: dict[str, torch.Tensor] = {}
    for f in sorted(mergekit_dir.glob("*.safetensors")):
        theirs.update(load_file(f))
    ours = dict(store.tensors(ref))
    out = {
        "tensors": len(theirs),
        "names_match": set(ours) == set(theirs),
        "dtype_shape_match": True,
        "elements": 0,
        "bad_f32": 0,
        "beyond_ulp": 0,
        "max_abs": 0.0,
    }
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            out["dtype_shape_match"] = False
            continue
        out["elements"] += b.numel()
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs()
        scale = b64.abs().max().clamp(min=1e-30)
        out["bad_f32"] += int((diff > 1e-5 * b64.abs() + 1e-6 * scale).sum())
        out["max_abs"] = max(out["max_abs"], float(diff.max()) if diff.numel() else 0.0)
        if a.dtype == torch.bfloat16:
            out["beyond_ulp"] += int(((a.view(torch.int16).int() - b.view(torch.int16).int()).abs() > 1).sum())
    return out


# ---------------------------------------------------------------------------- the benchmark


def run(
    preset: str,
    data: Path,
    experts: list[int],
    methods: list[str],
    repeat: int,
    work: Path | None = None,
    dtype: str | None = None,
    scale_preset: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build or reuse the suite, ingest it, run every case `repeat` times with both tools; the figures."""
    n_lora, n_partial, n_full = suite_counts(max(experts))
    paths = make_suite(data, preset=preset, n_lora=n_lora, n_partial=n_partial, n_full=n_full, log=log)
    paths = {name: Path(p).resolve() for name, p in paths.items()}
    cases = cases_for(methods, experts, paths)
    used = ["base"] + sorted({e for c in cases for e in c.experts}, key=list(paths).index)
    used_paths = {name: paths[name] for name in used}
    weights = {
        name: sum(p.stat().st_size for p in folder_files(paths[name]).values() if p.suffix == ".safetensors")
        for name in used
    }
    all_files = [p for name in used for p in folder_files(paths[name]).values()]
    baseline_read_sha256(all_files)  # warm the page cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    mergekit_exe, mpstore_exe = tool("mergekit-yaml"), tool("mpstore")
    workdir = Path(tempfile.mkdtemp(prefix=".bench-merge-", dir=work or data))
    store_path = workdir / "store"
    fig: dict = {
        "preset": preset,
        "params": param_count(PRESETS[preset]),
        "experts": experts,
        "methods": methods,
        "suite": (n_lora, n_partial, n_full),
        "repeat": repeat,
        "dtype": dtype,
        "load_at_start": os.getloadavg()[0],
        "code": code_version(),
        "rows": [],
    }
    try:
        log(f"ingesting {len(used)} folders into {store_path}")
        ing = ingest_all(store_path, used_paths, "base")
        with Store.open(store_path) as store:
            fig["store_bytes_after_ingest"] = store.du().total_bytes
        fig["ingest"] = {
            "seconds": ing.seconds,
            "folders": len(used),
            "input_bytes": sum(m["input_bytes"] for m in ing.per_model.values()),
            "written_bytes": sum(m["written_bytes"] for m in ing.per_model.values()),
        }
        log(f"ingest: {ing.seconds:.2f} s, {fig['ingest']['input_bytes'] / MB:.1f} MB")

        floors = {"mergekit": [], "mpstore": []}  # interpreter + imports only
        floor_cmds = {
            "mergekit": [sys.executable, "-c", "import mergekit.merge, mergekit.config, torch"],
            "mpstore": [
                sys.executable,
                "-c",
                "import mpcli.main, mpexec.merge, torch; from mpexec import kernels; kernels.warm_up()",
            ],
        }

        specs = []
        for case in cases:
            text = merge_yaml(case.method, str(paths["base"]), [str(paths[e]) for e in case.experts], dtype)
            ref_text = merge_yaml(case.method, "base", case.experts, dtype)
            yml, ref_yml = workdir / f"{case.key}.yml", workdir / f"{case.key}.refs.yml"
            yml.write_text(text)
            ref_yml.write_text(ref_text)
            seed_mk = ["--random-seed", "0"] if case.method == "dare_ties" else []
            seed_mp = ["--seed", "0"] if case.method == "dare_ties" else []
            out_dir = workdir / f"out-{case.key}"
            name = f"m-{case.key}"
            specs.append(
                {
                    "case": case,
                    "out": out_dir,
                    "ref": name,
                    "mergekit": [mergekit_exe, str(yml), str(out_dir), "--no-copy-tokenizer", "--quiet"] + seed_mk,
                    "mpstore": [
                        mpstore_exe,
                        "--store",
                        str(store_path),
                        "merge",
                        str(yml),
                        "--name",
                        name,
                        "--force",
                        "--json",
                    ]
                    + seed_mp,
                    "mpstore_refs": [
                        mpstore_exe,
                        "--store",
                        str(store_path),
                        "merge",
                        str(ref_yml),
                        "--name",
                        name + "-refs",
                        "--force",
                        "--json",
                    ]
                    + seed_mp,
                    "runs": {"mergekit": [], "mpstore": []},
                    "json": None,
                    "input_bytes": sum(weights[m] for m in ["base"] + case.experts),
                    "files": [p for m in ["base"] + case.experts for p in folder_files(paths[m]).values()],
                    "reads": [],
                }
            )
        fig["example_yaml"] = {
            "mergekit": (workdir / f"{cases[0].key}.yml").read_text(),
            "mpstore": (workdir / f"{cases[0].key}.refs.yml").read_text(),
        }
        fig["commands"] = {who: _shown(specs[0][who], workdir) for who in ("mergekit", "mpstore")}

        def once(spec: dict, who: str) -> ProcRun:
            if who == "mergekit" and spec["out"].exists():
                shutil.rmtree(spec["out"])
            if who.startswith("mpstore"):  # the merge writes its output afresh, as mergekit does
                drop_output(mpstore_exe, store_path, [spec["ref"], spec["ref"] + "-refs"])
            warm(spec["files"] + [p for p in sorted(store_path.rglob("*")) if p.is_file()])
            r = run_measured(spec[who], env)
            if r.returncode != 0:
                raise RuntimeError(f"{shlex.join(spec[who])} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            return r

        for r in range(repeat):
            order = ("mergekit", "mpstore") if r % 2 == 0 else ("mpstore", "mergekit")
            for who in order:
                floors[who].append(run_measured(floor_cmds[who], env))
            for spec in specs:
                for who in order:
                    pr = once(spec, who)
                    spec["runs"][who].append(pr)
                    if who == "mpstore":
                        spec["json"] = json.loads(pr.stdout)
                        spec["reads"].append(spec["json"]["bytes_read"])
                mk, mp = spec["runs"]["mergekit"][-1], spec["runs"]["mpstore"][-1]
                log(
                    f"run {r + 1}/{repeat} {spec['case'].key:<18} mergekit {mk.wall:6.2f} s "
                    f"{mk.maxrss / MB:6.0f} MB  mpstore {mp.wall:6.2f} s {mp.maxrss / MB:6.0f} MB "
                    f"read {spec['json']['bytes_read'] / MB:.1f} MB"
                )

        with Store.open(store_path) as store:
            for spec in specs:
                case = spec["case"]
                agree = compare_outputs(spec["out"], store, spec["ref"])
                refs_run = once(spec, "mpstore_refs")  # the YAML naming the store's refs, output fresh too
                mk, mp = spec["runs"]["mergekit"], spec["runs"]["mpstore"]
                med = lambda runs, attr: statistics.median(getattr(x, attr) for x in runs)  # noqa: E731
                fig["rows"].append(
                    {
                        "method": case.method,
                        "n": case.n,
                        "experts": case.experts,
                        "mergekit_s": med(mk, "wall"),
                        "mpstore_s": med(mp, "wall"),
                        "mergekit_walls": [x.wall for x in mk],
                        "mpstore_walls": [x.wall for x in mp],
                        "mergekit_rss": med(mk, "maxrss"),
                        "mpstore_rss": med(mp, "maxrss"),
                        "mergekit_rchar": med(mk, "rchar"),
                        "mpstore_rchar": med(mp, "rchar"),
                        "rchar_exact": all(x.rchar_exact for x in mk + mp),
                        "input_bytes": spec["input_bytes"],
                        "mpstore": spec["json"],
                        "bytes_read_runs": spec["reads"],
                        "refs_s": refs_run.wall,
                        "refs_rss": refs_run.maxrss,
                        "refs_rchar": refs_run.rchar,
                        "refs_bytes_read": json.loads(refs_run.stdout)["bytes_read"],
                        "agree": agree,
                    }
                )
                log(
                    f"{case.key:<18} refs YAML mpstore {refs_run.wall:.2f} s; outputs: "
                    f"{agree['tensors']} tensors, max |diff| {agree['max_abs']:.3g}, "
                    f"{agree['beyond_ulp']} bf16 elements > 1 ulp apart, {agree['bad_f32']} outside f32 tolerance"
                )
            fig["store_bytes_after"] = store.du().total_bytes
        ties8 = next((spec for spec in specs if spec["case"].key == "ties-8"), None)
        if ties8 is not None:
            fig["pipeline"] = pipeline(mpstore_exe, workdir, paths, ties8, env, log)
        if scale_preset:
            fig["scaling"] = scaling(scale_preset, data, workdir, mpstore_exe, env, log)
        fig["floors"] = {
            who: {
                "wall": statistics.median(x.wall for x in runs),
                "maxrss": statistics.median(x.maxrss for x in runs),
                "rchar": statistics.median(x.rchar for x in runs),
            }
            for who, runs in floors.items()
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if (now := code_version()) != fig["code"]:
        log(f"WARNING: the code changed during the run ({fig['code']} -> {now})")
        fig["code"] += f" at the start, {now} at the end (it changed during the run)"
    return fig


def pipeline(mpstore_exe: str, workdir: Path, paths: dict[str, Path], ties8: dict, env, log) -> dict:
    """Issue 5: ingest of the nine models (base + the 8 experts) into a new store plus one ties merge of
    the 8, all as `mpstore` commands (start-up included), against mergekit's single ties merge."""
    store = workdir / "pipeline-store"
    names = ["base"] + ties8["case"].experts
    warm([p for name in names for p in folder_files(paths[name]).values()])
    steps = [("init", [mpstore_exe, "--store", str(store), "init"])]
    for name in names:
        base = [] if name == "base" else ["--base", "base"]
        steps.append(
            (f"ingest {name}", [mpstore_exe, "--store", str(store), "ingest", str(paths[name]), "--name", name] + base)
        )
    yml = workdir / f"{ties8['case'].key}.yml"  # mergekit's YAML: the folders just ingested
    steps.append(("merge ties-8", [mpstore_exe, "--store", str(store), "merge", str(yml), "--name", "p", "--json"]))
    walls = {}
    for label, cmd in steps:
        r = run_measured(cmd, env)
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        walls[label] = r.wall
    total = sum(walls.values())
    mergekit = statistics.median(x.wall for x in ties8["runs"]["mergekit"])
    log(f"pipeline: init + ingest of {len(names)} + ties-8 merge {total:.2f} s; mergekit ties-8 {mergekit:.2f} s")
    return {"walls": walls, "total": total, "mergekit": mergekit}


def scaling(preset: str, data: Path, workdir: Path, mpstore_exe: str, env, log) -> dict:
    """Peak RSS and wall of mpstore's 8-expert merges on a bigger model (fresh store, outputs new)."""
    paths = make_suite(data.parent / f"{data.name}-{preset}", preset=preset, n_lora=3, n_partial=3, n_full=2, log=log)
    paths = {name: Path(p).resolve() for name, p in paths.items()}
    store = workdir / "scale-store"
    ing = ingest_all(store, paths, "base")
    experts = pick_experts(paths, 8)
    out = {"preset": preset, "params": param_count(PRESETS[preset]), "ingest_s": ing.seconds, "rows": {}}
    for method in ("task_arithmetic", "ties"):
        yml = workdir / f"scale-{method}.yml"
        yml.write_text(merge_yaml(method, "base", experts))
        warm([p for p in sorted(store.rglob("*")) if p.is_file()])
        r = run_measured([mpstore_exe, "--store", str(store), "merge", str(yml), "--name", method, "--json"], env)
        if r.returncode != 0:
            raise RuntimeError(f"scaling merge failed ({r.returncode}):\n{r.stderr[-3000:]}")
        out["rows"][method] = {"wall": r.wall, "maxrss": r.maxrss, "written": json.loads(r.stdout)["written_bytes"]}
        log(f"scaling {preset} {method}-8: {r.wall:.2f} s, RSS {r.maxrss / MB:.0f} MB")
    return out


# ---------------------------------------------------------------------------- report


def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:.1f}"


def bytes_read(row: dict) -> float:
    """mpstore's bytes_read for a row: the median over its runs."""
    return statistics.median(row["bytes_read_runs"])


def table(fig: dict) -> str:
    lines = [
        "| method | N | mergekit s | mpstore s | speedup | mergekit RSS MB | mpstore RSS MB "
        "| expert GB/s mergekit / mpstore | mergekit read MB | mpstore bytes_read MB | ratio | mpstore written MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in fig["rows"]:
        read = bytes_read(row)
        ratio = f"{row['input_bytes'] / read:.1f}x" if read else "inf"
        experts = row["n"] * fig["params"] * 2  # bf16 bytes of the experts' parameters
        lines.append(
            f"| {row['method']} | {row['n']} | {row['mergekit_s']:.2f} | {row['mpstore_s']:.2f} "
            f"| {row['mergekit_s'] / row['mpstore_s']:.2f}x | {row['mergekit_rss'] / MB:.0f} "
            f"| {row['mpstore_rss'] / MB:.0f} | {experts / row['mergekit_s'] / 1e9:.2f} / "
            f"{experts / row['mpstore_s'] / 1e9:.2f} | {_mb(row['input_bytes'])} | {_mb(read)} | {ratio} "
            f"| {_mb(row['mpstore']['written_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def targets(fig: dict) -> str:
    """Issue 5's targets against this run (8 experts)."""
    rows = {(r["method"], r["n"]): r for r in fig["rows"]}
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for method, want in TARGET_SPEEDUPS.items():
        r = rows.get((method, 8))
        if r:
            got = r["mergekit_s"] / r["mpstore_s"]
            lines.append(
                f"| {method}, 8 experts: >= {want:.0f}x faster than mergekit | {got:.2f}x "
                f"({r['mergekit_s']:.2f} s / {r['mpstore_s']:.2f} s) | {'yes' if got >= want else 'no'} |"
            )
    peak = max(r["mpstore_rss"] for r in fig["rows"])
    lines.append(
        f"| peak RSS of a merge <= 1 GiB | {peak / MB:.0f} MB (largest of all runs) "
        f"| {'yes' if peak <= TARGET_RSS else 'no'} |"
    )
    sc = fig.get("scaling")
    if sc:
        for method, row in sc["rows"].items():
            here = rows.get((method, 8))
            if here:
                grew = row["maxrss"] > here["mpstore_rss"] * 1.1
                lines.append(
                    f"| RSS not growing when the model doubles ({method}-8: {fig['params'] / 1e6:.0f}M -> "
                    f"{sc['params'] / 1e6:.0f}M parameters) | {here['mpstore_rss'] / MB:.0f} MB -> "
                    f"{row['maxrss'] / MB:.0f} MB | {'no' if grew else 'yes'} |"
                )
    pl = fig.get("pipeline")
    if pl:
        lines.append(
            f"| ingest of the 9 models + one ties merge, together, faster than mergekit's ties merge "
            f"| {pl['total']:.2f} s vs {pl['mergekit']:.2f} s | {'yes' if pl['total'] < pl['mergekit'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def render(fig: dict, plots: tuple[str, str] | None = None) -> str:
    m = fig["machine"]
    ing = fig["ingest"]
    n_lora, n_partial, n_full = fig["suite"]
    fl = fig["floors"]
    rows = fig["rows"]
    ta8 = next((r for r in rows if r["method"] == "task_arithmetic" and r["n"] == 8), None)
    lines = [
        targets(fig).rstrip(),
        "",
        f"Measured {fig['date']} on {m['nproc']} cores ({m['cpu']}, {m['mem']}), Python {m['python']}; "
        f"{m['libs']}; code at commit {fig['code']}. Load average (1 min) at the start: {fig['load_at_start']:.2f}.",
        "",
        f"Command: `{fig['command']}`",
        "",
        f"Data: `make_suite(preset={fig['preset']!r}, n_lora={n_lora}, n_partial={n_partial}, n_full={n_full})`, "
        f"{fig['params'] / 1e6:.1f}M bf16 parameters per model. The N experts are taken round-robin over the "
        "kinds (lora-0, partial-0, full-0, lora-1, ...; 8 = 3 LoRA + 3 partial + 2 full). Ingest of the "
        f"{ing['folders']} folders used into a fresh store, once, not counted below: {ing['seconds']:.2f} s "
        f"({ing['input_bytes'] / MB:.1f} MB in, {ing['written_bytes'] / MB:.1f} MB written; store "
        f"{fig['store_bytes_after_ingest'] / MB:.1f} MB).",
        "",
        "Cases: task_arithmetic (weight 1/N), ties and dare_ties (density 0.5, weight 1/N; seed 0 in both: "
        "`--random-seed 0` / `--seed 0`), slerp of the base and full-0 (t 0.5; N = 1 expert, whatever "
        "`--experts` says). "
        + (
            f"Every YAML has `dtype: {fig['dtype']}` (both tools compute and write it). "
            if fig["dtype"]
            else "No `dtype` key: mergekit computes in bf16 (the inputs' dtype), mpstore in float32; both write bf16. "
        )
        + "mergekit runs "
        "and mpstore run the same YAML, whose `model:` values are absolute folder paths; mpstore finds those "
        "folders ingested and unchanged (by their files' stat data, FORMAT.md section 11) and reads none "
        "of them. A YAML that differs only in those values (the store's ref names) is run through mpstore "
        "once per case and reported in the second table.",
        "",
        "Both tools run as whole processes, start-up and imports included, each case "
        f"{fig['repeat']} times with the tools interleaved; medians. Before every mpstore run the previous "
        "run's snapshot is removed and collected (`ref rm`, `gc`; not timed), so every merge computes and "
        "writes its output afresh (an identical merge finds its blocks stored and writes nothing). "
        "Commands (first case): "
        f"`HF_HUB_OFFLINE=1 {fig['commands']['mergekit']}` and `{fig['commands']['mpstore']}`. "
        "mergekit writes a model folder (safetensors, config, model card; no fsync); mpstore commits a "
        "snapshot to the store (fsynced; no export). RSS: peak resident set of the process (`ru_maxrss` "
        "from `wait4`, as `/usr/bin/time -f %M`). mergekit read MB: its input safetensors files, which it "
        "reads in full (through mmap); mpstore bytes_read: the pack bytes its merge read (its `--json`; "
        "median of the runs). Before every run the case's input folders and the store's files are read "
        "into the page cache (this machine pages out file pages unused for about a minute). "
        "Ratio = mergekit read / mpstore bytes_read. The YAML of the first case, as each tool got it:",
        "",
        "```yaml",
        "# mergekit-yaml and mpstore merge",
        fig["example_yaml"]["mergekit"].rstrip(),
        "```",
        "",
        "```yaml",
        "# mpstore merge, the refs variant",
        fig["example_yaml"]["mpstore"].rstrip(),
        "```",
        "",
        table(fig).rstrip(),
        "",
        "Expert GB/s: the N experts' bf16 parameters divided by the whole command's wall time. Issue 4's "
        f"target, >= {TARGET_IO_RATIO:.0f}x fewer bytes read than mergekit for the exact task_arithmetic "
        "merge of 8 experts"
        + (
            f": here {ta8['input_bytes'] / max(bytes_read(ta8), 1):.1f}x "
            f"({_mb(ta8['input_bytes'])} MB vs {_mb(bytes_read(ta8))} MB)."
            if ta8
            else "."
        ),
        "",
        f"Start-up floor (interpreter + imports only, median): mergekit {fl['mergekit']['wall']:.2f} s, "
        f"{fl['mergekit']['maxrss'] / MB:.0f} MB RSS, rchar {_mb(fl['mergekit']['rchar'])} MB; mpstore "
        f"{fl['mpstore']['wall']:.2f} s, {fl['mpstore']['maxrss'] / MB:.0f} MB RSS, rchar "
        f"{_mb(fl['mpstore']['rchar'])} MB.",
    ]
    pl, sc = fig.get("pipeline"), fig.get("scaling")
    if pl:
        lines += [
            "",
            "Ingest and merge together: a new store, `mpstore init`, `mpstore ingest` of the base and the 8 "
            "experts of the ties-8 case (each a whole process), then `mpstore merge` of the ties-8 YAML: "
            + ", ".join(f"{label} {wall:.2f} s" for label, wall in pl["walls"].items())
            + f"; total {pl['total']:.2f} s, against mergekit's ties-8 merge alone, {pl['mergekit']:.2f} s.",
        ]
    if sc:
        lines += [
            "",
            f"Bigger model: preset {sc['preset']!r} ({sc['params'] / 1e6:.1f}M parameters, "
            f"{sc['params'] / fig['params']:.2f}x; every matrix larger), 8 experts (3/3/2), ingested into a new "
            f"store ({sc['ingest_s']:.1f} s); one fresh merge each: "
            + "; ".join(
                f"{method}-8 {row['wall']:.2f} s, peak RSS {row['maxrss'] / MB:.0f} MB"
                for method, row in sc["rows"].items()
            )
            + ".",
        ]
    if plots:
        lines += ["", f"![merge time vs experts]({plots[0]}) ![bytes read vs experts]({plots[1]})"]
    lines += [
        "",
        "Details: `rchar` of /proc/PID/io at exit (bytes passed through read()/pread(), imports included; "
        "mmap reads are not counted), every run's wall seconds, mpstore's own read figures, the refs-YAML "
        "mpstore run (once), and output agreement (mpstore's snapshot vs mergekit's folder: "
        "largest |difference|, bf16 elements more than 1 ulp apart):",
        "",
        "| method | N | mergekit rchar MB | mpstore rchar MB | mergekit runs s | mpstore runs s | mpstore merge s "
        "(its own `seconds`, last run) | mpstore bytes_read MB, runs | mpstore read "
        "base / experts MB (last run) | blocks read / skipped same / shared | mpstore written MB "
        "| mpstore, refs YAML: s, RSS MB, bytes_read MB | max abs diff | > 1 ulp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        j, a = r["mpstore"], r["agree"]
        frac = a["beyond_ulp"] / a["elements"] if a["elements"] else 0.0
        lines.append(
            f"| {r['method']} | {r['n']} | {_mb(r['mergekit_rchar'])} | {_mb(r['mpstore_rchar'])} "
            f"| {', '.join(f'{w:.2f}' for w in r['mergekit_walls'])} "
            f"| {', '.join(f'{w:.2f}' for w in r['mpstore_walls'])} | {j['seconds']:.2f} "
            f"| {', '.join(_mb(b) for b in r['bytes_read_runs'])} "
            f"| {_mb(j['bytes_read_base'])} / {_mb(j['bytes_read_experts'])} "
            f"| {j['blocks_read']} / {j['blocks_skipped']['same_as_base']} / {j['blocks_skipped']['shared']} "
            f"| {_mb(j['written_bytes'])} | {r['refs_s']:.2f}, {r['refs_rss'] / MB:.0f}, "
            f"{_mb(r['refs_bytes_read'])} | {a['max_abs']:.2g} | {frac:.2%} |"
        )
    lines += [
        "",
        "dare_ties draws different random masks in the two tools (mergekit: torch's global generator; "
        "mpstore: a hash of `--seed`, tensor, input, block position and element index), so its outputs are "
        "not expected to agree element by element. The other differences come from bf16 arithmetic in "
        "mergekit against float32 in mpstore, and, for ties, from which magnitudes equal to the cut each "
        "keeps.",
    ]
    if not all(r["rchar_exact"] for r in rows):
        lines += ["", "Some rchar values are the last poll before exit, not the value at exit."]
    return "\n".join(lines) + "\n"


def plot(fig: dict, folder: Path, log: Callable[[str], None] = print) -> tuple[str, str] | None:
    """merge_time.png and merge_io.png in folder (wall s / MB read against N, per method); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    rows = fig["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    series = {
        PLOT_TIME: ("wall seconds (median, whole process)", "mergekit_s", "mpstore_s", "mergekit", "mpstore"),
        PLOT_IO: ("MB read", "input_bytes", "bytes_read", "mergekit (input safetensors)", "mpstore bytes_read"),
    }
    for filename, (ylabel, k_mk, k_mp, l_mk, l_mp) in series.items():
        f, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        mergekit_series: dict[tuple, list[str]] = {}  # identical mergekit curves (input bytes) drawn once
        for method in methods:
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n"])
            ns = [r["n"] for r in rs]
            mk = [r[k_mk] / (MB if k_mk == "input_bytes" else 1) for r in rs]
            mp = [bytes_read(r) / MB if k_mp == "bytes_read" else r[k_mp] for r in rs]
            mergekit_series.setdefault((tuple(ns), tuple(mk)), []).append(method)
            ax.plot(ns, mp, "s--", color=colors[method], label=f"{method}: {l_mp}")
        for (ns, mk), group in mergekit_series.items():
            color = colors[group[0]] if len(group) == 1 else "black"
            ax.plot(ns, mk, "o-", color=color, label=f"{', '.join(group)}: {l_mk}")
        ax.set_xlabel("experts merged (N)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["n"] for r in rows}), labels=[str(n) for n in sorted({r["n"] for r in rows})])
        ax.set_title(f"mergekit vs mpstore merge, preset {fig['preset']!r}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        f.tight_layout()
        f.savefig(folder / filename)
        plt.close(f)
    return PLOT_TIME, PLOT_IO


def report(fig: dict, out: Path | None, plot_dir: Path | None, log: Callable[[str], None] = print) -> str:
    """Plots (into plot_dir), the section text printed and written into `out` (unless None)."""
    plots = plot(fig, plot_dir, log) if plot_dir is not None else None
    if plots and out is not None:
        rel = [os.path.relpath(plot_dir / p, out.resolve().parent) for p in plots]
        plots = (rel[0], rel[1])
    body = render(fig, plots)
    log("")
    log(SECTION)
    log("")
    log(body)
    if out is not None:
        old = out.read_text() if out.exists() else ""
        out.write_text(replace_section(old, SECTION, body))
        log(f"section {SECTION!r} written to {out}")
    return body


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or set(values) - set(METHODS):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(METHODS)}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="bench")
    parser.add_argument("--experts", type=_int_list, default=[2, 4, 8], help="numbers of experts (default 2,4,8)")
    parser.add_argument(
        "--methods", type=_methods, default=list(METHODS), help="comma-separated, of " + ",".join(METHODS)
    )
    parser.add_argument("--data", type=Path, default=Path("bench/data"), help="suite cache (default bench/data)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/RESULTS.md"),
        help=f"markdown file whose {SECTION!r} section is replaced ('-': none)",
    )
    parser.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="folder for merge_time.png and merge_io.png (default: the folder of --out; none with --out -)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs of each tool per case (median reported)")
    parser.add_argument("--work", type=Path, default=None, help="where the store and outputs go (default: in --data)")
    parser.add_argument(
        "--dtype", default=None, help="add `dtype: DTYPE` to every YAML (default: none, as in the reported baseline)"
    )
    parser.add_argument(
        "--scale-preset",
        choices=list(PRESETS),
        default=None,
        help="also merge 8 experts of this (bigger) preset with mpstore alone: peak RSS as the model grows",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fig = run(args.preset, args.data, args.experts, args.methods, args.repeat, args.work, args.dtype, args.scale_preset)
    fig["machine"] = machine()
    from importlib.metadata import version

    fig["machine"]["libs"] += f", mergekit {version('mergekit')}"
    fig["date"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    given = sys.argv[1:] if argv is None else argv
    fig["command"] = "python -m bench.bench_merge" + "".join(" " + shlex.quote(a) for a in given)
    out = None if str(args.out) == "-" else args.out
    plot_dir = args.plots if args.plots is not None else (out.parent if out is not None else None)
    report(fig, out, plot_dir)
    broken = [r for r in fig["rows"] if not (r["agree"]["names_match"] and r["agree"]["dtype_shape_match"])]
    if broken:
        print(
            "OUTPUT MISMATCH (tensor names, dtypes or shapes) in: "
            + ", ".join(f"{r['method']}-{r['n']}" for r in broken),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
