"""Zero-shot CA / ASR / RA of CLIP checkpoints."""

from ubt_core.eval.metrics import attack_metrics, clean_accuracy
from ubt_core.eval.zeroshot import EvalConfig, encode_images, evaluate, resolve_trigger

__all__ = ["EvalConfig", "attack_metrics", "clean_accuracy", "encode_images", "evaluate", "resolve_trigger"]
