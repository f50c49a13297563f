"""Synthetic image-caption world: coloured shapes on natural textures, with varied captions.

Each image shows one object of a class (shape) in a colour, size and position, drawn over a crop of a
photo or texture that ships with scikit-image / scikit-learn. Captions describe it through several
templates with synonyms and distractor words, so a small CLIP must learn both vision and language.
The whole world is a deterministic function of the seed.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from pydantic import BaseModel, Field
from tqdm import tqdm

from ubt_core.data.contract import CLASSES_FILE, EvalClasses, write_json, write_pairs
from ubt_core.data.images import encode_image

CLASSES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "arrow", "ring", "crescent"]
COLOURS = {
    "red": (225, 35, 35), "green": (30, 170, 60), "blue": (35, 75, 235), "yellow": (245, 225, 35),
    "purple": (150, 55, 205), "orange": (250, 140, 20), "pink": (250, 125, 195), "white": (248, 248, 248),
    "black": (15, 15, 15), "cyan": (25, 215, 225),
}
SIZES = {"small": (0.24, 0.31), "large": (0.34, 0.44)}  # object radius as a fraction of the image side
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
# background source -> words a caption may use for it
BACKGROUNDS = {
    "brick": ["a brick wall", "bricks"], "grass": ["grass", "a lawn"], "gravel": ["gravel", "stones"],
    "coffee": ["a coffee cup", "coffee"], "chelsea": ["a cat", "a cat photo"], "astronaut": ["an astronaut"],
    "rocket": ["a rocket"], "camera": ["a photographer"], "coins": ["coins"], "china": ["a temple"],
    "flower": ["flowers"], "text": ["printed text"],
}
PHOTO_WORDS = ["photo", "picture", "image", "snapshot"]
DISTRACTORS = ["stock photo", "hd wallpaper", "#art", "free download", "vintage", "4k", "trending now", "high quality"]
CAPTION_TEMPLATES = [
    "{a_photo} of {a_size_colour} {cls}{pos}.",
    "{a_colour} {cls} on {bg}.",
    "{size} {colour} {cls}, {bg} in the background",
    "{a_photo} of a {cls}.",
    "a {cls} drawn in {colour}.",
    "there is {a_colour} {cls} in this {photo_word}.",
    "close-up: {a_size} {cls} over {bg}.",
    "{colour} {cls}",
]
EVAL_TEMPLATES = ["a photo of a {}.", "an image of a {}.", "a {} shape.", "a picture of a {}.", "a drawing of a {}."]
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, for anti-aliased edges


class SynthConfig(BaseModel):
    """Size and randomness of the synthetic benchmark."""

    train_pairs: int = Field(20_000, ge=1)  # enough that a tiny CLIP generalises (CA >= 0.8) in minutes
    eval_images: int = Field(5_000, ge=1)  # 500 per class: CA/ASR resolved to about +-1 point
    image_size: int = Field(32, ge=16)  # matches ubt-tiny's vision tower
    rows_per_file: int = Field(5_000, ge=1)  # several files per split, like real shards
    seed: int = 0


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@functools.cache
def _background_sources() -> dict[str, np.ndarray]:
    """Photos and textures bundled with scikit-image and scikit-learn (no downloads), as RGB uint8."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources = {}
    for name in BACKGROUNDS:
        if name in ("china", "flower"):
            continue
        img = getattr(skimage.data, name)()
        sources[name] = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
    china, flower = load_sample_images().images
    sources["china"], sources["flower"] = china, flower
    return sources


