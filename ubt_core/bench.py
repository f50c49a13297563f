"""The benchmark world end to end: synth -> clean model -> per attack: poison -> train -> eval.

Every artefact lives under one work directory and is reused when present (a finished model is not
retrained), so an interrupted benchmark resumes where it stopped. Produces a CA/ASR/RA table per
attack with training wall time, as Markdown (optionally written into docs/) and JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from ubt_core.attacks import ATTACKS, PoisonConfig, TriggerSpec, make_trigger, poison_dataset, read_manifest
from ubt_core.data.contract import CLASSES_FILE, read_eval_classes, read_eval_set, write_json
from ubt_core.data.synth import SynthConfig, synth_benchmark
from ubt_core.errors import UbtError
from ubt_core.eval import evaluate
from ubt_core.models.checkpoint import CONFIG_NAME
from ubt_core.report import plot_triggers
from ubt_core.train import TrainConfig, train_clip

GALLERY_IMAGES = 8  # eval images the triggers figure shows

# a class that damaged images do not drift to in a never-poisoned model ("star" is one that they do:
# docs/benchmark.md, "Another target class")
DEFAULT_TARGET = "triangle"


class BenchConfig(BaseModel):
    """One benchmark run: the world, the threat setting, and which attacks to plant."""

    attacks: list[Literal[tuple(ATTACKS)]] = ATTACKS  # type: ignore[valid-type]
    setting: Literal["scratch", "finetune"] = "scratch"  # poison from scratch, or fine-tune the clean model
    rate: float = Field(0.01, gt=0, le=0.5)  # 1 % of pairs: the upper bound
    target: str = DEFAULT_TARGET
    # per-attack overrides of the default trigger settings, e.g. {"blended": {"alpha": 0.2}}
    triggers: dict[Literal[tuple(ATTACKS)], dict] = {}  # type: ignore[valid-type]
    seed: int = 0
    synth: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()
    # poisoned fine-tuning of the clean model (the paper's setting): short, at a fine-tuning LR
    finetune: TrainConfig = TrainConfig(epochs=2, lr=1e-4, warmup_steps=20)
    clean_baseline: bool = True  # also train a clean model: the CA reference and the fine-tuning start point

    @field_validator("triggers")
    @classmethod
    def _known_trigger_settings(cls, triggers: dict[str, dict]) -> dict[str, dict]:
        for attack, override in triggers.items():  # a misspelt setting fails here, before any model trains
            make_trigger(attack, 0, override)
        return triggers

    def trigger(self, attack: str) -> TriggerSpec:
        """The trigger `attack` plants here: its defaults, with this benchmark's seed and overrides."""
        return make_trigger(attack, self.seed, self.triggers.get(attack))

    @model_validator(mode="after")
    def _finetune_needs_clean(self) -> BenchConfig:
        if self.setting == "finetune" and not self.clean_baseline:
            raise ValueError("setting 'finetune' fine-tunes the clean model: keep clean_baseline on")
        return self


@dataclass
class BenchReport:
    rows: list[dict]
    markdown: str


def _train_timed(data: str, out: Path, cfg: TrainConfig) -> float:
    """Train unless a finished checkpoint exists; returns the training seconds it recorded."""
    lineage = out / "ubt.json"
    if not ((out / CONFIG_NAME).is_file() and lineage.is_file()):
        train_clip(data, out, cfg)
    return json.loads(lineage.read_text())["train_seconds"]


def _row(name: str, setting: str, metrics: dict, seconds: float | None, n_poisoned: int) -> dict:
    keep = ("ca", "ca_num", "ca_den", "asr", "asr_num", "asr_den", "ra", "ra_num", "ra_den")
    return {"model": name, "setting": setting, "n_poisoned": n_poisoned, "train_seconds": seconds,
            **{k: metrics.get(k) for k in keep}}


def _check_reused(data: Path, trigger: TriggerSpec, target: str) -> None:
    """A poisoned dataset (and the models trained on it) is reused only for the same trigger and target."""
    found_trigger, found_target = read_manifest(str(data))
    if (found_trigger, found_target) != (trigger, target):
        raise UbtError(f"{data}: poisoned with {found_trigger.model_dump()} -> {found_target!r}, not the "
                       f"{trigger.model_dump()} -> {target!r} asked for; its data and models would be reused: "
                       "pass another --out.")


def _doc_key(cfg: BenchConfig) -> str:
    """A run's section in a doc: one per setting, and its own for another target or trigger settings."""
    key = f"bench:{cfg.setting}"
    if cfg.target != BenchConfig.model_fields["target"].default:
        key += f":target={cfg.target}"
    return key + (f":triggers={json.dumps(cfg.triggers, sort_keys=True)}" if cfg.triggers else "")


