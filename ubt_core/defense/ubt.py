"""UBT end to end in one process: pattern -> scan -> overfit -> scan -> select -> token-level unlearning.

The first pass refines the caption concepts' pixel patterns before any image is embedded; when it verifies a
trigger pattern (refine's evidence) the image scan, the overfit, which exists to make weak backdoors visible, and
select are skipped. `defend` reads a suspect checkpoint and the pair dataset it was trained on, runs the file-level
stages of `ubt_core.defense.stages` in order and writes OUT/model (open_clip local-dir), OUT/suspicious.parquet,
OUT/report.json and OUT/report.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ubt_core.data.contract import write_json
from ubt_core.defense import stages
from ubt_core.defense.embed import Precision
from ubt_core.defense.overfit import OverfitConfig
from ubt_core.defense.refine import RefineConfig
from ubt_core.defense.scan import ScanConfig
from ubt_core.defense.select import SelectConfig
from ubt_core.defense.unlearn import UnlearnConfig
from ubt_core.provenance import checkpoint_digest, dataset_digest


class DefenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    overfit: OverfitConfig = OverfitConfig()
    scan: ScanConfig = ScanConfig()
    refine: RefineConfig = RefineConfig()
    select: SelectConfig = SelectConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    batch_size: int = Field(512, ge=1)  # scan batch; never changes a score
    # the scans' forward passes: bfloat16 autocast ran the image tower 2x faster on the benchmark's CPU (it has
    # avx512_bf16), and image embeddings stayed within 2e-4 cosine of float32's (docs/algorithm.md, step 1).
    # fp32 where the hardware has no bfloat16 (autocast is slower there)
    precision: Precision = "amp_bf16"

    def refine_searches(self) -> bool:
        """Whether refine looks for a trigger pattern at all (not with a fixed k or the oracle set)."""
        return self.refine.iterations > 0 and self.select.k is None and not self.select.oracle

    def pattern_first(self) -> bool:
        """Whether the caption concepts are refined before any image is embedded (`stages.pattern_stage`): a
        verified pattern there makes the image scan, the overfit and select unnecessary. Not where the overfit must
        run whatever is found (`overfit.skip_if_pattern` off)."""
        return (self.refine_searches() and self.refine.concepts > 0
                and (not self.overfit.steps or self.overfit.skip_if_pattern))

    def select_before_overfit(self) -> bool:
        """Whether to select on the suspect's scan alone first: without overfit steps that is the selection;
        otherwise only for a pattern verified from the scan's top that makes the overfit unnecessary, where the
        caption concepts were not tried first."""
        return not self.overfit.steps or (self.overfit.skip_if_pattern and self.refine_searches()
                                          and not self.pattern_first())

    def needs_overfit(self, selection: dict | None) -> bool:
        """Whether to over-fit and select again after `selection` (None: nothing selected yet)."""
        return bool(self.overfit.steps) and (selection is None or selection["evidence_kind"] != "shared pattern")


class _Stages:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def scan_digest(model_dir: str, data_uri: str, cfg: DefenseConfig) -> str:
    """Names a scan (suspect embeddings, over-fitted model and its embeddings) by everything it depends on,
    the contents of the model and the data included (a model retrained in the same place gets a new scan)."""
    key = {"model": str(model_dir), "data": data_uri, "overfit": cfg.overfit.model_dump(),
           "batch_size": cfg.batch_size, "precision": cfg.precision, "weights": checkpoint_digest(model_dir),
           "pairs": dataset_digest(data_uri)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cached(done: Path, run: Callable[[_Stages], dict]) -> tuple[dict, dict[str, float]]:
    """`run`'s outputs and stage seconds, or those an earlier run recorded in `done`."""
    if done.is_file():  # a reused scan keeps the seconds it took when it ran, so totals stay comparable
        saved = json.loads(done.read_text())
        return saved["outputs"], saved["stage_seconds"]
    stage = _Stages()
    outputs = run(stage)
    write_json({"outputs": outputs, "stage_seconds": stage.seconds}, str(done))
    return outputs, stage.seconds


def _scan_suspect(model_dir: str, data_uri: str, scan_dir: Path, cfg: DefenseConfig, stage: _Stages) -> dict:
    suspect = str(scan_dir / "embeddings-suspect.parquet")
    with stage("scan_suspect"):
        stages.scan_stage(model_dir, data_uri, suspect, cfg.batch_size, cfg.precision)
    return {"embeddings": suspect}


def _overfit_and_scan(model_dir: str, data_uri: str, suspect: str, scan_dir: Path, cfg: DefenseConfig,
                      stage: _Stages) -> dict:
    with stage("overfit"):
        overfit_model = stages.overfit_stage(model_dir, data_uri, suspect, scan_dir / "overfit-model", cfg.overfit)
    amplified = str(scan_dir / "embeddings-overfit.parquet")
    with stage("scan_overfit"):
        stages.scan_stage(overfit_model, data_uri, amplified, cfg.batch_size, cfg.precision)
    return {"embeddings": amplified}


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
    tried = None
    if cfg.pattern_first():
        with stage("pattern"):
            tried = stages.pattern_stage(data, out, cfg.select, model_dir, cfg.refine, cfg.precision, cfg.batch_size)
    selection = tried if tried and tried["backdoor_evidence"] else None
    if selection is None:
        selection = _scan_and_select(model_dir, data, out, cfg, stage, tried,
                                     Path(scan_cache) / scan_digest(model_dir, data, cfg) if scan_cache else out)
    with stage("unlearn" if selection["k"] else "save"):  # with nothing selected the suspect is saved as is
        stages.unlearn_stage(model_dir, data, out, cfg.unlearn, {"defense_config": cfg.model_dump()})
    return stages.report_stage(model_dir, data, out, cfg.model_dump(), stage.seconds,
                               {"scan_cache": str(scan_cache) if scan_cache else None,
                                "quarantined": validated["quarantined"]})


def _scan_and_select(model_dir: str, data: str, out: Path, cfg: DefenseConfig, stage: _Stages, tried: dict | None,
                     scan_dir: Path) -> dict:
    """Scan the suspect, select (on its scan alone first where that may make the overfit unnecessary), over-fit,
    scan and select again where needed; returns the last selection. Scans are kept in `scan_dir`."""
    suspect, seconds = _cached(scan_dir / "scan-suspect.json",
                               lambda timer: _scan_suspect(model_dir, data, scan_dir, cfg, timer))
    stage.seconds |= seconds

    def select(amplified: str | None) -> dict:
        return stages.select_stage(data, suspect["embeddings"], amplified, out, cfg.scan, cfg.select, model_dir,
                                   cfg.refine, tried)

    selection = None
    if cfg.select_before_overfit():
        with stage("select"):
            selection = select(None)
    if cfg.needs_overfit(selection):
        amplified, seconds = _cached(scan_dir / "scan-overfit.json", lambda timer: _overfit_and_scan(
            model_dir, data, suspect["embeddings"], scan_dir, cfg, timer))
        stage.seconds |= seconds
        with stage("select" if selection is None else "select_overfit"):
            selection = select(amplified["embeddings"])
    return selection
