"""Import a checkpoint from OpenAI CLIP / open_clip / CleanCLIP-lineage training code into an open_clip
local-dir checkpoint, weights only.

open_clip's own `load_checkpoint` does the format work (`{"state_dict": ...}` wrappers, `module.` prefixes,
safetensors, third-party layouts); this module adds the refusals a user needs to act on: a pickle that
holds more than tensors, and keys or shapes that do not fit the named architecture.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict

from ubt_core.errors import UbtError
from ubt_core.models.checkpoint import save_model
from ubt_core.models.factory import create_model

SHOWN_KEYS = 5


def _mismatch(model: torch.nn.Module, path: str) -> str:
    """Which keys are missing, unexpected or of the wrong shape, for the error message."""
    given = load_state_dict(path, weights_only=True)
    expected = model.state_dict()
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and hasattr(given[k], "shape") and given[k].shape != v.shape]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    return "; ".join(parts) or "keys differ"


def import_checkpoint(checkpoint: str, model_name: str, out_dir: str | Path) -> Path:
    """Load `checkpoint` into the open_clip architecture `model_name` and save it as a local-dir checkpoint.

    OpenAI-lineage weights (OpenAI CLIP, CleanCLIP) need the QuickGELU variant of the architecture,
    e.g. `ViT-B-32-quickgelu`; shapes are identical, so only the name can tell.
    """
    if not Path(checkpoint).is_file():
        raise UbtError(f"{checkpoint}: no such checkpoint file.")
    loaded = create_model(model_name)
    try:
        open_clip.load_checkpoint(loaded.model, checkpoint, strict=True, weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), None)
        if found:
            raise UbtError(f"{checkpoint}: refused, it holds pickled code or objects, not only tensors ({found}); "
                           "ubt loads weights only. Re-save it as a plain state dict or as safetensors.") from None
        raise UbtError(f"{checkpoint}: not a readable PyTorch or safetensors checkpoint.") from None
    except (RuntimeError, AssertionError, KeyError) as e:  # load_state_dict / open_clip's resize checks
        raise UbtError(f"{checkpoint}: does not fit {model_name!r}: {_mismatch(loaded.model, checkpoint)}. "
                       "Pick the architecture the weights were trained with.") from e
    loaded.model.eval()
    return save_model(loaded, out_dir, extra={"imported_from": str(checkpoint), "architecture": model_name})
