"""The defend flow: one Prefect task per UBT stage, each one call into ubt_core or a Ray job.

validate -> pattern -> [scan_suspect -> overfit -> scan_overfit -> select] -> unlearn -> evaluate -> report ->
register. The pattern stage refines the caption concepts before any image is embedded; a verified trigger pattern
there is the selection, and the scans, the overfit and select do not run (`defense.overfit.skip_if_pattern`).
Task results are persisted and cached on the stage's inputs (upstream outputs by content digest), its
config section and the code version, so re-running a flow after a failed stage resumes at that stage.
MLflow gets one parent run per flow run and a child run per stage that actually ran. Stage files go to
the run's stage dir (`work_dir`, or a local `output`): intermediates under work/<stage>-<digest>, the
defended model and reports as `ubt defend` writes them, published to a remote `output` at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run

from ubt_core.config import (
    EvalConfig,
    RayConfig,
    RunConfig,
    config_digest,
    flatten_config,
    load_run_config,
    redacted_config,
)
from ubt_core.data.contract import use_s3_endpoint
from ubt_core.defense import stages
from ubt_core.defense.embed import Precision
from ubt_core.defense.overfit import OverfitConfig
from ubt_core.defense.refine import RefineConfig
from ubt_core.defense.scan import ScanConfig
from ubt_core.defense.select import SelectConfig
from ubt_core.defense.unlearn import UnlearnConfig
from ubt_core.eval import evaluate as evaluate_model
from ubt_core.eval import resolve_trigger
from ubt_core.jobs import run_scan_job, run_stage_job
from ubt_core.provenance import checkpoint_digest, code_version, dataset_digest, file_digest
from ubt_core.tracking import Tracker

# where a stage runs and whom it reports to never change its result, so they stay out of the cache key
CACHED = (INPUTS + TASK_SOURCE) - "ctx" - "ray"


@dataclass(frozen=True)
class StageContext:
    """Whom a stage reports to: the MLflow experiment and the flow's parent run."""

    tracking_uri: str
    experiment: str
    parent_run_id: str


