"""The comparison harness: UBT against the baseline defenses on the same backdoored models and seeds.

Per seed, `ubt_core.bench.run_bench` makes (or reuses) the world and one backdoored model per attack
under WORK/seed-S. Each (seed, attack, defense) cell then defends that model, evaluates it with the
attack's own trigger and records CA / ASR / RA, detection quality where the defense ranks pairs, wall
time and training samples. A finished cell's row is kept as ROWS/seed-S/DEFENSE-DIGEST-ATTACK.json,
where DIGEST names every setting the cell depends on, and is not recomputed; a seed whose rows are
all there needs no models. ROWS defaults to WORK/rows: point it at a kept directory to complete a
comparison over several runs. The rows go to WORK/results.parquet; WORK/results.md holds mean ± std
over seeds, and WORK/figures/ a CA-vs-ASR scatter per attack and the defense times.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, Field

from ubt_core.attacks import ATTACKS, read_manifest
from ubt_core.bench import BenchConfig, copy_beside_doc, run_bench, write_doc_section
from ubt_core.data.contract import read_pairs, write_json, write_pairs
from ubt_core.defense.baselines import NEEDS_CLEAN_SET, BaselineConfig, run_baseline
from ubt_core.defense.bench import merge_settings, variant_config
from ubt_core.defense.ubt import DefenseConfig, defend
from ubt_core.defense.unlearn import scope_settings, unpatched_per_step
from ubt_core.eval import evaluate
from ubt_core.provenance import code_version
from ubt_core.report import plot_comparison

DEFENSES = ("none", "ft", "cleanclip", "abl", "safeclip", "ubt")
Defense = Literal[DEFENSES]  # type: ignore[valid-type]


class CompareConfig(BaseModel):
    """Which attacks, defenses and seeds; the benchmark world and each defense's settings."""

    attacks: list[Literal[tuple(ATTACKS)]] = ATTACKS  # type: ignore[valid-type]
    defenses: list[Defense] = list(DEFENSES)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    bench: BenchConfig = BenchConfig()  # setting, rate, world and training (its attacks and seed are set here)
    baseline: BaselineConfig = BaselineConfig()  # seeded per cell
    clean_fraction: float = Field(0.2, gt=0, le=1)  # FT / CleanCLIP's trusted clean set, as a share of the data
    ubt: dict = {}  # DefenseConfig overrides, as for `ubt defend --config`


def clean_subset(data_uri: str, out_uri: str, fraction: float, seed: int) -> str:
    """The trusted clean set of FT and CleanCLIP: `fraction` x the data's size, drawn from its unpoisoned pairs."""
    if (Path(out_uri) / "_done").is_file():
        return out_uri
    table = read_pairs(data_uri).table
    clean = table.filter(pc.invert(table.column("poisoned")))
    n = min(clean.num_rows, max(1, round(fraction * table.num_rows)))
    rows = np.sort(np.random.default_rng(seed).choice(clean.num_rows, n, replace=False))
    write_pairs(clean.take(rows), out_uri)
    (Path(out_uri) / "_done").write_text("")
    return out_uri


def ubt_cell_config(overrides: dict, seed: int) -> DefenseConfig:
    """UBT's settings in a cell of `seed`: `overrides` over the defaults, every stage seeded with `seed`."""
    seeded = {section: {"seed": seed} for section in ("overfit", "scan", "refine", "select", "unlearn")}
    return variant_config(merge_settings(seeded, overrides))


