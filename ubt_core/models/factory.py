"""Build any open_clip architecture by name, with ubt's small CPU configs registered alongside.

`create_model("ubt-tiny")` builds a fresh model; `create_model("local-dir:PATH")` loads a checkpoint
written by `save_model` (weights only). Both return the model with its preprocess transform and tokenizer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from ubt_core.errors import UbtError

CONFIG_DIR = Path(__file__).parent / "configs"
LOCAL_DIR = "local-dir:"


@dataclasses.dataclass
class LoadedModel:
    """A CLIP model with what it needs to see images and read text."""

    model: torch.nn.Module
    preprocess: Any  # open_clip's eval transform: PIL image -> float tensor (3, H, W)
    tokenizer: Any  # open_clip tokenizer: list[str] -> LongTensor (B, context_length)
    model_cfg: dict  # the open_clip model config, saved with every checkpoint

    def copy(self) -> LoadedModel:
        """An independent copy of the weights that shares preprocess, tokenizer and config."""
        return dataclasses.replace(self, model=copy.deepcopy(self.model))

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"]["image_size"]
        return size if isinstance(size, int) else size[0]

    def preprocess_pixels(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 3, H, W) model inputs of (H, W, 3) uint8 images, exactly as `preprocess` makes them one by one.

        When every image already has the model's input size, the eval transform's resize and crop leave it as it
        is, so the transform runs once on the whole batch (a tenth of the time on 32-pixel images); otherwise
        image by image.
        """
        size = self.model_cfg["vision_cfg"]["image_size"]
        height, width = (size, size) if isinstance(size, int) else size
        if pixels and all(p.shape[:2] == (height, width) for p in pixels):
            return self.preprocess(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous().float().div(255))
        return torch.stack([self.preprocess(Image.fromarray(p)) for p in pixels])


@functools.cache
def register_configs() -> None:
    """Register ubt's JSON model configs (ubt-tiny, ubt-small) with open_clip, once per process."""
    open_clip.add_model_config(CONFIG_DIR)


def _model_cfg(name: str) -> dict:
    if name.startswith(LOCAL_DIR):
        config_path = Path(name[len(LOCAL_DIR):]) / "open_clip_config.json"
        if not config_path.is_file():
            raise UbtError(f"{config_path}: checkpoint config missing; pass a directory written by `ubt train`.")
        # open_clip only warns and initialises randomly when the weights are missing: refuse instead
        if not any(any(config_path.parent.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
            raise UbtError(f"{config_path.parent}: no weights file (open_clip_model.safetensors) beside "
                           "open_clip_config.json; the checkpoint is incomplete, re-run `ubt train`.")
        return json.loads(config_path.read_text())["model_cfg"]
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith("ubt-"))
        raise UbtError(f"unknown model {name!r}; use one of ours ({known}), any open_clip name, or local-dir:PATH.")
    return cfg


@contextlib.contextmanager
def _expected_random_init():
    """Silence open_clip's "initialized randomly" warning while building a fresh model on purpose."""
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def create_model(name: str, force_quick_gelu: bool = False, pretrained: str | None = None,
                 cache_dir: str | None = None) -> LoadedModel:
    """Build `name` (an open_clip model name or `local-dir:PATH`) in eval mode, weights-only loading.

    `force_quick_gelu` builds the QuickGELU variant of the architecture (OpenAI-trained weights need it);
    `pretrained` is an open_clip pretrained tag, read from `cache_dir` (see `importer.import_pretrained`).
    """
    register_configs()
    model_cfg = _model_cfg(name) | ({"quick_gelu": True} if force_quick_gelu else {})
    fresh = contextlib.nullcontext() if name.startswith(LOCAL_DIR) or pretrained else _expected_random_init()
    try:
        with fresh:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, cache_dir=cache_dir, weights_only=True, force_quick_gelu=force_quick_gelu)
    except (RuntimeError, ValueError, OSError) as e:
        raise UbtError(f"could not load model {name!r}: {e}") from e
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), model_cfg)
