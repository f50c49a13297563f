"""The benchmark's settings: trigger overrides and the target are checked before any training, a work
directory's poisoned data is reused only for the trigger and target it was made with, and the doc shows
the triggers it planted."""

import pytest
from PIL import Image
from pydantic import ValidationError

from ubt_core.attacks import PoisonConfig, make_trigger, poison_dataset
from ubt_core.bench import BenchConfig, run_bench
from ubt_core.data.contract import read_eval_set
from ubt_core.data.synth import SynthConfig
from ubt_core.errors import UbtError
from ubt_core.report import plot_triggers
from ubt_core.train import TrainConfig

TINY = SynthConfig(train_pairs=80, eval_images=40, rows_per_file=32)


def test_trigger_overrides_apply_to_their_attack_only_and_misspelt_ones_are_refused():
    cfg = BenchConfig(triggers={"blended": {"alpha": 0.2}}, seed=4)
    assert cfg.trigger("blended").alpha == 0.2 and cfg.trigger("blended").seed == 4
    assert cfg.trigger("badnet") == BenchConfig(seed=4).trigger("badnet")
    with pytest.raises(ValidationError, match="alpah"):
        BenchConfig(triggers={"blended": {"alpah": 0.3}})
    with pytest.raises(ValidationError, match="triggers"):
        BenchConfig(triggers={"nope": {}})


@pytest.mark.parametrize("asked", [{"target": "square"}, {"triggers": {"blended": {"alpha": 0.2}}}])
def test_data_poisoned_with_another_trigger_or_target_is_not_reused(tmp_path, asked):
    made = BenchConfig(attacks=["blended"], rate=0.1, clean_baseline=False, synth=TINY)
    run_bench(str(tmp_path), made.model_copy(update={"attacks": []}))  # the world only
    poison_dataset(str(tmp_path / "world" / "train"), str(tmp_path / "data" / "blended-0.1"),
                   PoisonConfig(trigger=made.trigger("blended"), rate=0.1, target=made.target))
    with pytest.raises(UbtError, match="blended-0.1: poisoned with .* pass another --out"):
        run_bench(str(tmp_path), BenchConfig.model_validate(made.model_dump() | asked))


def test_a_run_with_another_target_or_triggers_gets_its_own_doc_section(tmp_path):
    doc = tmp_path / "bench.md"
    world_only = BenchConfig(attacks=[], clean_baseline=False, synth=TINY)
    run_bench(str(tmp_path / "work"), world_only, doc=str(doc))
    run_bench(str(tmp_path / "work"), world_only.model_copy(update={"target": "square"}), doc=str(doc))
    text = doc.read_text()
    assert "<!-- bench:scratch:begin -->" in text and "<!-- bench:scratch:target=square:begin -->" in text
    assert "target 'square'" in text.split("bench:scratch:target=square:begin")[1]


def test_a_target_that_is_not_a_class_of_the_world_is_refused_before_any_training(tmp_path):
    with pytest.raises(UbtError, match="'hexagon' is not a class of .*classes.json .*star"):
        run_bench(str(tmp_path), BenchConfig(target="hexagon", synth=TINY))


def test_the_doc_shows_every_planted_trigger_on_eval_images(tmp_path):
    cfg = BenchConfig(attacks=["badnet", "wanet"], rate=0.1, clean_baseline=False, synth=TINY,
                      train=TrainConfig(epochs=1, batch_size=16))
    doc = tmp_path / "docs" / "bench.md"
    run_bench(str(tmp_path / "work"), cfg, doc=str(doc))
    figure = tmp_path / "docs" / "figures" / "bench-scratch" / "triggers.png"
    assert figure.is_file() and "![the triggers on eval images](figures/bench-scratch/triggers.png)" in doc.read_text()
    assert "](figures/triggers.png)" in (tmp_path / "work" / "results-scratch.md").read_text()


def test_the_triggers_figure_has_a_row_of_clean_images_and_one_per_trigger(tmp_path):
    images = read_eval_set(str(_world(tmp_path)))[0].table.slice(0, 3).column("image").to_pylist()
    one = Image.open(plot_triggers(images, {"sig": make_trigger("sig")}, tmp_path / "one.png"))
    three = Image.open(plot_triggers(images, {a: make_trigger(a) for a in ("sig", "badnet", "wanet")},
                                     tmp_path / "three.png"))
    assert three.size[0] == one.size[0] and three.size[1] > 1.5 * one.size[1]


def _world(tmp_path):
    run_bench(str(tmp_path), BenchConfig(attacks=[], clean_baseline=False, synth=TINY))
    return tmp_path / "world" / "eval"
