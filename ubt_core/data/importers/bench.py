"""Import benchmark: peak memory and throughput of `ubt data import --format webdataset` as the input
grows, each size imported in a fresh process (its own peak RSS). Writes a table into docs/performance.md."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from ubt_core.bench import write_doc_section
from ubt_core.data.images import encode_image

# Peak RSS comes from VmHWM, the high-water mark of this process image: ru_maxrss would carry the parent's
# peak over fork + exec on Linux.
_CHILD = """
import json, sys, time
from ubt_core.data.importers import import_pairs
start = time.perf_counter()
report = import_pairs("webdataset", sys.argv[1], sys.argv[2])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - start, "rows_out": report.rows_out,
                  "peak_rss_kib": int(hwm.split()[1])}))
"""


def write_shards(folder: Path, n_pairs: int, per_shard: int = 10_000, seed: int = 0) -> Path:
    """img2dataset-layout shards of `n_pairs` small PNG / caption / json samples (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = [encode_image(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(64)]
    for shard, start in enumerate(range(0, n_pairs, per_shard)):
        tmp = folder / f".{shard:06d}.tar.tmp"
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + per_shard, n_pairs)):
                key = f"{i:09d}"
                members = {"png": images[i % len(images)], "txt": f"pair number {i}".encode(),
                           "json": json.dumps({"key": key}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(folder / f"{shard:06d}.tar")
    return folder


def run_import_bench(work_dir: str, sizes: list[int], doc: str | None = None, command: str | None = None) -> str:
    """Import WebDataset shards of each size in a fresh process; returns the Markdown table."""
    work = Path(work_dir)
    rows = []
    for n in sorted(sizes):
        shards = work / f"shards-{n}"
        if not (shards / "done").is_file():
            write_shards(shards, n)
            (shards / "done").write_text("")
        out = work / f"imported-{n}"
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(shards), str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"import of {n} pairs failed:\n{proc.stderr[-2000:]}")
        rows.append({"pairs": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
    base = rows[0]["peak_rss_kib"]
    lines = [f"Command: `{command or 'ubt bench-import'}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; measured {time.strftime('%Y-%m-%d')}", "",
             "| pairs | rows written | seconds | pairs / s | peak RSS (MiB) | × smallest |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['pairs']:,} | {r['rows_out']:,} | {r['seconds']:.1f} | {r['pairs'] / r['seconds']:,.0f} "
              f"| {r['peak_rss_kib'] / 1024:.0f} | {r['peak_rss_kib'] / base:.2f} |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    if doc:
        write_doc_section(Path(doc), "import:webdataset", markdown)
    return markdown
