"""The select stage after refine. A verified pattern is the evidence and the pairs above its drop the
unlearning set, even where select's own threshold rule would not call it a group, and instead of a
collapsed group that holds only part of the trigger's pairs. Without a pattern, a closed group is the evidence;
failing that, dense pairs are regrouped, and the regrouped group is evidence only if it stays collapsed."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ubt_core.data.contract import read_checked_pairs
from ubt_core.defense import stages
from ubt_core.defense.refine import AlikeGroup, ClosedGroup, MatchedFilter, RefineConfig, Refinement
from ubt_core.defense.scan import ScanConfig
from ubt_core.defense.select import SelectConfig
from ubt_core.models import create_model, save_model


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A random-weight ubt-tiny checkpoint: the first pass embeds captions with it."""
    return save_model(create_model("ubt-tiny"), tmp_path_factory.mktemp("model") / "model")


def _write_embeddings(uids: pa.ChunkedArray | pa.Array, images: np.ndarray, texts: np.ndarray, path) -> None:
    """An embeddings file (the scan's output) with these (N, D) image and caption rows."""
    columns = [pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]) for v in (images, texts)]
    pq.write_table(pa.table({"uid": uids, "image_emb": columns[0], "text_emb": columns[1]}), path)


def _random_embeddings(uids: pa.ChunkedArray, path: str, dim: int = 16, collapsed: slice | None = None) -> None:
    """Random unit image and text embeddings; the `collapsed` rows' images all embed as one point."""
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.nn.functional.normalize(torch.randn(len(uids), dim, generator=gen), dim=1).numpy()
               for _ in range(2)]
    if collapsed:
        vectors[0][collapsed] = vectors[0][collapsed.start]
    _write_embeddings(uids, *vectors, path)


def _varied_pixels(n_pairs: int) -> MatchedFilter:
    """The pixels' matched filter of `n_pairs` different images (any group's spread about 1: no copies)."""
    return MatchedFilter(torch.randn(n_pairs, 8, generator=torch.Generator().manual_seed(0)), shrinkage=0.01)


def _verified_on_the_first(n: int, n_pairs: int):
    """A stand-in for refine that verifies a pattern whose scores drop right below the first `n` rows."""
    cliff = np.r_[np.full(n, 9.0) + np.arange(n) / 100, np.random.default_rng(0).normal(size=n_pairs - n)]

    def verified(model_dir, table, columns, starts, clean_rows, cfg, poisoned):
        columns["pattern"] = columns["suspicion"] = cliff
        return {"verified": True, "above_gap": n, "copies": False}, [], _varied_pixels(n_pairs)
    return verified


def test_a_verified_pattern_is_the_evidence_and_the_pairs_above_its_drop_are_unlearned(tiny_world, tmp_path,
                                                                                       monkeypatch):
    uids = read_checked_pairs(tiny_world["train"]).column("uid")
    embeddings = str(tmp_path / "embeddings.parquet")
    _random_embeddings(uids, embeddings)
    monkeypatch.setattr(stages, "_refine", _verified_on_the_first(25, len(uids)))
    select = SelectConfig(min_group=50, retain_size=20)  # 25 pairs above 4.5 z: no group by select's own rule
    summary = stages.select_stage(tiny_world["train"], embeddings, None, tmp_path, ScanConfig(neighbours=5), select,
                                  "unused", RefineConfig())
    assert summary["backdoor_evidence"] and summary["evidence_kind"] == "shared pattern" and summary["k"] == 25
    suspicious = pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).to_pandas()
    assert sorted(suspicious[suspicious.selected].uid) == sorted(np.asarray(uids.to_pylist())[:25])
    assert json.loads((tmp_path / stages.SELECTION_FILE).read_text())["k"] == 25


