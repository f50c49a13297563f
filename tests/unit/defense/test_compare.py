"""The comparison harness on a tiny world: one row per (seed, attack, defense), finished cells reused."""

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from ubt_core.attacks import PoisonConfig, make_trigger, poison_dataset
from ubt_core.data.contract import read_pairs
from ubt_core.defense import compare
from ubt_core.defense.baselines import BaselineConfig
from ubt_core.defense.compare import clean_subset, run_compare


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_compare):
    work = tmp_path_factory.mktemp("compare")
    return work, run_compare(str(work), tiny_compare)


def test_one_row_per_seed_attack_and_defense(compared, tiny_compare):
    work, markdown = compared
    rows = pq.read_table(work / "results.parquet").to_pylist()
    assert sorted((r["seed"], r["defense"]) for r in rows) == sorted(
        (seed, defense) for seed in tiny_compare.seeds for defense in tiny_compare.defenses)
    assert all(0 <= r["ca"] <= 1 and 0 <= r["asr"] <= 1 for r in rows)
    by = {(r["seed"], r["defense"]): r for r in rows}
    for seed in tiny_compare.seeds:
        assert by[seed, "none"]["seconds"] == 0 and by[seed, "none"]["pair_passes"] == 0
        assert by[seed, "ft"]["pair_passes"] == 32 and by[seed, "ft"]["auroc"] is None  # FT ranks no pairs
        assert 0 <= by[seed, "abl"]["auroc"] <= 1 and by[seed, "ubt"]["pair_passes"] > 0
    assert "| badnet | ubt |" in markdown and " ± " in markdown
    assert all((work / "figures" / name).stat().st_size > 0 for name in ("ca_vs_asr.png", "defense_seconds.png"))


def test_finished_cells_are_reused_not_recomputed(compared, tiny_compare, monkeypatch):
    work, markdown = compared

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(compare, "run_baseline", refuse)
    monkeypatch.setattr(compare, "defend", refuse)
    assert run_compare(str(work), tiny_compare).split("measured")[1] == markdown.split("measured")[1]


def test_other_settings_make_a_new_cell(compared, tiny_compare, monkeypatch):
    work, _ = compared
    calls = []
    monkeypatch.setattr(compare, "run_baseline", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    changed = tiny_compare.model_copy(update={"baseline": BaselineConfig(pair_passes=48, batch_size=16), "seeds": [0],
                                      "defenses": ["ft"]})
    with pytest.raises(ZeroDivisionError):
        run_compare(str(work), changed)
    assert len(calls) == 1


def test_a_cell_is_named_by_its_triggers_as_built(tiny_compare, tmp_path):
    def name(triggers):
        return compare.row_file(tmp_path, 0, "blended", "ubt", tiny_compare.model_copy(
            update={"bench": tiny_compare.bench.model_copy(update={"triggers": triggers})}))

    default_alpha = make_trigger("blended").alpha
    assert name({"blended": {"alpha": default_alpha}}) == name({})  # the default spelt out is the same cell
    assert name({"blended": {"alpha": default_alpha / 2}}) != name({})


def test_clean_subset_is_a_seeded_share_of_the_unpoisoned_pairs(tiny_world, tmp_path):
    poisoned = str(tmp_path / "poisoned")
    poison_dataset(tiny_world["train"], poisoned,
                   PoisonConfig(trigger=make_trigger("badnet", 0), rate=0.1, target="star", seed=0))
    first = read_pairs(clean_subset(poisoned, str(tmp_path / "a"), 0.25, seed=3)).table
    again = read_pairs(clean_subset(poisoned, str(tmp_path / "b"), 0.25, seed=3)).table
    assert first.num_rows == 20 and not np.any(first.column("poisoned").to_numpy(zero_copy_only=False))
    assert first.column("uid").to_pylist() == again.column("uid").to_pylist()


def test_kept_rows_complete_a_comparison_without_models(compared, tiny_compare, monkeypatch, tmp_path):
    work, markdown = compared
    monkeypatch.setattr(compare, "run_bench", lambda *args, **kwargs: 1 / 0)  # no world, no models
    fresh, doc = tmp_path / "fresh", tmp_path / "docs" / "results.md"  # nothing has created `fresh` yet
    again = run_compare(str(fresh), tiny_compare, rows_dir=str(work / "rows"), doc=str(doc))
    assert again.split("measured")[1] == markdown.split("measured")[1]
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", doc.read_text())
    assert len(links) == 2 and all((doc.parent / link).is_file() for link in links)  # the doc shows its own copies
    assert pq.read_table(fresh / "results.parquet").num_rows == len(tiny_compare.seeds) * len(tiny_compare.defenses)


def test_ubt_training_counts_the_overfit_only_when_it_ran():
    from ubt_core.defense.ubt import DefenseConfig

    cfg = DefenseConfig()
    unlearned = cfg.unlearn.steps * cfg.unlearn.batch_size * 2
    overfitted = cfg.overfit.steps * (cfg.overfit.weak_per_batch + cfg.overfit.normal_per_batch)
    pattern = {"scope": "pattern"}
    skipped, _ = compare._ubt_training(cfg, {"k": 200, "overfit_ran": False, "unlearn": pattern}, 20_000)
    ran, _ = compare._ubt_training(cfg, {"k": 200, "overfit_ran": True, "unlearn": pattern}, 20_000)
    nothing, _ = compare._ubt_training(cfg, {"k": 0, "overfit_ran": True, "unlearn": {}}, 20_000)
    assert (skipped, ran, nothing) == (unlearned, unlearned + overfitted, overfitted)
    fewer_clean = DefenseConfig(unlearn={"clean_per_step": 8})
    assert compare._ubt_training(fewer_clean, {"k": 200, "overfit_ran": False, "unlearn": pattern},
                                 20_000)[0] == cfg.unlearn.steps * 40
    transplanted, _ = compare._ubt_training(cfg, {"k": 200, "overfit_ran": False, "unlearn": {"scope": "token"}},
                                            20_000)
    assert transplanted == cfg.unlearn.transplant_steps * cfg.unlearn.transplant_batch_size * 2
