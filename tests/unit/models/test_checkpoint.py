"""Checkpoints are plain open_clip local-dirs: open_clip alone loads them, weights only."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from ubt_core.errors import UbtError
from ubt_core.models import create_model, load_model, save_model


@pytest.mark.parametrize(("name", "size"), [("ubt-tiny", 32), ("ubt-small", 64)])
def test_ubt_configs_build_by_name(name, size):
    loaded = create_model(name)
    assert loaded.image_size == size
    assert loaded.tokenizer(["a star"]).shape == (1, loaded.model_cfg["text_cfg"]["context_length"])
    assert loaded.preprocess.transforms[1].size == (size, size)  # open_clip's eval transform at the model size


def test_saved_checkpoint_loads_in_open_clip_without_ubt(tmp_path):
    torch.manual_seed(0)
    loaded = create_model("ubt-tiny")
    save_model(loaded, tmp_path / "ckpt", extra={"note": "test"})
    assert (tmp_path / "ckpt" / "open_clip_model.safetensors").is_file()
    assert json.loads((tmp_path / "ckpt" / "open_clip_config.json").read_text())["model_cfg"] == loaded.model_cfg
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ckpt'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'ckpt'}")
    model.eval()
    images, text = torch.rand(2, 3, 32, 32), tokenizer(["a red star", "a blue ring"])
    with torch.no_grad():
        expected = loaded.model.encode_image(images), loaded.model.encode_text(text)
        got = model.encode_image(images), model.encode_text(text)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)


def test_load_model_accepts_a_plain_directory(tmp_path):
    save_model(create_model("ubt-tiny"), tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt").image_size == 32


def test_unknown_model_name_lists_ours():
    with pytest.raises(UbtError, match="ubt-tiny"):
        create_model("no-such-model")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UbtError, match="open_clip_config.json"):
        create_model(f"local-dir:{tmp_path}")


def test_checkpoint_without_weights_is_refused_not_randomly_initialised(tmp_path):
    save_model(create_model("ubt-tiny"), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "open_clip_model.safetensors").unlink()
    with pytest.raises(UbtError, match="no weights file"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("shape", [(32, 32), (40, 28)])  # the model's size (one batch), another (image by image)
def test_preprocess_pixels_is_the_eval_transform_image_by_image(shape):
    loaded = create_model("ubt-tiny")
    pixels = list(np.random.default_rng(0).integers(0, 256, (3, *shape, 3), dtype=np.uint8))
    expected = torch.stack([loaded.preprocess(Image.fromarray(image)) for image in pixels])
    assert torch.equal(loaded.preprocess_pixels(pixels), expected)