def test_a_verified_pattern_replaces_a_collapsed_group(tiny_world, tmp_path, monkeypatch):
    uids = read_checked_pairs(tiny_world["train"]).column("uid")
    embeddings = str(tmp_path / "embeddings.parquet")
    _random_embeddings(uids, embeddings, collapsed=slice(40, 60))
    select, scan = SelectConfig(min_group=10, retain_size=20), ScanConfig(neighbours=5)
    collapse = stages.select_stage(tiny_world["train"], embeddings, None, tmp_path, scan, select, "unused",
                                   RefineConfig(iterations=0))
    assert collapse["evidence_kind"] == "collapse" and collapse["k"] == 20
    monkeypatch.setattr(stages, "_refine", _verified_on_the_first(25, len(uids)))
    summary = stages.select_stage(tiny_world["train"], embeddings, None, tmp_path, scan, select, "unused",
                                  RefineConfig())
    assert summary["evidence_kind"] == "shared pattern" and summary["k"] == 25
    suspicious = pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).to_pandas()
    assert sorted(suspicious[suspicious.selected].uid) == sorted(np.asarray(uids.to_pylist())[:25])



def _collapse_and_its_direction(tmp_path, n: int = 2000, group: int = 20) -> tuple[str, str]:
    """Pairs (never decoded: refine is stubbed) and embeddings: clean images spread over 15 content dimensions;
    the first `group` images are one point on a 16th, and the next `group` keep their content and lean towards
    that point (a trigger learned less on them). Returns the data and embeddings URIs."""
    uids = pa.array([f"pair-{i:05d}" for i in range(n)])
    (tmp_path / "pairs").mkdir()
    pq.write_table(pa.table({"uid": uids, "image": pa.array([b""] * n), "caption": pa.array(["a photo."] * n)}),
                   tmp_path / "pairs" / "part-0.parquet")
    gen = torch.Generator().manual_seed(0)
    images = torch.cat([torch.randn(n, 15, generator=gen), 0.01 * torch.randn(n, 1, generator=gen)], 1)
    images[:group] = torch.nn.functional.one_hot(torch.tensor(15), 16).float()
    images[group:2 * group, 15] += 2.0
    images, texts = torch.nn.functional.normalize(images, dim=1), torch.randn(n, 16, generator=gen)
    _write_embeddings(uids, images.numpy(), texts.numpy(), tmp_path / "embeddings.parquet")
    return str(tmp_path / "pairs"), str(tmp_path / "embeddings.parquet")


def _unverified(model_dir, table, columns, starts, clean_rows, cfg, poisoned):
    columns["pattern"] = np.zeros(table.num_rows)
    return {"verified": False, "copies": False}, [], _varied_pixels(table.num_rows)


def test_a_collapse_no_pattern_explains_is_regrouped_along_its_direction(tmp_path, monkeypatch):
    data, embeddings = _collapse_and_its_direction(tmp_path)
    monkeypatch.setattr(stages, "_refine", _unverified)
    collapsed, leaning = {f"pair-{i:05d}" for i in range(20)}, {f"pair-{i:05d}" for i in range(20, 40)}

    def selected(refine_cfg: RefineConfig) -> tuple[dict, set[str], pd.DataFrame]:
        summary = stages.select_stage(data, embeddings, None, tmp_path, ScanConfig(neighbours=10),
                                      SelectConfig(min_group=10, retain_size=20), "unused", refine_cfg)
        suspicious = pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).to_pandas()
        return summary, set(suspicious[suspicious.selected].uid), suspicious

    summary, rows, _ = selected(RefineConfig(group_size=20, regroup_collapse=False))
    assert summary["evidence_kind"] == "collapse" and collapsed <= rows and not leaning & rows
    summary, rows, suspicious = selected(RefineConfig(group_size=20))
    assert summary["evidence_kind"] == "collapse" and summary["refine"]["regrouped"]
    assert collapsed | leaning <= rows and len(rows) < 50
    assert (suspicious.regrouped == suspicious.suspicion).all()


def test_a_collapse_of_copies_of_one_image_is_no_evidence(tmp_path, monkeypatch):
    """The same collapsed and leaning pairs, but their images are copies of one image (a pair duplicated in the
    data): neither the collapse nor its regrouped direction is evidence, and the verdict says why."""
    data, embeddings = _collapse_and_its_direction(tmp_path)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2000, 8, generator=gen)
    pixels[:40] = pixels[0] + 0.01 * torch.randn(40, 8, generator=gen)

    def unverified(model_dir, table, columns, starts, clean_rows, cfg, poisoned):
        summary, tried, _ = _unverified(model_dir, table, columns, starts, clean_rows, cfg, poisoned)
        return summary, tried, MatchedFilter(pixels, shrinkage=0.01)

    monkeypatch.setattr(stages, "_refine", unverified)
    summary = stages.select_stage(data, embeddings, None, tmp_path, ScanConfig(neighbours=10),
                                  SelectConfig(min_group=10, retain_size=20), "unused", RefineConfig(group_size=20))
    assert not summary["backdoor_evidence"] and summary["k"] == 0 and summary["evidence_kind"] is None
    assert summary["refine"]["copies"] and summary["refine"]["regrouped"] is False
    assert "copies of one image" in stages._verdict(summary)


