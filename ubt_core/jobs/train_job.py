"""CLIP training as a Ray Train job: `train_clip`'s loop, data-parallel over `RayConfig.num_workers` workers.

Each worker reads the pair table, takes its DistributedSampler shard and runs `train_step` under DDP
(gloo on CPU); features are gathered across workers so the contrastive batch is `batch_size` pairs, as
in one process. Rank 0 reports a checkpoint per epoch (an open_clip local-dir plus `train_state.pt`),
which a restarted worker group resumes from. The driver writes the final model to OUT like `train_clip`.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ubt_core.config import RayConfig, config_digest
from ubt_core.data.contract import read_pairs
from ubt_core.errors import UbtError
from ubt_core.jobs.runtime import checkpoint_bytes, ensure_ray, load_checkpoint_bytes
from ubt_core.losses import ClipLoss
from ubt_core.models import load_model, save_model
from ubt_core.models.checkpoint import CONFIG_NAME
from ubt_core.tracking import log_run_metrics
from ubt_core.train import STATE_NAME, PairDataset, TrainConfig, TrainResult, param_groups, train_step, warmup_cosine

MAX_FAILURES = 2  # worker-group restarts (a lost worker or node); each resumes from the last epoch checkpoint
LINEAGE_NAME = "ubt.json"  # what save_model writes `extra` to


@dataclass
class TrainJobResult(TrainResult):
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, contrastive_loss, lr, steps, attempt
    attempts: int = 1  # worker-group runs that trained an epoch (> 1: resumed after a failure)
    skipped: bool = False  # out_dir already held this training's model


def _train_worker(config: dict) -> dict:
    """Ray Train's per-worker function; returns (on every rank) the epoch history of this run."""
    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    start = time.perf_counter()
    table = read_pairs(config["data"]).table
    state, saved = {"epoch": -1, "seconds": 0.0, "steps": 0, "history": [], "attempt": 0}, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a rerun of a job whose driver died
        with checkpoint.as_directory() as ckpt_dir:
            loaded = load_model(ckpt_dir)  # each checkpoint is itself an open_clip local-dir
            saved = torch.load(Path(ckpt_dir) / STATE_NAME, weights_only=True)
    else:
        torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
        init = config["init"]
        loaded = load_checkpoint_bytes(ray.get(init)) if init is not None else load_model(cfg.model)
    dataset = PairDataset(table, loaded, cfg.pixel_cache_mb)
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    # each rank holds batch_size / world pairs; the loss gathers them into one batch_size contrastive batch
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size // world, sampler=sampler,
                                         drop_last=True)
    model = ray.train.torch.prepare_model(loaded.model)
    optimizer = torch.optim.AdamW(param_groups(loaded.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.epochs * len(loader)))
    if saved is not None:
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        state = saved
    attempt = state["attempt"] + 1
    loss_fn = ClipLoss(gather_with_grad=True, rank=rank, world_size=world)  # exact full-batch gradient under DDP
    device = ray.train.torch.get_device()
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        sampler.set_epoch(epoch)
        loss = float("nan")
        for images, texts in loader:
            loss = train_step(model, images.to(device), texts.to(device), loss_fn, optimizer, scheduler,
                              cfg.max_logit_scale)["contrastive_loss"]
            state["steps"] += 1
        metrics = {"epoch": epoch, "contrastive_loss": loss, "lr": scheduler.get_last_lr()[0],
                   "steps": state["steps"], "attempt": attempt}
        state |= {"epoch": epoch, "attempt": attempt, "history": [*state["history"], metrics],
                  "seconds": state["seconds"] + time.perf_counter() - start}
        start = time.perf_counter()
        if rank == 0:  # progress: Ray forwards worker output to the driver's console
            print(f"train epoch {epoch + 1}/{cfg.epochs}: loss {loss:.3f}, lr {metrics['lr']:.2e}, "
                  f"{state['steps']} steps, {state['seconds']:.0f} s", flush=True)
        _report(metrics, loaded, optimizer, scheduler, state, rank, config["tracking"])
    return {k: state[k] for k in ("history", "steps", "seconds")}


def _report(metrics: dict, loaded, optimizer, scheduler, state: dict, rank: int, tracking: dict | None) -> None:
    """Every rank reports (it is a barrier); only rank 0 writes the checkpoint and logs to MLflow."""
    if rank != 0:
        ray.train.report(metrics)
        return
    if tracking is not None:
        log_run_metrics(tracking["tracking_uri"], tracking["run_id"],
                        {k: v for k, v in metrics.items() if k not in ("epoch", "attempt")}, metrics["epoch"])
    with tempfile.TemporaryDirectory(prefix="ubt-train-") as tmp:
        save_model(loaded, tmp)  # the checkpoint is itself an open_clip local-dir
        torch.save(state | {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   Path(tmp) / STATE_NAME)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{metrics['epoch']:03d}")


def _lineage(out_dir: Path) -> dict | None:
    """`ubt.json` of a complete checkpoint at out_dir (save_model writes the config last), else None."""
    if not (out_dir / CONFIG_NAME).is_file() or not (out_dir / LINEAGE_NAME).is_file():
        return None
    return json.loads((out_dir / LINEAGE_NAME).read_text())


def _storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())  # Ray needs an absolute path


