"""The select stage after a verified refine: the pattern is the evidence and the pairs above its drop the
unlearning set, even where select's own threshold rule would not call it a group, and instead of a
collapsed group that holds only part of the trigger's pairs."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ubt_core.data.contract import read_checked_pairs
from ubt_core.defense import stages
from ubt_core.defense.refine import RefineConfig
from ubt_core.defense.scan import ScanConfig
from ubt_core.defense.select import SelectConfig


def _random_embeddings(uids: pa.ChunkedArray, path: str, dim: int = 16, collapsed: slice | None = None) -> None:
    """Random unit image and text embeddings; the `collapsed` rows' images all embed as one point."""
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.nn.functional.normalize(torch.randn(len(uids), dim, generator=gen), dim=1).numpy()
               for _ in range(2)]
    if collapsed:
        vectors[0][collapsed] = vectors[0][collapsed.start]
    columns = [pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim) for v in vectors]
    pq.write_table(pa.table({"uid": uids, "image_emb": columns[0], "text_emb": columns[1]}), path)


def _verified_on_the_first(n: int, n_pairs: int):
    """A stand-in for refine that verifies a pattern whose scores drop right below the first `n` rows."""
    cliff = np.r_[np.full(n, 9.0) + np.arange(n) / 100, np.random.default_rng(0).normal(size=n_pairs - n)]

    def verified(model_dir, table, columns, texts, clean_rows, cfg, poisoned):
        columns["pattern"] = columns["suspicion"] = cliff
        return {"verified": True, "above_gap": n}
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