def _few_dense(monkeypatch, regrouped_rows: np.ndarray, n: int = 2000) -> None:
    """A scan with 12 pairs over the evidence threshold and 20 more over the selection threshold (too few for
    select's own rule at min_group 20), and a regroup that puts `regrouped_rows` on top."""
    scan = np.r_[np.full(12, 6.0), np.full(20, 4.0), np.random.default_rng(0).normal(scale=0.5, size=n - 32)]
    monkeypatch.setattr(stages, "scan_scores", lambda suspect, amplified, cfg: {"suspicion": scan.copy()})
    monkeypatch.setattr(stages, "_refine", _unverified)
    regrouped = np.random.default_rng(1).normal(scale=0.5, size=n)
    regrouped[regrouped_rows] = 9.0
    monkeypatch.setattr(stages, "regroup", lambda images, texts, start, cfg: regrouped)


def test_a_regrouped_group_that_stays_collapsed_is_evidence(tmp_path, monkeypatch):
    """Only 12 pairs pass select's evidence threshold, but the 40 pairs the regroup puts on top include all 32
    the scan saw collapsed: evidence, and the 40 are unlearned."""
    data, embeddings = _collapse_and_its_direction(tmp_path)
    _few_dense(monkeypatch, np.arange(40))
    summary = stages.select_stage(data, embeddings, None, tmp_path, ScanConfig(), SelectConfig(retain_size=20),
                                  "unused", RefineConfig(group_size=40))
    assert summary["backdoor_evidence"] and summary["evidence_kind"] == "collapse" and summary["k"] == 40
    assert summary["refine"]["regrouped"] and summary["refine"]["regrouped_collapsed"] == 32


def test_a_closed_group_comes_before_the_regroup(tmp_path, monkeypatch):
    """Dense pairs no pattern explains, and a closed group elsewhere: the closed group is the stricter test, so it is
    taken, and the regroup (whose test a content group can pass) does not run."""
    data, embeddings = _collapse_and_its_direction(tmp_path)
    _few_dense(monkeypatch, np.arange(40))
    scores = np.r_[np.full(30, 9.0), np.random.default_rng(2).normal(scale=0.5, size=1970)]
    monkeypatch.setattr(stages, "closed_group",
                        lambda embeddings, cfg, spread: ClosedGroup(scores, 0.95, 30, "c0", 0.5))
    summary = stages.select_stage(data, embeddings, None, tmp_path, ScanConfig(), SelectConfig(retain_size=20),
                                  "unused", RefineConfig(group_size=40))
    assert summary["evidence_kind"] == "closed group" and summary["k"] == 30
    assert "regrouped" not in summary["refine"]


def test_a_regrouped_group_that_does_not_collapse_is_no_evidence(tmp_path, monkeypatch):
    """The same 12 dense pairs lead to a group of 40 of which the scan saw only those 12 collapsed (near-duplicates
    in a content group): no evidence, nothing unlearned."""
    data, embeddings = _collapse_and_its_direction(tmp_path)
    _few_dense(monkeypatch, np.r_[np.arange(12), np.arange(100, 128)])
    summary = stages.select_stage(data, embeddings, None, tmp_path, ScanConfig(), SelectConfig(retain_size=20),
                                  "unused", RefineConfig(group_size=40))
    assert not summary["backdoor_evidence"] and summary["k"] == 0 and summary["refine"]["regrouped"] is False
    assert "regrouped" not in pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).column_names


