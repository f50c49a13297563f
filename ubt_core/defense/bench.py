"""Defense benchmark: UBT (and its ablation variants) on the backdoored models of `ubt bench`.

For each attack of a threat setting, and each named variant (a `DefenseConfig` override), runs
`defend` on the cached backdoored model and its poisoned training set, evaluates the defended model
with the same trigger, and tabulates CA / ASR before and after, detection quality and defense time
against the model's training time. A clean-model row checks that UBT does no harm without a backdoor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator

from ubt_core.attacks import ATTACKS, read_manifest
from ubt_core.bench import write_doc_section
from ubt_core.defense.ubt import DefenseConfig, defend
from ubt_core.errors import UbtError
from ubt_core.eval import evaluate
from ubt_core.models.checkpoint import CONFIG_NAME
from ubt_core.provenance import code_version


class DefenseBenchConfig(BaseModel):
    setting: Literal["scratch", "finetune"] = "scratch"
    attacks: list[Literal[tuple(ATTACKS)]] = ["badnet", "blended", "sig", "wanet"]  # type: ignore[valid-type]
    rate: float = Field(0.01, gt=0, le=0.5)
    variants: dict[str, dict] = {"ubt": {}}  # name -> DefenseConfig overrides (nested dicts)
    clean_check: bool = True  # also defend the clean model on clean data

    @field_validator("variants")
    @classmethod
    def _names_are_directory_names(cls, variants: dict[str, dict]) -> dict[str, dict]:
        return check_variant_names(variants)


def check_variant_names(variants: dict[str, dict]) -> dict[str, dict]:
    """Variant names name directories under OUT: a separator would nest them (or leave OUT), so it is refused."""
    for name in variants:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ValueError(f"variant name {name!r} names a directory: use letters, digits and - _ = + . "
                             "(not starting with a dot, no slashes)")
    return variants


def merge_settings(base: dict, override: dict) -> dict:
    """`base` with the nested settings of `override` laid over it."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge_settings(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def variant_config(override: dict) -> DefenseConfig:
    return DefenseConfig.model_validate(merge_settings(DefenseConfig().model_dump(), override))


def defense_dir(work: Path, name: str, cfg: DefenseConfig, model_dir: Path) -> Path:
    """Where one defense of `model_dir` writes: keyed by the full config and the code version, so that neither a
    changed default nor a code change is served an older run's result."""
    key = {"config": cfg.model_dump(), "code": code_version()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return work / "defense" / f"{name}-{digest}" / model_dir.name


def _defended(work: Path, name: str, cfg: DefenseConfig, model_dir: Path, data: Path) -> tuple[Path, dict]:
    """Run (or reuse) one defense (`defense_dir`)."""
    out = defense_dir(work, name, cfg, model_dir)
    if not (out / "report.json").is_file():
        defend(str(model_dir), str(data), out, cfg, scan_cache=work / "defense" / "scan-cache")
    return out, json.loads((out / "report.json").read_text())


def _train_seconds(model_dir: Path) -> float:
    return json.loads((model_dir / "ubt.json").read_text())["train_seconds"]


def run_defense_bench(work_dir: str, cfg: DefenseBenchConfig, doc: str | None = None,
                      command: str | None = None) -> str:
    """Defend every backdoored model of `cfg.setting` under `work_dir`; returns the Markdown table."""
    work = Path(work_dir)
    eval_uri = str(work / "world" / "eval")
    rows = []
    for attack in cfg.attacks:
        data = work / "data" / f"{attack}-{cfg.rate}"
        model_dir = work / "models" / f"{cfg.setting}-{attack}-{cfg.rate}"
        if not (model_dir / CONFIG_NAME).is_file():
            raise UbtError(f"{model_dir}: no backdoored model; run `ubt bench --out {work} --setting {cfg.setting}` "
                           "first.")
        trigger, target = read_manifest(str(data))
        before = evaluate(str(model_dir), eval_uri, trigger, target)
        for name, override in cfg.variants.items():
            out, report = _defended(work, name, variant_config(override), model_dir, data)
            after = evaluate(str(out / "model"), eval_uri, trigger, target)
            rows.append({"attack": attack, "variant": name, "target": target, "before": before, "after": after,
                         "report": report, "train_seconds": _train_seconds(model_dir)})
    clean = None
    if cfg.clean_check:
        clean_dir = work / "models" / "clean"
        out, report = _defended(work, "ubt", variant_config(cfg.variants.get("ubt", {})), clean_dir,
                                work / "world" / "train")
        clean = {"before": evaluate(str(clean_dir), eval_uri), "after": evaluate(str(out / "model"), eval_uri),
                 "report": report, "train_seconds": _train_seconds(clean_dir)}
    markdown = _markdown(rows, clean, cfg, command)
    (work / f"defense-{cfg.setting}.md").write_text(markdown)
    if doc:
        write_doc_section(Path(doc), f"defense:{cfg.setting}:{'+'.join(cfg.variants)}", markdown)
    return markdown


def _num(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _markdown(rows: list[dict], clean: dict | None, cfg: DefenseBenchConfig, command: str | None) -> str:
    targets = ", ".join(sorted({repr(r["target"]) for r in rows}))
    lines = [
        f"### Setting: {cfg.setting} (rate {cfg.rate}{', target ' + targets if targets else ''}; "
        f"variants: {', '.join(cfg.variants)})", "",
        f"Command: `{command or 'ubt bench-defense'}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"measured {time.strftime('%Y-%m-%d')}", "",
        "| attack | variant | CA before → after (Δ points) | ASR before → after | RA after | k (poisoned) "
        "| precision@k | recall@k | AUROC | defense s (% of train) |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        b, a, rep = r["before"], r["after"], r["report"]
        d = rep.get("detection", {})
        lines.append(
            f"| {r['attack']} | {r['variant']} | {b['ca']:.3f} → {a['ca']:.3f} ({100 * (a['ca'] - b['ca']):+.1f}) "
            f"| {b['asr']:.3f} → {a['asr']:.3f} | {a['ra']:.3f} | {rep['k']} ({d.get('n_poisoned', '–')}) "
            f"| {_num(d.get('precision_at_k'))} | {_num(d.get('recall_at_k'))} | {_num(d.get('auroc'))} "
            f"| {rep['total_seconds']:.0f} ({100 * rep['total_seconds'] / r['train_seconds']:.0f} %) |")
    if clean:
        b, a, rep = clean["before"], clean["after"], clean["report"]
        lines += ["", f"Clean model on clean data: CA {b['ca']:.3f} → {a['ca']:.3f} "
                      f"({100 * (a['ca'] - b['ca']):+.1f} points), k = {rep['k']}, verdict: *{rep['verdict']}* "
                      f"({rep['total_seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"