def _reraise_user_error(e: ray.train.TrainingFailedError) -> None:
    """Surface a UbtError raised on a worker as itself, so the CLI prints its one clear line."""
    for failure in getattr(e, "worker_failures", {}).values():
        if isinstance(failure, UbtError):
            raise failure from e


def run_train_job(ray_cfg: RayConfig, train_cfg: TrainConfig, data_uri: str, out_dir: str,
                  tracking: dict | None = None) -> TrainJobResult:
    """Train (or fine-tune, `train_cfg.init`) CLIP on `data_uri` with Ray Train; saves the model at `out_dir`.

    Args:
        tracking: `{"tracking_uri": ..., "run_id": ...}`: rank 0 logs each epoch's metrics to that MLflow run.

    Returns:
        The training summary with the per-epoch history; `skipped` when `out_dir` already held this
        training (same config and data), which is then not redone. A crashed earlier job resumes.
    """
    out = Path(out_dir).resolve()
    data_uri = data_uri if "://" in data_uri else str(Path(data_uri).resolve())  # workers run in their own cwd
    train = train_cfg.model_dump(mode="json")
    done = _lineage(out)
    if done is not None and done.get("trained_on") == data_uri and done.get("train_config") == train:
        # .get: a model that `train_clip` wrote has the same lineage but no step count or final loss
        return TrainJobResult(out, train_cfg.epochs, done.get("train_steps", -1), done.get("train_seconds", 0.0),
                              done.get("final_loss", float("nan")), skipped=True)
    if train_cfg.batch_size % ray_cfg.num_workers:
        raise UbtError(f"batch_size {train_cfg.batch_size} does not split evenly over {ray_cfg.num_workers} Ray Train "
                       "workers; make it a multiple of ray.num_workers.")
    # the data is checked here, once: a worker's error would be retried MAX_FAILURES times before reaching the user
    rows = read_pairs(data_uri).table.num_rows
    if rows < train_cfg.batch_size:
        raise UbtError(f"{data_uri}: {rows} pairs is fewer than one batch ({train_cfg.batch_size}); "
                       "lower --batch-size.")
    ensure_ray(ray_cfg)
    # shipped through the object store, so workers on any node need no shared disk for the init weights
    init = ray.put(checkpoint_bytes(train_cfg.init)) if train_cfg.init is not None else None
    # the run name keys Ray's own resume-after-driver-crash: same training, same name
    key = {"train": train, "data": data_uri, "out": str(out), "workers": ray_cfg.num_workers}
    name = f"train-{out.name}-{config_digest(key)}"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"train": train, "data": data_uri, "init": init, "tracking": tracking},
        scaling_config=_scaling(ray_cfg, ray_cfg.num_workers),
        run_config=RunConfig(storage_path=_storage(ray_cfg.storage_path or str(out.parent / "ray")), name=name,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        _reraise_user_error(e)
        raise
    summary = result.return_value
    with result.checkpoint.as_directory() as final:
        loaded = load_model(final)
    history = summary["history"]
    loss = history[-1]["contrastive_loss"]
    save_model(loaded, out, extra={"trained_on": data_uri, "train_config": train, "train_seconds": round(
        summary["seconds"], 1), "train_steps": summary["steps"], "final_loss": loss, "ray_run": result.path})
    return TrainJobResult(out, train_cfg.epochs, summary["steps"], summary["seconds"], loss, history,
                          attempts=max(row["attempt"] for row in history))


def _scaling(ray_cfg: RayConfig, workers: int) -> ScalingConfig:
    return ScalingConfig(num_workers=workers, use_gpu=ray_cfg.use_gpu,
                         resources_per_worker={"CPU": ray_cfg.cpus_per_worker})


def run_stage_job(ray_cfg: RayConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a plain-torch stage `fn(*args)` on one Ray Train worker (the cluster's resources); returns its value.

    The stage reads and writes files itself, so those paths must be reachable from the worker. Not retried
    here: a failure reaches the caller (a Prefect task retries the whole stage).
    """
    ensure_ray(ray_cfg)
    storage = _storage(ray_cfg.storage_path) if ray_cfg.storage_path else None  # None: Ray's ~/ray_results
    label = re.sub(r"\W", "", getattr(fn, "__name__", "")) or "fn"  # a lambda's name is `<lambda>`
    trainer = TorchTrainer(
        lambda: fn(*args), scaling_config=_scaling(ray_cfg, 1),
        run_config=RunConfig(storage_path=storage, name=f"stage-{label}-{uuid.uuid4().hex[:8]}",
                             failure_config=FailureConfig(max_failures=0)))
    try:
        return trainer.fit().return_value
    except ray.train.TrainingFailedError as e:
        _reraise_user_error(e)
        raise
