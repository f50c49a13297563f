"""The local multi-process stack of infra/local_stack.py, which exercises the cluster path on one machine.

Covered:
- the stack comes up: stack.env holds the exports, `status` reports every component healthy, and a
  second `up` finds the running stack instead of starting another;
- a component that dies while starting gives an error naming it, its exit code and its log;
- Prefect: the server's API is healthy and answers a query from its database;
- MLflow: the server logs a run with a param and an artifact over HTTP, MlflowClient reads both back,
  and the artifact lies in the moto S3 bucket (the server's --artifacts-destination);
- S3: a Parquet file written with pyarrow's S3FileSystem reads back identical with s3fs;
- Ray: 2 alive nodes, a task pinned to each runs there (from a subprocess, the fixture's rule), and an
  in-process local Ray (`local_ray`) started beside the stack stays a separate cluster.
"""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

_RAY_TASK_PER_NODE = """
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], log_to_driver=False)
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

ran_on = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
                  for n in nodes])
print(json.dumps({"nodes": nodes, "ran_on": ran_on}))
"""


def _get_json(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def test_stack_comes_up_once(local_stack, local_stack_module):
    module = local_stack_module
    env_file = (Path(local_stack.state_dir) / "stack.env").read_text()
    for name, value in local_stack.env().items():
        assert f"export {name}={value}" in env_file
    report = module.status(local_stack.state_dir)
    assert report["health"] == {"prefect": "ok", "mlflow": "ok", "s3": "ok", "ray": "ok"}
    assert all(report["processes"].values()) and len(report["processes"]) == 5
    again = module.up(local_stack.state_dir)
    assert again.already_running and again == local_stack


def test_component_that_dies_is_named_with_its_log(local_stack_module, tmp_path):
    module = local_stack_module
    (tmp_path / "logs").mkdir()
    launcher = module._Launcher(tmp_path, dict(os.environ))
    launcher.start("prefect", [sys.executable, "-c", "import sys; print('port already in use'); sys.exit(3)"], {})
    with pytest.raises(module.StackError) as err:
        launcher.wait("prefect", lambda: False, timeout=30, what="/api/health")
    message = str(err.value)
    assert message.startswith("prefect: exited with code 3")
    assert str(tmp_path / "logs" / "prefect.log") in message and "port already in use" in message


def test_prefect_api_is_healthy(local_stack):
    assert _get_json(f"{local_stack.prefect_api_url}/health") is True
    flows = _get_json(f"{local_stack.prefect_api_url}/flows/filter", {})  # the database answers a query
    assert isinstance(flows, list) and all("name" in flow for flow in flows)  # other tests may have run flows


def test_mlflow_server_logs_a_run_with_an_artifact_to_s3(local_stack, tmp_path):
    import s3fs
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=local_stack.mlflow_uri)
    run = client.create_run(client.create_experiment("local-stack-test"))
    client.log_param(run.info.run_id, "defense.unlearn.steps", "80")
    note = tmp_path / "note.txt"
    note.write_text("unlearned")
    client.log_artifact(run.info.run_id, str(note), artifact_path="reports")
    client.set_terminated(run.info.run_id)

    again = client.get_run(run.info.run_id)
    assert again.data.params == {"defense.unlearn.steps": "80"} and again.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run.info.run_id, "reports")] == ["reports/note.txt"]
    back = client.download_artifacts(run.info.run_id, "reports/note.txt", str(tmp_path / "down"))
    assert Path(back).read_text() == "unlearned"

    env = local_stack.env()
    s3 = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=local_stack.s3_endpoint)
    stored = s3.find(f"{local_stack.bucket}/mlflow")
    assert [p for p in stored if p.endswith(f"{run.info.run_id}/artifacts/reports/note.txt")], stored


def test_s3_parquet_written_by_pyarrow_reads_back_with_s3fs(local_stack):
    import s3fs

    env = local_stack.env()
    table = pa.table({"uid": ["a", "b", "c"], "image": [b"\x89PNG-1", b"\x89PNG-2", b"\x89PNG-3"],
                      "caption": ["a red star", "a blue circle", "a green square"]})
    writer = pafs.S3FileSystem(endpoint_override=local_stack.s3_endpoint.removeprefix("http://"), scheme="http",
                               access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
    path = f"{local_stack.bucket}/tests/pairs/part-0.parquet"
    pq.write_table(table, path, filesystem=writer)

    reader = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=local_stack.s3_endpoint)
    with reader.open(path, "rb") as f:
        assert pq.read_table(f).equals(table)


def test_ray_runs_a_task_on_each_of_two_nodes(local_stack):
    out = subprocess.run([sys.executable, "-c", _RAY_TASK_PER_NODE, local_stack.ray_address],
                         env={**os.environ, **local_stack.env()}, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["nodes"]) == 2
    assert result["ran_on"] == result["nodes"]


def test_in_process_local_ray_stays_apart_from_the_stack(local_stack, local_ray):
    import ray

    out = subprocess.run([sys.executable, "-c", _RAY_TASK_PER_NODE, local_stack.ray_address],
                         env={**os.environ, **local_stack.env()}, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    stack_nodes = set(json.loads(out.stdout.strip().splitlines()[-1])["nodes"])
    local_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(local_nodes) == 1 and not local_nodes & stack_nodes
    assert ray.cluster_resources()["CPU"] == local_ray.num_cpus  # its own 2 CPUs, not the stack's 1 + 1