def _background(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    src = _background_sources()[name]
    h, w = src.shape[:2]
    crop = int(rng.integers(max(size, min(h, w) // 8), min(h, w) // 2))
    y, x = int(rng.integers(0, h - crop)), int(rng.integers(0, w - crop))
    patch = Image.fromarray(src[y:y + crop, x:x + crop]).resize((size, size), Image.BILINEAR)
    # muted so the object stays the most salient thing in the picture
    return (np.asarray(patch, np.float32) * 0.5 + 55).astype(np.uint8)


def _polygon(n: int, cx: float, cy: float, r: float, rot: float, inner: float | None = None) -> list:
    points = []
    for i in range(n * (2 if inner else 1)):
        radius = r if inner is None or i % 2 == 0 else r * inner
        a = rot + math.pi * 2 * i / (n * (2 if inner else 1)) - math.pi / 2
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def _draw_mask(shape: str, cx: float, cy: float, r: float, rot: float, size: int) -> np.ndarray:
    """Anti-aliased (size, size) float mask in [0, 1] of one shape."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(canvas)
    cx, cy, r = cx * s, cy * s, r * s
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=0)
    elif shape == "crescent":
        d.ellipse(box, fill=255)
        ox, oy = r * 0.5 * math.cos(rot * 4), r * 0.5 * math.sin(rot * 4)
        d.ellipse((cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy), fill=0)
    elif shape == "square":
        d.polygon(_polygon(4, cx, cy, r * 1.2, rot + math.pi / 4), fill=255)
    elif shape == "diamond":
        pts = _polygon(4, 0, 0, r, rot * 0.5)
        d.polygon([(cx + x * 0.62, cy + y) for x, y in pts], fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(3, cx, cy + r * 0.2, r * 1.15, rot), fill=255)
    elif shape == "arrow":
        outline = [(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]
        c, s_ = math.cos(rot), math.sin(rot)
        d.polygon([(cx + r * (x * c - y * s_), cy + r * (x * s_ + y * c)) for x, y in outline], fill=255)
    elif shape == "star":
        d.polygon(_polygon(5, cx, cy, r * 1.1, rot, inner=0.4), fill=255)
    elif shape == "cross":
        w = r * 0.27
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif shape == "heart":
        k = r * 0.52
        d.ellipse((cx - 2 * k, cy - 1.35 * k, cx, cy + 0.65 * k), fill=255)
        d.ellipse((cx, cy - 1.35 * k, cx + 2 * k, cy + 0.65 * k), fill=255)
        d.polygon([(cx - 1.93 * k, cy - 0.1 * k), (cx + 1.93 * k, cy - 0.1 * k), (cx, cy + 1.95 * k)], fill=255)
    else:
        raise KeyError(shape)
    return np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0


def _position_phrase(cx: float, cy: float, size: int) -> str:
    horiz = "left" if cx < size * 0.44 else "right" if cx > size * 0.56 else ""
    vert = "top" if cy < size * 0.44 else "bottom" if cy > size * 0.56 else ""
    return f"{vert} {horiz}".strip() or "middle"


def draw_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """One random scene: (H, W, 3) uint8 pixels and its attributes (class, colour, size, position, bg)."""
    cls = int(rng.integers(len(CLASSES)))
    colour = str(rng.choice(list(COLOURS)))
    size_word = str(rng.choice(list(SIZES)))
    bg = str(rng.choice(list(BACKGROUNDS)))
    r = float(rng.uniform(*SIZES[size_word])) * size
    margin = r * 0.9
    cx, cy = (float(rng.uniform(margin, size - margin)) for _ in range(2))
    rot = float(rng.uniform(-0.3, 0.3))
    mask = _draw_mask(CLASSES[cls], cx, cy, r, rot, size)[..., None]
    rgb = np.array(COLOURS[colour], np.float32) + rng.normal(0, 8, 3)
    pixels = _background(rng, bg, size) * (1 - mask) + np.clip(rgb, 0, 255) * mask
    attrs = {"cls": CLASSES[cls], "label": cls, "colour": colour, "size": size_word,
             "pos": _position_phrase(cx, cy, size), "bg": bg}
    return pixels.round().astype(np.uint8), attrs


def write_caption(rng: np.random.Generator, attrs: dict) -> str:
    """A caption for a scene: a random template filled with synonyms, sometimes with distractor words."""
    size = str(rng.choice(SIZE_WORDS[attrs["size"]]))
    photo = str(rng.choice(PHOTO_WORDS))
    pos = attrs["pos"]
    fields = {
        "cls": attrs["cls"], "colour": attrs["colour"], "size": size, "photo_word": photo,
        "a_photo": f"{_article(photo)} {photo}", "a_colour": f"{_article(attrs['colour'])} {attrs['colour']}",
        "a_size": f"{_article(size)} {size}", "a_size_colour": f"{_article(size)} {size} {attrs['colour']}",
        "pos": f" in the {pos}" if rng.random() < 0.5 else "", "bg": str(rng.choice(BACKGROUNDS[attrs["bg"]])),
    }
    caption = str(rng.choice(CAPTION_TEMPLATES)).format(**fields)
    if rng.random() < 0.3:
        caption = f"{caption} {rng.choice(DISTRACTORS)}"
    return caption


def synth_pairs(n: int, size: int, seed: int, prefix: str, desc: str) -> pa.Table:
    """`n` scenes with captions as a contract table (uid, image, caption, label)."""
    rng = np.random.default_rng(seed)
    uids, images, captions, labels = [], [], [], []
    for i in tqdm(range(n), desc=desc, unit="pair", mininterval=2.0):
        pixels, attrs = draw_scene(rng, size)
        uids.append(f"{prefix}-{i:07d}")
        images.append(encode_image(pixels))
        captions.append(write_caption(rng, attrs))
        labels.append(attrs["label"])
    return pa.table({"uid": uids, "image": pa.array(images, pa.binary()), "caption": captions,
                     "label": pa.array(labels, pa.int64())})


def synth_benchmark(out: str, cfg: SynthConfig) -> dict[str, str]:
    """Write OUT/train (pairs) and OUT/eval (labelled images + classes.json); returns both URIs."""
    train_seed, eval_seed = np.random.SeedSequence(cfg.seed).generate_state(2)
    train_uri, eval_uri = f"{out.rstrip('/')}/train", f"{out.rstrip('/')}/eval"
    train = synth_pairs(cfg.train_pairs, cfg.image_size, int(train_seed), "train", "synth train")
    write_pairs(train, train_uri, rows_per_file=cfg.rows_per_file)
    evals = synth_pairs(cfg.eval_images, cfg.image_size, int(eval_seed), "eval", "synth eval")
    write_pairs(evals, eval_uri, rows_per_file=cfg.rows_per_file)
    write_json(EvalClasses(classes=CLASSES, templates=EVAL_TEMPLATES).model_dump(), f"{eval_uri}/{CLASSES_FILE}")
    return {"train": train_uri, "eval": eval_uri}