def test_a_closed_group_is_evidence_where_nothing_else_is(tiny_world, tmp_path, monkeypatch):
    """No pattern, no collapse: a caption concept regrouped into a group whose images keep to themselves (closure
    over `min_closure`, standing apart from the next group by `min_closure_gap`) is the evidence, and its members are
    unlearned; a less closed one, or one as closed as another concept's, is not."""
    uids = read_checked_pairs(tiny_world["train"]).column("uid")
    embeddings = str(tmp_path / "embeddings.parquet")
    _random_embeddings(uids, embeddings)
    monkeypatch.setattr(stages, "_refine", _unverified)
    scores = np.r_[np.full(30, 9.0), np.random.default_rng(0).normal(scale=0.5, size=len(uids) - 30)]

    def selected(closure: float, next_closure: float = 0.5,
                 refine_cfg: RefineConfig | None = None) -> tuple[dict, pd.DataFrame]:
        monkeypatch.setattr(stages, "closed_group",
                            lambda embeddings, cfg, spread: ClosedGroup(scores, closure, 25, "c0", next_closure))
        summary = stages.select_stage(tiny_world["train"], embeddings, None, tmp_path, ScanConfig(neighbours=5),
                                      SelectConfig(min_group=10, retain_size=20), "unused",
                                      refine_cfg or RefineConfig())
        return summary, pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).to_pandas()

    summary, suspicious = selected(0.9)
    assert summary["evidence_kind"] == "closed group" and summary["k"] == 25
    assert summary["refine"]["closed_group"] == {"closure": 0.9, "next_closure": 0.5, "members": 25, "start": "c0",
                                                 "model": "suspect"}
    assert set(suspicious[suspicious.selected].uid) <= set(uids.to_pylist()[:30])
    assert (suspicious.closed == suspicious.suspicion).all()
    for closure, next_closure in ((0.8, 0.5), (0.9, 0.85)):
        summary, suspicious = selected(closure, next_closure)
        assert not summary["backdoor_evidence"] and summary["k"] == 0 and "closed" not in suspicious.columns
    summary, _ = selected(0.9, refine_cfg=RefineConfig(closed_group=False))
    assert summary["k"] == 0 and "closed_group" not in summary["refine"]


def test_a_pattern_verified_from_the_captions_alone_is_the_selection_without_a_scan(tiny_world, random_model,
                                                                                     tmp_path, monkeypatch):
    """The first pass embeds only the captions: refine starts from their concepts (no scan, so no scan-top start)
    and checks on every pair; a verified pattern writes the same files select does."""
    uids = read_checked_pairs(tiny_world["train"]).column("uid")
    seen = {}

    def verified(model_dir, table, columns, starts, clean_rows, cfg, poisoned):
        seen.update(starts=set(starts), clean_rows=len(clean_rows))
        return _verified_on_the_first(25, len(uids))(model_dir, table, columns, starts, clean_rows, cfg, poisoned)

    monkeypatch.setattr(stages, "_refine", verified)
    summary = stages.pattern_stage(tiny_world["train"], tmp_path, SelectConfig(min_group=50, retain_size=20),
                                   str(random_model), RefineConfig(concepts=4))
    assert seen == {"starts": {f"concept {i}" for i in range(4)}, "clean_rows": len(uids)}
    assert summary["backdoor_evidence"] and summary["evidence_kind"] == "shared pattern" and summary["k"] == 25
    suspicious = pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).to_pandas()
    assert sorted(suspicious[suspicious.selected].uid) == sorted(np.asarray(uids.to_pylist())[:25])
    assert suspicious.retained.sum() == 20 and not (suspicious.retained & suspicious.selected).any()
    assert json.loads((tmp_path / stages.SELECTION_FILE).read_text()) == summary


def test_without_a_pattern_the_select_stage_tries_only_the_scan_top_and_lists_every_start(tiny_world, random_model,
                                                                                           tmp_path, monkeypatch):
    uids = read_checked_pairs(tiny_world["train"]).column("uid")
    tried = []

    def unverified(model_dir, table, columns, starts, clean_rows, cfg, poisoned):
        tried.append(sorted(starts))
        summary, found, pixels = _unverified(model_dir, table, columns, starts, clean_rows, cfg, poisoned)
        return summary | {"starts": [{"start": name} for name in starts]}, found, pixels

    monkeypatch.setattr(stages, "_refine", unverified)
    first = stages.pattern_stage(tiny_world["train"], tmp_path, SelectConfig(retain_size=20), str(random_model),
                                 RefineConfig(concepts=4, alike_group=False))
    assert not first["backdoor_evidence"] and not (tmp_path / stages.SELECTION_FILE).exists()
    embeddings = str(tmp_path / "embeddings.parquet")
    _random_embeddings(uids, embeddings)
    summary = stages.select_stage(tiny_world["train"], embeddings, None, tmp_path, ScanConfig(neighbours=5),
                                  SelectConfig(retain_size=20), "unused", RefineConfig(concepts=4, closed_group=False),
                                  first)
    assert tried == [[f"concept {i}" for i in range(4)], ["scan top"]]
    assert [s["start"] for s in summary["refine"]["starts"]] == [*(f"concept {i}" for i in range(4)), "scan top"]


