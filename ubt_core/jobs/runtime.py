"""Joining (or starting) the Ray cluster a run config names, and shipping checkpoints to its workers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray

from ubt_core.config import RayConfig
from ubt_core.models import LoadedModel, load_model

# Defaults unless the user set them, inherited by a local Ray's processes: no usage reporting, logs not
# deduplicated, and two malloc arenas (glibc gives each thread its own; a Ray worker runs many threads, and
# a scan actor held 1.6-1.8 GiB of heap with the default, 1.0 GiB with two). Cluster images set the last
# in their environment (docker/Dockerfile): a job-level runtime_env would cost every task a fresh worker.
_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "MALLOC_ARENA_MAX": "2"}

# S3 settings the driver has, which workers on other nodes need to read and write the same objects
_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
           "AWS_DEFAULT_REGION")


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address`, or start a local Ray sized by `cfg.num_cpus`; a no-op when already connected.

    The driver's AWS_* variables travel to the workers in the job's runtime environment.
    """
    if ray.is_initialized():
        return
    for name, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    runtime_env = {"env_vars": {name: os.environ[name] for name in _S3_ENV if name in os.environ}}
    if cfg.address is None:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(address=cfg.address, log_to_driver=True, runtime_env=runtime_env)


def checkpoint_bytes(model_dir: str) -> dict[str, bytes]:
    """The files of a local-dir checkpoint (config and weights), to `ray.put` for workers on any node."""
    return {p.name: p.read_bytes() for p in Path(model_dir).iterdir() if p.is_file()}


def load_checkpoint_bytes(files: dict[str, bytes]) -> LoadedModel:
    """Load a checkpoint shipped by `checkpoint_bytes` (written to a temporary dir, then loaded weights-only)."""
    with tempfile.TemporaryDirectory(prefix="ubt-ckpt-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_model(tmp)
