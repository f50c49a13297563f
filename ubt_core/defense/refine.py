"""Refine: the pattern the most suspicious images share, and whether it works as a trigger.

A backdoor whose images do not collapse (a faint blend over the whole image) leaves only a few
poisoned pairs at the top of the scan's ranking, and no clearly anomalous group. But an additive
trigger adds the same pixels to every poisoned image. A whitened matched filter, (x - mean)^T S^-1 p
with S the images' covariance, weighs each pixel direction by how little clean images vary along
it, and the trigger stands out of the content. Estimating p from the top pairs and re-ranking every
pair by it, in turn, converges on the poisoned group from a top set where a fifth is poisoned.

Any start converges on *some* group (a content direction with a heavy tail does too), so a group is
not evidence. Evidence is that the group's pattern works as a trigger on the suspect: pasted onto
clean images, it makes most of them match the group's captions better than their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ubt_core.defense.saliency import patch_size
from ubt_core.defense.scan import robust_z
from ubt_core.defense.unlearn import shared_pattern
from ubt_core.models import LoadedModel
from ubt_core.train import PairDataset


class RefineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    iterations: int = Field(5, ge=0)  # pattern <-> group alternations; 0 = off (the "no-refine" ablation)
    group_size: int = Field(200, ge=2)  # top pairs each pattern estimate averages
    side: int = Field(32, ge=4)  # images are average-pooled to side x side pixels for the matched filter
    shrinkage: float = Field(0.01, gt=0)  # added to the covariance's eigenvalues, as a share of their mean
    pattern_z: float = Field(3.0, gt=0)  # token significance of the checked pattern (as unlearn.pattern_z)
    check_size: int = Field(500, ge=1)  # clean images the pattern is pasted onto
    # evidence: the share of patched clean images that match the group's captions better than their own
    min_match_rate: float = Field(0.5, gt=0, le=1)


@dataclass
class Refinement:
    scores: np.ndarray  # robust z of every pair's matched-filter score against the final pattern
    group: np.ndarray  # rows the final pattern was estimated from
    match_rate: float  # patched clean images matching the group's captions better than their own
    clean_match_rate: float  # the same for the unpatched clean images
    evidence: bool


def pooled_pixels(dataset: PairDataset, side: int, batch_size: int = 512) -> torch.Tensor:
    """(N, 3 * side * side) preprocessed images, average-pooled to side x side."""
    rows = []
    for start in range(0, len(dataset), batch_size):
        images, _ = dataset.stack(range(start, min(start + batch_size, len(dataset))))
        rows.append(torch.nn.functional.adaptive_avg_pool2d(images, side).flatten(1))
    return torch.cat(rows)


def matched_filter_scores(pixels: torch.Tensor, suspicion: np.ndarray, cfg: RefineConfig) -> tuple[np.ndarray, np.ndarray]:
    """Robust z of every row's whitened match to the pattern of the top group, after `cfg.iterations` rounds.

    Returns the scores and the group the final pattern was estimated from.
    """
    mean = pixels.mean(dim=0)
    centred = pixels - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(pixels))
    inverse = (eigenvectors / (eigenvalues.clamp(min=0) + cfg.shrinkage * eigenvalues.mean())) @ eigenvectors.T
    group = np.argsort(-suspicion, kind="stable")[:cfg.group_size]
    scores = suspicion
    for _ in range(cfg.iterations):
        scores = robust_z((centred @ (inverse @ (pixels[group].mean(dim=0) - mean))).numpy())
        group = np.argsort(-scores, kind="stable")[:cfg.group_size]
    return scores, group


def _captions_preferred(model: torch.nn.Module, images: torch.Tensor, own_texts: torch.Tensor,
                        concept: torch.Tensor) -> float:
    embedded = torch.cat([model.encode_image(chunk, normalize=True) for chunk in images.split(256)])
    return ((embedded @ concept) > (embedded * own_texts).sum(dim=1)).float().mean().item()


@torch.no_grad()
def trigger_match_rate(loaded: LoadedModel, group: tuple[torch.Tensor, torch.Tensor],
                       clean: tuple[torch.Tensor, torch.Tensor], pattern_z: float) -> tuple[float, float]:
    """Share of clean images that match the group's shared concept better than their own caption,
    with the group's shared pattern pasted on, and without it."""
    model = loaded.model.eval()
    pattern, _ = shared_pattern(group[0], clean[0], patch_size(loaded), pattern_z)
    concept = torch.nn.functional.normalize(model.encode_text(group[1], normalize=True).mean(dim=0), dim=0)
    own = model.encode_text(clean[1], normalize=True)
    return (_captions_preferred(model, clean[0] + pattern, own, concept),
            _captions_preferred(model, clean[0], own, concept))


def refine(loaded: LoadedModel, dataset: PairDataset, suspicion: np.ndarray, clean_rows: np.ndarray,
           cfg: RefineConfig) -> Refinement:
    """Find the group of pairs sharing one pixel pattern near the top of `suspicion`; check it is a trigger."""
    scores, group = matched_filter_scores(pooled_pixels(dataset, cfg.side), suspicion, cfg)
    checked = np.random.default_rng(0).choice(clean_rows, min(cfg.check_size, len(clean_rows)), replace=False)
    rate, clean_rate = trigger_match_rate(loaded, dataset.stack(group), dataset.stack(checked), cfg.pattern_z)
    return Refinement(scores, group, rate, clean_rate, rate >= cfg.min_match_rate)
