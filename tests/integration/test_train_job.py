"""The Ray Train jobs on a local Ray (2 CPUs, fractional workers).

Covered: 2-worker DDP training writes a loadable open_clip local-dir, per-epoch checkpoints under the
storage path and rank-0 metrics in an MLflow run, and a rerun is skipped; a worker killed (SIGKILL) after
the first checkpoint is replaced and training resumes from that checkpoint, not from epoch 0;
`run_stage_job` runs the real overfit stage on a worker and returns its value, and surfaces a stage's
UbtError as itself.
"""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import open_clip
import pytest
import ray

from ubt_core.defense.overfit import OverfitConfig
from ubt_core.defense.stages import overfit_stage, scan_stage
from ubt_core.errors import UbtError
from ubt_core.jobs import run_stage_job, run_train_job
from ubt_core.models import create_model, save_model
from ubt_core.train import TrainConfig

TINY = TrainConfig(epochs=2, batch_size=16, warmup_steps=2)  # 80 pairs: 5 steps per epoch


@pytest.fixture
def two_workers(local_ray, tmp_path):
    return local_ray.model_copy(update={"num_workers": 2, "cpus_per_worker": 0.5,
                                        "storage_path": str(tmp_path / "ray")})


def test_two_workers_train_a_loadable_model_with_checkpoints_and_mlflow_metrics_then_skip(
        two_workers, tiny_world, tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("train-job")).info.run_id
    out = tmp_path / "model"
    result = run_train_job(two_workers, TINY, tiny_world["train"], str(out),
                           tracking={"tracking_uri": client.tracking_uri, "run_id": run_id})
    assert not result.skipped and result.steps == 10 and math.isfinite(result.final_loss)
    assert [row["epoch"] for row in result.history] == [0, 1] and result.attempts == 1
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(out))
    assert model.logit_scale.exp() <= TINY.max_logit_scale
    lineage = json.loads((out / "ubt.json").read_text())
    assert lineage["trained_on"] == tiny_world["train"] and lineage["train_config"] == TINY.model_dump()
    checkpoints = sorted(p.name for p in Path(two_workers.storage_path).glob("train-*/epoch_*"))
    assert checkpoints == ["epoch_000", "epoch_001"]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "contrastive_loss")}
    assert logged == {row["epoch"]: row["contrastive_loss"] for row in result.history}
    assert run_train_job(two_workers, TINY, tiny_world["train"], str(out)).skipped


def _train_worker_pids() -> list[int]:
    # the GCS actor table: ray.util.state needs the dashboard, which the local Ray runs without
    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


def _first_checkpoint_registered(storage: Path) -> bool:
    # the controller's snapshot names a checkpoint only once it is complete, unlike the epoch_* dir itself
    return any("epoch_000" in p.read_text() for p in storage.glob("train-*/checkpoint_manager_snapshot.json"))


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(two_workers, tiny_world, tmp_path):
    cfg = TINY.model_copy(update={"epochs": 3})
    outcome = {}

    def train():
        try:
            outcome["result"] = run_train_job(two_workers, cfg, tiny_world["train"], str(tmp_path / "model"))
        except BaseException as e:  # re-raised below, in the test's thread
            outcome["error"] = e

    job = threading.Thread(target=train)
    job.start()
    while job.is_alive() and not _first_checkpoint_registered(Path(two_workers.storage_path)):
        time.sleep(0.05)
    pids = _train_worker_pids()
    assert job.is_alive() and pids, "training ended before a worker could be killed"
    os.kill(pids[0], signal.SIGKILL)
    job.join()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert result.attempts == 2 and result.history[0]["attempt"] == 1 and result.history[-1]["attempt"] == 2
    assert result.steps == 15  # the killed attempt's unfinished epoch is redone, not counted twice
    assert math.isfinite(result.final_loss)
    open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "model"))


def test_stage_job_runs_overfit_returns_its_value_and_surfaces_its_errors(local_ray, tiny_world, tmp_path):
    ray_cfg = local_ray.model_copy(update={"cpus_per_worker": 0.5, "storage_path": str(tmp_path / "ray")})
    save_model(create_model("ubt-tiny"), tmp_path / "suspect")
    embeddings = scan_stage(str(tmp_path / "suspect"), tiny_world["train"], str(tmp_path / "suspect.parquet"))
    cfg = OverfitConfig(steps=2, weak_per_batch=8, normal_per_batch=8)
    out = run_stage_job(ray_cfg, overfit_stage, str(tmp_path / "suspect"), tiny_world["train"], embeddings,
                        str(tmp_path / "overfit"), cfg)
    assert out == str(tmp_path / "overfit")
    open_clip.create_model_and_transforms("local-dir:" + out)
    with pytest.raises(UbtError, match="no such dataset"):
        run_stage_job(ray_cfg, overfit_stage, str(tmp_path / "suspect"), str(tmp_path / "missing"), embeddings,
                      str(tmp_path / "never"), cfg)
