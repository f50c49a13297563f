"""Training losses. The CLIP contrastive loss is open_clip's own `ClipLoss`; later stages add theirs here."""

from open_clip.loss import ClipLoss

__all__ = ["ClipLoss"]
