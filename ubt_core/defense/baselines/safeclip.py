"""SafeCLIP-style filtering (after Yang et al., ICML 2024).

At the start of every epoch the current model's image-caption cosines are split by a two-component
Gaussian mixture: pairs of the high-similarity component are "safe" and train with the CLIP loss;
the rest are "risky" and train only in-modally (each image with its augmented view, each caption
with its view), so a poisoned pair can never teach its trigger -> caption link. SafeCLIP's in-modal
warm-up epoch is left out: the suspect is already trained, which is what the warm-up is for.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch
from sklearn.mixture import GaussianMixture

from ubt_core.defense.baselines.cleanclip import inmodal_loss
from ubt_core.defense.baselines.common import BaselineConfig, batches_per_epoch, epoch_batches, fine_tune, pair_cosines
from ubt_core.defense.baselines.views import PairViews, embed_with_views
from ubt_core.losses import ClipLoss
from ubt_core.models import LoadedModel


def safe_pairs(cosines: np.ndarray, seed: int) -> np.ndarray:
    """True for pairs the two-component mixture more likely puts in its high-similarity component."""
    mixture = GaussianMixture(2, random_state=seed).fit(cosines.reshape(-1, 1))
    high = int(np.argmax(mixture.means_.ravel()))
    return mixture.predict_proba(cosines.reshape(-1, 1))[:, high] > 0.5


def safeclip(suspect: LoadedModel, data: pa.Table, cfg: BaselineConfig) -> tuple[LoadedModel, dict]:
    """Fine-tune on `data`: CLIP loss on the safe pairs, in-modal losses on the risky ones, re-split each epoch."""
    torch.manual_seed(cfg.seed)  # AutoAugment draws from torch's generator
    views = PairViews(data, suspect, cfg.seed)
    batches = epoch_batches(np.arange(len(views)), cfg.batch_size, cfg.seed)
    steps_per_epoch = batches_per_epoch(len(views), cfg.batch_size)
    clip_loss = ClipLoss()
    state: dict = {}

    def step_loss(model, step: int):
        if step % steps_per_epoch == 0:  # a new epoch: split with the model as it is now
            cosines = pair_cosines(dataclasses.replace(suspect, model=model), data)
            state["safe"] = safe_pairs(cosines, cfg.seed)
            state.setdefault("first_cosines", cosines)
            state.setdefault("first_safe", state["safe"])
            model.train()
        rows = next(batches)
        safe, risky = rows[state["safe"][rows]], rows[~state["safe"][rows]]
        loss = torch.zeros(())
        if len(safe) > 1:
            loss = loss + clip_loss(*model(*views.stack(safe))[:3])
        if len(risky) > 1:
            loss = loss + inmodal_loss(*embed_with_views(model, views, risky), clip_loss)
        return loss

    defended = fine_tune(suspect, step_loss, cfg, "SafeCLIP")
    return defended, {"suspicion": -state["first_cosines"], "k": int((~state["first_safe"]).sum()),
                      "pairs_trained": len(views)}
