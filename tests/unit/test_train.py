"""The training loop on tiny data: it learns, it saves open_clip checkpoints, and it resumes; its dataset
tokenizes only the captions asked for."""

import math
import time

import pytest
import safetensors.torch
import torch

import ubt_core.train as train_module
from ubt_core.data.contract import read_pairs
from ubt_core.data.images import decode_pixels
from ubt_core.errors import UbtError
from ubt_core.models import load_model
from ubt_core.train import PairDataset, TrainConfig, train_clip, warmup_cosine

TINY = dict(epochs=2, batch_size=16, lr=1e-3, warmup_steps=2)


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(f(8), 0.5) and f(12) == 0.0 and f(20) == 0.0


def test_pair_dataset_tokenizes_only_the_rows_asked_for_as_one_batch_would(tiny_world):
    table = read_pairs(tiny_world["train"]).table
    loaded = load_model("ubt-tiny")
    tokenized = []
    dataset = PairDataset(table, loaded)
    dataset.tokenizer = lambda texts: tokenized.extend(texts) or loaded.tokenizer(texts)
    rows = [5, 2, 5, 40]
    images, tokens = dataset.stack(rows)
    captions = table.column("caption").to_pylist()
    assert torch.equal(tokens, loaded.tokenizer([captions[i] for i in rows]))
    assert images.shape[0] == 4 and torch.equal(images[0], images[2])
    assert torch.equal(dataset[2][1], tokens[1])
    assert tokenized == [captions[5], captions[2], captions[40]]  # 3 of 80 captions, each once
    assert torch.equal(dataset.pixels([40, 2]), images[[3, 1]]) and len(tokenized) == 3  # images only


def test_pair_dataset_decodes_a_cached_image_once_and_caches_no_more_than_its_budget(tiny_world, monkeypatch):
    table = read_pairs(tiny_world["train"]).table
    loaded = load_model("ubt-tiny")
    decoded = []
    monkeypatch.setattr(train_module, "decode_pixels", lambda data: decoded.append(data) or decode_pixels(data))
    one_image = PairDataset(table, loaded).pixels([0])[0].nbytes
    cached = PairDataset(table, loaded, cache_mb=3.5 * one_image / 2**20)  # room for three images
    first = cached.pixels([0, 1, 2, 3, 4])
    decoded.clear()
    again = cached.pixels([4, 3, 2, 1, 0])
    assert torch.equal(again, first.flip(0))  # the same tensors, cached or decoded again
    assert decoded == [table.column("image")[i].as_py() for i in (4, 3)]  # rows 0-2 filled the budget
    plain = PairDataset(table, loaded)
    decoded.clear()
    plain.pixels([0, 0])
    plain.pixels([0])
    assert len(decoded) == 2  # no budget, no cache: once per call


def test_training_lowers_the_contrastive_loss_and_clamps_logit_scale(tiny_world, tmp_path):
    first = train_clip(tiny_world["train"], tmp_path / "one", TrainConfig(**{**TINY, "epochs": 1, "lr": 1e-5}))
    many = train_clip(tiny_world["train"], tmp_path / "many", TrainConfig(**{**TINY, "epochs": 8,
                                                                              "max_logit_scale": 20.0}))
    assert many.final_loss < first.final_loss - 0.3
    scale = safetensors.torch.load_file(tmp_path / "many" / "open_clip_model.safetensors")["logit_scale"]
    assert scale.exp().item() <= 20.0 + 1e-4


def test_a_crashed_run_resumes_from_its_last_epoch_and_matches_an_uninterrupted_run(
        tiny_world, tmp_path, monkeypatch):
    whole = train_clip(tiny_world["train"], tmp_path / "whole", TrainConfig(**TINY))

    real_step, calls = train_module.train_step, []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # 5 steps per epoch: dies in epoch 2, after epoch 1's checkpoint
            raise RuntimeError("injected crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="injected"):
        train_clip(tiny_world["train"], tmp_path / "crashed", TrainConfig(**TINY))
    monkeypatch.setattr(train_module, "train_step", real_step)
    call_start = time.perf_counter()
    resumed = train_clip(tiny_world["train"], tmp_path / "crashed", TrainConfig(**TINY))
    call_seconds = time.perf_counter() - call_start

    assert whole.steps == 10 and resumed.steps == 5
    assert resumed.seconds > call_seconds  # the crashed run's epoch is counted in the training time
    a = safetensors.torch.load_file(tmp_path / "whole" / "open_clip_model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "crashed" / "open_clip_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_fewer_pairs_than_a_batch_is_a_clear_error(tiny_world, tmp_path):
    with pytest.raises(UbtError, match="fewer than one batch"):
        train_clip(tiny_world["train"], tmp_path / "x", TrainConfig(batch_size=1000))
