"""The unlearning sweep on a tiny comparison: each variant unlearns the UBT cell's own selection."""

import pyarrow.parquet as pq
import pytest

from ubt_core.defense import sweep
from ubt_core.defense.compare import cell_dir, run_compare
from ubt_core.defense.sweep import SweepConfig, run_unlearn_sweep
from ubt_core.errors import UbtError


@pytest.fixture(scope="module")
def ubt_cells(tmp_path_factory, tiny_compare):
    """A UBT cell that unlearned something: a fixed k, since a one-epoch model shows no evidence."""
    cfg = tiny_compare.model_copy(update={"defenses": ["ubt"], "seeds": [0],
                                          "ubt": tiny_compare.ubt | {"select": {"retain_size": 20, "k": 6}}})
    work = tmp_path_factory.mktemp("sweep")
    run_compare(str(work), cfg)
    return work, cfg


def test_every_variant_unlearns_the_cells_selection(ubt_cells, tmp_path):
    work, cfg = ubt_cells
    doc = tmp_path / "algorithm.md"
    variants = {"one": {"steps": 1}, "three": {"steps": 3}}
    markdown = run_unlearn_sweep(str(work), SweepConfig(compare=cfg, variants=variants), doc=str(doc))
    cell = cell_dir(work / "seed-0", 0, "badnet", "ubt", cfg)
    selected = pq.read_table(cell / "suspicious.parquet")
    runs = sorted((work / "seed-0" / "unlearn-sweep" / cell.parent.name).iterdir())
    assert [run.name.split("-")[0] for run in runs] == ["one", "three"]
    for run in runs:
        assert pq.read_table(run / "badnet" / "suspicious.parquet").equals(selected)
        assert (run / "badnet" / "model" / "open_clip_config.json").is_file()
    assert "| one | `{\"steps\": 1}` | badnet |" in markdown and "| three |" in markdown
    assert "<!-- unlearn-sweep:scratch:one+three:begin -->" in doc.read_text()


def test_finished_variants_are_reused(ubt_cells, monkeypatch):
    work, cfg = ubt_cells
    run_unlearn_sweep(str(work), SweepConfig(compare=cfg, variants={"one": {"steps": 1}}))
    monkeypatch.setattr(sweep, "unlearn_stage", lambda *args, **kwargs: 1 / 0)
    run_unlearn_sweep(str(work), SweepConfig(compare=cfg, variants={"one": {"steps": 1}}))


def test_a_cell_without_ubt_says_how_to_make_it(ubt_cells, tmp_path):
    _, cfg = ubt_cells
    with pytest.raises(UbtError, match=r"no UBT selection for seed 0, badnet; run `ubt bench --out .* --defenses ubt"):
        run_unlearn_sweep(str(tmp_path), SweepConfig(compare=cfg, variants={"one": {}}))
