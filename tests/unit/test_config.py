"""RunConfig: YAML + overrides, every error reported with its path, credentials refused and redacted."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from ubt_core.config import (
    RunConfig,
    _is_credential_name,
    config_digest,
    flatten_config,
    load_run_config,
    redacted_config,
)
from ubt_core.defense.ubt import DefenseConfig
from ubt_core.errors import UbtError

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = "data:\n  train: runs/demo/data/poisoned-badnet\nmodel: runs/demo/suspect\n"


@pytest.fixture
def minimal(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(MINIMAL)
    return path


def _error(path, overrides=(), text=None) -> str:
    if text is not None:
        path.write_text(text)
    with pytest.raises(UbtError) as info:
        load_run_config(path, overrides)
    return str(info.value)


def test_minimal_yaml_gets_every_default(minimal, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # local paths come back absolute: Ray workers run in another directory
    cfg = load_run_config(minimal)
    assert cfg.data.train == f"{tmp_path}/runs/demo/data/poisoned-badnet"
    assert cfg.model == f"{tmp_path}/runs/demo/suspect"
    assert cfg.data.eval is None and cfg.output == f"{tmp_path}/runs/ubt" and cfg.seed == 0
    assert cfg.defense == DefenseConfig()
    assert cfg.ray.address is None and cfg.ray.scan_batch_size == 256 and cfg.ray.cpus_per_worker == 1.0
    assert cfg.prefect.retries == 1 and cfg.mlflow.experiment == "ubt" and cfg.s3.endpoint_url is None


def test_overrides_reach_any_depth_typed_and_win_over_the_file(minimal):
    minimal.write_text(MINIMAL + "defense:\n  unlearn:\n    steps: 40\n")
    cfg = load_run_config(minimal, ["defense.unlearn.steps=5", "defense.overfit.lr=1e-4", "ray.use_gpu=true",
                                    "data.eval=null", "defense.select.k=7", "defense.unlearn.transplant_share=0.25"])
    assert cfg.defense.unlearn.steps == 5 and isinstance(cfg.defense.unlearn.steps, int)
    assert cfg.defense.overfit.lr == pytest.approx(1e-4)
    assert cfg.ray.use_gpu is True and cfg.data.eval is None and cfg.defense.select.k == 7
    assert cfg.defense.unlearn.transplant_share == 0.25
    assert load_run_config(None, ["data.train=s3://b/pairs", "model=ubt-tiny"]).data.train == "s3://b/pairs"


def test_every_error_is_reported_with_its_path(minimal):
    message = _error(minimal, ["defense.unlearn.steps=-1", "seed=abc"],
                     text="data: {}\nmodel: m\nray: {scan_actors: 0}\nprefect: {retries: -2}\n")
    assert message.startswith(f"{minimal}: 5 problems")
    for expected in ("data.train: Field required", "defense.unlearn.steps: Input should be greater than or equal "
                     "to 1 (got -1)", "seed:", "ray.scan_actors:", "prefect.retries:"):
        assert expected in message
    assert "[from override 'defense.unlearn.steps=-1']" in message
    assert "{" not in message.replace("{}", "")  # no unformatted placeholders


def test_unknown_nested_key_names_its_path_and_the_known_keys(minimal):
    message = _error(minimal, ["defense.unlernn.steps=3"])
    assert "defense.unlernn: unknown key; did you mean `unlearn`?" in message
    assert "known keys here: overfit, scan, refine, select, unlearn" in message


def test_credential_keys_are_refused_without_echoing_them(minimal):
    message = _error(minimal, text=MINIMAL + "s3:\n  endpoint_url: http://minio:9000\n  Secret_Key: hunter2\n")
    assert "s3.Secret_Key" in message and "environment" in message and "hunter2" not in message
    for override in ("s3.aws_access_key_id=AKIA", "mlflow.token=abc", "ray.password=x", "s3.key=k"):
        assert "environment" in _error(minimal, [override]), override
    assert not any(map(_is_credential_name, ("tokens_per_pair", "max_k", "monkey")))  # words, not substrings


def test_ray_address_excludes_num_cpus(minimal):
    message = _error(minimal, ["ray.address=auto", "ray.num_cpus=4"])
    assert message.startswith(f"{minimal}: ray: `num_cpus` sizes a local Ray")
    assert load_run_config(minimal, ["ray.address=ray://head:10001"]).ray.address == "ray://head:10001"


def test_local_ray_must_leave_cpu_for_the_data_pipeline(minimal):
    assert "leaves no CPU" in _error(minimal, ["ray.num_cpus=2", "ray.num_workers=2"])
    assert load_run_config(minimal, ["ray.num_cpus=2", "ray.num_workers=2", "ray.cpus_per_worker=0.5"]).ray


def test_eval_trigger_settings(minimal):
    assert "eval: `attack` and `target` come together" in _error(minimal, ["eval.attack=badnet"])
    assert "`trigger_from` already gives" in _error(minimal, ["eval.attack=badnet", "eval.target=star",
                                                              "eval.trigger_from=runs/demo/data/poisoned"])
    assert "unknown attack 'badnett'; available: badnet" in _error(minimal, ["eval.attack=badnett",
                                                                             "eval.target=star"])
    assert load_run_config(minimal, ["eval.attack=sig", "eval.target=star"]).eval.attack == "sig"


def test_file_problems_name_the_file(tmp_path, minimal):
    assert "not found" in _error(tmp_path / "nope.yaml")
    assert "invalid YAML at line 3" in _error(minimal, text="data:\n  train: x\nmodel: m: n\n")
    assert "must be a mapping" in _error(minimal, text="- data\n- model\n")
    assert "duplicate key 'defense'" in _error(minimal, text=MINIMAL + "defense: {}\ndefense: {}\n")
    assert "override 'seed' is not `section.key=value`" in _error(minimal, ["seed"], text=MINIMAL)


def test_config_is_frozen(minimal):
    cfg = load_run_config(minimal)
    with pytest.raises(ValidationError):
        cfg.seed = 1
    with pytest.raises(ValidationError):
        cfg.ray.num_workers = 4


def test_redaction_masks_passwords_and_signed_query_strings(minimal):
    signed = ("https://bkt.s3.amazonaws.com/eval?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F2024"
              "&X-Amz-Security-Token=tok123&X-Amz-Signature=deadbeef&part=3")
    cfg = load_run_config(minimal, ["mlflow.tracking_uri=postgresql://u:pw@h/db", f"data.eval={signed}"])
    redacted = redacted_config(cfg)
    assert redacted["mlflow"]["tracking_uri"] == "postgresql://u:***@h/db"
    assert redacted["data"]["eval"] == ("https://bkt.s3.amazonaws.com/eval?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                                        "&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***&part=3")
    dumped = json.dumps(redacted)
    assert all(secret not in dumped for secret in (":pw@", "AKIAX", "tok123", "deadbeef"))
    assert cfg.mlflow.tracking_uri == "postgresql://u:pw@h/db"  # the config itself keeps the real value
    assert RunConfig.model_validate(cfg.model_dump()) == cfg  # what Ray workers re-validate
    # an invalid value is echoed redacted in the error too
    assert "got 'postgresql://u:***@h/db'" in _error(minimal, ["ray.num_cpus=postgresql://u:pw@h/db"])


def test_flatten_config_gives_dotted_string_params(minimal):
    flat = flatten_config(redacted_config(load_run_config(minimal)))
    assert flat["defense.unlearn.steps"] == str(DefenseConfig().unlearn.steps) and flat["data.eval"] == "null"
    assert flat["data.train"].endswith("/runs/demo/data/poisoned-badnet") and flat["ray.use_gpu"] == "false"
    assert all(isinstance(v, str) for v in flat.values())
    assert flatten_config({"a": {"b": {"c": [1, 2]}}, "d": {}}) == {"a.b.c": "[1, 2]", "d": "{}"}


def test_config_digest_is_canonical(minimal):
    assert config_digest({"a": 1, "b": {"x": 2, "y": 3}}) == config_digest({"b": {"y": 3, "x": 2}, "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": 2})
    base = load_run_config(minimal)
    assert config_digest(base.defense) == config_digest(DefenseConfig())
    assert config_digest(base.defense) != config_digest(load_run_config(minimal, ["defense.scan.seed=1"]).defense)
    assert len(config_digest(base.defense)) == 16


def test_every_shipped_run_config_validates():
    shipped = [p for p in sorted((ROOT / "configs").rglob("*.yaml"))
               if p.read_text().startswith("# ubt flow")]
    assert len(shipped) == 1  # update when adding a run config; guards against the walk missing files
    for path in shipped:
        assert isinstance(load_run_config(path), RunConfig), path


def test_a_model_name_stays_a_name_and_remote_uris_stay_remote(minimal):
    cfg = load_run_config(minimal, ["model=ubt-tiny", "data.train=s3://bucket/pairs", "output=s3://b/o",
                                    "work_dir=w"])
    assert cfg.model == "ubt-tiny" and cfg.data.train == "s3://bucket/pairs" and cfg.output == "s3://b/o"
    assert cfg.work_dir.startswith("/") and cfg.stage_dir == cfg.work_dir

