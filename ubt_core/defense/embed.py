"""Embeddings of every pair of a dataset under one model: the raw material of the scan.

`embed_batch` is the batch adapter every scan runs (in-process here, on Ray Data actors in
`ubt_core.jobs.scan_job`): it consumes contract rows (`uid`, `image`, `caption`) and returns
`uid`, `image_emb`, `text_emb` (float32, L2-normalised). Embedding files are Parquet with those
columns, one file or a directory of parts in any row order; `read_embeddings` aligns them to a
dataset's row order by uid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from open_clip_train.precision import get_autocast
from tqdm import tqdm

from ubt_core.data.contract import filesystem
from ubt_core.errors import UbtError
from ubt_core.eval.zeroshot import encode_image_batch
from ubt_core.models import LoadedModel

SCANNED_COLUMNS = ("uid", "image", "caption")  # what a scan reads of each pair
EMBEDDING_COLUMNS = ("uid", "image_emb", "text_emb")
Precision = Literal["fp32", "amp_bf16"]  # open_clip's names: float32, or bfloat16 autocast


@dataclass
class PairEmbeddings:
    images: torch.Tensor  # (N, D) L2-normalised
    texts: torch.Tensor  # (N, D) L2-normalised

    @property
    def cosine(self) -> torch.Tensor:
        """(N,) image-caption cosine similarity of each pair."""
        return (self.images * self.texts).sum(dim=1)


def _vectors(rows: torch.Tensor) -> pa.FixedSizeListArray:
    matrix = rows.detach().to(torch.float32).numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _matrix(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = column.type.list_size
    return torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).copy())


@torch.inference_mode()  # faster than no_grad; the embeddings leave as Arrow, never into autograd
def embed_batch(batch: pa.Table | pa.RecordBatch, loaded: LoadedModel, precision: Precision = "fp32") -> pa.Table:
    """Contract rows (`uid`, `image`, `caption`) -> `uid`, `image_emb`, `text_emb` (eval mode, no grad).

    With `amp_bf16` the encoders run under bfloat16 autocast and their outputs are normalised in float32.
    """
    loaded.model.eval()
    with _autocast(loaded, precision):
        images = encode_image_batch(loaded, batch.column("image").to_pylist(), normalize=False)
        texts = loaded.model.encode_text(loaded.tokenizer(batch.column("caption").to_pylist()))
    images, texts = (torch.nn.functional.normalize(rows.float(), dim=-1) for rows in (images, texts))
    return pa.table({"uid": batch.column("uid"), "image_emb": _vectors(images), "text_emb": _vectors(texts)})


@torch.inference_mode()
def embed_captions(captions: list[str], loaded: LoadedModel, precision: Precision = "fp32",
                   batch_size: int = 512) -> torch.Tensor:
    """(N, D) L2-normalised caption embeddings computed as `embed_batch` computes `text_emb`, with the text tower
    only (a first pass that reads no image). Each distinct caption is tokenized and encoded once."""
    distinct, position = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    distinct = distinct.tolist()
    loaded.model.eval()
    with _autocast(loaded, precision):
        texts = [loaded.model.encode_text(loaded.tokenizer(distinct[start:start + batch_size]))
                 for start in tqdm(range(0, len(distinct), batch_size), desc="captions", unit="batch",
                                   mininterval=2.0)]
    return torch.nn.functional.normalize(torch.cat(texts).float(), dim=-1)[torch.from_numpy(position)]


def embed_rows(table: pa.Table, rows: np.ndarray, loaded: LoadedModel, precision: Precision = "fp32",
               batch_size: int = 512) -> PairEmbeddings:
    """The embeddings of some rows of a contract table (as `embed_batch` computes them), in the order of `rows`."""
    chosen = table.take(rows).select(list(SCANNED_COLUMNS))
    return embeddings_of(pa.concat_tables(embed_batch(chosen.slice(start, batch_size), loaded, precision)
                                          for start in range(0, len(rows), batch_size)))


def _autocast(loaded: LoadedModel, precision: Precision):
    return get_autocast(precision, next(loaded.model.parameters()).device.type)()


def embeddings_of(table: pa.Table) -> PairEmbeddings:
    """The (N, D) matrices of an embeddings table, in its row order."""
    return PairEmbeddings(_matrix(table.column("image_emb")), _matrix(table.column("text_emb")))


def read_embeddings(uri: str, uids: pa.ChunkedArray | pa.Array) -> PairEmbeddings:
    """Embeddings from a file or directory of parts, in the order of `uids` (every uid must be there)."""
    fs, path = filesystem(uri)
    table = pq.read_table(path, filesystem=fs, columns=list(EMBEDDING_COLUMNS))
    position = pc.index_in(uids, value_set=table.column("uid"))
    if position.null_count:
        missing = pc.filter(uids, pc.is_null(position))[0]
        raise UbtError(f"{uri}: no embedding for uid {missing.as_py()!r} ({position.null_count} uids missing); "
                       f"the embeddings were made from other data: re-run the scan on this dataset.")
    return embeddings_of(table.take(position.to_numpy(zero_copy_only=False).astype(np.int64)))
