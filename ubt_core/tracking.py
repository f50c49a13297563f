"""MLflow tracking for flow runs: one parent run per flow, one child run per stage, plus the model registry.

Every call goes through an `MlflowClient` bound to the tracker's own URI, so two trackers in one process
never share MLflow's global tracking URI or active run. Datasets are logged as inputs with a cheap content
digest; checkpoints are registered as pyfunc models (`ubt_core/models/mlflow_flavor.py`) whose artifact is
the open_clip local-dir itself, and `lineage` walks a model version back to the data and flow that made it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, LoggedModelStatus, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from ubt_core.config import flatten_config, redact_value
from ubt_core.errors import UbtError

logger = logging.getLogger(__name__)

FLAVOR_FILE = Path(__file__).parent / "models" / "mlflow_flavor.py"  # executed by MLflow, never imported
MODEL_ARTIFACT = "model"  # name of the logged model inside its run
CHECKPOINT_FILES = ("open_clip_config.json", "open_clip_model.safetensors", "ubt.json", "README.md")
STAGE_TAG, KIND_TAG = "ubt.stage", "ubt.kind"
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
# what the pyfunc needs at serving time; exact pins keep a served model numerically equal to ours
_SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "pandas", "pillow")


class Tracker:
    """Runs, params, metrics, artifacts, datasets and model versions on one MLflow tracking URI."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        """Bind to `tracking_uri` and create `experiment` there if missing.

        Args:
            artifact_location: where new experiments store artifacts. For a `sqlite:///.../mlflow.db` URI it
                defaults to `mlartifacts/` beside the db file (MLflow's own default is `./mlruns` of the CWD).
        """
        self.tracking_uri = tracking_uri
        try:
            location = artifact_location or _default_artifact_location(tracking_uri)
            # registry_uri too: it otherwise follows MLflow's global registry URI, not ours
            self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
                    return
                except MlflowException as e:
                    found = self.client.get_experiment_by_name(experiment)  # another process created it first
                    if found is None:
                        raise e from None
        except (MlflowException, OSError) as e:
            raise UbtError(f"MLflow tracking at {_redact(tracking_uri)} is unreachable or unusable "
                           f"({_redact(_first_line(e))}); start the server or fix the tracking URI.") from e
        self.experiment_id = _check_experiment(found, artifact_location)

    # ---- runs ------------------------------------------------------------------------------------------------

    def start_flow_run(self, run_name: str, params: Mapping[str, Any] | None = None,
                       tags: Mapping[str, str] | None = None) -> str:
        """Start the parent run of one flow execution; returns its run id."""
        return self._start_run(run_name, {**(tags or {}), KIND_TAG: "flow"}, params)

    def start_stage_run(self, parent_run_id: str, stage: str, params: Mapping[str, Any] | None = None) -> str:
        """Start a child run for one stage under `parent_run_id`; returns its run id."""
        tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, KIND_TAG: "stage", STAGE_TAG: stage}
        return self._start_run(stage, tags, params)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise UbtError(f"end_run({run_id!r}): status {status!r} is not one of FINISHED, FAILED, KILLED.")
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def flow_run(self, run_name: str, params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """`with tracker.flow_run(name) as run_id:` — ends the run, FAILED (and re-raised) on exception."""
        with self._ending(self.start_flow_run(run_name, params, tags)) as run_id:
            yield run_id

    @contextlib.contextmanager
    def stage_run(self, parent_run_id: str, stage: str, params: Mapping[str, Any] | None = None) -> Iterator[str]:
        """`with tracker.stage_run(parent, "scan") as run_id:` — ends the run, FAILED (and re-raised) on exception."""
        with self._ending(self.start_stage_run(parent_run_id, stage, params)) as run_id:
            yield run_id

    # ---- values and files ------------------------------------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in batches; nested dicts become dotted keys, secrets are redacted, long values truncated."""
        flat = [Param(key, _param_value(key, text)) for key, text in flatten_config(redact_value(dict(params))).items()]
        for start in range(0, len(flat), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=flat[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics (at `step`, default 0) in one batch per 1000."""
        _log_metrics(self.client, run_id, metrics, step)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory with its name kept (like `cp -r`), under `artifact_path`."""
        path = Path(local_path)
        if path.is_dir():
            inner = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self.client.log_artifacts(run_id, str(path), artifact_path=inner)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        else:
            raise UbtError(f"{path}: no such file or directory to log as an artifact; did the stage write it?")

    def log_dict(self, run_id: str, dictionary: Mapping[str, Any], name: str) -> None:
        """Store `dictionary` as the artifact file `name` (JSON, or YAML for .yaml/.yml)."""
        self.client.log_dict(run_id, dict(dictionary), name)

    def log_dataset(self, run_id: str, uri: str, digest: str, name: str, context: str,
                    num_rows: int | None = None) -> None:
        """Record a dataset as a run input: its source URI, content digest, name and role (`context`).

        Args:
            uri: local path (made absolute) or remote URI such as s3://bucket/prefix.
            digest: at most 36 characters, e.g. from `dataset_digest(uri)`.
            context: the dataset's role in the run, e.g. "train", "eval", "suspect".
        """
        if len(digest) > MAX_DATASET_DIGEST_SIZE:
            raise UbtError(f"dataset digest {digest[:40]}... is {len(digest)} characters; MLflow keeps at most "
                           f"{MAX_DATASET_DIGEST_SIZE}: pass `dataset_digest(uri)` or a shortened hash.")
        with warnings.catch_warnings():
            # MLflow registers local paths under both "" and "file" schemes and warns that they are ambiguous
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            try:
                source = resolve_dataset_source(_absolute(uri))
            except MlflowException as e:
                raise UbtError(f"dataset {uri!r}: MLflow cannot record this kind of URI ({_first_line(e)}); "
                               "use a local path or an s3:// URI.") from e
        dataset = _MetaParquetDataset(source, name=name, digest=digest, num_rows=num_rows)
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)])

    # ---- registry --------------------------------------------------------------------------------------------

    def register_model(self, run_id: str, model_dir: str | Path, name: str,
                       tags: Mapping[str, str] | None = None) -> str:
        """Log the open_clip checkpoint at `model_dir` as a pyfunc model of `run_id` and register it as `name`.

        The model's artifact `artifacts/checkpoint/` holds the checkpoint files unchanged, so it loads with
        `open_clip.create_model_and_transforms("local-dir:...")` too. `tags` (e.g. `ubt.dataset_digest`,
        `ubt.selection_run_id`) go on the model version to link its lineage. Returns the new version number.
        """
        tags = {key: str(value) for key, value in (tags or {}).items()}
        _check_checkpoint(Path(model_dir))
        run = self.client.get_run(run_id)
        logged = self.client.create_logged_model(run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id,
                                                 tags=tags)
        try:
            with tempfile.TemporaryDirectory(prefix="ubt-mlflow-") as tmp:
                checkpoint = _stage_checkpoint(Path(model_dir), Path(tmp) / "checkpoint")
                local = Path(tmp) / MODEL_ARTIFACT
                mlflow.pyfunc.save_model(
                    path=str(local),
                    python_model=str(FLAVOR_FILE),
                    artifacts={"checkpoint": str(checkpoint)},
                    signature=_SIGNATURE,
                    input_example=pd.DataFrame({"caption": ["a photo of a banana."]}),
                    pip_requirements=_serving_requirements(),
                    mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                       model_id=logged.model_id, model_uuid=logged.model_id),
                )
                self.client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # else: a new version of a known model
                raise
        # source is the artifact location, not models:/<id>: MLflow's sqlite registry resolves that URI with a
        # client on the process-global tracking URI, which is not ours
        version = self.client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                                   tags=tags, model_id=logged.model_id)
        return str(version.version)

    # ---- internals -------------------------------------------------------------------------------------------

    def _start_run(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any] | None) -> str:
        experiment_id = self.experiment_id
        if parent := tags.get(MLFLOW_PARENT_RUN_ID):
            experiment_id = self.client.get_run(parent).info.experiment_id  # children live beside their parent
        # resolve_tags adds what fluent mlflow.start_run would: user, source file, git commit
        run = self.client.create_run(experiment_id, tags=resolve_tags(dict(tags)), run_name=run_name)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    @contextlib.contextmanager
    def _ending(self, run_id: str) -> Iterator[str]:
        try:
            yield run_id
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
            self.end_run(run_id, RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
            raise
        self.end_run(run_id)


def log_run_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log metrics to an existing run by id (e.g. from rank 0 of a Ray Train job, which knows no Tracker)."""
    _log_metrics(mlflow.MlflowClient(tracking_uri=tracking_uri), run_id, metrics, step)


def _log_metrics(client: mlflow.MlflowClient, run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
    now = int(time.time() * 1000)
    rows = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
    for start in range(0, len(rows), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=rows[start:start + _METRICS_PER_BATCH])


def lineage(tracking_uri: str, name: str, version: str | int) -> dict[str, Any]:
    """Which data and which flow made model `name` version `version`.

    Returns:
        {"model": {name, version, source, run_id, tags}, "run": {run_id, name, stage, status},
         "flow_run": {run_id, name, status, tags} or None,
         "datasets": [{name, digest, source, source_type, context, num_rows, run_id, stage}, ...]} where the
        datasets are the inputs of the version's run, of its parent flow run and of that flow's other stages.
    """
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as e:
        raise UbtError(f"model {name!r} version {version} not found at {_redact(tracking_uri)} "
                       f"({_redact(_first_line(e))}); "
                       "check the name and version in the MLflow UI (Models tab).") from e
    if not mv.run_id:
        raise UbtError(f"model {name!r} version {version} records no run; it was not registered by ubt, so its "
                       "lineage is unknown.")
    run = client.get_run(mv.run_id)
    runs = [run]
    parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    flow = client.get_run(parent_id) if parent_id else None
    if flow is not None:
        siblings = client.search_runs([flow.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")
        runs += [flow, *(r for r in siblings if r.info.run_id != run.info.run_id)]
    return {
        "model": {"name": mv.name, "version": str(mv.version), "source": mv.source, "run_id": mv.run_id,
                  "tags": dict(mv.tags)},
        "run": {"run_id": run.info.run_id, "name": run.info.run_name, "stage": run.data.tags.get(STAGE_TAG),
                "status": run.info.status},
        "flow_run": None if flow is None else {"run_id": flow.info.run_id, "name": flow.info.run_name,
                                               "status": flow.info.status, "tags": _user_tags(flow.data.tags)},
        "datasets": [_dataset_record(r, dataset_input) for r in runs for dataset_input in r.inputs.dataset_inputs],
    }


def source_uri(source_json: str) -> str:
    """The URI inside an MLflow dataset source JSON (`{"uri": ...}` or `{"url": ...}`), else the JSON itself."""
    with contextlib.suppress(ValueError, AttributeError):
        parsed = json.loads(source_json)
        return parsed.get("uri") or parsed.get("url") or source_json
    return source_json


class _MetaParquetDataset(MetaDataset):
    """A metadata-only dataset whose profile carries the row count (MLflow shows it beside the digest)."""

    def __init__(self, source, name: str, digest: str, num_rows: int | None):
        self._num_rows = num_rows
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict | None:
        return None if self._num_rows is None else {"num_rows": int(self._num_rows)}

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        if self.profile is not None:
            config["profile"] = json.dumps(self.profile)
        return config


_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "caption", required=False),
                   ColSpec(DataType.binary, "image", required=False)]),
    outputs=Schema([ColSpec(Array(DataType.float), "text_embedding", required=False),
                    ColSpec(Array(DataType.float), "image_embedding", required=False)]),
)


def _check_experiment(found, artifact_location: str | None) -> str:
    if found.lifecycle_stage == "deleted":
        raise UbtError(f"MLflow experiment {found.name!r} is deleted; restore it (`mlflow experiments restore "
                       f"--experiment-id {found.experiment_id}`) or choose another experiment name.")
    if artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        raise UbtError(f"MLflow experiment {found.name!r} already stores artifacts at {found.artifact_location}, "
                       f"not {artifact_location}; drop artifact_location or choose another experiment name.")
    return found.experiment_id


def _check_checkpoint(model_dir: Path) -> None:
    for required in CHECKPOINT_FILES[:2]:
        if not (model_dir / required).is_file():
            raise UbtError(f"{model_dir}: {required} missing, so it is not a complete open_clip checkpoint; "
                           "pass a directory written by `ubt train` or `ubt defend` (OUT/model).")


def _stage_checkpoint(model_dir: Path, out: Path) -> Path:
    """Copy only the checkpoint files (not training state or temp files) into `out`."""
    out.mkdir(parents=True)
    for file_name in CHECKPOINT_FILES:
        if (model_dir / file_name).is_file():
            shutil.copy2(model_dir / file_name, out / file_name)
    return out


def _serving_requirements() -> list[str]:
    pins = []
    for package in _SERVING_PACKAGES:
        # a local build tag (torch 2.x+cpu) is not installable from PyPI
        pins.append(f"{package}=={metadata.version(package).split('+')[0]}")
    return pins


def _default_artifact_location(tracking_uri: str) -> str | None:
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None  # servers choose their own artifact root
    db = Path(unquote(parsed.path)).resolve()  # sqlite:////abs/x.db parses to path //abs/x.db
    db.parent.mkdir(parents=True, exist_ok=True)
    return (db.parent / "mlartifacts").as_uri()


def _param_value(key: str, text: str) -> str:
    if len(text) > MAX_PARAM_VAL_LENGTH:
        # params are for search and comparison; the full resolved config is logged as an artifact
        logger.warning("param %s is %d characters; MLflow keeps %d, truncating", key, len(text), MAX_PARAM_VAL_LENGTH)
        marker = "...[truncated]"
        text = text[:MAX_PARAM_VAL_LENGTH - len(marker)] + marker
    return text


def _absolute(uri: str) -> str:
    if "://" in uri or uri.startswith("file:"):
        return uri
    return str(Path(uri).resolve())  # a relative path means nothing once the run is read elsewhere


def _dataset_record(run, dataset_input) -> dict[str, Any]:
    dataset = dataset_input.dataset
    profile = json.loads(dataset.profile) if dataset.profile else {}
    context = next((t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT), None)
    return {"name": dataset.name, "digest": dataset.digest, "source": source_uri(dataset.source),
            "source_type": dataset.source_type, "context": context, "num_rows": profile.get("num_rows"),
            "run_id": run.info.run_id, "stage": run.data.tags.get(STAGE_TAG)}


def _user_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in tags.items() if not key.startswith("mlflow.")}


def _redact(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", uri)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
