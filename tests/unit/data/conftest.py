"""Fixtures for the pair-dataset tests: tiny valid tables and a writer for raw Parquet files in tmp_path."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ubt_core.data.images import encode_image


@pytest.fixture
def png() -> Callable[..., bytes]:
    """`png(seed)`: PNG bytes of a seeded random 4x4 RGB image (a different image per seed)."""

    def make(seed: int = 0) -> bytes:
        return encode_image(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8))

    return make


@pytest.fixture
def pairs(png) -> Callable[..., pa.Table]:
    """`pairs(n, prefix)`: n valid rows, uid `{prefix}-{i}`, caption `{prefix} caption {i}`, label `i % 3`.

    Keyword arguments replace whole columns, e.g. `pairs(3, caption=["a", "", "c"])`; a value of None drops
    the column.
    """

    def make(n: int, prefix: str = "p", **columns) -> pa.Table:
        data = {
            "uid": pa.array([f"{prefix}-{i}" for i in range(n)], pa.string()),
            "image": pa.array([png(i) for i in range(n)], pa.binary()),
            "caption": pa.array([f"{prefix} caption {i}" for i in range(n)], pa.string()),
            "label": pa.array([i % 3 for i in range(n)], pa.int64()),
        }
        for name, values in columns.items():
            if values is None:
                data.pop(name)
            else:
                data[name] = values if isinstance(values, pa.Array) else pa.array(values, type=data[name].type)
        return pa.table(data)

    return make


@pytest.fixture
def write_parquet(tmp_path) -> Callable[[pa.Table, str], str]:
    """`write_parquet(table, "ds/part-0.parquet")`: write a raw Parquet file under tmp_path; returns its path."""

    def write(table: pa.Table, relpath: str) -> str:
        path = tmp_path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return str(path)

    return write


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    """The directory `write_parquet(..., "ds/...")` writes into (tmp_path/ds)."""
    return tmp_path / "ds"
