"""Import a checkpoint from OpenAI CLIP / open_clip / CleanCLIP-lineage training code, or open_clip's
pretrained weights by tag, into an open_clip local-dir checkpoint, weights only.

open_clip's own `load_checkpoint` does the format work (`{"state_dict": ...}` wrappers, `module.` prefixes,
safetensors, third-party layouts); this module adds the refusals a user needs to act on (a pickle that
holds more than tensors, a TorchScript archive, keys or shapes that do not fit the named architecture)
and the activation: OpenAI trained CLIP with QuickGELU, and shapes cannot tell the two activations apart.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict

from ubt_core.errors import UbtError
from ubt_core.models.checkpoint import save_model
from ubt_core.models.factory import create_model, register_configs

SHOWN_KEYS = 5
# the state dict of OpenAI's released CLIP models carries these three; nothing trained with GELU does
OPENAI_RELEASE_KEYS = ("input_resolution", "context_length", "vocab_size")


def _mismatch(model: torch.nn.Module, given: dict) -> str:
    """Which keys are missing, unexpected or of the wrong shape, for the error message."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and hasattr(given[k], "shape") and given[k].shape != v.shape]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    return "; ".join(parts) or "keys differ"


def _is_torchscript(checkpoint: str) -> bool:
    """TorchScript archives are zips with a `constants.pkl` (plain `torch.save` zips have none)."""
    if not zipfile.is_zipfile(checkpoint):
        return False
    with zipfile.ZipFile(checkpoint) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _read_weights(checkpoint: str) -> dict:
    """The checkpoint's state dict (wrappers and `module.` prefixes removed), refusing anything but tensors."""
    if _is_torchscript(checkpoint):
        raise UbtError(f"{checkpoint}: a TorchScript archive (OpenAI's release format) holds code, which ubt "
                       "does not run. Extract its weights where you trust it: "
                       "torch.save(torch.jit.load(FILE).state_dict(), 'weights.pt'), and import that.")
    try:
        return load_state_dict(checkpoint, weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), None)
        if found:
            raise UbtError(f"{checkpoint}: refused, it holds pickled code or objects, not only tensors ({found}); "
                           "ubt loads weights only. Re-save it as a plain state dict or as safetensors.") from None
        raise UbtError(f"{checkpoint}: not a readable PyTorch or safetensors checkpoint.") from None
    except (RuntimeError, OSError, ValueError) as e:
        raise UbtError(f"{checkpoint}: not a readable PyTorch or safetensors checkpoint ({e}).") from None


def import_checkpoint(checkpoint: str, model_name: str, out_dir: str | Path, quick_gelu: bool | None = None) -> Path:
    """Load `checkpoint` into the open_clip architecture `model_name` and save it as a local-dir checkpoint.

    `quick_gelu=None` decides the activation: QuickGELU for weights in OpenAI's release layout
    (`OPENAI_RELEASE_KEYS`), else the architecture's own. CleanCLIP-lineage checkpoints carry no such
    mark: pass `quick_gelu=True` or name the `-quickgelu` architecture (e.g. `ViT-B-32-quickgelu`).
    """
    if not Path(checkpoint).is_file():
        raise UbtError(f"{checkpoint}: no such checkpoint file.")
    state = _read_weights(checkpoint)
    openai_release = any(key in state for key in OPENAI_RELEASE_KEYS)
    loaded = create_model(model_name, force_quick_gelu=quick_gelu or (quick_gelu is None and openai_release))
    try:
        if openai_release:  # already open_clip's key layout, plus three entries that are not weights
            loaded.model.load_state_dict({k: v for k, v in state.items() if k not in OPENAI_RELEASE_KEYS})
        else:
            open_clip.load_checkpoint(loaded.model, checkpoint, strict=True, weights_only=True)
    except (RuntimeError, AssertionError, KeyError) as e:  # load_state_dict / open_clip's resize checks
        raise UbtError(f"{checkpoint}: does not fit {model_name!r}: {_mismatch(loaded.model, state)}. "
                       "Pick the architecture the weights were trained with.") from e
    loaded.model.eval()
    activation = "QuickGELU" if loaded.model_cfg.get("quick_gelu") else "GELU"
    return save_model(loaded, out_dir, extra={"imported_from": str(checkpoint), "architecture": model_name,
                                               "activation": activation, "openai_release_layout": openai_release})


def import_pretrained(model_name: str, tag: str, out_dir: str | Path, cache_dir: str | None = None) -> Path:
    """Save open_clip's pretrained weights `tag` of `model_name` as a local-dir checkpoint.

    The weights come from open_clip's cache (`cache_dir`, else the Hugging Face / ~/.cache/clip default),
    or from the hub when it is reachable: the one ubt command that may use the network.
    """
    register_configs()
    pretrained = open_clip.get_pretrained_cfg(model_name, tag)
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise UbtError(f"open_clip has no pretrained weights {tag!r} for {model_name!r}; its tags: "
                       f"{', '.join(tags) or 'none'}.")
    try:
        open_clip.download_pretrained(pretrained, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - offline shows up as many kinds of error (URL, HTTP, hub, OS)
        raise UbtError(f"pretrained weights {model_name} / {tag} are not in the cache ({cache_dir or 'the default'}) "
                       f"and could not be fetched ({type(e).__name__}: {e}). On a machine with network run this "
                       "command there and copy its output directory here, or point --cache-dir at a cache that "
                       "holds the weights, or import the weights file with --checkpoint.") from None
    loaded = create_model(model_name, force_quick_gelu=bool(pretrained.get("quick_gelu")), pretrained=tag,
                          cache_dir=cache_dir)
    activation = "QuickGELU" if loaded.model_cfg.get("quick_gelu") else "GELU"
    return save_model(loaded, out_dir, extra={"pretrained": tag, "architecture": model_name,
                                               "activation": activation})
