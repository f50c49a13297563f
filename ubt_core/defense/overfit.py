"""Overfit amplification: a short, deliberately over-fitting fine-tune of the suspect model.

Batches are drawn mostly from the weakest-similarity pairs, where a weakly learned backdoor hides
(its captions name a concept the image does not show), plus a share of random pairs as the
normal-pair regulariser. The poisoned pairs share one trigger -> target shortcut, so together they
are fitted far faster than clean weak pairs, each of which is hard in its own way: after a few
dozen steps the triggered images collapse into one tight cluster that the scan can see.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ubt_core.losses import ClipLoss
from ubt_core.models import LoadedModel
from ubt_core.train import PairDataset, param_groups, train_step


class OverfitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    steps: int = Field(120, ge=0)  # 0 disables the stage (ablation "no overfit")
    # skip the stage when the suspect's own scan already gives a verified trigger pattern (refine's evidence)
    skip_if_pattern: bool = True
    lr: float = Field(1e-3, gt=0)  # constant, deliberately high
    weak_fraction: float = Field(0.05, gt=0, le=1)  # the weakest-similarity share of pairs to prioritise
    weak_per_batch: int = Field(96, ge=1)
    normal_per_batch: int = Field(32, ge=0)  # random pairs: the normal-pair regulariser
    max_logit_scale: float = Field(100.0, gt=1)
    seed: int = 0


def weakest_pairs(cosine: torch.Tensor, fraction: float) -> np.ndarray:
    """Indices of the `fraction` of pairs with the lowest image-caption cosine."""
    n = max(1, round(fraction * len(cosine)))
    return torch.argsort(cosine)[:n].numpy()


def overfit(suspect: LoadedModel, dataset: PairDataset, cosine: torch.Tensor, cfg: OverfitConfig) -> LoadedModel:
    """A copy of `suspect` over-fitted on its weakest pairs (the suspect itself is not modified)."""
    amplified = suspect.copy()
    if cfg.steps == 0:
        return amplified
    weak = weakest_pairs(cosine, cfg.weak_fraction)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(param_groups(amplified.model, 0.0), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn = ClipLoss()
    for _ in tqdm(range(cfg.steps), desc="overfit", unit="step", mininterval=2.0):
        indices = np.concatenate([rng.choice(weak, cfg.weak_per_batch),
                                  rng.integers(0, len(dataset), cfg.normal_per_batch)])
        batch = dataset.stack(np.unique(indices))  # a pair twice in a batch would be its own negative
        train_step(amplified.model, *batch, loss_fn, optimizer, scheduler, cfg.max_logit_scale)
    amplified.model.eval()
    return amplified
