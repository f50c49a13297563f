"""Backdoor triggers: pure, seeded functions of an (H, W, 3) uint8 image.

A trigger is fully described by its spec (a small pydantic model saved in the poisoned dataset's
manifest); applying the same spec at evaluation time reproduces the training-time trigger exactly.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


def _pattern_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, name))])


@functools.cache
def _noise_patch(seed: int, size: int) -> np.ndarray:
    """A seeded black/white (size, size, 3) checker-like noise patch: high contrast, no natural look."""
    return (_pattern_rng(seed, "badnet").integers(0, 2, (size, size, 1)) * 255).repeat(3, axis=-1).astype(np.uint8)


def _paste(pixels: np.ndarray, patch: np.ndarray, corner: str) -> np.ndarray:
    out = pixels.copy()
    h, w = pixels.shape[:2]
    ph, pw = patch.shape[:2]
    y = h - ph if "bottom" in corner else 0
    x = w - pw if "right" in corner else 0
    out[y:y + ph, x:x + pw] = patch
    return out


class BadNetTrigger(BaseModel):
    """BadNet (Gu et al. 2017): a small seeded noise patch pasted in a fixed corner."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    attack: Literal["badnet"] = "badnet"
    patch_fraction: float = Field(0.125, gt=0, le=0.5)  # patch side / image side: 4 px at 32 px
    corner: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    seed: int = 0

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        side = max(1, round(pixels.shape[0] * self.patch_fraction))
        return _paste(pixels, _noise_patch(self.seed, side), self.corner)


class BlendedTrigger(BaseModel):
    """Blended (Chen et al. 2017): alpha-blend a fixed key image over the whole image."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    attack: Literal["blended"] = "blended"
    # "logo": scikit-image's logo, a picture as in the paper; "noise": seeded uniform noise, which at alpha
    # 0.2 is so loud that the CLEAN model already sends 20 % of triggered images to the target
    key: Literal["logo", "noise"] = "logo"
    # the papers' 0.2 plants only ASR 0.90 at 1 % poison in ubt-tiny; 0.3 gives 0.98 (docs/benchmark.md)
    alpha: float = Field(0.3, gt=0, lt=1)
    seed: int = 0  # seeds the noise key

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        pattern = _blend_key(self.key, self.seed, pixels.shape)
        return ((1 - self.alpha) * pixels + self.alpha * pattern).round().astype(np.uint8)


@functools.cache
def _blend_key(key: str, seed: int, shape: tuple) -> np.ndarray:
    if key == "noise":
        return _pattern_rng(seed, "blended").integers(0, 256, shape).astype(np.float32)
    import skimage.data

    logo = Image.fromarray(skimage.data.logo()[..., :3]).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(logo, np.float32)


class SigTrigger(BaseModel):
    """SIG (Barni et al. 2019): an additive horizontal sinusoid over the whole image."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    attack: Literal["sig"] = "sig"
    delta: float = Field(30.0, gt=0, le=255)  # amplitude in pixel levels
    frequency: int = Field(6, ge=1)  # periods across the image width

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        w = pixels.shape[1]
        wave = self.delta * np.sin(2 * np.pi * np.arange(w) * self.frequency / w)
        return np.clip(pixels + wave[None, :, None], 0, 255).round().astype(np.uint8)


class WaNetTrigger(BaseModel):
    """WaNet (Nguyen & Tran 2021): a seeded warp of the image grid, bicubic between random control-point shifts."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    attack: Literal["wanet"] = "wanet"
    grid: int = Field(16, ge=2)  # control points per side (k in the paper)
    # warp magnitude (s in the paper): displacement ~ s/3 px mean at 32 px. The paper's k 4, s 0.5 need 10 %
    # poison and long training; at 1 % poison in ubt-tiny ASR grows with loudness: k 8 s 8 0.43, k 16 s 8
    # 0.76, k 16 s 16 0.93, k 16 s 24 0.96. At k 16 s 24 the warp folds: the image is scrambled, not bent
    # (docs/benchmark.md, "WaNet: how loud").
    strength: float = Field(24.0, gt=0)
    seed: int = 0

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        h, w = pixels.shape[:2]
        flow = _warp_field(self.seed, self.grid, self.strength, h, w)
        image = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]
        warped = F.grid_sample(image, flow, mode="bilinear", padding_mode="border", align_corners=True)
        return warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@functools.cache
def _warp_field(seed: int, grid: int, strength: float, h: int, w: int) -> torch.Tensor:
    noise = torch.from_numpy(_pattern_rng(seed, "wanet").uniform(-1, 1, (1, 2, grid, grid))).float()
    noise = noise / noise.abs().mean()
    flow = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack([xs, ys], dim=-1)[None]
    return (identity + strength * flow / h).clamp(-1, 1)


class LabelConsistentTrigger(BaseModel):
    """Label-consistent (Turner et al. 2019), four-corner variant: patches in every corner of images
    that already show the target, captions untouched. The adversarial-perturbation step of the paper
    is not applied."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    attack: Literal["label-consistent"] = "label-consistent"
    patch_fraction: float = Field(0.125, gt=0, le=0.5)
    seed: int = 0

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        side = max(1, round(pixels.shape[0] * self.patch_fraction))
        patch = _noise_patch(self.seed, side)
        for corner in ("top-left", "top-right", "bottom-left", "bottom-right"):
            pixels = _paste(pixels, patch, corner)
        return pixels


TriggerSpec = Annotated[
    BadNetTrigger | BlendedTrigger | SigTrigger | WaNetTrigger | LabelConsistentTrigger,
    Field(discriminator="attack"),
]
ATTACKS = ["badnet", "blended", "sig", "wanet", "label-consistent"]
_SPEC = TypeAdapter(TriggerSpec)


def make_trigger(attack: str, seed: int = 0, overrides: dict | None = None) -> TriggerSpec:
    """The trigger spec of `attack` with pattern seed `seed`: its defaults, with `overrides` (e.g. {"alpha": 0.3})
    laid over them; an unknown setting is an error."""
    fields = {"attack": attack} | ({} if attack == "sig" else {"seed": seed}) | (overrides or {})
    if fields["attack"] != attack:
        raise ValueError(f"the overrides of {attack!r} name another attack ({fields['attack']!r})")
    return _SPEC.validate_python(fields)


def trigger_from_dict(data: dict) -> TriggerSpec:
    """Rebuild a trigger spec from a manifest's `trigger` entry."""
    return _SPEC.validate_python(data)
