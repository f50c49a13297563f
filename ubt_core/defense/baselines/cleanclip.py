"""CleanCLIP (Bansal et al., ICCV 2023): fine-tune on clean pairs with the multimodal CLIP loss plus
in-modal self-supervised losses, which break the spurious trigger -> caption link by making each
modality learn its own features.

Each clean pair gives an AutoAugment view of its image and an EDA view of its caption (`views.py`).
The in-modal loss is the contrastive loss between an image and its view and between a caption and
its view, averaged; it is added to the CLIP loss with equal weights, the paper's default.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ubt_core.defense.baselines.common import BaselineConfig, epoch_batches, fine_tune
from ubt_core.defense.baselines.views import PairViews, embed_with_views
from ubt_core.losses import ClipLoss
from ubt_core.models import LoadedModel

MULTIMODAL_WEIGHT = 1.0  # lambda_1 of the paper
INMODAL_WEIGHT = 1.0  # lambda_2 of the paper


def inmodal_loss(image, image_view, text, text_view, logit_scale, clip_loss: ClipLoss) -> torch.Tensor:
    """Contrastive loss of each image with its augmented view and each caption with its view, averaged."""
    return (clip_loss(image, image_view, logit_scale) + clip_loss(text, text_view, logit_scale)) / 2


def cleanclip(suspect: LoadedModel, clean: pa.Table, cfg: BaselineConfig) -> tuple[LoadedModel, dict]:
    """The suspect fine-tuned with CleanCLIP's loss on `clean` pairs for the budget of `cfg`."""
    torch.manual_seed(cfg.seed)  # AutoAugment draws from torch's generator
    views = PairViews(clean, suspect, cfg.seed)
    batches = epoch_batches(np.arange(len(views)), cfg.batch_size, cfg.seed)
    clip_loss = ClipLoss()

    def step_loss(model, step: int):
        image, image_view, text, text_view, scale = embed_with_views(model, views, next(batches))
        return (MULTIMODAL_WEIGHT * clip_loss(image, text, scale)
                + INMODAL_WEIGHT * inmodal_loss(image, image_view, text, text_view, scale, clip_loss))

    return fine_tune(suspect, step_loss, cfg, "CleanCLIP"), {"pairs_trained": len(views)}
