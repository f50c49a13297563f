"""The defend flow on the cluster path (the real multi-process stack of infra/local_stack.py): input
Parquet and eval set on the S3-compatible server over HTTP, a two-node Ray cluster for the scans and
stage jobs, the Prefect server recording the flow run, the MLflow server over HTTP tracking it and
registering the model, results published back to S3. Runs `ubt flow defend` as a user does, in a
subprocess with the stack's environment (the stack fixture's rule for Ray)."""

import json
import os
import subprocess
import sys
import urllib.request

import pyarrow.fs as pafs
import yaml

from ubt_core.attacks.poison import PoisonConfig, poison_dataset
from ubt_core.attacks.triggers import make_trigger
from ubt_core.models import create_model, save_model
from ubt_core.tracking import lineage

SMALL = {"overfit": {"steps": 2, "weak_per_batch": 8, "normal_per_batch": 8}, "scan": {"neighbours": 5},
         "select": {"k": 6, "retain_size": 20}, "unlearn": {"steps": 2, "transplant_steps": 2, "batch_size": 8}}


def _s3(stack) -> pafs.S3FileSystem:
    env = stack.env()
    return pafs.S3FileSystem(endpoint_override=stack.s3_endpoint.split("://")[1], scheme="http",
                             access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])


def _flow_runs(prefect_api_url: str) -> list[dict]:
    request = urllib.request.Request(f"{prefect_api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_defend_flow_reads_and_writes_s3_on_a_two_node_ray_with_prefect_and_mlflow_servers(
        local_stack, tiny_world, tmp_path):
    s3 = _s3(local_stack)
    poison_dataset(tiny_world["train"], str(tmp_path / "poisoned"),
                   PoisonConfig(trigger=make_trigger("badnet", 1), rate=0.1, target="star", seed=1))
    bucket = local_stack.bucket
    for local, remote in ((tmp_path / "poisoned", "data/poisoned"), (tiny_world["eval"], "data/eval")):
        pafs.copy_files(str(local), f"{bucket}/{remote}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)
    save_model(create_model("ubt-tiny"), tmp_path / "suspect")
    config = {"data": {"train": f"s3://{bucket}/data/poisoned", "eval": f"s3://{bucket}/data/eval"},
              "eval": {"trigger_from": f"s3://{bucket}/data/poisoned"}, "model": str(tmp_path / "suspect"),
              "output": f"s3://{bucket}/defended", "work_dir": str(tmp_path / "work"), "defense": SMALL,
              "prefect": {"retries": 0},
              "ray": {"scan_actors": 1, "cpus_per_actor": 0.5, "cpus_per_worker": 0.5, "scan_batch_size": 32}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "ubt_core.cli", "flow", "defend", "--config",
                           str(tmp_path / "run.yaml"), *local_stack.overrides()],
                          env={**os.environ, **local_stack.env()}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["k"] == 6 and set(summary["evaluation"]) == {"suspect", "defended"}

    published = {info.base_name for info in s3.get_file_info(pafs.FileSelector(f"{bucket}/defended"))}
    assert {"model", "suspicious.parquet", "report.md", "report.json"} <= published
    assert s3.get_file_info(f"{bucket}/defended/model/open_clip_model.safetensors").type == pafs.FileType.File

    found = lineage(local_stack.mlflow_uri, "ubt-defended", summary["registered_version"])
    assert found["flow_run"]["run_id"] == summary["mlflow_run_id"]
    sources = {d["name"]: d["source"] for d in found["datasets"]}
    assert sources["train"] == f"s3://{bucket}/data/poisoned" and sources["eval"] == f"s3://{bucket}/data/eval"

    runs = [r for r in _flow_runs(local_stack.prefect_api_url) if r["name"] == found["flow_run"]["name"]]
    assert runs and runs[0]["state_type"] == "COMPLETED"
