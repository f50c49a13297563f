"""`ubt_core.tracking` against a real sqlite MLflow store in tmp_path, run from a scratch CWD.

Covers: flow and stage runs nest, and a failing stage marks itself and its flow FAILED and re-raises; params
are flattened, redacted and truncated; two trackers with different URIs in one process stay apart; dataset
inputs round-trip digest, source, context and row count; `dataset_digest` is stable and content-based and
changes when a Parquet file changes; a registered version loads with `mlflow.pyfunc` and embeds text and
images exactly like the source checkpoint, whose files it keeps byte for byte; `lineage` walks version →
run → datasets and flow run; no artifact or db lands in the CWD; user-fixable failures raise UbtError.
"""

import filecmp
import io
import shutil
import socket

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image

from ubt_core.errors import UbtError
from ubt_core.models import create_model, load_model, save_model
from ubt_core.provenance import dataset_digest
from ubt_core.tracking import Tracker, lineage, source_uri

MODEL_NAME = "ubt-defended"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store outside the CWD, and a scratch CWD that must stay empty for the whole module."""
    root = tmp_path_factory.mktemp("tracking")
    cwd = root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        uri = f"sqlite:///{root}/store/mlflow.db"
        yield {"root": root, "cwd": cwd, "uri": uri, "tracker": Tracker(uri, "ubt-test")}


def _write_pairs(path, captions, image_bytes=16):
    rng = np.random.default_rng(len(captions))
    images = [rng.bytes(image_bytes) for _ in captions]
    table = pa.table({"uid": [f"u{i}" for i in range(len(captions))], "image": images, "caption": captions})
    pq.write_table(table, path, compression="none")  # incompressible bytes: file size follows image_bytes


@pytest.fixture
def dataset(tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    _write_pairs(data / "part-0.parquet", ["a red star", "a blue circle"])
    _write_pairs(data / "part-1.parquet", ["a green square"] * 3, image_bytes=1 << 20)  # > 2 MiB file
    return data


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registered(store, tmp_path_factory):
    """A defend-like flow: validate logs the data, register logs the checkpoint as a model version."""
    tracker, root = store["tracker"], tmp_path_factory.mktemp("registered")
    data = root / "train"
    data.mkdir()
    _write_pairs(data / "part-0.parquet", ["a red star", "a blue circle"])
    ckpt = save_model(create_model("ubt-tiny"), root / "ckpt")
    digest = dataset_digest(str(data))
    with tracker.flow_run("defend", {"seed": 7}, {"ubt.prefect_flow_run_id": "pf-123"}) as parent:
        with tracker.stage_run(parent, "validate") as validate:
            tracker.log_dataset(validate, str(data), digest, "train", "train", num_rows=2)
        with tracker.stage_run(parent, "register") as register:
            version = tracker.register_model(register, ckpt, MODEL_NAME, {
                "ubt.dataset_digest": digest, "ubt.dataset_uri": str(data), "ubt.suspect_model": "/m/suspect",
                "ubt.selection_run_id": validate, "ubt.prefect_flow_run_id": "pf-123"})
    return {"version": version, "ckpt": ckpt, "data": data, "digest": digest, "parent": parent,
            "validate": validate, "register": register}


def test_stage_runs_nest_and_a_failing_stage_is_failed_and_reraised(store, tmp_path):
    tracker, client = store["tracker"], store["tracker"].client
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "scores.parquet").write_bytes(b"not really parquet")
    params = {"model": "ubt-tiny", "scan": {"k": 30, "batch_size": 64}, "s3": {"secret_key": "hunter2"},
              "note": "x" * 7000}
    with pytest.raises(RuntimeError, match="boom"), tracker.flow_run("defend", params, {"team": "ml"}) as parent:
        with tracker.stage_run(parent, "validate", {"rows": 5}) as ok:
            tracker.log_metrics(ok, {"rows_in": 5, "rows_quarantined": 0}, step=1)
            tracker.log_artifact(ok, tmp_path / "scan")
            tracker.log_dict(ok, {"rows": 5}, "summary.json")
        with tracker.stage_run(parent, "scan") as failed:
            raise RuntimeError("boom")

    flow = client.get_run(parent)
    assert flow.info.status == "FAILED" and flow.data.tags["team"] == "ml"
    assert flow.data.params["scan.k"] == "30" and flow.data.params["s3.secret_key"] == "***"
    assert len(flow.data.params["note"]) == 6000 and flow.data.params["note"].endswith("[truncated]")
    assert client.get_run(ok).info.status == "FINISHED" and client.get_run(failed).info.status == "FAILED"
    children = client.search_runs([tracker.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")
    assert {r.info.run_id for r in children} == {ok, failed}
    assert {r.data.tags["ubt.stage"] for r in children} == {"validate", "scan"}
    run = client.get_run(ok)
    assert run.data.metrics["rows_in"] == 5 and run.data.params["rows"] == "5"
    assert {a.path for a in client.list_artifacts(ok)} == {"scan", "summary.json"}
    assert [a.path for a in client.list_artifacts(ok, "scan")] == ["scan/scores.parquet"]
    assert run.info.artifact_uri.startswith((store["root"] / "store" / "mlartifacts").as_uri())


def test_two_trackers_keep_their_own_uri(store, tmp_path):
    global_uri = mlflow.get_tracking_uri()
    other = Tracker(f"sqlite:///{tmp_path}/other.db", "ubt-test")
    run_id = other.start_flow_run("elsewhere", {}, {})
    other.end_run(run_id)
    assert other.client.get_run(run_id).info.status == "FINISHED"
    ours = store["tracker"]
    assert not ours.client.search_runs([ours.experiment_id], "attributes.run_name = 'elsewhere'")
    assert mlflow.get_tracking_uri() == global_uri  # no tracker touched MLflow's process-global URI
    with pytest.raises(UbtError, match="status 'DONE'"):
        other.end_run(run_id, "DONE")


def test_dataset_input_round_trips_digest_source_and_rows(store, dataset, monkeypatch):
    tracker = store["tracker"]
    monkeypatch.chdir(dataset.parent)  # a relative path is stored absolute
    with tracker.flow_run("data", {}, {}) as run_id:
        tracker.log_dataset(run_id, "train", "0123abcd", "train", "train", num_rows=5)
        tracker.log_dataset(run_id, "s3://bucket/pairs/eval", "4567ef01", "eval", "eval")
        with pytest.raises(UbtError, match="at most 36"):
            tracker.log_dataset(run_id, "train", "f" * 64, "train", "train")
    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    found = {i.dataset.name: i for i in inputs}
    assert found.keys() == {"train", "eval"}
    train, evaluation = found["train"].dataset, found["eval"].dataset
    assert (train.digest, train.source_type, source_uri(train.source)) == ("0123abcd", "local", str(dataset))
    assert (evaluation.digest, evaluation.source_type) == ("4567ef01", "s3")
    assert source_uri(evaluation.source) == "s3://bucket/pairs/eval"
    assert '"num_rows": 5' in train.profile and not evaluation.profile
    assert [(t.key, t.value) for t in found["train"].tags] == [("mlflow.data.context", "train")]


def test_dataset_digest_is_content_based(dataset, tmp_path):
    digest = dataset_digest(str(dataset))
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert dataset_digest(str(dataset)) == digest
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "_SUCCESS").write_text("")  # non-Parquet markers are not data
    assert dataset_digest(str(copy)) == digest  # neither location nor mtime matters

    _write_pairs(copy / "part-0.parquet", ["a red star", "a blue circlE"])  # same size, one byte differs
    assert (copy / "part-0.parquet").stat().st_size == (dataset / "part-0.parquet").stat().st_size
    changed_small = dataset_digest(str(copy))
    _write_pairs(copy / "part-1.parquet", ["a green squarE"] * 3, image_bytes=1 << 20)
    changed_big = dataset_digest(str(copy))
    (copy / "classes.json").write_text('{"classes": ["star"]}')
    with_classes = dataset_digest(str(copy))
    assert len({digest, changed_small, changed_big, with_classes}) == 4

    with pytest.raises(UbtError, match="no such dataset directory"):
        dataset_digest(str(tmp_path / "missing"))


def test_registered_pyfunc_embeds_like_the_source_checkpoint(store, registered, monkeypatch, tmp_path):
    uri, version = store["uri"], registered["version"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through MLflow's global URI
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}")
    captions, images = ["a red star", "a photo of a banana."], [_png(0), _png(1)]
    out = pyfunc.predict(pd.DataFrame({"caption": captions, "image": images}))

    source = load_model(registered["ckpt"])
    with torch.no_grad():
        text = source.model.encode_text(source.tokenizer(captions), normalize=True)
        pixels = torch.stack([source.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        image = source.model.encode_image(pixels, normalize=True)
    np.testing.assert_allclose(np.array(out["text_embedding"].tolist()), text.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(out["image_embedding"].tolist()), image.numpy(), atol=1e-5)
    only_text = pyfunc.predict(pd.DataFrame({"caption": captions}))
    assert list(only_text.columns) == ["text_embedding"]

    # the checkpoint inside the model is the open_clip local-dir, unchanged
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/{version}", dst_path=str(tmp_path),
                                                tracking_uri=uri, registry_uri=uri)
    kept = filecmp.cmpfiles(registered["ckpt"], f"{local}/artifacts/checkpoint",
                            ["open_clip_config.json", "open_clip_model.safetensors"], shallow=False)
    assert kept[0] == ["open_clip_config.json", "open_clip_model.safetensors"]


def test_lineage_walks_version_to_data_and_flow(store, registered):
    found = lineage(store["uri"], MODEL_NAME, registered["version"])
    assert found["model"]["run_id"] == found["run"]["run_id"] == registered["register"]
    assert found["model"]["tags"]["ubt.dataset_digest"] == registered["digest"]
    assert found["model"]["tags"]["ubt.selection_run_id"] == registered["validate"]
    assert found["run"]["stage"] == "register"
    assert found["flow_run"]["run_id"] == registered["parent"]
    assert found["flow_run"]["tags"]["ubt.prefect_flow_run_id"] == "pf-123"
    assert [(d["digest"], d["source"], d["context"], d["num_rows"], d["stage"]) for d in found["datasets"]] == [
        (registered["digest"], str(registered["data"]), "train", 2, "validate")]
    with pytest.raises(UbtError, match="'nope' version 1 not found"):
        lineage(store["uri"], "nope", 1)


def test_registering_again_adds_a_version_and_bad_checkpoints_are_refused(store, registered, tmp_path):
    tracker = store["tracker"]
    with tracker.flow_run("again", {}, {}) as run_id:
        assert tracker.register_model(run_id, registered["ckpt"], MODEL_NAME, {}) == str(int(registered["version"]) + 1)
        with pytest.raises(UbtError, match="missing, so it is not a complete open_clip checkpoint"):
            tracker.register_model(run_id, tmp_path, MODEL_NAME, {})


def test_nothing_lands_in_the_cwd(store, registered):
    assert list(store["cwd"].iterdir()) == []  # no ./mlruns, no ./mlflow.db from a default client
    assert any((store["root"] / "store" / "mlartifacts" / "models").iterdir())


def test_unreachable_tracking_server_is_a_ubt_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UbtError, match=r"http://\*\*\*@127.0.0.1:\d+ is unreachable.*start the server") as e:
        Tracker(f"http://user:pw@127.0.0.1:{port}", "ubt-test")
    assert "pw" not in str(e.value)
