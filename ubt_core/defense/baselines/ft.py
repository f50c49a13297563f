"""FT: plain CLIP-loss fine-tuning of the suspect on a clean set (the simplest repair)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ubt_core.defense.baselines.common import BaselineConfig, epoch_batches, fine_tune
from ubt_core.losses import ClipLoss
from ubt_core.models import LoadedModel
from ubt_core.train import PairDataset


def finetune_clean(suspect: LoadedModel, clean: pa.Table, cfg: BaselineConfig) -> tuple[LoadedModel, dict]:
    """The suspect fine-tuned with the CLIP loss on `clean` pairs for the budget of `cfg`."""
    dataset = PairDataset(clean, suspect)
    batches = epoch_batches(np.arange(len(dataset)), cfg.batch_size, cfg.seed)
    clip_loss = ClipLoss()

    def step_loss(model, step: int):
        return clip_loss(*model(*dataset.stack(next(batches)))[:3])

    return fine_tune(suspect, step_loss, cfg, "FT"), {"pairs_trained": len(dataset)}