def _tracked(ctx: StageContext, stage: str, body: Callable[[Tracker, str], Any], params: dict | None = None) -> dict:
    """Run a stage body inside its own MLflow child run; returns its value with `seconds` and `run_id`."""
    tracker = Tracker(ctx.tracking_uri, ctx.experiment)
    with tracker.stage_run(ctx.parent_run_id, stage, params) as run_id:
        start = time.perf_counter()
        value = body(tracker, run_id)
        seconds = round(time.perf_counter() - start, 2)
        numbers = {k: float(v) for k, v in (value if isinstance(value, dict) else {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        tracker.log_metrics(run_id, numbers | {"seconds": seconds})
    return {"value": value, "seconds": seconds, "run_id": run_id}


@task(cache_policy=CACHED, persist_result=True)
def validate(data_uri: str, data_digest: str, out: str, quarantine: str | None, code: str,
             ctx: StageContext) -> dict:
    return _tracked(ctx, "validate", lambda *_: stages.validate_stage(data_uri, out, quarantine))


@task(cache_policy=CACHED, persist_result=True)
def scan(stage: str, model_dir: str, model_digest: str, data_uri: str, data_digest: str, out_uri: str,
         precision: Precision, code: str, ray: RayConfig, ctx: StageContext) -> dict:
    return _tracked(ctx, stage, lambda *_: vars(run_scan_job(ray, model_dir, data_uri, out_uri, precision)),
                    {"precision": precision})


@task(cache_policy=CACHED, persist_result=True)
def overfit(model_dir: str, model_digest: str, data_uri: str, data_digest: str, embeddings: str, out_dir: str,
            cfg: OverfitConfig, code: str, ray: RayConfig, ctx: StageContext) -> dict:
    return _tracked(ctx, "overfit", lambda *_: run_stage_job(
        ray, stages.overfit_stage, model_dir, data_uri, embeddings, out_dir, cfg), cfg.model_dump())


@task(cache_policy=CACHED, persist_result=True)
def pattern(model_dir: str, model_digest: str, data_uri: str, data_digest: str, out: str, select_cfg: SelectConfig,
            refine_cfg: RefineConfig, precision: Precision, code: str, ctx: StageContext) -> dict:
    def body(tracker: Tracker, run_id: str) -> dict:
        summary = stages.pattern_stage(data_uri, out, select_cfg, model_dir, refine_cfg, precision)
        if not summary["backdoor_evidence"]:
            return summary
        tracker.log_artifact(run_id, Path(out) / stages.SUSPICIOUS_FILE)
        return summary | {"digest": file_digest(Path(out) / stages.SUSPICIOUS_FILE)}
    return _tracked(ctx, "pattern", body, {"select": select_cfg.model_dump(), "refine": refine_cfg.model_dump(),
                                           "precision": precision})


@task(cache_policy=CACHED, persist_result=True)
def select(stage: str, model_dir: str, model_digest: str, data_uri: str, data_digest: str, suspect: str,
           amplified: str | None, out: str, scan_cfg: ScanConfig, select_cfg: SelectConfig, refine_cfg: RefineConfig,
           tried: dict | None, code: str, ctx: StageContext) -> dict:
    def body(tracker: Tracker, run_id: str) -> dict:
        summary = stages.select_stage(data_uri, suspect, amplified, out, scan_cfg, select_cfg, model_dir, refine_cfg,
                                      tried)
        tracker.log_artifact(run_id, Path(out) / stages.SUSPICIOUS_FILE)
        return summary | {"digest": file_digest(Path(out) / stages.SUSPICIOUS_FILE)}
    return _tracked(ctx, stage, body, {"scan": scan_cfg.model_dump(), "select": select_cfg.model_dump(),
                                       "refine": refine_cfg.model_dump()})


@task(cache_policy=CACHED, persist_result=True)
def unlearn(model_dir: str, model_digest: str, data_uri: str, data_digest: str, selection_digest: str, out: str,
            cfg: UnlearnConfig, code: str, ray: RayConfig, ctx: StageContext) -> dict:
    def body(*_) -> dict:
        info = run_stage_job(ray, stages.unlearn_stage, model_dir, data_uri, out, cfg,
                             {"defense_unlearn": cfg.model_dump()})
        return info | {"digest": checkpoint_digest(Path(out) / "model")}
    return _tracked(ctx, "unlearn", body, cfg.model_dump())


@task(cache_policy=CACHED, persist_result=True)
def evaluate(which: str, model_dir: str, model_digest: str, eval_uri: str, cfg: EvalConfig, code: str,
             ctx: StageContext) -> dict:
    trigger, target = resolve_trigger(cfg.attack, cfg.target, cfg.trigger_from, cfg.trigger_seed)
    return _tracked(ctx, f"evaluate_{which}", lambda *_: evaluate_model(model_dir, eval_uri, trigger, target))


@task(retries=2)  # idempotent copies; object stores have transient faults
def publish(stage_dir: str, output: str) -> list[str]:
    return stages.publish_outputs(stage_dir, output)


@task
def report(cfg: RunConfig, data_uri: str, stage_seconds: dict[str, float], extra: dict, ctx: StageContext) -> dict:
    def body(tracker: Tracker, run_id: str) -> dict:
        stage_dir = Path(cfg.stage_dir)
        result = stages.report_stage(cfg.model, data_uri, stage_dir, cfg.defense.model_dump(), stage_seconds, extra)
        for name in ("report.md", "report.json", *sorted(p.name for p in stage_dir.glob("*.png"))):
            tracker.log_artifact(run_id, stage_dir / name, "report")
        return result
    return _tracked(ctx, "report", body)


@task(cache_policy=CACHED - "lineage", persist_result=True)  # one version per defended model, not per flow run
def register(cfg: RunConfig, model_digest: str, lineage: dict[str, str], code: str, ctx: StageContext) -> dict:
    return _tracked(ctx, "register", lambda tracker, run_id: {"version": tracker.register_model(
        run_id, Path(cfg.stage_dir) / "model", cfg.mlflow.registered_model, lineage)})


def _tracking_uri(cfg: RunConfig) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{(Path(cfg.stage_dir) / 'mlflow.db').resolve()}"


def _scan_and_select(cfg: RunConfig, tasks: dict, data: str, data_digest: str, suspect_digest: str,
                     tried: dict | None, seconds: dict[str, float], code: str, ray: RayConfig,
                     ctx: StageContext) -> dict:
    """Scan the suspect, over-fit, scan and select (on the suspect's scan alone first where that may make the
    overfit unnecessary); returns the last select task's result and adds each stage's seconds to `seconds`."""
    d, out = cfg.defense, Path(cfg.stage_dir)
    work = out / "work"
    suspect = tasks["scan"]("scan_suspect", cfg.model, suspect_digest, data, data_digest,
                            str(work / f"embeddings-suspect-{suspect_digest}-{d.precision}"), d.precision, code, ray,
                            ctx)
    seconds["scan_suspect"] = suspect["seconds"]

    def select_on(stage: str, amplified: str | None) -> dict:
        picked = tasks["select"](stage, cfg.model, suspect_digest, data, data_digest, suspect["value"]["out_uri"],
                                 amplified, str(out), d.scan, d.select, d.refine, tried, code, ctx)
        seconds[stage] = picked["seconds"]
        return picked

    selected = select_on("select", None) if d.select_before_overfit() else None
    if d.needs_overfit(selected and selected["value"]):
        over = tasks["overfit"](cfg.model, suspect_digest, data, data_digest, suspect["value"]["out_uri"],
                                str(work / f"overfit-model-{config_digest(d.overfit)}"), d.overfit, code, ray, ctx)
        over_digest = checkpoint_digest(over["value"])
        amplified = tasks["scan"]("scan_overfit", over["value"], over_digest, data, data_digest,
                                  str(work / f"embeddings-overfit-{over_digest}-{d.precision}"), d.precision, code,
                                  ray, ctx)
        seconds |= {"overfit": over["seconds"], "scan_overfit": amplified["seconds"]}
        selected = select_on("select" if selected is None else "select_overfit", amplified["value"]["out_uri"])
    return selected


@flow(name="ubt-defend")
def defend_flow(config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """UBT on a suspect model and its training pairs, as a DAG of cached stages; returns the report."""
    cfg = load_run_config(config_path, overrides or [])
    use_s3_endpoint(cfg.s3.endpoint_url)
    out = Path(cfg.stage_dir)
    d, code = cfg.defense, code_version()
    # Ray Train keeps its stage checkpoints with the run's other outputs unless the config says otherwise
    ray = cfg.ray.model_copy(update={"storage_path": cfg.ray.storage_path or str((out / "ray").resolve())})
    tracker = Tracker(_tracking_uri(cfg), cfg.mlflow.experiment)
    train_digest = dataset_digest(cfg.data.train)
    with tracker.flow_run(flow_run.get_name() or "ubt-defend", flatten_config(redacted_config(cfg)),
                          {"prefect.flow_run_id": str(flow_run.get_id()), "ubt.code_version": code}) as parent:
        tracker.log_dict(parent, redacted_config(cfg), "config.json")
        tracker.log_dataset(parent, cfg.data.train, train_digest, "train", "training")
        if cfg.data.eval:
            tracker.log_dataset(parent, cfg.data.eval, dataset_digest(cfg.data.eval), "eval", "evaluation")
        ctx = StageContext(tracker.tracking_uri, cfg.mlflow.experiment, parent)
        storage = {"result_storage": cfg.prefect.result_storage} if cfg.prefect.result_storage else {}
        tasks = {t.name: t.with_options(retries=cfg.prefect.retries,
                                        retry_delay_seconds=cfg.prefect.retry_delay_seconds, **storage)
                 for t in (validate, pattern, scan, overfit, select, unlearn, evaluate, register)}

        checked = tasks["validate"](cfg.data.train, train_digest, str(out), cfg.data.quarantine, code, ctx)
        data = checked["value"]["data"]
        data_digest = train_digest if data == cfg.data.train else dataset_digest(data)
        suspect_digest = checkpoint_digest(cfg.model)
        seconds = {"load": checked["seconds"]}
        tried = selected = None
        if d.pattern_first():
            found = tasks["pattern"](cfg.model, suspect_digest, data, data_digest, str(out), d.select, d.refine,
                                     d.precision, code, ctx)
            seconds["pattern"], tried = found["seconds"], found["value"]
            selected = found if tried["backdoor_evidence"] else None
        if selected is None:
            selected = _scan_and_select(cfg, tasks, data, data_digest, suspect_digest, tried, seconds, code, ray, ctx)
        cleaned = tasks["unlearn"](cfg.model, suspect_digest, data, data_digest, selected["value"]["digest"], str(out),
                                   d.unlearn, code, ray, ctx)
        seconds["unlearn"] = cleaned["seconds"]
        evaluation = {}
        if cfg.data.eval:
            evaluation = {which: tasks["evaluate"](which, model, digest, cfg.data.eval, cfg.eval, code, ctx)["value"]
                          for which, model, digest in (("suspect", cfg.model, suspect_digest),
                                                       ("defended", str(out / "model"), cleaned["value"]["digest"]))}
        result = report(cfg, data, seconds, {"evaluation": evaluation, "quarantined": checked["value"]["quarantined"]},
                        ctx)["value"]
        version = tasks["register"](cfg, cleaned["value"]["digest"], {
            "ubt.suspect_model": cfg.model, "ubt.dataset_uri": cfg.data.train, "ubt.dataset_digest": train_digest,
            "ubt.selection_run_id": selected["run_id"], "ubt.code_version": code,
            "ubt.prefect_flow_run_id": str(flow_run.get_id())}, code, ctx)["value"]["version"]
        if cfg.output != cfg.stage_dir:
            publish(str(out), cfg.output)
        tracker.log_metrics(parent, {f"{which}_{k}": v[k] for which, v in evaluation.items()
                                     for k in ("ca", "asr", "ra") if k in v} | {"k": result["k"]})
    return result | {"registered_version": version, "mlflow_run_id": parent}
