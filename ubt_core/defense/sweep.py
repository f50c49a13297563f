"""Unlearning sweep: re-run only UBT's unlearning step, with other settings, on the comparison's cells.

Each UBT cell of `ubt bench --defenses ...,ubt` keeps its ranked pairs (`suspicious.parquet`, with the
selected and retained ones), so every variant unlearns exactly the pairs UBT chose there and only the
unlearning differs. A variant is a set of `UnlearnConfig` overrides of the cell's UBT settings. Results go
to WORK/seed-S/unlearn-sweep/UBT-CELL/VARIANT-DIGEST/ATTACK/ (a finished one is reused) and into a table of
ASR after and CA change against the backdoored model, per seed and as the mean over seeds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field, field_validator

from ubt_core.attacks import TriggerSpec, read_manifest
from ubt_core.bench import write_doc_section
from ubt_core.config import config_digest
from ubt_core.data.contract import write_json
from ubt_core.defense.bench import check_variant_names, merge_settings, variant_config
from ubt_core.defense.compare import CompareConfig, cell_dir, cell_inputs, ubt_cell_config
from ubt_core.defense.stages import SELECTION_FILE, SUSPICIOUS_FILE, unlearn_stage
from ubt_core.defense.unlearn import UnlearnConfig
from ubt_core.errors import UbtError
from ubt_core.eval import evaluate

RESULT_FILE = "result.json"


class SweepConfig(BaseModel):
    compare: CompareConfig  # which cells (seeds, attacks) and UBT's settings there
    variants: dict[str, dict] = Field(min_length=1)  # name -> UnlearnConfig overrides

    @field_validator("variants")
    @classmethod
    def _known_settings(cls, variants: dict[str, dict]) -> dict[str, dict]:
        for override in variants.values():  # a misspelt setting fails here, before any cell runs
            variant_config({"unlearn": override})
        return check_variant_names(variants)


def _selection(seed_dir: Path, seed: int, attack: str, cfg: CompareConfig) -> Path:
    """The ranked pairs (with UBT's selection) of one UBT cell; an error says how to make them."""
    ranked = cell_dir(seed_dir, seed, attack, "ubt", cfg) / SUSPICIOUS_FILE
    if not ranked.is_file():
        raise UbtError(f"{ranked}: no UBT selection for seed {seed}, {attack}; run `ubt bench --out "
                       f"{seed_dir.parent} --defenses ubt --seeds {seed} --attacks {attack}` with the same "
                       "settings first.")
    return ranked


def _unlearned(seed_dir: Path, ranked: Path, attack: str, name: str, unlearn_cfg: UnlearnConfig,
               cfg: CompareConfig, trigger: TriggerSpec, target: str) -> dict:
    """Unlearn the pairs selected in `ranked` with `unlearn_cfg` (or reuse the result) and evaluate it."""
    out = seed_dir / "unlearn-sweep" / ranked.parent.parent.name / f"{name}-{config_digest(unlearn_cfg)}" / attack
    if (out / RESULT_FILE).is_file():  # the UBT cell's name above keeps variants of other selections apart
        return json.loads((out / RESULT_FILE).read_text())
    model_dir, data = cell_inputs(seed_dir, attack, cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name in (SUSPICIOUS_FILE, SELECTION_FILE):  # the cell's selection, and how it was found
        shutil.copyfile(ranked.parent / name, out / name)
    start = time.perf_counter()
    unlearn_stage(str(model_dir), str(data), out, unlearn_cfg)
    seconds = round(time.perf_counter() - start, 1)
    after = evaluate(str(out / "model"), str(seed_dir / "world" / "eval"), trigger, target)
    result = {"ca": after["ca"], "asr": after["asr"], "ra": after["ra"], "seconds": seconds}
    write_json(result, str(out / RESULT_FILE))
    return result


def run_unlearn_sweep(work_dir: str, cfg: SweepConfig, doc: str | None = None, command: str | None = None) -> str:
    """Every variant on every (seed, attack) UBT cell under `work_dir`; returns the Markdown table."""
    work = Path(work_dir)
    rows = []
    for seed in cfg.compare.seeds:
        seed_dir = work / f"seed-{seed}"
        for attack in cfg.compare.attacks:
            ranked = _selection(seed_dir, seed, attack, cfg.compare)
            model_dir, data = cell_inputs(seed_dir, attack, cfg.compare)
            trigger, target = read_manifest(str(data))
            before = evaluate(str(model_dir), str(seed_dir / "world" / "eval"), trigger, target)
            for name, override in cfg.variants.items():
                unlearn_cfg = ubt_cell_config(merge_settings(cfg.compare.ubt, {"unlearn": override}), seed).unlearn
                after = _unlearned(seed_dir, ranked, attack, name, unlearn_cfg, cfg.compare, trigger, target)
                rows.append({"variant": name, "attack": attack, "seed": seed, "asr": after["asr"],
                             "ca_change": 100 * (after["ca"] - before["ca"]), "seconds": after["seconds"]})
    markdown = _markdown(rows, cfg, command)
    (work / "unlearn-sweep.md").write_text(markdown)
    if doc:
        write_doc_section(Path(doc), f"unlearn-sweep:{cfg.compare.bench.setting}:{'+'.join(cfg.variants)}", markdown)
    return markdown


def _markdown(rows: list[dict], cfg: SweepConfig, command: str | None) -> str:
    seeds = cfg.compare.seeds
    lines = [
        f"### Unlearning sweep: {cfg.compare.bench.setting}, seeds {', '.join(map(str, seeds))}", "",
        f"Command: `{command or 'ubt bench-unlearn'}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"measured {time.strftime('%Y-%m-%d')}", "",
        "Per seed: ASR after / CA change in points against the backdoored model; then the means.", "",
        "| variant | unlearn overrides | attack | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ASR | mean CA change | unlearn s |",
        "|---|---|---|" + "---|" * len(seeds) + "---:|---:|---:|",
    ]
    for name, override in cfg.variants.items():
        for attack in cfg.compare.attacks:
            cell = {r["seed"]: r for r in rows if r["variant"] == name and r["attack"] == attack}
            per_seed = [f"{cell[s]['asr']:.3f} / {cell[s]['ca_change']:+.1f}" for s in seeds]
            lines.append(f"| {name} | `{json.dumps(override)}` | {attack} | " + " | ".join(per_seed)
                         + f" | {np.mean([c['asr'] for c in cell.values()]):.3f}"
                         + f" | {np.mean([c['ca_change'] for c in cell.values()]):+.1f}"
                         + f" | {np.mean([c['seconds'] for c in cell.values()]):.0f} |")
    return "\n".join(lines) + "\n"
