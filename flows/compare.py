"""The comparison flow: per seed and attack, the backdoored model, then one cell per defense; then the table.

The same work as `ubt bench --defenses ...` (`ubt_core.defense.compare`), as a DAG whose cells are
separate, cached, retried tasks: a re-run after a failure recomputes only the cells that did not finish.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from ubt_core.defense.compare import CompareConfig, make_model, needs_model, run_cell, write_results
from ubt_core.provenance import code_version


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def backdoored_model(seed_dir: str, seed: int, attack: str, cfg: CompareConfig, code: str) -> str:
    make_model(Path(seed_dir), seed, attack, cfg)
    return seed_dir


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, retries=1)
def cell(seed_dir: str, rows_dir: str, seed: int, attack: str, defense: str, cfg: CompareConfig, code: str) -> dict:
    return run_cell(Path(seed_dir), Path(rows_dir), seed, attack, defense, cfg)


@flow(name="ubt-compare")
def compare_flow(out: str = "runs/compare", cfg: CompareConfig | None = None, doc: str | None = None,
                 rows_dir: str | None = None) -> str:
    """UBT against the baselines on every attack and seed of `cfg`; returns the results table (Markdown)."""
    cfg = cfg or CompareConfig()
    work, code = Path(out).resolve(), code_version()
    rows_at = Path(rows_dir).resolve() if rows_dir else work / "rows"
    rows = []
    for seed in cfg.seeds:
        seed_dir = str(work / f"seed-{seed}")
        for attack in cfg.attacks:
            if needs_model(rows_at, seed, attack, cfg):
                backdoored_model(seed_dir, seed, attack, cfg, code)
            rows += [cell(seed_dir, str(rows_at), seed, attack, defense, cfg, code) for defense in cfg.defenses]
    return write_results(work, rows, cfg, doc, command=f"compare_flow(out={out!r})")
