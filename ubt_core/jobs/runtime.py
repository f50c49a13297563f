"""Joining (or starting) the Ray cluster a run config names, and shipping checkpoints to its workers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray

from ubt_core.config import RayConfig
from ubt_core.models import LoadedModel, load_model

# quiet, reproducible Ray defaults unless the user set them: no usage reporting, logs not deduplicated
_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address`, or start a local Ray sized by `cfg.num_cpus`; a no-op when already connected."""
    if ray.is_initialized():
        return
    for name, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if cfg.address is None:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=cfg.address, log_to_driver=True)


def checkpoint_bytes(model_dir: str) -> dict[str, bytes]:
    """The files of a local-dir checkpoint (config and weights), to `ray.put` for workers on any node."""
    return {p.name: p.read_bytes() for p in Path(model_dir).iterdir() if p.is_file()}


def load_checkpoint_bytes(files: dict[str, bytes]) -> LoadedModel:
    """Load a checkpoint shipped by `checkpoint_bytes` (written to a temporary dir, then loaded weights-only)."""
    with tempfile.TemporaryDirectory(prefix="ubt-ckpt-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_model(tmp)
