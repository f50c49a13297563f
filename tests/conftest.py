"""Shared fixtures: a tiny synthetic world written once per test session."""

import pytest

from ubt_core.data.synth import SynthConfig, synth_benchmark


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, str]:
    """80 training pairs and 40 eval images of the synthetic benchmark (train/, eval/ URIs)."""
    out = tmp_path_factory.mktemp("world")
    return synth_benchmark(str(out), SynthConfig(train_pairs=80, eval_images=40, rows_per_file=32, seed=7))
