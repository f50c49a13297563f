"""Baseline defenses (FT, CleanCLIP, ABL, SafeCLIP-filter) on tiny sizes: definitions and contracts."""

import json
import random

import numpy as np
import pytest
import torch

from ubt_core.attacks import PoisonConfig, make_trigger, poison_dataset
from ubt_core.data.contract import read_pairs
from ubt_core.defense.baselines import BASELINES, BaselineConfig, run_baseline
from ubt_core.defense.baselines.common import epoch_batches, fine_tune, per_pair_clip_loss
from ubt_core.defense.baselines.safeclip import safe_pairs
from ubt_core.defense.baselines.views import PairViews, eda
from ubt_core.errors import UbtError
from ubt_core.losses import ClipLoss
from ubt_core.models import create_model, load_model, save_model
from ubt_core.train import PairDataset

TINY = BaselineConfig(pair_passes=16, batch_size=8, warmup_steps=0, abl_isolation=0.05, abl_isolated_per_batch=4)


@pytest.fixture(scope="module")
def suspect(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    save_model(create_model("ubt-tiny"), root / "model")
    poison_dataset(tiny_world["train"], str(root / "poisoned"),
                   PoisonConfig(trigger=make_trigger("badnet", 1), rate=0.1, target="star", seed=1))
    return root


def test_eda_swaps_or_drops_words_and_keeps_the_rest():
    caption = "a small red star in the top left corner over grass"
    for seed in range(20):
        out = eda(caption, random.Random(seed)).split()
        assert out != caption.split()
        assert sorted(out) == sorted(caption.split()) or (len(out) == len(caption.split()) - 1
                                                          and set(out) <= set(caption.split()))
    assert eda("star", random.Random(0)) == "star"


def test_views_are_the_plain_batch_plus_augmented_copies(tiny_world):
    table = read_pairs(tiny_world["train"]).table
    loaded = create_model("ubt-tiny")
    views = PairViews(table, loaded, seed=0)
    rows = [3, 0, 5]
    images, image_views, texts, text_views = views.views(rows)
    plain_images, plain_texts = PairDataset(table, loaded).stack(rows)
    assert torch.equal(images, plain_images) and torch.equal(texts, plain_texts)
    assert image_views.shape == images.shape and text_views.shape == texts.shape


def test_epoch_batches_cover_every_row_once_per_epoch():
    batches = epoch_batches(np.arange(10), 5, seed=3)
    for _ in range(3):
        epoch = np.concatenate([next(batches), next(batches)])
        assert sorted(epoch.tolist()) == list(range(10))
    assert len(next(epoch_batches(np.arange(3), 8, seed=0))) == 3  # fewer rows than a batch: one smaller batch


def test_per_pair_losses_average_to_the_clip_loss_of_one_batch(tiny_world):
    table = read_pairs(tiny_world["train"]).table.slice(0, 16)
    torch.manual_seed(0)
    loaded = create_model("ubt-tiny")
    dataset = PairDataset(table, loaded)
    losses = per_pair_clip_loss(loaded, dataset, batch_size=16, seed=0)
    with torch.no_grad():
        whole = ClipLoss()(*loaded.model(*dataset.stack(range(16)))[:3])
    assert losses.shape == (16,)
    assert losses.mean() == pytest.approx(whole.item(), rel=1e-5)


def test_safe_pairs_are_the_high_similarity_component():
    rng = np.random.default_rng(0)
    cosines = np.concatenate([rng.normal(0.8, 0.02, 90), rng.normal(0.1, 0.02, 10)])
    safe = safe_pairs(cosines, seed=0)
    assert safe[:90].all() and not safe[90:].any()


def test_fine_tune_moves_a_copy_and_leaves_the_suspect(tiny_world):
    loaded = create_model("ubt-tiny")
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    dataset = PairDataset(read_pairs(tiny_world["train"]).table, loaded)
    batches = epoch_batches(np.arange(len(dataset)), 8, seed=0)
    tuned = fine_tune(loaded, lambda model, step: ClipLoss()(*model(*dataset.stack(next(batches)))[:3]), TINY, "t")
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in tuned.model.named_parameters())


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_each_baseline_writes_a_loadable_model_and_a_report(name, suspect, tiny_world, tmp_path):
    report = run_baseline(name, str(suspect / "model"), str(suspect / "poisoned"), tmp_path, TINY,
                          clean_uri=tiny_world["train"])
    assert load_model(str(tmp_path / "model")).model is not None
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["defense"] == name and saved["pair_passes"] >= TINY.pair_passes and saved["total_seconds"] > 0
    if name in ("abl", "safeclip"):  # they rank the suspect's own pairs, which carry ground truth here
        assert saved["detection"]["n_poisoned"] == 8 and 0 <= saved["detection"]["auroc"] <= 1
    else:
        assert report["trained_on"] == tiny_world["train"] and "detection" not in saved


def test_clean_set_baselines_refuse_to_run_without_one(suspect, tmp_path):
    with pytest.raises(UbtError, match="clean set"):
        run_baseline("cleanclip", str(suspect / "model"), str(suspect / "poisoned"), tmp_path, TINY)
    with pytest.raises(UbtError, match="unknown baseline 'roclip'"):
        run_baseline("roclip", str(suspect / "model"), str(suspect / "poisoned"), tmp_path, TINY)
