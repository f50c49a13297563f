"""Shared fixtures: a tiny synthetic world written once per test session."""

import pytest

from ubt_core.data.synth import SynthConfig, synth_benchmark


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, str]:
    """80 training pairs and 40 eval images of the synthetic benchmark (train/, eval/ URIs)."""
    out = tmp_path_factory.mktemp("world")
    return synth_benchmark(str(out), SynthConfig(train_pairs=80, eval_images=40, rows_per_file=32, seed=7))


@pytest.fixture(scope="session")
def tiny_compare():
    """A comparison small enough for tests: 120 pairs, 1 epoch, BadNet at 10 %, two seeds, tiny budgets."""
    from ubt_core.bench import BenchConfig
    from ubt_core.defense.baselines import BaselineConfig
    from ubt_core.defense.compare import CompareConfig
    from ubt_core.train import TrainConfig

    small_ubt = {"overfit": {"steps": 2, "weak_per_batch": 8, "normal_per_batch": 8}, "scan": {"neighbours": 5},
                 "select": {"retain_size": 20}, "unlearn": {"steps": 2, "transplant_steps": 2, "batch_size": 8}}
    bench = BenchConfig(rate=0.1, clean_baseline=False,
                        synth=SynthConfig(train_pairs=120, eval_images=40, rows_per_file=64),
                        train=TrainConfig(epochs=1, batch_size=16, warmup_steps=2))
    return CompareConfig(attacks=["badnet"], defenses=["none", "ft", "abl", "ubt"], seeds=[0, 1], bench=bench,
                         baseline=BaselineConfig(pair_passes=32, batch_size=16, warmup_steps=0), ubt=small_ubt)


@pytest.fixture
def refine_outcome(monkeypatch) -> dict:
    """Refine's outcome as a test chooses it: set `verified` in the returned dict, or `alike_closure` (the closure of
    the pixel group among the pairs captioned alike; 0 by default). A verified pattern puts the first 6 pairs above a
    drop; every start is listed, each with those 6 as its group, and 25 pairs lie along the alike group's direction."""
    import numpy as np
    import torch

    from ubt_core.defense import stages
    from ubt_core.defense.refine import AlikeGroup, MatchedFilter, Refinement

    outcome = {"verified": False, "alike_closure": 0.0}

    def refined(model_dir, table, columns, starts, clean_rows, cfg, poisoned):
        columns["pattern"] = np.r_[np.full(6, 9.0), np.zeros(table.num_rows - 6)]
        if outcome["verified"]:
            columns["suspicion"] = columns["pattern"]
        summary = {"verified": outcome["verified"], "above_gap": 6, "gap": 9.0, "trigger_match_rate": 0.5,
                   "clean_match_rate": 0.0, "copies": False, "starts": [{"start": name} for name in starts]}
        tried = [Refinement(columns["pattern"], np.arange(6), None, None, 9.0, 6, name, cfg.min_match_gain, 1.0)
                 for name in starts]
        pixels = MatchedFilter(torch.randn(table.num_rows, 8, generator=torch.Generator().manual_seed(0)), 0.01)
        return summary, tried, pixels  # the pixels of as many different images (no group is copies)

    def alike(images, texts, rows, group, start, cfg):
        scores = np.r_[np.full(25, 9.0), np.zeros(len(rows) - 25)]
        return AlikeGroup(rows, scores, outcome["alike_closure"], 25, start)

    monkeypatch.setattr(stages, "_refine", refined)
    monkeypatch.setattr(stages, "alike_group", alike)
    return outcome
