"""Which code and inputs produced a result: the package version plus a digest of its source, and content
digests of checkpoints and datasets that key cached work."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs

import ubt_core
from ubt_core.data.contract import CLASSES_FILE, filesystem, list_parquet_files
from ubt_core.models.checkpoint import WEIGHTS_NAME

_CHUNK = 1 << 20
_EDGE_BYTES = 1 << 20  # head and tail read per Parquet file by `dataset_digest`
_DIGEST_CHARS = 32  # hex chars of sha256 kept: MLflow caps dataset digests at 36 characters


def code_version() -> str:
    """`ubt_core` version plus a digest of its source: a code change invalidates every cached stage."""
    digest = hashlib.sha256()
    root = Path(ubt_core.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return f"{ubt_core.__version__}+{digest.hexdigest()[:12]}"


def file_digest(path: str | Path) -> str:
    """sha256 (16 hex chars) of a file's bytes, or of a directory's files in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoint_digest(model: str | Path) -> str:
    """Digest of a checkpoint's weights (not its model card), or the name itself for a model name."""
    weights = Path(model) / WEIGHTS_NAME
    return file_digest(weights) if weights.is_file() else str(model)


def dataset_digest(uri: str) -> str:
    """A cheap content digest (32 hex chars) of a Parquet dataset directory or file, local or s3://.

    Hashes each file's name and size, its first and last MiB and its whole Parquet footer (row counts,
    statistics, offsets), plus `classes.json` when present. Reads about 2 MiB per file, never the whole
    dataset, so an edit in the middle of a large file that keeps its size and footer goes unnoticed.
    """
    fs, files = list_parquet_files(uri)
    _, root = filesystem(uri)
    classes = f"{root.rstrip('/')}/{CLASSES_FILE}"  # eval sets: the class names decide what a label means
    if fs.get_file_info(classes).type == pafs.FileType.File:
        files = [*files, classes]
    digest = hashlib.sha256()
    for path in files:
        size = fs.get_file_info(path).size
        digest.update(f"{Path(path).name}\0{size}\0".encode())
        with fs.open_input_file(path) as f:
            if size <= 2 * _EDGE_BYTES:
                digest.update(f.read_at(size, 0))
                continue
            footer = int.from_bytes(f.read_at(8, size - 8)[:4], "little") + 8 if path.endswith(".parquet") else 0
            tail = min(size - _EDGE_BYTES, max(_EDGE_BYTES, footer))
            digest.update(f.read_at(_EDGE_BYTES, 0))
            digest.update(f.read_at(tail, size - tail))
    return digest.hexdigest()[:_DIGEST_CHARS]
