"""The house rules on imports: ubt_core never imports prefect; only ubt_core/jobs imports ray."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.MULTILINE)


def _imports(path: Path) -> set[str]:
    return set(IMPORT.findall(path.read_text()))


def test_core_never_imports_prefect_and_only_jobs_import_ray():
    files = sorted((ROOT / "ubt_core").rglob("*.py"))
    assert len(files) >= 15  # the walk really saw the package
    for path in files:
        found = _imports(path)
        assert "prefect" not in found, path
        if "jobs" not in path.relative_to(ROOT / "ubt_core").parts:
            assert "ray" not in found, path


def test_flows_hold_no_torch():
    for path in (ROOT / "flows").rglob("*.py"):
        assert "torch" not in _imports(path), path
