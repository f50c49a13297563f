"""UBT end to end in one process: overfit -> scan -> select -> token-level unlearning.

`defend` reads a suspect checkpoint and the pair dataset it was trained on, and writes
OUT/model (open_clip local-dir), OUT/suspicious.parquet, OUT/report.json and OUT/report.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from ubt_core.data.contract import read_pairs, write_json, write_table
from ubt_core.defense.embed import embed_pairs
from ubt_core.defense.overfit import OverfitConfig, overfit
from ubt_core.defense.saliency import token_saliency
from ubt_core.defense.scan import ScanConfig, scan_scores
from ubt_core.defense.select import SelectConfig, select_pairs
from ubt_core.defense.unlearn import UnlearnConfig, unlearn
from ubt_core.eval.detection import detection_metrics
from ubt_core.models import LoadedModel, load_model, save_model
from ubt_core.report import write_defense_report, write_model_card
from ubt_core.train import PairDataset

SUSPICIOUS_FILE = "suspicious.parquet"
REPORT_SHOWN = 16  # most suspicious pairs shown in the report


class DefenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    overfit: OverfitConfig = OverfitConfig()
    scan: ScanConfig = ScanConfig()
    select: SelectConfig = SelectConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    batch_size: int = 512  # scan batch; never changes a score


class _Stages:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def _ground_truth(table: pa.Table) -> np.ndarray | None:
    """The `poisoned` flags when every row has one (benchmarks), else None."""
    if "poisoned" not in table.column_names or table.column("poisoned").null_count:
        return None
    return table.column("poisoned").to_numpy(zero_copy_only=False).astype(bool)


def _scan(suspect: LoadedModel, table: pa.Table, dataset: PairDataset, cfg: DefenseConfig,
          stage: _Stages) -> dict[str, np.ndarray]:
    """Embed, overfit, embed again and score: the per-pair scan columns."""
    with stage("scan_suspect"):
        suspect_emb = embed_pairs(suspect, table, cfg.batch_size, "suspect")
    amplified_emb = None
    if cfg.overfit.steps:
        with stage("overfit"):
            amplified = overfit(suspect, dataset, suspect_emb.cosine, cfg.overfit)
        with stage("scan_overfit"):
            amplified_emb = embed_pairs(amplified, table, cfg.batch_size, "overfit")
    with stage("score"):
        return scan_scores(suspect_emb, amplified_emb, cfg.scan)


def _cached_scan(cache_dir: Path, key: dict, run) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Scan columns and their stage seconds, reused from `cache_dir` when the same scan already ran."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"scan-{digest}.npz"
    if path.is_file():
        with np.load(path) as saved:
            seconds = json.loads(str(saved["stage_seconds"]))
            return {name: saved[name] for name in saved.files if name != "stage_seconds"}, seconds
    columns, seconds = run()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{path.name}.{os.getpid()}.tmp.npz"
    np.savez(tmp, stage_seconds=json.dumps(seconds), **columns)
    tmp.replace(path)
    return columns, seconds


def _verdict(evidence: bool, k: int) -> str:
    if evidence:
        return f"backdoor evidence: a group of pairs whose images collapse onto one point; {k} pairs unlearned"
    found = "no strong backdoor evidence: no anomalous group of pairs"
    return f"{found}; the {k} pairs asked for (fixed k) were unlearned anyway" if k else found


def defend(model_dir: str, data_uri: str, out_dir: str | Path, cfg: DefenseConfig | None = None,
           quarantine: str | None = None, scan_cache: str | Path | None = None) -> dict:
    """Run UBT on a suspect model and its training pairs; returns the report (also written to OUT).

    With `scan_cache` (a directory), the scan of the same model, data and overfit / scan settings is
    reused from an earlier run (ablations of the later stages); its recorded stage seconds are kept.
    """
    cfg = cfg or DefenseConfig()
    out = Path(out_dir)
    stage = _Stages()
    with stage("load"):
        table = read_pairs(data_uri, quarantine=quarantine).table
        suspect = load_model(model_dir)
        dataset = PairDataset(table, suspect)

    def run_scan() -> tuple[dict[str, np.ndarray], dict[str, float]]:
        scan_stages = _Stages()
        return _scan(suspect, table, dataset, cfg, scan_stages), scan_stages.seconds

    if scan_cache is None:
        columns, scan_seconds = run_scan()
    else:
        key = {"model": str(model_dir), "data": data_uri, "overfit": cfg.overfit.model_dump(),
               "scan": cfg.scan.model_dump(), "batch_size": cfg.batch_size}
        columns, scan_seconds = _cached_scan(Path(scan_cache), key, run_scan)
    stage.seconds |= scan_seconds
    poisoned = _ground_truth(table)
    with stage("select"):
        selection = select_pairs(columns["suspicion"], cfg.select, poisoned)
    unlearn_info = {"skipped": "no strong backdoor evidence and no fixed k"}
    if len(selection.forget):
        with stage("unlearn"):
            retain_images, _ = dataset.stack(selection.retain)
            cleaned, unlearn_info = unlearn(suspect, *dataset.stack(selection.forget), retain_images, cfg.unlearn)
    else:
        cleaned = copy.copy(suspect)
    shown = (selection.forget if len(selection.forget) else np.argsort(-columns["suspicion"]))[:REPORT_SHOWN]
    patch_saliency = unlearn_info.pop("patch_saliency", None)
    token_sal = unlearn_info.pop("token_saliency", None)
    pattern = unlearn_info.pop("pattern", None)
    if patch_saliency is None:
        with stage("saliency"):
            sal = token_saliency(suspect, *dataset.stack(shown))
            patch_saliency, token_sal = sal.patches, sal.tokens
    with stage("save"):
        save_model(cleaned, out / "model", extra={"defended_from": str(model_dir), "data": data_uri,
                                                  "defense_config": cfg.model_dump()})
        rank = np.empty(len(table), np.int64)
        rank[np.argsort(-columns["suspicion"], kind="stable")] = np.arange(1, len(table) + 1)
        selected = np.zeros(len(table), bool)
        selected[selection.forget] = True
        suspicious = pa.table({"uid": table.column("uid"), **columns, "rank": rank, "selected": selected,
                               **({"poisoned": table.column("poisoned")} if "poisoned" in table.column_names else {})})
        write_table(suspicious.sort_by("rank"), str(out / SUSPICIOUS_FILE))

    report = {
        "model": str(model_dir), "data": data_uri, "n_pairs": len(table), "k": int(len(selection.forget)),
        "backdoor_evidence": bool(selection.evidence),
        "verdict": _verdict(selection.evidence, len(selection.forget)),
        "anomalous_pairs": selection.n_anomalous,
        "unlearn": unlearn_info, "stage_seconds": stage.seconds,
        "scan_cache": str(scan_cache) if scan_cache else None, "config": cfg.model_dump(),
    }
    if poisoned is not None:
        report["detection"] = detection_metrics(columns["suspicion"], poisoned, len(selection.forget))
    with stage("report"):
        write_defense_report(out, report | {"total_seconds": sum(stage.seconds.values())}, columns, shown, table,
                             patch_saliency, token_sal, suspect, poisoned, pattern)
        write_model_card(out / "model", report)
    # a reused scan counts with the seconds it took when it ran, so totals stay comparable across runs
    report["total_seconds"] = round(sum(stage.seconds.values()), 2)
    write_json(report, str(out / "report.json"))
    return report
