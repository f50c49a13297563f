"""What every flow shares: the code version and content digests that key the stage caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ubt_core
from ubt_core.models.checkpoint import WEIGHTS_NAME

_CHUNK = 1 << 20


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
