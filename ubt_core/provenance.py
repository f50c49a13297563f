"""Which code produced a result: the package version plus a digest of its source."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ubt_core


def code_version() -> str:
    """`ubt_core` version plus a digest of its source: a code change invalidates every cached stage."""
    digest = hashlib.sha256()
    root = Path(ubt_core.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return f"{ubt_core.__version__}+{digest.hexdigest()[:12]}"
