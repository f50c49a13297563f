"""Human-readable defense report: Markdown with figures (suspicion histogram, top suspicious pairs
with their patch-token saliency overlaid, so the trigger is visible)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from open_clip.push_to_hf_hub import generate_readme  # noqa: E402

from ubt_core.attacks import TriggerSpec  # noqa: E402
from ubt_core.data.images import decode_pixels  # noqa: E402
from ubt_core.models import LoadedModel  # noqa: E402

HISTOGRAM_FILE = "suspicion_histogram.png"
TOP_PAIRS_FILE = "top_suspicious.png"
TRIGGER_FILE = "estimated_trigger.png"
OUTLINED_TOKENS = 4  # most salient patch tokens outlined on each shown image


def _histogram(path: Path, suspicion: np.ndarray, k: int, poisoned: np.ndarray | None) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(suspicion.min(), suspicion.max(), 80)
    if poisoned is None:
        ax.hist(suspicion, bins=bins, color="tab:blue", label="pairs")
    else:
        ax.hist(suspicion[~poisoned], bins=bins, color="tab:blue", alpha=0.8, label="clean (ground truth)")
        ax.hist(suspicion[poisoned], bins=bins, color="tab:red", alpha=0.8, label="poisoned (ground truth)")
    if k:
        ax.axvline(np.sort(suspicion)[::-1][k - 1], color="black", linestyle="--", label=f"selected: top {k}")
    ax.set_yscale("log")
    ax.set_xlabel("suspicion (robust z, see ubt_core/defense/scan.py)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _salient_words(loaded: LoadedModel, caption: str, saliency: torch.Tensor, n: int = 2) -> list[str]:
    ids = loaded.tokenizer([caption])[0]
    length = int((ids != 0).sum())
    inner = saliency[1:length - 1]  # skip start / end tokens
    top = inner.topk(min(n, len(inner))).indices + 1 if len(inner) else []
    return [loaded.tokenizer.decode([int(ids[i])]).strip() for i in top]


def _top_pairs(path: Path, table: pa.Table, rows: np.ndarray, patch_saliency: torch.Tensor,
               token_saliency: torch.Tensor, loaded: LoadedModel) -> None:
    cols = 4
    n_rows = max(1, int(np.ceil(len(rows) / cols)))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 2.4, 2.9 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, sal, tok in zip(axes.flat, rows, patch_saliency, token_saliency, strict=False):
        pixels = decode_pixels(table.column("image")[int(row)].as_py())
        heat = sal.clamp(min=0).numpy()
        ax.imshow(pixels)
        ax.imshow(heat / max(heat.max(), 1e-12), cmap="magma", alpha=0.3, interpolation="nearest",
                  extent=(0, pixels.shape[1], pixels.shape[0], 0))
        cell_h, cell_w = pixels.shape[0] / heat.shape[0], pixels.shape[1] / heat.shape[1]
        for index in np.argsort(-heat, axis=None)[:OUTLINED_TOKENS]:
            r, c = np.unravel_index(index, heat.shape)
            ax.add_patch(plt.Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, fill=False,
                                       edgecolor="cyan", linewidth=1.2))
        caption = table.column("caption")[int(row)].as_py()
        words = ", ".join(_salient_words(loaded, caption, tok))
        ax.set_title(f"{caption[:28]}\nsalient words: {words}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _trigger(path: Path, pattern: torch.Tensor) -> None:
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    shown = ax.imshow(pattern.abs().mean(dim=0).numpy(), cmap="magma", interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, label="|mean difference| (normalised pixels)")
    ax.set_title("selected minus clean images,\non the trigger's tokens", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_model_card(model_dir: Path, report: dict) -> Path:
    """README.md model card beside a defended checkpoint (open_clip's Hugging Face card format)."""
    details = {"Architecture": "open_clip_config.json in this directory", "Defended from": report["model"],
               "Training data scanned": f"{report['data']} ({report['n_pairs']} pairs)",
               "Defense": "UBT (ubt defend): overfit amplification, suspicion scan, selection, token-level unlearning",
               "Verdict": report["verdict"], "Unlearning set size k": report["k"]}
    if "detection" in report:
        d = report["detection"]
        details["Detection against ground truth"] = {
            "precision@k": f"{d['precision_at_k']:.3f}", "recall@k": f"{d['recall_at_k']:.3f}",
            "AUROC": f"{d['auroc']:.3f}"}
    unlearned = report["unlearn"]
    if "trainable_fraction" in unlearned:
        details["Parameters changed"] = f"{100 * unlearned['trainable_fraction']:.0f} % ({unlearned['portion']})"
    usage = ("```python\nimport open_clip\n"
             f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{model_dir}')\n"
             f"tokenizer = open_clip.get_tokenizer('local-dir:{model_dir}')\n```\n")
    card = {"tags": ("clip", "backdoor-defense", "ubt"), "license": "other", "details": details, "usage": usage,
            "description": "A CLIP checkpoint after ubt's backdoor defense. See report.md beside this directory for "
                           "the suspicious pairs, the estimated trigger and per-stage times."}
    return _write_text(model_dir / "README.md", generate_readme(card, f"{model_dir.name} (defended by ubt)"))


def _write_text(path: Path, text: str) -> Path:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def _overfit_fact(report: dict) -> str:
    if report["overfit_ran"]:
        return "ran"
    if not report["config"]["overfit"]["steps"]:
        return "off (`overfit.steps` = 0)"
    if "scan_suspect" not in report["stage_seconds"]:
        found = ("a verified trigger pattern" if report["evidence_kind"] == "shared pattern" else
                 "a pixel group the model keeps together among the pairs captioned alike")
        return f"skipped, and the image scan too: the caption concepts gave {found}"
    return "skipped: the suspect's own scan already gave a verified trigger pattern"


def write_defense_report(out: Path, report: dict, columns: dict[str, np.ndarray], shown: np.ndarray,
                         table: pa.Table, patch_saliency: torch.Tensor, token_saliency: torch.Tensor,
                         loaded: LoadedModel, poisoned: np.ndarray | None = None,
                         pattern: torch.Tensor | None = None) -> Path:
    """Write OUT/report.md with its figures; returns the Markdown path.

    `poisoned` (ground truth) colours the histogram; `pattern` is the unlearning stage's trigger estimate.
    """
    out.mkdir(parents=True, exist_ok=True)
    _histogram(out / HISTOGRAM_FILE, columns["suspicion"], report["k"], poisoned)
    _top_pairs(out / TOP_PAIRS_FILE, table, shown, patch_saliency, token_saliency, loaded)
    facts = [("model", f"`{report['model']}`"), ("data", f"`{report['data']}` ({report['n_pairs']} pairs)"),
             ("verdict", report["verdict"]), ("unlearning set k", str(report["k"])),
             ("clearly anomalous pairs", str(report["anomalous_pairs"])),
             ("overfit amplification", _overfit_fact(report)),
             ("total time (s)", f"{report['total_seconds']:.1f}")]
    if "detection" in report:
        d = report["detection"]
        facts += [("precision@k / recall@k", f"{d['precision_at_k']:.3f} / {d['recall_at_k']:.3f} "
                                             f"({d['hits_at_k']} of {d['n_poisoned']} poisoned pairs)"),
                  ("AUROC", f"{d['auroc']:.3f}")]
    if "trainable_fraction" in report["unlearn"]:
        u = report["unlearn"]
        moved = {"token": f"; the {u.get('tokens_per_pair')} most salient patch tokens of each selected image "
                          "transplanted onto clean images",
                 "pattern": f"; the shared pattern pasted on {u.get('pattern_tokens')} patch tokens"}
        share = f"{100 * u['trainable_fraction']:.0f} % of parameters"
        facts.append(("unlearning",
                      f"{u['scope']}-level, portion `{u['portion']}` ({share}){moved.get(u['scope'], '')}"))
    trigger = ""
    if pattern is not None:
        _trigger(out / TRIGGER_FILE, pattern)
        trigger = f"""
## Estimated trigger
The mean of the selected images minus the mean of clean ones, kept on the patch tokens where the
difference is significant: what the unlearning stage taught the model to ignore.

![estimated trigger]({TRIGGER_FILE})
"""
    stages = "\n".join(f"| {name} | {sec:.1f} |" for name, sec in report["stage_seconds"].items())
    text = f"""# UBT defense report

{_table(facts)}

## Suspicion scores
![suspicion histogram]({HISTOGRAM_FILE})

## Most suspicious pairs
Patch-token saliency of each pair's image-caption match is overlaid (bright = carries the match) and
its {OUTLINED_TOKENS} most salient tokens are outlined; a trigger shows up in the same place across pairs.

![most suspicious pairs]({TOP_PAIRS_FILE})
{trigger}
## Time per stage
| stage | seconds |
|---|---:|
{stages}
"""
    return _write_text(out / "report.md", text)


def plot_triggers(images: list[bytes], triggers: dict[str, TriggerSpec], path: Path) -> Path:
    """One row of `images` as they are and one row per trigger, as the benchmark plants it: what each attack
    does to a picture."""
    pixels = [decode_pixels(data) for data in images]
    rows = {"clean": pixels} | {name: [trigger.apply(p) for p in pixels] for name, trigger in triggers.items()}
    fig, axes = plt.subplots(len(rows), len(pixels), figsize=(0.9 * len(pixels) + 1.2, 0.9 * len(rows)),
                             squeeze=False)
    for row, (name, shown) in zip(axes, rows.items(), strict=True):
        for ax, picture in zip(row, shown, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set(xticks=[], yticks=[])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(results: pa.Table, out_dir: Path) -> list[Path]:
    """CA against ASR per attack (one point per defense, mean ± std over seeds) and defense wall time bars."""
    rows = results.to_pylist()
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    colours = {d: plt.cm.tab10(i) for i, d in enumerate(defenses)}

    def stats(attack: str, defense: str, key: str) -> tuple[float, float]:
        values = [r[key] for r in rows if r["attack"] == attack and r["defense"] == defense]
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3.2), squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        for defense in defenses:
            (asr, asr_sd), (ca, ca_sd) = stats(attack, defense, "asr"), stats(attack, defense, "ca")
            ax.errorbar(asr, ca, xerr=asr_sd, yerr=ca_sd, fmt="o", color=colours[defense], label=defense, capsize=2)
        ax.set(title=attack, xlabel="ASR (lower is better)", xlim=(-0.05, 1.05))
    axes[0][0].set_ylabel("CA (higher is better)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    scatter = out_dir / "ca_vs_asr.png"
    fig.tight_layout()
    fig.savefig(scatter, dpi=110)
    plt.close(fig)

    timed = [d for d in defenses if d != "none"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(attacks), 3.2))
    width = 0.8 / max(1, len(timed))
    for i, defense in enumerate(timed):
        means = [stats(attack, defense, "seconds") for attack in attacks]
        ax.bar(np.arange(len(attacks)) + i * width, [m for m, _ in means], width, yerr=[s for _, s in means],
               color=colours[defense], label=defense, capsize=2)
    ax.set_xticks(np.arange(len(attacks)) + width * (len(timed) - 1) / 2, attacks)
    ax.set(ylabel="defense wall time (s)")
    ax.legend(fontsize=7)
    bars = out_dir / "defense_seconds.png"
    fig.tight_layout()
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [scatter, bars]
