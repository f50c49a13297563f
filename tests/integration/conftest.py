"""Real local components for integration tests: one local Ray per session, shut down at the end."""

import os
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Prefect reads these once, at import: its own home (cached task results) per test session, no analytics,
# and time for the embedded server to start on 2 busy cores
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ubt-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 2 logical CPUs (fractional actors/workers fit beside the data pipeline)."""
    import ray

    from ubt_core.config import RayConfig
    from ubt_core.jobs import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield RayConfig(num_cpus=2, scan_actors=2, cpus_per_actor=0.5, scan_batch_size=16)
    ray.shutdown()


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server (and database) for the flow tests of one module. One per session was tried:
    the suite was not faster (18m25s against 16m29s, same machine, same hour)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _load_local_stack():
    """infra/local_stack.py, imported by file path (infra/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "ubt_infra_local_stack"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[2] / "infra" / "local_stack.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def local_stack_module():
    """The infra/local_stack.py module (`up`, `down`, `status`, `Stack`, `StackError`)."""
    return _load_local_stack()


@pytest.fixture(scope="session")
def local_stack(local_stack_module):
    """The real multi-process stack of infra/local_stack.py (Prefect, MLflow, moto S3, a 2-node Ray), up for
    the session in a fresh state dir and torn down at its end, failed tests or not.

    Yields a `Stack`: `prefect_api_url`, `mlflow_uri`, `s3_endpoint`, `bucket`, `ray_address`, `state_dir`, and
    `env()`, the variables a client needs (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_*, RAY_ADDRESS, RAY_AUTH_*).

    Rule for Ray: the pytest process may also hold the in-process Ray of `local_ray`, so this fixture never
    calls `ray.init` and never puts RAY_ADDRESS or RAY_AUTH_* into `os.environ`. A test that uses the stack's
    Ray connects from a subprocess (`subprocess.run([sys.executable, "-c", ...], env={**os.environ,
    **local_stack.env()})`). Connecting in-process would need `ray.shutdown()` of `local_ray` first and
    RAY_AUTH_* in `os.environ`, which Ray caches for the rest of the process: don't.
    """
    import shutil
    import tempfile

    stack_module = local_stack_module
    # a short path: Ray's socket paths under the state dir must fit in 107 bytes
    state = tempfile.mkdtemp(prefix="ubt-stack-")
    started = False
    try:
        stack = stack_module.up(state, timeout=180)
        started = True
        yield stack
    finally:
        stack_module.down(state)  # also after a failed `up`, which has stopped what it started already
        if started:  # after a failed start the logs stay for reading; the error names them
            shutil.rmtree(state, ignore_errors=True)