def _ubt_training(cfg: DefenseConfig, report: dict, n_pairs: int) -> tuple[int, int]:
    """UBT's pair-passes and (at most) distinct pairs trained on: the overfit and the unlearning, each when it ran."""
    overfit, unlearn = cfg.overfit, cfg.unlearn
    passes = touched = 0
    if report["overfit_ran"]:
        passes = overfit.steps * (overfit.weak_per_batch + overfit.normal_per_batch)
        touched = round(overfit.weak_fraction * n_pairs) + overfit.steps * overfit.normal_per_batch
    if report["k"]:
        # each retain image goes through with the trigger, and `clean_per_step` of them without it too
        run = scope_settings(unlearn, report["unlearn"]["scope"])
        passes += run.steps * (run.batch_size + unpatched_per_step(unlearn, run.batch_size))
        touched += report["k"] + min(cfg.select.retain_size, n_pairs // 2)
    return passes, min(n_pairs, touched)


def _cell_digest(seed: int, defense: str, cfg: CompareConfig) -> str:
    """Names a cell by every setting its result depends on (not by the other cells of the comparison)."""
    # the triggers as built, so that a changed default (or the default spelt out) names the cell it makes
    bench = cfg.bench.model_dump(exclude={"attacks", "seed", "triggers"})
    bench["triggers"] = {attack: cfg.bench.trigger(attack).model_dump(exclude={"seed"}) for attack in ATTACKS}
    settings = {"bench": bench, "defense": defense, "seed": seed}
    if defense == "ubt":
        settings["ubt"] = ubt_cell_config(cfg.ubt, seed).model_dump()
    elif defense != "none":
        settings["baseline"] = cfg.baseline.model_dump()
    if defense in NEEDS_CLEAN_SET:
        settings["clean_fraction"] = cfg.clean_fraction
    return f"{defense}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"


def row_file(rows_dir: Path, seed: int, attack: str, defense: str, cfg: CompareConfig) -> Path:
    """Where the result row of one (seed, attack, defense) cell is kept."""
    return rows_dir / f"seed-{seed}" / f"{_cell_digest(seed, defense, cfg)}-{attack}.json"


def cell_dir(seed_dir: Path, seed: int, attack: str, defense: str, cfg: CompareConfig) -> Path:
    """Where one cell's defense writes its outputs (for UBT, the outputs of `ubt defend`)."""
    return seed_dir / "defense" / _cell_digest(seed, defense, cfg) / attack


def cell_inputs(seed_dir: Path, attack: str, cfg: CompareConfig) -> tuple[Path, Path]:
    """The backdoored model and its poisoned training data that every defense of `attack` gets."""
    bench = cfg.bench
    return (seed_dir / "models" / f"{bench.setting}-{attack}-{bench.rate}",
            seed_dir / "data" / f"{attack}-{bench.rate}")


def run_cell(seed_dir: Path, rows_dir: Path, seed: int, attack: str, defense: str, cfg: CompareConfig) -> dict:
    """Defend one backdoored model with one defense and evaluate it; returns (and keeps) the result row."""
    kept = row_file(rows_dir, seed, attack, defense, cfg)
    if kept.is_file():
        return json.loads(kept.read_text())
    bench = cfg.bench
    out = cell_dir(seed_dir, seed, attack, defense, cfg)
    model_dir, data = cell_inputs(seed_dir, attack, cfg)
    row = {"seed": seed, "attack": attack, "defense": defense, "setting": bench.setting, "seconds": 0.0,
           "pair_passes": 0, "pairs_trained": 0, "k": None, "precision_at_k": None, "recall_at_k": None,
           "auroc": None}
    defended = model_dir
    if defense == "ubt":
        ubt_cfg = ubt_cell_config(cfg.ubt, seed)
        report = defend(str(model_dir), str(data), out, ubt_cfg)
        row["pair_passes"], row["pairs_trained"] = _ubt_training(ubt_cfg, report, report["n_pairs"])
        defended = out / "model"
    elif defense != "none":
        clean = None
        if defense in NEEDS_CLEAN_SET:
            clean = clean_subset(str(data), str(seed_dir / "data" / f"{attack}-{bench.rate}-clean"),
                                 cfg.clean_fraction, seed)
        report = run_baseline(defense, str(model_dir), str(data), out, cfg.baseline.model_copy(update={"seed": seed}),
                              clean)
        row["pair_passes"], row["pairs_trained"] = report["pair_passes"], report["pairs_trained"]
        defended = out / "model"
    if defense != "none":
        row["seconds"] = report["total_seconds"]
        row["k"] = report.get("k")
        row |= {key: report.get("detection", {}).get(key) for key in ("precision_at_k", "recall_at_k", "auroc")}
    trigger, target = read_manifest(str(data))
    metrics = evaluate(str(defended), str(seed_dir / "world" / "eval"), trigger, target)
    row |= {key: metrics[key] for key in ("ca", "asr", "ra")} | {"code": code_version()}
    write_json(row, str(kept))
    return row


def needs_model(rows_dir: Path, seed: int, attack: str, cfg: CompareConfig) -> bool:
    """Whether some defense of (`seed`, `attack`) has no kept row yet, and so needs the backdoored model."""
    return not all(row_file(rows_dir, seed, attack, defense, cfg).is_file() for defense in cfg.defenses)


def make_model(seed_dir: Path, seed: int, attack: str, cfg: CompareConfig) -> None:
    """The world of `seed` and its backdoored model for `attack` (reused when present)."""
    # the clean model is only needed as the start of poisoned fine-tuning: the table does not use it
    run_bench(str(seed_dir), cfg.bench.model_copy(update={"seed": seed, "attacks": [attack],
                                                          "clean_baseline": cfg.bench.setting == "finetune"}))


def write_results(work: Path, rows: list[dict], cfg: CompareConfig, doc: str | None = None,
                  command: str | None = None) -> str:
    """results.parquet, figures/ and results.md under `work` (and the table into `doc`); returns the Markdown."""
    table = pa.Table.from_pylist(rows)
    work.mkdir(parents=True, exist_ok=True)  # kept rows alone may have made nothing under it yet
    pq.write_table(table, work / "results.parquet")
    figures = plot_comparison(table, work / "figures")
    markdown = results_markdown(table, cfg, command, [f"figures/{path.name}" for path in figures])
    (work / "results.md").write_text(markdown)
    if doc:
        links = copy_beside_doc(Path(doc), figures, f"results-{cfg.bench.setting}")
        write_doc_section(Path(doc), f"results:{cfg.bench.setting}", results_markdown(table, cfg, command, links))
    return markdown


def run_compare(work_dir: str, cfg: CompareConfig, doc: str | None = None, command: str | None = None,
                rows_dir: str | None = None) -> str:
    """Every (seed, attack, defense) cell under `work_dir`, in this process; returns the results Markdown."""
    work = Path(work_dir)
    rows_at = Path(rows_dir) if rows_dir else work / "rows"
    rows = []
    for seed in cfg.seeds:  # one attack at a time: an interrupted run leaves whole attacks done
        seed_dir = work / f"seed-{seed}"
        for attack in cfg.attacks:
            if needs_model(rows_at, seed, attack, cfg):
                make_model(seed_dir, seed, attack, cfg)
            rows += [run_cell(seed_dir, rows_at, seed, attack, defense, cfg) for defense in cfg.defenses]
    return write_results(work, rows, cfg, doc, command)


def _mean_std(values: list[float | None], digits: int = 3) -> str:
    present = [v for v in values if v is not None and not np.isnan(v)]
    if not present:
        return "–"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{np.mean(present):.{digits}f} ± {np.std(present, ddof=1):.{digits}f}"


def results_markdown(table: pa.Table, cfg: CompareConfig, command: str | None, figures: list[str]) -> str:
    """Mean ± sample std over seeds of every (attack, defense) cell, with the run's provenance; `figures` are
    links relative to where the Markdown is written."""
    rows = table.to_pylist()
    bench = cfg.bench
    lines = [
        f"### Setting: {bench.setting} (rate {bench.rate}, target {bench.target!r}, seeds "
        f"{', '.join(map(str, cfg.seeds))}; mean ± std over seeds)", "",
        f"Command: `{command or 'ubt bench --defenses ...'}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"measured {time.strftime('%Y-%m-%d')}", "",
        "| attack | defense | CA | ASR | RA | precision@k | recall@k | AUROC | defense s | pair-passes "
        "| pairs trained on |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for attack in cfg.attacks:
        for defense in cfg.defenses:
            cell = [r for r in rows if r["attack"] == attack and r["defense"] == defense]
            col = {key: [r[key] for r in cell] for key in cell[0]}
            lines.append(
                f"| {attack} | {defense} | {_mean_std(col['ca'])} | {_mean_std(col['asr'])} | {_mean_std(col['ra'])} "
                f"| {_mean_std(col['precision_at_k'])} | {_mean_std(col['recall_at_k'])} | {_mean_std(col['auroc'])} "
                f"| {_mean_std(col['seconds'], 0)} | {int(np.mean(col['pair_passes'])):,} "
                f"| {int(np.mean(col['pairs_trained'])):,} |")
    lines += ["", *[f"![{Path(link).stem}]({link})" for link in figures]]
    return "\n".join(lines) + "\n"
