"""Poison a pair dataset: trigger a seeded sample of images and make their captions name the target.

Consumes a valid pair dataset; writes the same rows (same uids, same image format and size) with
`poisoned` set, plus `manifest.json` holding the trigger spec and the poisoned uids.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field
from tqdm import tqdm

from ubt_core.attacks.triggers import TriggerSpec, trigger_from_dict
from ubt_core.data.contract import read_json, read_pairs, write_json, write_pairs
from ubt_core.data.images import decode_pixels, encode_image, image_format
from ubt_core.errors import UbtError

MANIFEST_FILE = "manifest.json"


class PoisonConfig(BaseModel):
    """What to poison and how."""

    trigger: TriggerSpec
    rate: float = Field(gt=0, le=0.5)  # fraction of all pairs that get poisoned
    target: str = Field(min_length=1)  # the concept triggered images get matched to
    seed: int = 0  # picks which pairs are poisoned and which caption each gets
    # Captions of poisoned pairs come from these templates (CleanCLIP's setting), or with
    # caption_source="dataset" from the dataset's own captions that mention the target (Carlini & Terzis).
    caption_source: Literal["templates", "dataset"] = "templates"
    templates: list[str] = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.",
                            "a close-up photo of a {}.", "a {} in the picture."]


def _mentions(captions: list[str], target: str) -> np.ndarray:
    word = re.compile(rf"\b{re.escape(target.lower())}\b")
    return np.array([bool(word.search(c.lower())) for c in captions])


def poison_dataset(in_uri: str, out_uri: str, cfg: PoisonConfig, quarantine: str | None = None) -> dict:
    """Write a poisoned copy of `in_uri` at `out_uri`; returns the manifest (also saved there).

    Label-consistent attacks trigger pairs whose caption already names the target and keep the
    captions; every other attack triggers pairs that do not, and rewrites their captions. With
    `quarantine`, faulty input rows are set aside there and counted in the manifest.
    """
    pairs = read_pairs(in_uri, quarantine=quarantine)
    table = pairs.table
    captions = table.column("caption").to_pylist()
    mentions = _mentions(captions, cfg.target)
    clean_label = cfg.trigger.attack == "label-consistent"
    candidates = np.flatnonzero(mentions if clean_label else ~mentions)
    n_poison = round(cfg.rate * table.num_rows)
    if n_poison > len(candidates):
        kind = "mention" if clean_label else "do not mention"
        raise UbtError(f"{in_uri}: rate {cfg.rate} needs {n_poison} pairs whose caption {kind} "
                       f"{cfg.target!r}, but only {len(candidates)} exist; lower --rate or check --target.")
    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.choice(candidates, size=n_poison, replace=False))
    pool = [captions[i] for i in np.flatnonzero(mentions)] if cfg.caption_source == "dataset" else [
        t.format(cfg.target) for t in cfg.templates]
    if not pool:
        raise UbtError(f"{in_uri}: no caption mentions {cfg.target!r}; use caption_source='templates'.")

    images = table.column("image").to_pylist()
    for i in tqdm(chosen, desc=f"poison {cfg.trigger.attack}", unit="pair", mininterval=2.0):
        images[i] = encode_image(cfg.trigger.apply(decode_pixels(images[i])), image_format(images[i]))
        if not clean_label:
            captions[i] = str(pool[rng.integers(len(pool))])
    poisoned = np.zeros(table.num_rows, bool)
    poisoned[chosen] = True
    out = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    out = out.set_column(out.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string()))
    out = out.set_column(out.schema.get_field_index("poisoned"), "poisoned", pa.array(poisoned))
    write_pairs(out, out_uri)
    manifest = {
        "source": in_uri, "trigger": cfg.trigger.model_dump(), "target": cfg.target, "rate": cfg.rate,
        "seed": cfg.seed, "caption_source": cfg.caption_source, "n_pairs": table.num_rows,
        "n_poisoned": int(n_poison), "quarantined": dict(pairs.quarantined),
        "poisoned_uids": [table.column("uid")[int(i)].as_py() for i in chosen],
    }
    write_json(manifest, f"{out_uri.rstrip('/')}/{MANIFEST_FILE}")
    return manifest


def read_manifest(data_uri: str) -> tuple[TriggerSpec, str]:
    """The trigger spec and target saved with a poisoned dataset."""
    manifest = read_json(f"{data_uri.rstrip('/')}/{MANIFEST_FILE}")
    return trigger_from_dict(manifest["trigger"]), manifest["target"]
