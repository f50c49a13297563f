"""`ubt defend` end to end on a tiny poisoned world: every output of the contract, and its errors."""

import json

import open_clip
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch

from ubt_core.data.contract import read_pairs
from ubt_core.models import create_model, save_model

pytestmark = pytest.mark.e2e

SMALL = {"overfit": {"steps": 2, "weak_per_batch": 8, "normal_per_batch": 8},
         "scan": {"neighbours": 5}, "select": {"retain_size": 20},
         "unlearn": {"steps": 2, "transplant_steps": 2, "batch_size": 8}}


@pytest.fixture(scope="module")
def suspect(ubt_main, tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("defend")
    ubt_main("poison", "--data", tiny_world["train"], "--out", str(root / "poisoned"), "--attack", "badnet",
        "--rate", "0.1", "--target", "star", "--seed", "1")
    save_model(create_model("ubt-tiny"), root / "model")
    (root / "small.json").write_text(json.dumps(SMALL))
    return root


def test_defend_writes_model_table_and_reports(ubt, suspect, tmp_path):
    out = tmp_path / "out"
    proc = ubt("defend", "--model", str(suspect / "model"), "--data", str(suspect / "poisoned"), "--out", str(out),
               "--config", str(suspect / "small.json"), "--k", "6")
    assert json.loads(proc.stdout)["k"] == 6
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'model'}")  # plain open_clip loads it
    assert model is not None
    table = pq.read_table(out / "suspicious.parquet")
    uids = read_pairs(str(suspect / "poisoned")).table.column("uid").to_pylist()
    assert sorted(table.column("uid").to_pylist()) == sorted(uids)
    assert table.column("rank").to_pylist() == list(range(1, len(uids) + 1))
    assert sum(table.column("selected").to_pylist()) == 6
    report = json.loads((out / "report.json").read_text())
    assert set(report["detection"]) >= {"precision_at_k", "recall_at_k", "auroc", "k"}
    assert {"scan_suspect", "overfit", "scan_overfit", "unlearn"} <= set(report["stage_seconds"])
    assert report["detection"]["n_poisoned"] == 8
    text = (out / "report.md").read_text()
    assert "suspicion_histogram.png" in text and (out / "suspicion_histogram.png").stat().st_size > 0
    assert (out / "top_suspicious.png").stat().st_size > 0
    card = (out / "model" / "README.md").read_text()
    assert "library_name: open_clip" in card and f"local-dir:{out / 'model'}" in card and "recall@k" in card
    assert "estimated_trigger.png" in text and (out / "estimated_trigger.png").stat().st_size > 0
    assert f"pattern pasted on {report['unlearn']['pattern_tokens']} patch tokens" in text  # what the unlearning moved


