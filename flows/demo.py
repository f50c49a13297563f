"""The demo: the benchmark flow makes a BadNet-backdoored model, the defend flow runs UBT on it.

Embedded defaults only: a local Ray, Prefect's ephemeral server, MLflow in sqlite under the output
directory, local files. Re-running reuses every finished stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from flows.benchmark import benchmark_flow
from flows.defend import defend_flow
from ubt_core.config import RayConfig
from ubt_core.data.synth import SynthConfig
from ubt_core.train import TrainConfig


@flow(name="ubt-demo")
def demo_flow(out: str, synth_cfg: SynthConfig | None = None, train_cfg: TrainConfig | None = None,
              overrides: list[str] | None = None) -> dict:
    """Backdoor a model (BadNet, 1 %), defend it with UBT; returns the defense report with before/after metrics.
    `overrides` (`section.key=value`, as `ubt flow defend` takes them) go to the defend flow after the demo's own."""
    cores = os.cpu_count() or 1
    # one Train worker holding every core, as in-process training would; a scan actor per core, each asking
    # for half a CPU so Ray Data's read tasks still get one (actors holding every CPU would starve them)
    made = benchmark_flow(out, ["badnet"], synth_cfg=synth_cfg, train_cfg=train_cfg,
                          ray_cfg=RayConfig(cpus_per_worker=cores))["badnet"]
    return defend_flow(None, [f"data.train={made['data']}", f"data.eval={Path(out) / 'world' / 'eval'}",
                              f"eval.trigger_from={made['data']}", f"model={made['model']}",
                              f"output={Path(out) / 'defense'}", f"ray.cpus_per_worker={cores}",
                              f"ray.scan_actors={cores}", "ray.cpus_per_actor=0.5", *(overrides or [])])
