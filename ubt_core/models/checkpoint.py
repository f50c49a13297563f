"""open_clip local-dir checkpoints: `open_clip_config.json` + `open_clip_model.safetensors`.

Any open_clip user loads them with `open_clip.create_model_and_transforms("local-dir:PATH")`; no ubt
code is needed. Each file is written under a temporary name and renamed into place, so a crash never
leaves a half-written file; other files in the directory (e.g. resumable training state) are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import safetensors.torch
from open_clip.push_to_hf_hub import save_config_for_hf

from ubt_core.models.factory import LOCAL_DIR, LoadedModel, create_model

WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"


def save_model(loaded: LoadedModel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `loaded` as an open_clip local-dir checkpoint at `out_dir` (each file replaced atomically).

    Args:
        extra: small JSON-able facts stored beside the weights in `ubt.json` (e.g. training lineage).
    """
    out_dir = Path(out_dir)
    tmp = out_dir / ".writing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    safetensors.torch.save_file(state, tmp / WEIGHTS_NAME)
    save_config_for_hf(loaded.model, tmp / CONFIG_NAME, model_config=loaded.model_cfg)
    if extra:
        (tmp / "ubt.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):  # config last: it marks done
        os.replace(path, out_dir / path.name)
    tmp.rmdir()
    return out_dir


def load_model(path_or_name: str | Path) -> LoadedModel:
    """Load a checkpoint directory (or build a fresh model from an open_clip / ubt config name)."""
    text = str(path_or_name)
    if Path(text).is_dir():
        text = LOCAL_DIR + text
    return create_model(text)