def test_without_evidence_the_model_is_left_unchanged(ubt_main, suspect, tmp_path):
    config = tmp_path / "strict.json"
    # no evidence either way: no scan tail is high enough, and refine (whose pixel groups need no trained model)
    # is off; with it on, whether a random model's check passes depends on its initialisation
    config.write_text(json.dumps(SMALL | {"select": {"retain_size": 20, "evidence_threshold": 1e9},
                                          "refine": {"iterations": 0}}))
    out = tmp_path / "out"
    ubt_main("defend", "--model", str(suspect / "model"), "--data", str(suspect / "poisoned"), "--out", str(out),
        "--config", str(config))
    report = json.loads((out / "report.json").read_text())
    assert report["k"] == 0 and "no strong backdoor evidence" in report["verdict"]
    assert "unlearn" not in report["stage_seconds"] and report["detection"]["k"] == 0
    before = safetensors.torch.load_file(suspect / "model" / "open_clip_model.safetensors")
    after = safetensors.torch.load_file(out / "model" / "open_clip_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_misspelt_setting_is_one_clear_error(ubt, ubt_main, suspect, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"unlearn": {"stepz": 3}}))
    proc = ubt("defend", "--model", str(suspect / "model"), "--data", str(suspect / "poisoned"), "--out",
               str(tmp_path / "o"), "--config", str(bad), ok=False)
    assert proc.stderr.count("\n") == 1 and "unlearn.stepz" in proc.stderr
    proc = ubt_main("defend", "--model", str(suspect / "model"), "--data", str(suspect / "poisoned"), "--out",
                    str(tmp_path / "o"), "--config", str(tmp_path / "none.json"), ok=False)
    assert "--config" in proc.stderr and "none.json" in proc.stderr


def test_a_reused_scan_gives_the_same_scores_and_keeps_its_recorded_time(suspect, tmp_path):
    from ubt_core.defense.bench import variant_config
    from ubt_core.defense.ubt import defend

    args = (str(suspect / "model"), str(suspect / "poisoned"))
    first = defend(*args, tmp_path / "a", variant_config(SMALL | {"select": {"k": 4, "retain_size": 20}}),
                   scan_cache=tmp_path / "cache")
    second = defend(*args, tmp_path / "b", variant_config(SMALL | {"select": {"k": 6, "retain_size": 20}}),
                    scan_cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*/scan-overfit.json"))) == 1
    assert first["stage_seconds"]["overfit"] == second["stage_seconds"]["overfit"]
    a = pq.read_table(tmp_path / "a" / "suspicious.parquet").sort_by("uid")
    b = pq.read_table(tmp_path / "b" / "suspicious.parquet").sort_by("uid")
    assert a.column("suspicion").equals(b.column("suspicion")) and second["k"] == 6


def test_a_pattern_verified_from_the_captions_skips_the_scans_and_the_overfit(suspect, tmp_path, refine_outcome):
    """A trigger pattern verified from the caption concepts is the selection: no image scan, overfit or select runs.
    Without one the suspect is scanned and over-fitted, and select tries only the scan's top; with the overfit on
    whatever is found (`skip_if_pattern` off) the caption pass does not run."""
    from ubt_core.defense.bench import variant_config
    from ubt_core.defense.ubt import defend

    args = (str(suspect / "model"), str(suspect / "poisoned"))
    refine_outcome["verified"] = True
    skipped = defend(*args, tmp_path / "a", variant_config(SMALL))
    assert not skipped["overfit_ran"] and skipped["k"] == 6
    assert set(skipped["stage_seconds"]) == {"load", "pattern", "unlearn", "report"}
    assert "overfit amplification | skipped, and the image scan too" in (tmp_path / "a" / "report.md").read_text()
    refine_outcome["verified"] = False
    ran = defend(*args, tmp_path / "b", variant_config(SMALL))
    assert ran["overfit_ran"] and {"pattern", "scan_suspect", "overfit", "scan_overfit", "select"} <= set(
        ran["stage_seconds"]) and "select_overfit" not in ran["stage_seconds"]
    starts = [start["start"] for start in ran["refine"]["starts"]]
    assert starts[-1] == "scan top" and len(starts) > 1 and all(s.startswith("concept") for s in starts[:-1])
    always = SMALL | {"overfit": SMALL["overfit"] | {"skip_if_pattern": False}}
    ran = defend(*args, tmp_path / "c", variant_config(always))
    assert ran["overfit_ran"] and "pattern" not in ran["stage_seconds"]
    off = defend(*args, tmp_path / "d", variant_config(SMALL | {"overfit": {"steps": 0}}))  # the ablation
    assert not off["overfit_ran"] and "overfit amplification | off" in (tmp_path / "d" / "report.md").read_text()


def test_a_pixel_group_kept_together_among_its_captions_skips_the_scans_and_transplants_tokens(suspect, tmp_path,
                                                                                              refine_outcome):
    """No pattern, but the group whose captions agree most keeps together among the pairs captioned alike: its members
    are the selection, unlearned by token transplant (a warp's), with no image scan, overfit or select."""
    from ubt_core.defense.bench import variant_config
    from ubt_core.defense.ubt import defend

    refine_outcome["alike_closure"] = 0.9
    report = defend(str(suspect / "model"), str(suspect / "poisoned"), tmp_path, variant_config(SMALL))
    assert report["evidence_kind"] == "alike group" and report["k"] == 25 and not report["overfit_ran"]
    assert set(report["stage_seconds"]) == {"load", "pattern", "unlearn", "report"}
    assert report["unlearn"]["scope"] == "token" and report["unlearn"]["portion"] == "visual-late"
    assert "a pixel group the model keeps together" in (tmp_path / "report.md").read_text()
