"""The one typed run config: YAML plus `section.key=value` overrides, validated once.

`load_run_config` builds a `RunConfig` and reports every problem together, each with its dotted key path.
Credentials never live here (they come from the environment); `redacted_config` is the only dump that may
be printed, logged or stored. No prefect or ray imports: the config is read by every layer.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ubt_core.attacks.triggers import ATTACKS
from ubt_core.defense.ubt import DefenseConfig
from ubt_core.errors import UbtError

# extra="forbid": a misspelt setting is an error, not a silent default. frozen: the config is passed down and
# never mutated; derived runtime state (paths, rank, run id) lives in a separate object
_SECTION = ConfigDict(extra="forbid", frozen=True)


class DataConfig(BaseModel):
    model_config = _SECTION

    train: str  # the suspect's pair dataset (local dir or s3:// prefix): what is scanned and unlearned from
    eval: str | None = None  # labelled eval set (+ classes.json); None skips the evaluation stage
    quarantine: str | None = None  # Parquet file that collects faulty rows; None = the first bad row is an error


class EvalConfig(BaseModel):
    model_config = _SECTION

    attack: str | None = None  # trigger family to measure ASR/RA with; None = clean accuracy only
    target: str | None = None  # the backdoor's target class name (ASR counts predictions of it)
    trigger_from: str | None = None  # poisoned dataset dir whose manifest.json holds the exact trigger and target
    trigger_seed: int = 0  # with `attack`: the seed the data was poisoned with (it draws the trigger pattern)

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, attack: str | None) -> str | None:
        if attack is not None and attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; available: {', '.join(ATTACKS)}")
        return attack

    @model_validator(mode="after")
    def _one_trigger_source(self) -> EvalConfig:
        # a trigger rebuilt from its name alone must match the poisoning one, so both halves are needed
        if (self.attack is None) != (self.target is None):
            raise ValueError("`attack` and `target` come together: set both (e.g. eval.attack=badnet "
                             "eval.target=banana) or neither")
        # two trigger sources could disagree; the manifest is the exact one, so it excludes the other
        if self.trigger_from is not None and self.attack is not None:
            raise ValueError("`trigger_from` already gives the trigger and target; drop `attack`/`target` or "
                             "`trigger_from`")
        return self


class RayConfig(BaseModel):
    model_config = _SECTION

    address: str | None = None  # None = start a local Ray in-process; "auto" or "ray://host:10001" = join a cluster
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of the local Ray; a cluster knows its own
    scan_actors: int = Field(1, ge=1)  # actor-pool size of the Ray Data scan (each holds one model copy)
    scan_batch_size: int = Field(256, ge=1)  # trades memory for throughput, never changes a score
    # object-store memory the scan's blocks may fill (read ahead of the actors): bounds memory whatever the data size
    scan_object_store_mib: int = Field(1024, ge=64)
    cpus_per_actor: float = Field(1.0, gt=0)  # fractional values pack more scan actors onto few cores
    num_workers: int = Field(1, ge=1)  # Ray Train workers (data-parallel ranks)
    # STACK: on 2 CPUs, TorchTrainer with a Ray Dataset deadlocks unless the workers leave CPU free for
    # the data pipeline; use fractions (0.5) on small machines
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False  # one GPU per Train worker and scan actor
    storage_path: str | None = None  # Ray Train checkpoints; None = OUTPUT/ray (jobs make it absolute)

    @model_validator(mode="after")
    def _fits_local_ray(self) -> RayConfig:
        if self.num_cpus is None:
            return self
        if self.address is not None:
            raise ValueError(f"`num_cpus` sizes a local Ray, but `address` {self.address!r} joins a cluster that "
                             "has its own; drop one of them")
        # checked here rather than discovered as a hang at run time (see the STACK note above)
        train_cpus = self.num_workers * self.cpus_per_worker
        if train_cpus >= self.num_cpus:
            raise ValueError(f"num_workers x cpus_per_worker = {train_cpus:g} leaves no CPU of num_cpus="
                             f"{self.num_cpus} for the data pipeline (Ray Train would hang); lower "
                             "cpus_per_worker (e.g. 0.5) or num_workers, or raise num_cpus")
        scan_cpus = self.scan_actors * self.cpus_per_actor
        if scan_cpus >= self.num_cpus:
            raise ValueError(f"scan_actors x cpus_per_actor = {scan_cpus:g} leaves no CPU of num_cpus={self.num_cpus} "
                             "for Ray Data's read tasks (the scan would hang); lower cpus_per_actor (e.g. 0.5) or "
                             "scan_actors, or raise num_cpus")
        return self


class PrefectConfig(BaseModel):
    model_config = _SECTION

    retries: int = Field(1, ge=0)  # per task, for transient faults (a lost worker, a flaky S3 read)
    retry_delay_seconds: float = Field(0, ge=0)  # raise it for faults that need time to clear (throttling)
    # a saved Prefect storage block (e.g. "s3-bucket/ubt-results") where task results persist, so cached stages are
    # shared by every worker; None = Prefect's local storage (PREFECT_LOCAL_STORAGE_PATH) on the machine running it
    result_storage: str | None = None


class MlflowConfig(BaseModel):
    model_config = _SECTION

    tracking_uri: str | None = None  # None = sqlite under OUTPUT/mlflow.db (no server needed)
    experiment: str = "ubt"  # groups runs of the same study
    registered_model: str = "ubt-defended"  # registry name the defended checkpoint is versioned under


class S3Config(BaseModel):
    model_config = _SECTION

    # S3-compatible server (MinIO, moto); None = AWS. Credentials are deliberately NOT fields: they come
    # from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment
    endpoint_url: str | None = None


class RunConfig(BaseModel):
    """Everything one `ubt` run needs. Frozen at the top level and in every section defined here;
    `DefenseConfig` is not frozen itself, so treat it as read-only too (use `model_copy(update=...)`).
    """

    model_config = _SECTION

    data: DataConfig  # required: there is nothing to defend without the training pairs
    model: str  # required: suspect checkpoint dir (open_clip local-dir) or open_clip model name
    output: str = "runs/ubt"  # local dir or s3:// URI: the defended model, suspicious.parquet and the reports
    # stage files (embeddings, over-fitted model, Ray checkpoints): a directory the driver and every Ray worker
    # can read and write (local, or a shared mount on a cluster); None = `output`, which must then be local
    work_dir: str | None = None
    seed: int = 0  # the run's base seed; stage sections keep their own seeds so ablations can vary one
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    s3: S3Config = Field(default_factory=S3Config)

    @model_validator(mode="after")
    def _stage_files_are_on_a_filesystem(self) -> RunConfig:
        # stages write checkpoints as directories of files, which object stores do not hold
        if self.work_dir is not None and "://" in self.work_dir:
            raise ValueError(f"`work_dir` {self.work_dir!r} must be a filesystem path (local or a shared mount), "
                             "not an object-store URI; put remote results in `output`")
        if self.work_dir is None and "://" in self.output:
            raise ValueError(f"`output` {self.output!r} is remote, so stage files need a `work_dir`: set it to a "
                             "local directory (or a mount every Ray worker shares)")
        return self

    @property
    def stage_dir(self) -> str:
        """Where the stages write their files: `work_dir`, or `output` when that is local."""
        return self.work_dir or self.output


# --- credentials ---------------------------------------------------------------------------------------------

_CREDENTIAL_WORDS = {"secret", "password", "passwd", "pwd", "token", "credential", "credentials", "signature"}
_CREDENTIAL_NAMES = {"key", "apikey", "accesskey", "secretkey", "sessiontoken", "sig", "auth", "authorization"}
_CREDENTIAL_ENV = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN"


def _is_credential_name(name: object) -> bool:
    # split on separators so `tokens_per_pair` or `max_k` stay legal while `secret_key`, `X-Amz-Signature`
    # and `aws_access_key_id` do not
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", str(name))  # AWSAccessKeyId
    words = [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]
    if not words:
        return False
    return ("".join(words) in _CREDENTIAL_NAMES or bool(_CREDENTIAL_WORDS.intersection(words))
            or "key" in words)


def _credential_paths(node: Any, prefix: str = "") -> list[str]:
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(key, str) and _is_credential_name(key):
            found.append(path)
        found.extend(_credential_paths(value, path))
    return found


# --- loading -------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # resolve `<<` merges first: only keys written twice are mistakes
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float | bool | None):
            continue  # unhashable keys are SafeLoader's to refuse
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise UbtError(f"{path}: run config not found; check the path (shipped examples are in configs/)") from e
    except OSError as e:
        raise UbtError(f"{path}: cannot read the run config ({e.strerror})") from e
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown line"
        problem = getattr(e, "problem", None) or str(e)
        raise UbtError(f"{path}: invalid YAML at {where}: {problem}") from e
    if raw is None:  # an empty file sets nothing; the required keys are then reported as missing
        return {}
    if not isinstance(raw, dict):
        raise UbtError(f"{path}: the run config must be a mapping of sections (data:, model:, defense:, ...), "
                       f"found a {type(raw).__name__}")
    return raw


def _apply_override(raw: dict, override: str, source: str) -> str:
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise UbtError(f"{source}: override {override!r} is not `section.key=value` (e.g. defense.unlearn.steps=50)")
    try:
        value = yaml.safe_load(text)  # so 3, 1e-4, true, null and [1,2] arrive typed
    except yaml.YAMLError as e:
        raise UbtError(f"{source}: override {override!r}: the value is not valid YAML; quote it") from e
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise UbtError(f"{source}: override {override!r}: `{where}` is {child!r}, not a section of keys")
        node = child
    node[parts[-1]] = value
    return key


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The config class found by following `loc` (field names) down from RunConfig."""
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _show(value: Any) -> str:
    text = repr(redact_value(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _format_error(err: dict, overridden: dict[str, str]) -> str:
    loc = err["loc"]
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        msg = f"unknown key; {hint}known keys here: {', '.join(known)}"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "missing" and not isinstance(err["input"], dict | BaseModel):
            msg += f" (got {_show(err['input'])})"
    source = next((o for k, o in overridden.items() if path == k or path.startswith(k + ".")), None)
    return f"{path}: {msg}" + (f" [from override {source!r}]" if source else "")


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Build the run config from a YAML file and `section.key=value` overrides, validated once.

    Args:
        path: the YAML file, or None to build from overrides alone.
        overrides: dot paths of any depth (`defense.unlearn.steps=50`); values are parsed as YAML.

    Raises:
        UbtError: naming the file, with every validation problem and its dotted key path.
    """
    source = str(path) if path is not None else "run config (no file)"
    raw = _read_yaml(Path(path)) if path is not None else {}
    overridden = {}
    for override in overrides:
        overridden[_apply_override(raw, override, source)] = override
    secrets = _credential_paths(raw)
    if secrets:
        raise UbtError(f"{source}: {', '.join(secrets)}: credentials never go in the run config; they come from "
                       f"the environment ({_CREDENTIAL_ENV}) or the platform's secret store. Remove "
                       f"{'this key' if len(secrets) == 1 else 'these keys'}.")
    try:
        return _with_absolute_paths(RunConfig.model_validate(raw))
    except ValidationError as e:
        lines = [_format_error(err, overridden) for err in e.errors()]
        if len(lines) == 1:
            raise UbtError(f"{source}: {lines[0]}") from e
        listed = "\n".join(f"  - {line}" for line in lines)
        raise UbtError(f"{source}: {len(lines)} problems in the run config (fix them in the file or with "
                       f"section.key=value overrides):\n{listed}") from e


# --- dumping -------------------------------------------------------------------------------------------------

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MASK = "***"


def _redact_uri(text: str) -> str:
    if not _URI.match(text):
        return text
    try:
        parts = urlsplit(text)
    except ValueError:  # malformed (e.g. a bad IPv6 host): mask the whole thing rather than risk a leak
        return _MASK
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{host}"
    query = "&".join(
        f"{name}={_MASK}" if eq and _is_credential_name(unquote(name)) else f"{name}{eq}{value}"
        for name, eq, value in (pair.partition("=") for pair in parts.query.split("&"))
    ) if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return text  # untouched strings come back byte for byte
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _absolute(path: str | None) -> str | None:
    return path if path is None or "://" in path else str(Path(path).resolve())


def _with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths resolved against the current directory: Ray workers and Prefect workers run elsewhere."""
    model = _absolute(cfg.model) if "/" in cfg.model or Path(cfg.model).exists() else cfg.model  # or a model name
    return cfg.model_copy(update={
        "model": model, "output": _absolute(cfg.output), "work_dir": _absolute(cfg.work_dir),
        "data": cfg.data.model_copy(update={k: _absolute(getattr(cfg.data, k))
                                            for k in ("train", "eval", "quarantine")}),
        "eval": cfg.eval.model_copy(update={"trigger_from": _absolute(cfg.eval.trigger_from)}),
        "ray": cfg.ray.model_copy(update={"storage_path": _absolute(cfg.ray.storage_path)})})


def redact_value(value: Any) -> Any:
    """A JSON-able value with credential-named keys and URI passwords / signed query parameters masked."""
    if isinstance(value, str):
        return _redact_uri(value)
    if isinstance(value, dict):
        return {k: _MASK if _is_credential_name(k) else redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def redacted_config(cfg: RunConfig) -> dict:
    """The JSON-able dump to print, log or store (MLflow params, Prefect parameters, reports).

    Passwords in `user:password@` URIs and credential-named query parameters (`X-Amz-Signature`, `token`,
    ...) become `***`. Not for re-validation: pass `cfg.model_dump()` to Ray workers instead.
    """
    return redact_value(cfg.model_dump(mode="json"))


def flatten_config(d: dict) -> dict[str, str]:
    """Dotted keys to string values (MLflow params are flat); non-strings are written as JSON."""
    flat: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
        else:
            flat[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return flat


def config_digest(section: BaseModel | dict) -> str:
    """First 16 hex digits of the sha256 of a section's canonical JSON (sorted keys): a cache key."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
