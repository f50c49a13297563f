"""Token saliency: which image patch tokens and caption tokens carry a pair's image-text match.

Gradient x activation of the pair's cosine similarity, taken at the patch embeddings (the output
of the ViT's patch projection, `visual.conv1`) and at the caption's token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ubt_core.errors import UbtError
from ubt_core.models import LoadedModel


@dataclass
class Saliency:
    patches: torch.Tensor  # (N, grid_h, grid_w) image patch-token saliency
    tokens: torch.Tensor  # (N, context_length) caption-token saliency (0 beyond the caption's end)
    patch_size: tuple[int, int]  # pixels of the preprocessed image per patch token


def _patch_projection(loaded: LoadedModel) -> torch.nn.Module:
    conv = getattr(loaded.model.visual, "conv1", None)
    if not isinstance(conv, torch.nn.Conv2d):
        raise UbtError(f"token-level unlearning needs an open_clip ViT image tower; this model's is "
                       f"{type(loaded.model.visual).__name__} (use --scope full for sample-level unlearning).")
    return conv


def patch_size(loaded: LoadedModel) -> tuple[int, int]:
    """Pixels of the preprocessed image per patch token of an open_clip ViT image tower."""
    return tuple(_patch_projection(loaded).kernel_size)


def token_saliency(loaded: LoadedModel, images: torch.Tensor, texts: torch.Tensor, batch_size: int = 128) -> Saliency:
    """Saliency of every patch token of `images` and every token of `texts` for their paired cosine."""
    model = loaded.model
    conv = _patch_projection(loaded)
    captured = {}
    hooks = [conv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("patches", out)),
             model.token_embedding.register_forward_hook(lambda _m, _i, out: captured.__setitem__("tokens", out))]
    patches, tokens = [], []
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            x, t = images[start:start + batch_size], texts[start:start + batch_size]
            cosine = (model.encode_image(x, normalize=True) * model.encode_text(t, normalize=True)).sum()
            grads = torch.autograd.grad(cosine, [captured["patches"], captured["tokens"]])
            patches.append((grads[0] * captured["patches"]).sum(dim=1).detach())
            tokens.append((grads[1] * captured["tokens"]).sum(dim=-1).detach())
    finally:
        for hook in hooks:
            hook.remove()
    return Saliency(torch.cat(patches), torch.cat(tokens), tuple(conv.kernel_size))


def top_patch_masks(saliency: Saliency, n_tokens: int, image_shape: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) boolean pixel masks covering each image's `n_tokens` most salient patch tokens."""
    n, grid_h, grid_w = saliency.patches.shape
    top = saliency.patches.reshape(n, -1).topk(min(n_tokens, grid_h * grid_w), dim=1).indices
    grid = torch.zeros(n, grid_h * grid_w, dtype=torch.bool)
    grid.scatter_(1, top, True)
    ph, pw = saliency.patch_size
    masks = grid.reshape(n, 1, grid_h, grid_w).repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)
    return torch.nn.functional.pad(masks, (0, image_shape[1] - masks.shape[3], 0, image_shape[0] - masks.shape[2]))
