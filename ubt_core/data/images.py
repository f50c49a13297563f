"""Image bytes <-> uint8 arrays. Every stage encodes images the same way, so a poisoned image is
indistinguishable from a clean one by its file format or size."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_FORMAT = "PNG"  # lossless: a trigger survives encoding exactly as the attack drew it


def encode_image(pixels: np.ndarray, image_format: str = IMAGE_FORMAT) -> bytes:
    """Encode an (H, W, 3) uint8 array as PNG (default) or JPEG bytes."""
    buf = io.BytesIO()
    options = {"quality": 95} if image_format == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="RGB").save(buf, format=image_format, **options)
    return buf.getvalue()


def image_format(data: bytes) -> str:
    """The container format of encoded image bytes ("PNG", "JPEG", ...)."""
    return Image.open(io.BytesIO(data)).format


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG bytes into an RGB PIL image (raises PIL/OSError errors on bad bytes)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def decode_pixels(data: bytes) -> np.ndarray:
    """Decode image bytes into an (H, W, 3) uint8 array."""
    return np.asarray(decode_image(data), dtype=np.uint8)
