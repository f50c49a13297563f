"""`ubt bench --defenses`: the comparison from the command line, and its refusals."""

import json

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e


def test_bench_with_defenses_writes_the_comparison(ubt_main, tmp_path):
    (tmp_path / "baseline.json").write_text(json.dumps({"pair_passes": 32, "batch_size": 16, "warmup_steps": 0}))
    proc = ubt_main("bench", "--out", str(tmp_path / "work"), "--attacks", "badnet", "--defenses", "none,ft",
                    "--seeds", "0", "--train-pairs", "260", "--eval-images", "30", "--epochs", "1", "--rate", "0.1",
                    "--baseline-config", str(tmp_path / "baseline.json"), "--doc", str(tmp_path / "results.md"))
    assert "| badnet | ft |" in proc.stdout
    rows = pq.read_table(tmp_path / "work" / "results.parquet").to_pylist()
    assert [(r["seed"], r["defense"]) for r in rows] == [(0, "none"), (0, "ft")] and rows[1]["pair_passes"] == 32
    assert "<!-- results:scratch:begin -->" in (tmp_path / "results.md").read_text()


def test_bench_refuses_unknown_defenses_and_bad_seeds(ubt_main, tmp_path):
    proc = ubt_main("bench", "--out", str(tmp_path), "--defenses", "none,magic", ok=False)
    assert "defenses" in proc.stderr and "magic" in proc.stderr
    proc = ubt_main("bench", "--out", str(tmp_path), "--defenses", "none", "--seeds", "0,x", ok=False)
    assert "--seeds 0,x" in proc.stderr


def test_bench_unlearn_refuses_unknown_settings_and_slashed_names_and_names_a_missing_ubt_cell(ubt_main, tmp_path):
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"short": {"stepz": 1}}))
    proc = ubt_main("bench-unlearn", "--out", str(tmp_path / "work"), "--variants", str(variants), ok=False)
    assert "stepz" in proc.stderr
    variants.write_text(json.dumps({"1/16": {"steps": 1}}))  # a name is a directory: a slash would nest it
    for command in ("bench-unlearn", "bench-defense"):
        proc = ubt_main(command, "--out", str(tmp_path / "work"), "--variants", str(variants), ok=False)
        assert "variant name '1/16' names a directory" in proc.stderr, command
    variants.write_text(json.dumps({"short": {"steps": 1}}))
    proc = ubt_main("bench-unlearn", "--out", str(tmp_path / "work"), "--variants", str(variants),
                    "--attacks", "sig", "--seeds", "1", ok=False)
    assert "no UBT selection for seed 1, sig; run `ubt bench --out" in proc.stderr
