"""The demo flow with embedded defaults (local Ray, ephemeral Prefect, sqlite MLflow under the output):
the benchmark flow synthesises, poisons and trains (a Ray Train job), the defend flow runs UBT on the
result (small defense settings, passed as overrides), and a second run is served from the cache."""

import json

from ubt_core.data.synth import SynthConfig
from ubt_core.train import TrainConfig

SMALL_DEFENSE = ["defense.overfit.steps=2", "defense.overfit.weak_per_batch=8", "defense.overfit.normal_per_batch=8",
                 "defense.scan.neighbours=5", "defense.select.retain_size=20", "defense.unlearn.steps=2",
                 "defense.unlearn.transplant_steps=2", "defense.unlearn.batch_size=8"]


def test_demo_backdoors_a_model_defends_it_and_reuses_finished_stages(prefect_server, local_ray, tmp_path):
    from flows.demo import demo_flow

    sizes = SynthConfig(train_pairs=160, eval_images=40, rows_per_file=64)
    report = demo_flow(str(tmp_path), sizes, TrainConfig(epochs=1, batch_size=16), SMALL_DEFENSE)
    assert report["config"]["unlearn"]["steps"] == 2  # the overrides reached the defend flow
    assert set(report["evaluation"]) == {"suspect", "defended"}
    assert report["evaluation"]["suspect"]["asr_den"] > 0  # triggered non-target images were measured
    model_card = json.loads((tmp_path / "models" / "scratch-badnet-0.01" / "ubt.json").read_text())
    assert model_card["train_config"]["epochs"] == 1 and (tmp_path / "defense" / "report.md").is_file()
    assert report["detection"]["n_poisoned"] == 2  # 1 % of 160 pairs

    again = demo_flow(str(tmp_path), sizes, TrainConfig(epochs=1, batch_size=16), SMALL_DEFENSE)
    assert again["evaluation"] == report["evaluation"] and again["registered_version"] == report["registered_version"]
