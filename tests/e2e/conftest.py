"""The `ubt` command line as a subprocess, exactly as a user runs it."""

import subprocess
import sys

import pytest


def _run_ubt(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ubt_core.cli", *args], capture_output=True, text=True)
    assert (proc.returncode == 0) is ok, proc.stderr
    return proc


@pytest.fixture(scope="session")
def ubt():
    """Call as ubt("train", "--data", ...); asserts success (or failure with ok=False)."""
    return _run_ubt
