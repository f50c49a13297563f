"""Pair datasets on an S3-compatible server over HTTP (moto): read like local ones; an unreadable
object, a missing prefix and an unreachable endpoint each give one clear error naming the s3:// path."""

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from ubt_core.data.contract import DataContractError, read_pairs
from ubt_core.data.images import encode_image


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            env.setenv(name, value)
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                               secret_key="testing", allow_bucket_creation=True)
        fs.create_dir("ubt-data")
        yield fs
    server.stop()


def _pairs(n: int) -> pa.Table:
    image = encode_image(np.zeros((8, 8, 3), np.uint8))
    return pa.table({"uid": [f"u{i}" for i in range(n)], "image": [image] * n,
                     "caption": [f"pair {i}" for i in range(n)]})


def test_a_dataset_on_s3_reads_like_a_local_one(s3):
    with s3.open_output_stream("ubt-data/good/part-0.parquet") as f:
        pq.write_table(_pairs(5), f)
    assert read_pairs("s3://ubt-data/good").table.column("uid").to_pylist() == [f"u{i}" for i in range(5)]


def test_an_unreadable_object_is_one_clear_error_naming_it(s3):
    with s3.open_output_stream("ubt-data/broken/part-0.parquet") as f:
        f.write(b"PAR1 this is not parquet")
    with pytest.raises(DataContractError, match="ubt-data/broken/part-0.parquet: not a readable Parquet file"):
        read_pairs("s3://ubt-data/broken")


def test_a_missing_prefix_is_refused_naming_it(s3):
    with pytest.raises(DataContractError, match="s3://ubt-data/nothing-here"):
        read_pairs("s3://ubt-data/nothing-here")


def test_an_unreachable_endpoint_is_one_clear_error(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(DataContractError, match="s3://ubt-data/good: cannot list the dataset"):
        read_pairs("s3://ubt-data/good")
