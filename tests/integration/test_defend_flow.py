"""The defend flow on real local components (ephemeral Prefect, local Ray, sqlite MLflow under the
output dir): a stage that fails on purpose, a re-run that serves the earlier stages from the cache
and resumes at the failed one, a final model identical to an uninterrupted run's, and lineage walked
through the MLflow client from the registered model back to the run and the dataset digest/source."""

import mlflow
import pytest
import safetensors.torch
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ubt_core.attacks.poison import PoisonConfig, poison_dataset
from ubt_core.attacks.triggers import make_trigger
from ubt_core.models import create_model, save_model
from ubt_core.provenance import dataset_digest
from ubt_core.tracking import lineage, source_uri

BEFORE_UNLEARN = {"validate", "scan_suspect", "overfit", "scan_overfit", "select"}
SMALL = ["defense.overfit.steps=2", "defense.overfit.weak_per_batch=8", "defense.overfit.normal_per_batch=8",
         "defense.scan.neighbours=5", "defense.select.k=6", "defense.select.retain_size=20",
         "defense.unlearn.steps=2", "defense.unlearn.transplant_steps=2", "defense.unlearn.batch_size=8",
         "prefect.retries=0",
         "ray.scan_actors=1", "ray.cpus_per_actor=0.5", "ray.scan_batch_size=32"]


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    poison_dataset(tiny_world["train"], str(root / "poisoned"),
                   PoisonConfig(trigger=make_trigger("badnet", 1), rate=0.1, target="star", seed=1))
    save_model(create_model("ubt-tiny"), root / "suspect")
    return {"data": str(root / "poisoned"), "model": str(root / "suspect"), "eval": tiny_world["eval"]}


def _overrides(world, out) -> list[str]:
    return [f"data.train={world['data']}", f"data.eval={world['eval']}", f"eval.trigger_from={world['data']}",
            f"model={world['model']}", f"output={out}", *SMALL]


def _stage_runs(out, parent_run_id: str) -> dict[str, str]:
    """The stages that ran under a flow run, by name, with their MLflow run ids."""
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("ubt").experiment_id,
                              f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")
    return {run.data.tags["ubt.stage"]: run.info.run_id for run in runs}


def _weights(out) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(out / "model" / "open_clip_model.safetensors")


def test_a_failed_stage_resumes_from_cache_and_matches_an_uninterrupted_run(
        prefect_server, local_ray, world, tmp_path, monkeypatch):
    from flows import defend as flow_module

    out = tmp_path / "resumed"

    def injected_fault(*args, **kwargs):
        raise RuntimeError("injected fault in unlearning")

    with monkeypatch.context() as patch:
        patch.setattr(flow_module.stages, "unlearn_stage", injected_fault)
        with pytest.raises(Exception, match="injected fault"):  # raised on the Ray Train worker
            flow_module.defend_flow(None, _overrides(world, out))
    scans = sorted((out / "work").glob("embeddings-*/_SUCCESS"))
    stamps = [p.stat().st_mtime_ns for p in scans]
    assert len(scans) == 2

    resumed = flow_module.defend_flow(None, _overrides(world, out))
    ran = set(_stage_runs(out, resumed["mlflow_run_id"]))
    assert not ran & BEFORE_UNLEARN, f"served from cache, so no run of their own: {ran}"
    assert {"unlearn", "evaluate_suspect", "evaluate_defended", "report", "register"} <= ran
    assert [p.stat().st_mtime_ns for p in scans] == stamps  # not recomputed either
    assert resumed["k"] == 6 and set(resumed["evaluation"]["defended"]) >= {"ca", "asr", "ra"}

    fresh = flow_module.defend_flow(None, _overrides(world, tmp_path / "fresh"))
    assert set(_stage_runs(tmp_path / "fresh", fresh["mlflow_run_id"])) >= BEFORE_UNLEARN  # a new output: no cache
    a, b = _weights(out), _weights(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    found = lineage(f"sqlite:///{out / 'mlflow.db'}", "ubt-defended", resumed["registered_version"])
    assert found["flow_run"]["run_id"] == resumed["mlflow_run_id"]
    assert found["model"]["tags"]["ubt.suspect_model"] == world["model"]
    train = [d for d in found["datasets"] if d["name"] == "train"]
    assert train and train[0]["digest"] == dataset_digest(world["data"])
    assert source_uri(train[0]["source"]) == world["data"] or train[0]["source"].endswith(world["data"])


def test_a_pattern_from_the_captions_decides_whether_the_flow_scans(prefect_server, local_ray, world, tmp_path,
                                                                    refine_outcome):
    """A trigger pattern verified by the pattern stage is the selection: no scan, overfit or select runs, and the
    model's lineage names the pattern stage's run. Without one the flow scans, over-fits and selects."""
    from flows import defend as flow_module

    scanning = {"scan_suspect", "overfit", "scan_overfit", "select", "select_overfit"}
    for verified, ran_after in ((True, set()), (False, scanning - {"select_overfit"})):
        refine_outcome["verified"] = verified
        out = tmp_path / f"verified-{verified}"
        overrides = [o for o in _overrides(world, out) if not o.startswith("defense.select.k=")]  # refine runs
        result = flow_module.defend_flow(None, overrides)
        runs = _stage_runs(out, result["mlflow_run_id"])
        assert set(runs) & (scanning | {"pattern"}) == {"pattern"} | ran_after, (verified, runs)
        assert result["overfit_ran"] != verified and ("scan_suspect" in result["stage_seconds"]) != verified
        tags = lineage(f"sqlite:///{out / 'mlflow.db'}", "ubt-defended", result["registered_version"])["model"]["tags"]
        assert tags["ubt.selection_run_id"] == runs["pattern" if verified else "select"]
