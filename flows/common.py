"""What every flow shares: the code version and content digests that key the stage caches."""

from __future__ import annotations

from ubt_core.provenance import checkpoint_digest, code_version, file_digest

__all__ = ["checkpoint_digest", "code_version", "file_digest"]
