"""Augmented views of pairs for the in-modal (self-supervised) losses of CleanCLIP and SafeCLIP.

Images: torchvision's AutoAugment (ImageNet policy), as CleanCLIP uses. Captions: EDA (Wei & Zou,
2019) without its WordNet operations, which would need a download: each caption gets one random
swap or random deletion of about 10 % of its words.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import torch
from torchvision.transforms import AutoAugment

from ubt_core.data.images import decode_image
from ubt_core.models import LoadedModel
from ubt_core.train import PairDataset

EDA_ALPHA = 0.1  # share of words an EDA operation touches


def eda(caption: str, rng: random.Random) -> str:
    """One random swap or deletion of about `EDA_ALPHA` of the words (at least one change)."""
    words = caption.split()
    if len(words) < 2:
        return caption
    changes = max(1, round(EDA_ALPHA * len(words)))
    if rng.random() < 0.5:
        for _ in range(changes):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    else:
        dropped = set(rng.sample(range(len(words)), min(changes, len(words) - 1)))
        words = [w for i, w in enumerate(words) if i not in dropped]
    return " ".join(words)


class PairViews(PairDataset):
    """A `PairDataset` that also gives augmented views of its rows."""

    def __init__(self, table: pa.Table, loaded: LoadedModel, seed: int):
        super().__init__(table, loaded)
        self.preprocess = loaded.preprocess
        self.auto_augment = AutoAugment()  # draws from torch's global generator: seed it with torch.manual_seed
        self.rng = random.Random(seed)

    def views(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Originals and augmented views of `rows`: images (N, 3, H, W) twice, token ids (N, context) twice."""
        decoded = [decode_image(self.images[int(i)]) for i in rows]
        images = self.preprocess_pixels([np.asarray(image) for image in decoded])
        augmented = torch.stack([self.preprocess(self.auto_augment(image)) for image in decoded])
        captions = self.tokenizer([eda(self.captions[int(i)], self.rng) for i in rows])
        return images, augmented, self.tokens(rows), captions


def embed_with_views(model: torch.nn.Module, views: PairViews, rows) -> tuple[torch.Tensor, ...]:
    """One forward of `rows` and their views: (image, image_view, text, text_view, logit_scale)."""
    images, image_views, texts, text_views = views.views(rows)
    n = len(images)
    image, text, scale = model(torch.cat([images, image_views]), torch.cat([texts, text_views]))[:3]
    return image[:n], image[n:], text[:n], text[n:], scale
