"""Scan and select on hand-made embeddings: a collapsed group is found, a clean spread is not."""

import numpy as np
import pytest
import torch

from ubt_core.defense.embed import PairEmbeddings
from ubt_core.defense.scan import ScanConfig, knn_density, robust_z, scan_scores
from ubt_core.defense.select import SelectConfig, select_pairs
from ubt_core.eval.detection import detection_metrics


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def _world(n_clean=2000, n_group=60, dim=32, spread=0.02, seed=0):
    """Random clean embeddings plus a group of near-identical ones (a learned trigger's collapse)."""
    gen = torch.Generator().manual_seed(seed)
    clean = _unit(torch.randn(n_clean, dim, generator=gen))
    centre = _unit(torch.randn(1, dim, generator=gen))
    group = _unit(centre + spread * torch.randn(n_group, dim, generator=gen))
    images = torch.cat([clean, group])
    texts = _unit(images + 0.5 * torch.randn(images.shape, generator=gen))
    poisoned = np.r_[np.zeros(n_clean, bool), np.ones(n_group, bool)]
    return PairEmbeddings(images, texts), poisoned


def test_knn_density_ranks_near_duplicates_highest():
    emb, poisoned = _world()
    density = knn_density(emb.images, 20, emb.images)
    assert density[poisoned].min() > density[~poisoned].max()


def test_robust_z_ignores_a_small_extreme_tail():
    values = np.r_[np.random.default_rng(0).normal(size=1000), np.full(20, 1e6)]
    z = robust_z(values)
    assert abs(np.median(z)) < 0.1 and np.quantile(np.abs(z[:1000]), 0.5) < 1.0


def test_strongly_collapsed_group_is_selected_with_evidence():
    emb, poisoned = _world()
    columns = scan_scores(emb, None, ScanConfig(neighbours=20))
    selection = select_pairs(columns["suspicion"], SelectConfig(retain_size=100))
    assert selection.evidence
    metrics = detection_metrics(columns["suspicion"], poisoned, len(selection.forget))
    assert metrics["recall_at_k"] == 1.0 and len(selection.forget) <= 2 * poisoned.sum()
    assert not set(selection.retain) & set(np.flatnonzero(poisoned))


def test_no_group_means_no_evidence_and_nothing_to_unlearn():
    emb, _ = _world(n_group=0)
    columns = scan_scores(emb, None, ScanConfig(neighbours=20))
    selection = select_pairs(columns["suspicion"], SelectConfig(retain_size=100))
    assert not selection.evidence and len(selection.forget) == 0 and len(selection.retain) == 100


def test_weak_backdoor_is_found_through_the_overfit_model():
    # suspect: the group is spread out and mismatched to its captions; overfit: it has collapsed
    emb, poisoned = _world(spread=3.0, seed=1)
    texts = emb.texts.clone()
    gen = torch.Generator().manual_seed(5)
    texts[poisoned] = _unit(torch.randn(int(poisoned.sum()), texts.shape[1], generator=gen))
    suspect = PairEmbeddings(emb.images, texts)
    collapsed, _ = _world(spread=0.02, seed=1)
    amplified = PairEmbeddings(collapsed.images, texts)
    cfg = ScanConfig(neighbours=20)
    without = scan_scores(suspect, None, cfg)
    with_overfit = scan_scores(suspect, amplified, cfg)
    assert detection_metrics(without["suspicion"], poisoned, 60)["recall_at_k"] < 0.5
    assert detection_metrics(with_overfit["suspicion"], poisoned, 60)["recall_at_k"] > 0.9


def test_fixed_k_and_oracle_selection():
    emb, poisoned = _world()
    suspicion = scan_scores(emb, None, ScanConfig(neighbours=20))["suspicion"]
    assert len(select_pairs(suspicion, SelectConfig(k=7)).forget) == 7
    oracle = select_pairs(-suspicion, SelectConfig(oracle=True), poisoned)
    assert set(oracle.forget) == set(np.flatnonzero(poisoned))
    with pytest.raises(Exception, match="ground-truth"):
        select_pairs(suspicion, SelectConfig(oracle=True))


def test_detection_metrics_on_hand_made_scores():
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.2])
    truth = np.array([True, False, True, False, False])
    m = detection_metrics(scores, truth, k=2)
    assert m["hits_at_k"] == 1 and m["precision_at_k"] == 0.5 and m["recall_at_k"] == 0.5
    assert m["auroc"] == pytest.approx(5 / 6)


def test_only_a_verified_pattern_before_the_overfit_makes_it_unnecessary():
    from ubt_core.defense.ubt import DefenseConfig

    cfg = DefenseConfig()  # the caption concepts are refined first; without a pattern there, straight to the overfit
    assert cfg.pattern_first() and not cfg.select_before_overfit() and cfg.needs_overfit(None)
    assert not cfg.needs_overfit({"evidence_kind": "shared pattern"})
    assert cfg.needs_overfit({"evidence_kind": "collapse"}) and cfg.needs_overfit({"evidence_kind": None})
    scan_top_only = DefenseConfig(refine={"concepts": 0})  # the ablation: only the scan's top can verify first
    assert not scan_top_only.pattern_first() and scan_top_only.select_before_overfit()
    always = DefenseConfig(overfit={"skip_if_pattern": False})  # the overfit runs whatever is found
    assert not always.pattern_first() and not always.select_before_overfit() and always.needs_overfit(None)
    fixed_k = DefenseConfig(select={"k": 10})  # refine is off with a fixed k: nothing can be verified first
    assert not fixed_k.pattern_first() and not fixed_k.select_before_overfit() and fixed_k.needs_overfit(None)
    no_overfit = DefenseConfig(overfit={"steps": 0})  # the ablation: the caption pass, then one selection
    assert no_overfit.pattern_first() and no_overfit.select_before_overfit()
    assert not no_overfit.needs_overfit({"evidence_kind": None})


def test_the_retain_set_spans_every_pair_under_the_threshold():
    """A ranking can follow content: drawing only from the least suspicious half would leave out whatever
    content ranks high, so every pair under the selection threshold may be retained, and no selected one."""
    suspicion = np.r_[np.linspace(-3, 3, 1000), np.full(30, 10.0)]
    selection = select_pairs(suspicion, SelectConfig(retain_size=500))
    retained = suspicion[selection.retain]
    assert len(selection.forget) == 30 and not set(selection.retain) & set(selection.forget)
    assert retained.max() <= SelectConfig().select_threshold and (retained > np.median(suspicion)).sum() > 100
