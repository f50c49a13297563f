"""The defense benchmark's cells: a cell is reused only for the same settings and the same code."""

from pathlib import Path

from ubt_core.defense import bench
from ubt_core.defense.ubt import DefenseConfig


def test_a_cell_is_reused_only_for_the_same_config_and_code(monkeypatch):
    work, model = Path("runs/bench"), Path("models/finetune-badnet-0.01")
    monkeypatch.setattr(bench, "code_version", lambda: "0.1+aaaa")
    first = bench.defense_dir(work, "ubt", DefenseConfig(), model)
    assert bench.defense_dir(work, "ubt", DefenseConfig(), model) == first and first.name == model.name
    assert bench.defense_dir(work, "ubt", DefenseConfig(unlearn={"steps": 150}), model) != first
    monkeypatch.setattr(bench, "code_version", lambda: "0.1+bbbb")
    assert bench.defense_dir(work, "ubt", DefenseConfig(), model) != first
