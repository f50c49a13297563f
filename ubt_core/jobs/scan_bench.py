"""Scan throughput: the Ray Data scan job against the bare single-process loop over the same Parquet and model.

`ubt bench-scan` replicates the synthetic training pairs to each size (fresh uids), then runs each
method in a fresh process while sampling the memory (PSS and RSS) of that process and all its children
(Ray's GCS, raylet and workers included). The bare loop is `ubt_core.defense.stages.scan_stage`, the
in-process scan `ubt defend` uses. Writes the table into docs/performance.md.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import pyarrow as pa

from ubt_core.bench import write_doc_section
from ubt_core.data.contract import read_pairs, write_pairs
from ubt_core.data.synth import SynthConfig, synth_benchmark
from ubt_core.errors import UbtError
from ubt_core.models import create_model, save_model

# Ray is started before the clock: a cluster is already running when a scan is submitted to it
_CHILD = """
import json, sys, time
from pathlib import Path
method, model, data, out, batch, actors, result = sys.argv[1:8]
if method == "bare":
    from ubt_core.defense.stages import scan_stage
    start = time.perf_counter()
    scan_stage(model, data, out, int(batch))
else:
    from ubt_core.config import RayConfig
    from ubt_core.jobs import ensure_ray, run_scan_job
    # half a CPU per actor: actors holding every CPU would starve Ray Data's read tasks
    cfg = RayConfig(scan_actors=int(actors), cpus_per_actor=0.5, scan_batch_size=int(batch))
    ensure_ray(cfg)
    start = time.perf_counter()
    run_scan_job(cfg, model, data, out)
Path(result).write_text(json.dumps({"seconds": time.perf_counter() - start}))
"""
SAMPLE_SECONDS = 0.25
PSS_EVERY = 8  # samples: PSS every 2 s keeps the sampler's own CPU time small on a 2-core machine


def tree_memory_kib(root: int, proportional: bool = True) -> dict[str, int]:
    """Memory (KiB) of process `root` and all its descendants, from /proc: summed resident sets (`rss`; a
    shared page counts once per process mapping it) and, if `proportional`, summed proportional sets (`pss`;
    each shared page split among its mappers, so the object store and the libraries every worker maps count
    once). PSS walks every page table (≈ 10 ms per GiB mapped), so samplers ask for it less often."""
    if proportional and not Path("/proc/self/smaps_rollup").is_file():
        raise UbtError("measuring proportional memory needs /proc/PID/smaps_rollup (Linux 4.14 or later)")
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    total, stack = {"rss": 0} | ({"pss": 0} if proportional else {}), [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            total["rss"] += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            if proportional:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                total["pss"] += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue  # the process ended while we looked (or is a zombie)
    return total


def _run_measured(args: list[str], result: Path) -> dict:
    """Run the child; returns the seconds it wrote to `result` plus the peak memory of its process tree.

    The measurement is kept beside `result` (`.measured.json`) and reused by a later run, so a failure at a
    larger size does not lose the smaller ones; delete it to measure again.
    """
    measured = result.with_suffix(".measured.json")
    if measured.is_file() and "peak_pss_kib" in (cached := json.loads(measured.read_text())):
        return cached
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    result.unlink(missing_ok=True)
    # the child's output goes to a log file (Ray workers write to it too, and a pipe nobody reads could fill)
    with open(result.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args, str(result)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        peak = _peak_memory_while_running(proc)
    if proc.returncode or not result.is_file():
        tail = result.with_suffix(".log").read_text()[-2000:]
        raise UbtError(f"scan benchmark child ({args[0]}) failed (exit {proc.returncode}); its log ends:\n{tail}")
    value = json.loads(result.read_text()) | {f"peak_{key}_kib": kib for key, kib in peak.items()}
    measured.write_text(json.dumps(value))
    return value


def _peak_memory_while_running(proc: subprocess.Popen) -> dict[str, int]:
    """Largest `tree_memory_kib` of `proc` and its descendants (each measure's own peak), sampled until it
    exits."""
    peak = {"rss": 0, "pss": 0}

    def sample() -> None:
        for i in itertools.count():
            if proc.poll() is not None:
                return
            for key, kib in tree_memory_kib(proc.pid, proportional=i % PSS_EVERY == 0).items():
                peak[key] = max(peak[key], kib)
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    sampler.join()
    return peak


def replicate_pairs(source_uri: str, out_uri: str, rows: int) -> str:
    """`rows` pairs made of copies of `source_uri`'s pairs with fresh uids (10,000 rows per file)."""
    if (Path(out_uri) / "done").is_file():
        return out_uri
    table = read_pairs(source_uri).table.select(["uid", "image", "caption"])
    copies, uids = [], table.column("uid").to_pylist()
    for rep in range(-(-rows // table.num_rows)):
        copy = table.set_column(0, "uid", pa.array([f"{uid}-r{rep}" for uid in uids]))
        copies.append(copy)
    write_pairs(pa.concat_tables(copies).slice(0, rows), out_uri)
    (Path(out_uri) / "done").write_text("")
    return out_uri


def run_scan_bench(work_dir: str, sizes: list[int], doc: str | None = None, command: str | None = None,
                   batch_size: int = 256) -> str:
    """Time and measure both scans at each size; returns the Markdown table."""
    work = Path(work_dir)
    source = work / "world" / "train"
    if not source.is_dir():
        synth_benchmark(str(work / "world"), SynthConfig())
    model = work / "model"
    if not model.is_dir():
        save_model(create_model("ubt-tiny"), model)  # throughput does not depend on the weights
    cores = os.cpu_count() or 1
    rows, results = [], {}
    for n in sorted(sizes):
        data = replicate_pairs(str(source), str(work / f"pairs-{n}"), n)
        for method in ("bare", "ray"):
            out = work / f"scan-{method}-{n}"
            results[method, n] = _run_measured([method, str(model), data, str(out / "embeddings.parquet"),
                                                str(batch_size), str(cores)], work / f"{method}-{n}.json")
            shutil.rmtree(out, ignore_errors=True)
        bare, ray = results["bare", n], results["ray", n]
        for method, r in (("bare loop (1 process)", bare), (f"Ray Data ({cores} actors)", ray)):
            rows.append(f"| {n:,} | {method} | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | "
                        f"{r['peak_pss_kib'] / 1024:,.0f} | {r['peak_rss_kib'] / 1024:,.0f} |")
        rows.append(f"| {n:,} | Ray / bare | | **{bare['seconds'] / ray['seconds']:.2f}×** | | |")
    smallest, largest = min(sizes), max(sizes)

    def growth(key: str) -> str:
        return ", ".join(f"{m} {results[m, largest][key] / results[m, smallest][key]:.2f}×" for m in ("bare", "ray"))
    table = "\n".join([
        f"Command: `{command or 'ubt bench-scan'}`  ",
        f"Machine: {platform.machine()}, {cores} CPUs; measured {date.today().isoformat()}; ubt-tiny, "
        f"batch {batch_size}", "",
        "| pairs | scan | seconds | pairs / s | peak PSS of the process tree (MiB) | peak RSS sum (MiB) |",
        "|---:|---|---:|---:|---:|---:|", *rows, "",
        f"Peak memory at {largest:,} pairs ÷ at {smallest:,}: PSS {growth('peak_pss_kib')}; "
        f"RSS sum {growth('peak_rss_kib')}", ""])
    if doc:
        write_doc_section(Path(doc), "scan:throughput", table)
    return table