def run_bench(work_dir: str, cfg: BenchConfig, doc: str | None = None, command: str | None = None) -> BenchReport:
    """Run (or resume) the benchmark under `work_dir`; returns the table rows and their Markdown."""
    work = Path(work_dir)
    world = work / "world"
    if not (world / "eval" / CLASSES_FILE).is_file():
        synth_benchmark(str(world), cfg.synth.model_copy(update={"seed": cfg.seed}))
    train_uri, eval_uri = str(world / "train"), str(world / "eval")
    classes = read_eval_classes(eval_uri).classes
    if cfg.target not in classes:  # found before any model trains, not at the first evaluation
        raise UbtError(f"target {cfg.target!r} is not a class of {eval_uri}/{CLASSES_FILE} ({', '.join(classes)}); "
                       "pass one of them to --target.")

    gallery = None
    if cfg.attacks:
        shown = read_eval_set(eval_uri)[0].table.slice(0, GALLERY_IMAGES).column("image").to_pylist()
        gallery = plot_triggers(shown, {attack: cfg.trigger(attack) for attack in cfg.attacks},
                                work / "figures" / "triggers.png")
    clean_dir = work / "models" / "clean"
    rows = []
    if cfg.clean_baseline:
        clean_seconds = _train_timed(train_uri, clean_dir, cfg.train.model_copy(update={"seed": cfg.seed}))
        for attack in cfg.attacks:
            metrics = evaluate(str(clean_dir), eval_uri, cfg.trigger(attack), cfg.target)
            rows.append(_row(f"clean model, {attack} trigger", "clean", metrics, clean_seconds, 0))
    for attack in cfg.attacks:
        data, trigger = work / "data" / f"{attack}-{cfg.rate}", cfg.trigger(attack)
        if (data / "manifest.json").is_file():
            _check_reused(data, trigger, cfg.target)
        else:
            poison_dataset(train_uri, str(data), PoisonConfig(trigger=trigger, rate=cfg.rate, target=cfg.target,
                                                              seed=cfg.seed))
        manifest = json.loads((data / "manifest.json").read_text())
        if cfg.setting == "scratch":
            train_cfg = cfg.train.model_copy(update={"seed": cfg.seed})
        else:
            train_cfg = cfg.finetune.model_copy(update={"seed": cfg.seed, "init": str(clean_dir)})
        model_dir = work / "models" / f"{cfg.setting}-{attack}-{cfg.rate}"
        seconds = _train_timed(str(data), model_dir, train_cfg)
        metrics = evaluate(str(model_dir), eval_uri, trigger, cfg.target)  # the manifest's, as checked above
        rows.append(_row(f"backdoored, {attack}", cfg.setting, metrics, seconds, manifest["n_poisoned"]))
    markdown = _markdown(rows, cfg, command, gallery and "figures/triggers.png")
    write_json({"config": cfg.model_dump(), "rows": rows}, str(work / f"results-{cfg.setting}.json"))
    (work / f"results-{cfg.setting}.md").write_text(markdown)
    if doc:
        key = _doc_key(cfg)
        link = copy_beside_doc(Path(doc), [gallery], key.replace(":", "-").replace("=", "-"))[0] if gallery else None
        write_doc_section(Path(doc), key, _markdown(rows, cfg, command, link))
    return BenchReport(rows, markdown)


def _fmt(rate: float | None, num: int | None, den: int | None) -> str:
    return "–" if rate is None else f"{rate:.3f} ({num}/{den})"


def _markdown(rows: list[dict], cfg: BenchConfig, command: str | None, gallery: str | None) -> str:
    """The table of `rows`, with the run's provenance and, when given, a link to the triggers figure."""
    train = cfg.train if cfg.setting == "scratch" else cfg.finetune
    lines = [
        f"### Setting: {cfg.setting} (rate {cfg.rate}, target {cfg.target!r}, {cfg.synth.train_pairs} train pairs, "
        f"{cfg.synth.eval_images} eval images, {train.epochs} epochs, lr {train.lr}, seed {cfg.seed}"
        + (f", triggers {json.dumps(cfg.triggers)}" if cfg.triggers else "") + ")",
        "",
        f"Command: `{command or 'ubt bench'}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"measured {time.strftime('%Y-%m-%d')}",
        "",
        "| model | poisoned pairs | CA | CA − clean CA (points) | ASR | RA | train time (min) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    clean_ca = next((r["ca"] for r in rows if r["setting"] == "clean"), None)
    for r in rows:
        delta = "–" if clean_ca is None or r["setting"] == "clean" else f"{100 * (r['ca'] - clean_ca):+.1f}"
        lines.append(f"| {r['model']} | {r['n_poisoned']} | {_fmt(r['ca'], r['ca_num'], r['ca_den'])} | {delta} | "
                     f"{_fmt(r['asr'], r['asr_num'], r['asr_den'])} | {_fmt(r['ra'], r['ra_num'], r['ra_den'])} "
                     f"| {r['train_seconds'] / 60:.1f} |")
    if gallery:
        lines += ["", f"![the triggers on eval images]({gallery})"]
    return "\n".join(lines) + "\n"


def copy_beside_doc(doc: Path, figures: list[Path], folder: str) -> list[str]:
    """Copies of `figures` in the doc's figures/FOLDER/, so the doc still shows them once the work directory
    is gone; returns their links relative to the doc."""
    shown = doc.parent / "figures" / folder
    shown.mkdir(parents=True, exist_ok=True)
    for path in figures:
        shutil.copyfile(path, shown / path.name)
    return [f"figures/{folder}/{path.name}" for path in figures]


def write_doc_section(doc: Path, key: str, markdown: str) -> None:
    """Replace (or append) the generated section `key` of a Markdown doc, keeping the rest."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = doc.read_text() if doc.is_file() else "# Benchmark\n"
    block = f"{begin}\n{markdown}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
