"""The benchmark flow: synthesise -> poison (per attack) -> train a backdoored model (Ray Train) -> evaluate.

One DAG makes a whole experiment's models. Each task is cached on its inputs and the code version
(the synthetic world and poisoned sets by their directories' content digests), so a re-run only does
what changed. Models are the open_clip local-dirs `ubt train` writes, ready for `flows/defend.py`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from ubt_core.attacks.poison import PoisonConfig, poison_dataset
from ubt_core.attacks.triggers import make_trigger
from ubt_core.bench import DEFAULT_TARGET
from ubt_core.config import RayConfig
from ubt_core.data.synth import SynthConfig, synth_benchmark
from ubt_core.eval import evaluate as evaluate_model
from ubt_core.eval import resolve_trigger
from ubt_core.jobs import run_train_job
from ubt_core.provenance import checkpoint_digest, code_version, dataset_digest
from ubt_core.train import TrainConfig

CACHED = (INPUTS + TASK_SOURCE) - "ray"  # where training runs never changes the model


@task(cache_policy=CACHED, persist_result=True)
def synth(out: str, cfg: SynthConfig, code: str) -> dict[str, str]:
    return synth_benchmark(out, cfg)


@task(cache_policy=CACHED, persist_result=True)
def poison(train_uri: str, train_digest: str, out: str, cfg: PoisonConfig, code: str) -> str:
    poison_dataset(train_uri, out, cfg)
    return out


@task(cache_policy=CACHED, persist_result=True)
def train(data_uri: str, data_digest: str, out: str, cfg: TrainConfig, code: str, ray: RayConfig) -> str:
    run_train_job(ray, cfg, data_uri, out)
    return out


@task(cache_policy=CACHED, persist_result=True)
def evaluate(model_dir: str, model_digest: str, eval_uri: str, poisoned_uri: str, code: str) -> dict:
    return evaluate_model(model_dir, eval_uri, *resolve_trigger(trigger_from=poisoned_uri))  # the exact trigger


@flow(name="ubt-benchmark")
def benchmark_flow(out: str = "runs/bench-flow", attacks: list[str] | None = None, rate: float = 0.01,
                   target: str = DEFAULT_TARGET, seed: int = 0, synth_cfg: SynthConfig | None = None,
                   train_cfg: TrainConfig | None = None, ray_cfg: RayConfig | None = None) -> dict[str, dict]:
    """Backdoored models for `attacks` (default: BadNet) on the synthetic world; returns each one's metrics."""
    root, code = Path(out).resolve(), code_version()  # Ray workers run in their own working directory
    ray = ray_cfg or RayConfig()
    world = synth(str(root / "world"), synth_cfg or SynthConfig(seed=seed), code)
    train_digest = dataset_digest(world["train"])
    results = {}
    for attack in attacks or ["badnet"]:
        data = poison(world["train"], train_digest, str(root / "data" / f"{attack}-{rate}"),
                      PoisonConfig(trigger=make_trigger(attack, seed), rate=rate, target=target, seed=seed), code)
        model = train(data, dataset_digest(data), str(root / "models" / f"scratch-{attack}-{rate}"),
                      train_cfg or TrainConfig(seed=seed), code, ray)
        metrics = evaluate(model, checkpoint_digest(model), world["eval"], data, code)
        results[attack] = {"data": data, "model": model} | {k: metrics[k] for k in ("ca", "asr", "ra")}
    return results
