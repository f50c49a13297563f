"""ABL for CLIP (after Li et al., NeurIPS 2021, Anti-Backdoor Learning).

ABL's observation: a backdoor is learned faster than clean content, so poisoned samples are the
lowest-loss ones. Isolation: each pair's CLIP loss under the suspect (in random batches, as it was
trained), and the lowest `abl_isolation` share (the paper's 1 %) is isolated. Unlearning: the suspect
is fine-tuned with the CLIP loss on the rest while the CLIP loss of the isolated pairs is ascended.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ubt_core.defense.baselines.common import BaselineConfig, epoch_batches, fine_tune, per_pair_clip_loss
from ubt_core.losses import ClipLoss
from ubt_core.models import LoadedModel
from ubt_core.train import PairDataset


def abl(suspect: LoadedModel, data: pa.Table, cfg: BaselineConfig) -> tuple[LoadedModel, dict]:
    """Isolate the lowest-loss pairs of `data`, then unlearn them while fine-tuning on the rest."""
    dataset = PairDataset(data, suspect)
    losses = per_pair_clip_loss(suspect, dataset, cfg.batch_size, cfg.seed)
    order = np.argsort(losses, kind="stable")
    n_isolated = max(2, round(cfg.abl_isolation * len(dataset)))
    isolated, rest = order[:n_isolated], order[n_isolated:]
    keep = epoch_batches(rest, cfg.batch_size, cfg.seed)
    forget = epoch_batches(isolated, cfg.abl_isolated_per_batch, cfg.seed + 1)
    clip_loss = ClipLoss()

    def step_loss(model, step: int):
        retain = clip_loss(*model(*dataset.stack(next(keep)))[:3])
        ascent = clip_loss(*model(*dataset.stack(next(forget)))[:3])
        return retain - cfg.abl_unlearn_weight * ascent

    defended = fine_tune(suspect, step_loss, cfg, "ABL")
    return defended, {"suspicion": -losses, "k": n_isolated, "pairs_trained": len(dataset),
                      "pair_passes": cfg.steps * (cfg.batch_size + cfg.abl_isolated_per_batch)}
