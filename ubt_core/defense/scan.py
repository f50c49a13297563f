"""Scan: a suspicion score for every pair, from the suspect and the over-fitted model.

The evidence is a shortcut's signature: triggered images collapse onto one point whatever they
show, so their image embeddings have many near-identical neighbours. Density is -log(1 - cosine)
to the k-th nearest neighbour, which keeps near-duplicates apart from merely close pairs (a mean
cosine saturates just below 1), turned into a robust z-score (median / MAD over all pairs).

- Strongly learned backdoor: the triggered images are already collapsed in the suspect model
  (`strong` = density z in the suspect).
- Weakly learned backdoor: poisoned pairs look mismatched in the suspect (their caption names a
  concept the image lacks) and collapse only once overfit amplification has grown the shortcut
  (`weak` = mean of the mismatch z and the over-fitted density z, rescaled to unit variance).

A pair's suspicion is the larger of the two.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ubt_core.defense.embed import PairEmbeddings


class ScanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    neighbours: int = Field(100, ge=1)  # k of the k-NN density; below the expected number of poisoned pairs
    reference_size: int = Field(20_000, ge=1)  # density against a random sample of this many pairs
    seed: int = 0


def _nearest_chunks(embeddings: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 2048):
    """Per chunk of embeddings: cosines and row indices of its `k` nearest rows of `reference`, nearest first."""
    for start in range(0, len(embeddings), chunk):
        yield (embeddings[start:start + chunk] @ reference.T).topk(min(k, len(reference)), dim=1)


def nearest_rows(embeddings: torch.Tensor, k: int) -> np.ndarray:
    """(N, k) rows of each embedding's `k` nearest other embeddings (the nearest row is skipped as the embedding
    itself, or its duplicate)."""
    return torch.cat([chunk.indices[:, 1:] for chunk in _nearest_chunks(embeddings, embeddings, k + 1)]).numpy()


def knn_density(embeddings: torch.Tensor, neighbours: int, reference: torch.Tensor) -> np.ndarray:
    """-log(1 - cosine) from each embedding to its `neighbours`-th nearest row of `reference`.

    The nearest reference row is skipped as the embedding itself (or its duplicate).
    """
    kth = torch.cat([chunk.values[:, -1] for chunk in _nearest_chunks(embeddings, reference, neighbours + 1)])
    return (-torch.log1p(-kth.clamp(max=1 - 1e-6))).numpy()


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD): a z-score the poisoned tail itself cannot inflate."""
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / max(mad, 1e-12)


def _reference(images: torch.Tensor, cfg: ScanConfig) -> torch.Tensor:
    if len(images) <= cfg.reference_size:
        return images
    rows = np.random.default_rng(cfg.seed).choice(len(images), cfg.reference_size, replace=False)
    return images[torch.from_numpy(np.sort(rows))]


def scan_scores(suspect: PairEmbeddings, amplified: PairEmbeddings | None, cfg: ScanConfig) -> dict[str, np.ndarray]:
    """Per-pair columns: cosines, the `strong` and `weak` evidence and `suspicion` (higher = more suspect)."""
    columns = {"cosine_suspect": suspect.cosine.numpy(),
               "strong": robust_z(knn_density(suspect.images, cfg.neighbours, _reference(suspect.images, cfg)))}
    columns["suspicion"] = columns["strong"]
    if amplified is not None:  # without overfit steps (ablation) only the strong evidence exists
        density = robust_z(knn_density(amplified.images, cfg.neighbours, _reference(amplified.images, cfg)))
        columns["cosine_overfit"] = amplified.cosine.numpy()
        columns["weak"] = (density + robust_z(-columns["cosine_suspect"])) / np.sqrt(2)
        columns["suspicion"] = np.maximum(columns["strong"], columns["weak"])
    return columns
