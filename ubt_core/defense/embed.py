"""Embeddings of every pair of a dataset under one model: the raw material of the scan."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
from tqdm import tqdm

from ubt_core.eval.zeroshot import encode_images
from ubt_core.models import LoadedModel


@dataclass
class PairEmbeddings:
    images: torch.Tensor  # (N, D) L2-normalised
    texts: torch.Tensor  # (N, D) L2-normalised

    @property
    def cosine(self) -> torch.Tensor:
        """(N,) image-caption cosine similarity of each pair."""
        return (self.images * self.texts).sum(dim=1)


@torch.no_grad()
def encode_texts(loaded: LoadedModel, captions: list[str], batch_size: int, desc: str = "encode text") -> torch.Tensor:
    """L2-normalised (N, D) caption embeddings."""
    out = []
    for start in tqdm(range(0, len(captions), batch_size), desc=desc, unit="batch", mininterval=2.0):
        out.append(loaded.model.encode_text(loaded.tokenizer(captions[start:start + batch_size]), normalize=True))
    return torch.cat(out)


def embed_pairs(loaded: LoadedModel, table: pa.Table, batch_size: int = 512, name: str = "") -> PairEmbeddings:
    """Image and caption embeddings of every row of a contract table, in eval mode."""
    loaded.model.eval()
    images = encode_images(loaded, table.column("image").to_pylist(), batch_size, desc=f"scan images {name}".strip())
    texts = encode_texts(loaded, table.column("caption").to_pylist(), batch_size, desc=f"scan texts {name}".strip())
    return PairEmbeddings(images, texts)
