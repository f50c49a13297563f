"""What every flow shares: the code version and content digests that key the stage caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ubt_core.models.checkpoint import WEIGHTS_NAME
from ubt_core.provenance import code_version

__all__ = ["checkpoint_digest", "code_version", "file_digest"]

_CHUNK = 1 << 20


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
