"""UBT: overfit amplification, scan, selection and token-level unlearning (pure torch + open_clip)."""

from ubt_core.defense.ubt import DefenseConfig, defend

__all__ = ["DefenseConfig", "defend"]
