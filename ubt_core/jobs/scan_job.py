"""The scan as a Ray Data job: read_parquet -> embed on an actor pool -> write_parquet.

Each actor loads the model once (from checkpoint bytes the driver put in the object store, so
workers need no shared disk) and runs `ubt_core.defense.embed.embed_batch` on its batches. The
output is the embeddings directory the in-process scan would write (`uid`, `image_emb`,
`text_emb`, parts in any order), closed by a `_SUCCESS` marker; a job whose output is complete
is skipped, and a partial one is cleared and redone.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ubt_core.config import RayConfig
from ubt_core.data.contract import filesystem, list_parquet_files
from ubt_core.defense.embed import SCANNED_COLUMNS, Precision, embed_batch
from ubt_core.errors import UbtError
from ubt_core.jobs.runtime import checkpoint_bytes, ensure_ray, load_checkpoint_bytes
from ubt_core.models import LoadedModel

SUCCESS = "_SUCCESS"
# Ray Data's parquet reader packs files into blocks of up to 128 MiB, so a 10^5-pair dataset is one
# block: one actor works while the others idle. Small blocks spread the pairs over the whole pool.
SCAN_BLOCK_BYTES = 8 * 1024**2


@dataclass
class ScanSummary:
    out_uri: str
    rows: int
    seconds: float
    skipped: bool  # the output already existed


class _EmbedActor:
    """Holds one model copy for the actor's lifetime."""

    def __init__(self, checkpoint: ray.ObjectRef, precision: Precision):
        self.loaded: LoadedModel = load_checkpoint_bytes(ray.get(checkpoint))
        self.precision = precision

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_batch(batch, self.loaded, self.precision)


def _complete(fs: pafs.FileSystem, root: str) -> bool:
    return fs.get_file_info(posixpath.join(root, SUCCESS)).type == pafs.FileType.File


def _read_bounded(files: list[str], fs: pafs.FileSystem, object_store_mib: int) -> ray.data.Dataset:
    """`read_parquet` in SCAN_BLOCK_BYTES blocks, holding at most `object_store_mib` of them in the object store.

    Without the bound Ray Data reads ahead into a share of the whole object store, so the scan's memory
    grows with the data until that share is full. The dataset keeps a copy of the context it was made with.
    """
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    defaults = context.target_max_block_size, options.resource_limits
    context.target_max_block_size = SCAN_BLOCK_BYTES
    options.resource_limits = options.resource_limits.copy(object_store_memory=object_store_mib * 1024**2)
    try:
        return ray.data.read_parquet(files, filesystem=fs)
    finally:
        context.target_max_block_size, options.resource_limits = defaults


def run_scan_job(cfg: RayConfig, model_dir: str, data_uri: str, out_uri: str,
                 precision: Precision = "fp32") -> ScanSummary:
    """Embed every pair of `data_uri` under `model_dir` with Ray Data (`embed_batch` at `precision`); writes the
    embeddings dir `out_uri`."""
    start = time.perf_counter()
    out_fs, out_root = filesystem(out_uri)
    if _complete(out_fs, out_root):
        return ScanSummary(out_uri, -1, 0.0, skipped=True)
    if out_fs.get_file_info(out_root).type != pafs.FileType.NotFound:
        out_fs.delete_dir(out_root)  # a crashed earlier attempt: its parts cannot be trusted
    in_fs, files = list_parquet_files(data_uri)  # the contract's file listing, and its clear errors
    ensure_ray(cfg)
    cpus, asked = ray.cluster_resources().get("CPU", 0), cfg.scan_actors * cfg.cpus_per_actor
    if asked >= cpus:  # the actors would hold every CPU and Ray Data's read tasks would wait forever
        raise UbtError(f"ray.scan_actors x ray.cpus_per_actor = {asked:g} leaves none of the cluster's {cpus:g} CPUs "
                       "for reading the data; lower ray.cpus_per_actor (e.g. 0.5) or ray.scan_actors.")
    checkpoint = ray.put(checkpoint_bytes(model_dir))
    dataset = _read_bounded(files, in_fs, cfg.scan_object_store_mib).select_columns(list(SCANNED_COLUMNS))
    embedded = dataset.map_batches(
        _EmbedActor, fn_constructor_args=(checkpoint, precision), batch_size=cfg.scan_batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.scan_actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0)
    embedded.write_parquet(out_root, filesystem=out_fs)
    rows = sum(pq.read_metadata(f, filesystem=out_fs).num_rows for f in list_parquet_files(out_uri)[1])
    with out_fs.open_output_stream(posixpath.join(out_root, SUCCESS)) as f:
        f.write(b"")
    return ScanSummary(out_uri, rows, round(time.perf_counter() - start, 2), skipped=False)
