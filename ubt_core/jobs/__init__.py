"""Ray jobs: the only package of ubt_core that imports ray. Each wraps a plain-torch stage of
`ubt_core.defense` so it runs on a Ray cluster (or a local Ray) and writes the same files."""

from ubt_core.jobs.runtime import ensure_ray
from ubt_core.jobs.scan_job import ScanSummary, run_scan_job
from ubt_core.jobs.train_job import TrainJobResult, run_stage_job, run_train_job

__all__ = ["ScanSummary", "TrainJobResult", "ensure_ray", "run_scan_job", "run_stage_job", "run_train_job"]
