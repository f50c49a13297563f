"""The `ubt` command line end to end: as a subprocess, exactly as a user runs it (`ubt`), or through the same
`main(argv)` in this process (`ubt_main`), which skips the ~7 s of imports a fresh process pays per call on
2 cores. Tests of what a user sees on the terminal (one-line errors, exit codes) use the subprocess."""

import contextlib
import io
import subprocess
import sys

import pytest


def _run_ubt(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ubt_core.cli", *args], capture_output=True, text=True)
    assert (proc.returncode == 0) is ok, proc.stderr
    return proc


def _run_main(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    from ubt_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse refusing the arguments
            code = e.code
    proc = subprocess.CompletedProcess(["ubt", *args], code, out.getvalue(), err.getvalue())
    assert (code == 0) is ok, proc.stderr
    return proc


@pytest.fixture(scope="session")
def ubt():
    """Call as ubt("train", "--data", ...) to run `python -m ubt_core.cli`; asserts success (or failure with
    ok=False) and returns the CompletedProcess."""
    return _run_ubt


@pytest.fixture(scope="session")
def ubt_main():
    """As `ubt`, through `ubt_core.cli.main` in this process (stdout and stderr captured)."""
    return _run_main
