"""open_clip model factory, our small configs, and local-dir checkpoints."""

from ubt_core.models.checkpoint import load_model, save_model
from ubt_core.models.factory import LoadedModel, create_model, register_configs

__all__ = ["LoadedModel", "create_model", "load_model", "register_configs", "save_model"]
