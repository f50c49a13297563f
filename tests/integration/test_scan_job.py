"""The Ray Data scan job on a local Ray: the same embeddings as the in-process scan, a partial
output cleared and redone, finished work skipped; the bounds that keep its memory flat."""

import os

import ray
import torch

from ubt_core.data.contract import list_parquet_files, read_pairs
from ubt_core.defense.embed import read_embeddings
from ubt_core.defense.stages import scan_stage
from ubt_core.jobs import run_scan_job
from ubt_core.jobs.scan_job import SUCCESS, _read_bounded
from ubt_core.models import create_model, save_model


def test_ray_scan_matches_the_in_process_scan_redoes_partial_output_and_skips_finished_work(
        local_ray, tiny_world, tmp_path):
    save_model(create_model("ubt-tiny"), tmp_path / "model")
    partial = tmp_path / "ray-emb"
    partial.mkdir()
    (partial / "stale.parquet").write_bytes(b"half a file")  # a crashed attempt: no _SUCCESS marker
    summary = run_scan_job(local_ray, str(tmp_path / "model"), tiny_world["train"], str(partial))
    assert summary.rows == 80 and not summary.skipped
    assert (partial / SUCCESS).is_file() and not (partial / "stale.parquet").exists()
    scan_stage(str(tmp_path / "model"), tiny_world["train"], str(tmp_path / "local.parquet"), batch_size=32)
    uids = read_pairs(tiny_world["train"]).table.column("uid")
    distributed = read_embeddings(str(tmp_path / "ray-emb"), uids)
    local = read_embeddings(str(tmp_path / "local.parquet"), uids)
    assert torch.allclose(distributed.images, local.images, atol=1e-5)
    assert torch.allclose(distributed.texts, local.texts, atol=1e-5)
    again = run_scan_job(local_ray, str(tmp_path / "model"), tiny_world["train"], str(tmp_path / "ray-emb"))
    assert again.skipped



def test_workers_use_few_malloc_arenas_and_the_scan_holds_its_object_store_bound(local_ray, tiny_world):
    arenas = ray.get(ray.remote(lambda: os.environ.get("MALLOC_ARENA_MAX")).options(num_cpus=0.5).remote())
    assert arenas == "2"
    fs, files = list_parquet_files(tiny_world["train"])
    dataset = _read_bounded(files, fs, object_store_mib=96)
    assert dataset.context.execution_options.resource_limits.object_store_memory == 96 * 1024**2
    # the bound belongs to the scan's dataset, not to datasets made after it
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory != 96 * 1024**2
