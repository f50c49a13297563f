"""Zero-shot evaluation of a CLIP checkpoint on an eval set, clean and with a trigger applied on the fly.

Class embeddings are prompt-ensembled with open_clip's `build_zero_shot_classifier` over the eval
set's templates. Triggered images are the clean eval images with the attack's trigger spec applied
to their decoded pixels, exactly as poisoning applied it to training images.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from open_clip import build_zero_shot_classifier
from pydantic import BaseModel, Field
from tqdm import tqdm

from ubt_core.attacks.poison import read_manifest
from ubt_core.attacks.triggers import TriggerSpec, make_trigger
from ubt_core.data.contract import read_eval_set
from ubt_core.data.images import decode_pixels
from ubt_core.errors import UbtError
from ubt_core.eval.metrics import accuracy_by_class, attack_metrics, clean_accuracy
from ubt_core.models import LoadedModel, load_model


class EvalConfig(BaseModel):
    batch_size: int = Field(256, ge=1)  # memory vs throughput; never changes a metric


@torch.no_grad()
def encode_image_batch(loaded: LoadedModel, images: list[bytes],
                       transform: Callable[[np.ndarray], np.ndarray] | None = None,
                       normalize: bool = True) -> torch.Tensor:
    """(N, D) embeddings of encoded images (L2-normalised unless `normalize` is False), as one batch;
    `transform` edits (H, W, 3) pixels first."""
    pixels = [decode_pixels(data) for data in images]
    if transform is not None:
        pixels = [transform(image) for image in pixels]
    return loaded.model.encode_image(loaded.preprocess_pixels(pixels), normalize=normalize)


def encode_images(loaded: LoadedModel, images: list[bytes], batch_size: int,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None, desc: str = "encode") -> torch.Tensor:
    """L2-normalised (N, D) image embeddings in batches, with a progress bar."""
    return torch.cat([encode_image_batch(loaded, images[start:start + batch_size], transform)
                      for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=2.0)])


def resolve_trigger(attack: str | None = None, target: str | None = None, trigger_from: str | None = None,
                    trigger_seed: int = 0) -> tuple[TriggerSpec | None, str | None]:
    """The trigger and target to measure ASR with: a poisoned dataset's manifest, or an attack name and seed."""
    if trigger_from:
        return read_manifest(trigger_from)
    return (make_trigger(attack, trigger_seed) if attack else None), target


def evaluate(model_dir: str, eval_uri: str, trigger: TriggerSpec | None = None, target: str | None = None,
             cfg: EvalConfig | None = None) -> dict:
    """CA on clean eval images; with `trigger` and `target` also ASR and RA (with their counts)."""
    cfg = cfg or EvalConfig()
    start = time.perf_counter()
    pairs, classes = read_eval_set(eval_uri)
    if (trigger is None) != (target is None):
        raise UbtError("pass --attack and --target together (or neither for clean accuracy only).")
    if target is not None and target not in classes.classes:
        raise UbtError(f"target {target!r} is not a class of {eval_uri}/classes.json "
                       f"({', '.join(classes.classes)}).")
    loaded = load_model(model_dir)  # in eval mode
    with torch.no_grad():
        classifier = build_zero_shot_classifier(loaded.model, loaded.tokenizer, classes.classes, classes.templates,
                                                num_classes_per_batch=None)
    images = pairs.table.column("image").to_pylist()
    labels = torch.tensor(pairs.table.column("label").to_pylist())
    scale = loaded.model.logit_scale.exp().item()
    clean_logits = scale * encode_images(loaded, images, cfg.batch_size, desc="eval clean") @ classifier
    metrics = clean_accuracy(clean_logits, labels)
    metrics["ca_by_class"] = accuracy_by_class(clean_logits, labels, classes.classes)
    if trigger is not None:
        triggered = encode_images(loaded, images, cfg.batch_size, trigger.apply, desc=f"eval {trigger.attack}")
        metrics |= attack_metrics(scale * triggered @ classifier, labels, classes.classes.index(target))
        metrics |= {"attack": trigger.attack, "target": target, "trigger": trigger.model_dump()}
    return metrics | {"model": str(model_dir), "eval": eval_uri, "n_images": len(images),
                      "seconds": time.perf_counter() - start}