def test_a_pixel_group_kept_together_among_its_captions_is_the_selection_without_a_scan(tiny_world, random_model,
                                                                                       tmp_path, monkeypatch):
    """No pattern verified from the captions: the group whose captions agree most is embedded with the pairs captioned
    alike, and where the model keeps it together (`AlikeGroup.is_evidence`) and select's evidence holds on its
    direction's scores, its members are unlearned with no scan; otherwise nothing is written."""
    uids = read_checked_pairs(tiny_world["train"]).column("uid")
    n = len(uids)
    groups = {"concept 0": np.arange(10), "concept 1": np.arange(10, 20)}
    checked = []

    def unverified(model_dir, table, columns, starts, clean_rows, cfg, poisoned):
        columns["pattern"] = np.zeros(n)
        tried = [Refinement(np.zeros(n), group, None, None, 0.5, 30, name, cfg.min_match_gain, 1.0)
                 for name, group in groups.items()]
        return {"verified": False, "copies": False, "starts": [{"start": name} for name in starts]}, tried, None

    def alike(closure):
        def found(images, texts, rows, group, start, cfg):
            checked.append((len(images), len(rows), start))
            scores = np.r_[np.full(25, 9.0), np.random.default_rng(0).normal(scale=0.5, size=len(rows) - 25)]
            return AlikeGroup(rows, scores, closure, 22, start)
        return found

    monkeypatch.setattr(stages, "_refine", unverified)
    monkeypatch.setattr(stages, "most_coherent", lambda tried, texts, min_spread: tried[1])
    monkeypatch.setattr(stages, "alike_group", alike(0.7))
    select = SelectConfig(min_group=10, retain_size=20)
    summary = stages.pattern_stage(tiny_world["train"], tmp_path, select, str(random_model), RefineConfig(concepts=2))
    assert checked == [(n, n, "concept 1")]  # 80 pairs: every one is among the 2,000 captioned most alike
    assert summary["backdoor_evidence"] and summary["evidence_kind"] == "alike group" and summary["k"] == 22
    assert summary["refine"]["alike_group"] == {"start": "concept 1", "closure": 0.7, "embedded": n, "members": 22}
    suspicious = pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).to_pandas()
    assert set(suspicious[suspicious.selected].uid) <= set(uids.to_pylist()[:25])
    assert (suspicious.alike == suspicious.suspicion).all() and not (suspicious.retained & suspicious.selected).any()
    assert "keep to themselves" in stages._verdict(summary)

    (tmp_path / stages.SELECTION_FILE).unlink()
    monkeypatch.setattr(stages, "alike_group", alike(0.5))
    summary = stages.pattern_stage(tiny_world["train"], tmp_path, select, str(random_model), RefineConfig(concepts=2))
    assert not summary["backdoor_evidence"] and summary["refine"]["alike_group"]["closure"] == 0.5
    assert not (tmp_path / stages.SELECTION_FILE).exists()
    embeddings = str(tmp_path / "embeddings.parquet")
    _random_embeddings(uids, embeddings)
    after_scan = stages.select_stage(tiny_world["train"], embeddings, None, tmp_path, ScanConfig(neighbours=5),
                                     select, str(random_model), RefineConfig(concepts=2, closed_group=False), summary)
    assert after_scan["refine"]["alike_group"] == summary["refine"]["alike_group"]  # the report shows what it saw
    summary = stages.pattern_stage(tiny_world["train"], tmp_path, select, str(random_model),
                                   RefineConfig(concepts=2, alike_group=False))
    assert not summary["backdoor_evidence"] and "alike_group" not in summary["refine"] and len(checked) == 2
