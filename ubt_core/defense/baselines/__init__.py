"""Baseline defenses with UBT's interface: suspect checkpoint + data -> OUT/model + OUT/report.json.

`ft` and `cleanclip` repair with a trusted clean set (`clean_uri`); `abl` and `safeclip` work on the
suspect's own (possibly poisoned) training data and also rank its pairs, so their detection is
scored like UBT's when the data has ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from ubt_core.data.contract import read_pairs, write_json
from ubt_core.defense.baselines.abl import abl
from ubt_core.defense.baselines.cleanclip import cleanclip
from ubt_core.defense.baselines.common import BaselineConfig
from ubt_core.defense.baselines.ft import finetune_clean
from ubt_core.defense.baselines.safeclip import safeclip
from ubt_core.errors import UbtError
from ubt_core.eval.detection import detection_metrics
from ubt_core.models import LoadedModel, load_model, save_model

Baseline = Callable[[LoadedModel, pa.Table, BaselineConfig], tuple[LoadedModel, dict]]
BASELINES: dict[str, Baseline] = {"ft": finetune_clean, "cleanclip": cleanclip, "abl": abl, "safeclip": safeclip}
NEEDS_CLEAN_SET = frozenset({"ft", "cleanclip"})

__all__ = ["BASELINES", "NEEDS_CLEAN_SET", "BaselineConfig", "run_baseline"]


def run_baseline(name: str, model_dir: str, data_uri: str, out_dir: str | Path, cfg: BaselineConfig | None = None,
                 clean_uri: str | None = None) -> dict:
    """Defend the suspect at `model_dir` with baseline `name`; writes OUT/model and OUT/report.json."""
    if name not in BASELINES:
        raise UbtError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}.")
    if name in NEEDS_CLEAN_SET and clean_uri is None:
        raise UbtError(f"baseline {name!r} fine-tunes on a trusted clean set: pass its pair dataset as clean_uri "
                       "(`--clean-data DIR`).")
    cfg = cfg or BaselineConfig()
    start = time.perf_counter()
    trained_on = clean_uri if name in NEEDS_CLEAN_SET else data_uri
    table = read_pairs(trained_on).table
    defended, info = BASELINES[name](load_model(model_dir), table, cfg)
    seconds = round(time.perf_counter() - start, 2)
    out = Path(out_dir)
    report = {"defense": name, "model": str(model_dir), "data": data_uri, "trained_on": trained_on,
              "total_seconds": seconds, "pair_passes": info.get("pair_passes", cfg.steps * cfg.batch_size),
              "pairs_trained": info["pairs_trained"], "config": cfg.model_dump()}
    if "suspicion" in info:
        report["k"] = info["k"]
        if "poisoned" in table.column_names and not table.column("poisoned").null_count:
            truth = table.column("poisoned").to_numpy(zero_copy_only=False).astype(bool)
            report["detection"] = detection_metrics(np.asarray(info["suspicion"]), truth, info["k"])
    save_model(defended, out / "model", extra={"defended_from": str(model_dir), "defense": name,
                                                "data": trained_on})
    write_json(report, str(out / "report.json"))
    return report
