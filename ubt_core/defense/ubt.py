"""UBT end to end in one process: overfit -> scan -> select -> token-level unlearning.

`defend` reads a suspect checkpoint and the pair dataset it was trained on, runs the file-level
stages of `ubt_core.defense.stages` in order and writes OUT/model (open_clip local-dir),
OUT/suspicious.parquet, OUT/report.json and OUT/report.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ubt_core.data.contract import write_json
from ubt_core.defense import stages
from ubt_core.defense.overfit import OverfitConfig
from ubt_core.defense.refine import RefineConfig
from ubt_core.defense.scan import ScanConfig
from ubt_core.defense.select import SelectConfig
from ubt_core.defense.unlearn import UnlearnConfig


class DefenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    overfit: OverfitConfig = OverfitConfig()
    scan: ScanConfig = ScanConfig()
    refine: RefineConfig = RefineConfig()
    select: SelectConfig = SelectConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    batch_size: int = Field(512, ge=1)  # scan batch; never changes a score


class _Stages:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def scan_digest(model_dir: str, data_uri: str, cfg: DefenseConfig) -> str:
    """Names a scan (suspect embeddings, over-fitted model and its embeddings) by everything it depends on."""
    key = {"model": str(model_dir), "data": data_uri, "overfit": cfg.overfit.model_dump(),
           "batch_size": cfg.batch_size}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _scan(model_dir: str, data_uri: str, scan_dir: Path, cfg: DefenseConfig) -> tuple[str, str | None, dict]:
    """Suspect embeddings, over-fitted model and its embeddings; reused when `scan_dir` already holds them."""
    done = scan_dir / "scan.json"
    if done.is_file():  # a reused scan keeps the seconds it took when it ran, so totals stay comparable
        saved = json.loads(done.read_text())
        return saved["suspect"], saved["overfit"], saved["stage_seconds"]
    stage = _Stages()
    suspect = str(scan_dir / "embeddings-suspect.parquet")
    with stage("scan_suspect"):
        stages.scan_stage(model_dir, data_uri, suspect, cfg.batch_size)
    amplified = None
    if cfg.overfit.steps:  # 0 = the "no overfit" ablation: only the strong evidence exists
        with stage("overfit"):
            overfit_model = stages.overfit_stage(model_dir, data_uri, suspect, scan_dir / "overfit-model", cfg.overfit)
        amplified = str(scan_dir / "embeddings-overfit.parquet")
        with stage("scan_overfit"):
            stages.scan_stage(overfit_model, data_uri, amplified, cfg.batch_size)
    write_json({"suspect": suspect, "overfit": amplified, "stage_seconds": stage.seconds}, str(done))
    return suspect, amplified, stage.seconds


def defend(model_dir: str, data_uri: str, out_dir: str | Path, cfg: DefenseConfig | None = None,
           quarantine: str | None = None, scan_cache: str | Path | None = None) -> dict:
    """Run UBT on a suspect model and its training pairs; returns the report (also written to OUT).

    With `scan_cache` (a directory), the scan of the same model, data and overfit settings is reused
    from an earlier run (ablations of the later stages).
    """
    cfg = cfg or DefenseConfig()
    out = Path(out_dir)
    stage = _Stages()
    with stage("load"):
        validated = stages.validate_stage(data_uri, out, quarantine)
    data = validated["data"]
    scan_dir = Path(scan_cache) / scan_digest(model_dir, data, cfg) if scan_cache else out
    suspect, amplified, scan_seconds = _scan(model_dir, data, scan_dir, cfg)
    stage.seconds |= scan_seconds
    with stage("select"):
        selection = stages.select_stage(data, suspect, amplified, out, cfg.scan, cfg.select, model_dir, cfg.refine)
    with stage("unlearn" if selection["k"] else "save"):  # with nothing selected the suspect is saved as is
        stages.unlearn_stage(model_dir, data, out, cfg.unlearn, {"defense_config": cfg.model_dump()})
    return stages.report_stage(model_dir, data, out, cfg.model_dump(), stage.seconds,
                               {"scan_cache": str(scan_cache) if scan_cache else None,
                                "quarantined": validated["quarantined"]})
