"""The select stage after a verified refine: the pattern is the evidence and the pairs above its drop the
unlearning set, even where select's own threshold rule would not call it a group."""

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


def _random_embeddings(uids: pa.ChunkedArray, path: str, dim: int = 16) -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.nn.functional.normalize(torch.randn(len(uids), dim, generator=gen), dim=1).numpy()
               for _ in range(2)]
    columns = [pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim) for v in vectors]
    pq.write_table(pa.table({"uid": uids, "image_emb": columns[0], "text_emb": columns[1]}), path)


def test_a_verified_pattern_is_the_evidence_and_the_pairs_above_its_drop_are_unlearned(tiny_world, tmp_path,
                                                                                       monkeypatch):
    uids = read_checked_pairs(tiny_world["train"]).column("uid")
    embeddings = str(tmp_path / "embeddings.parquet")
    _random_embeddings(uids, embeddings)
    cliff = np.r_[np.full(25, 9.0) + np.arange(25) / 100, np.random.default_rng(0).normal(size=len(uids) - 25)]

    def verified(model_dir, table, columns, texts, clean_rows, cfg):
        columns["pattern"] = columns["suspicion"] = cliff
        return {"verified": True, "above_gap": 25}

    monkeypatch.setattr(stages, "_refine", verified)
    select = SelectConfig(min_group=50, retain_size=20)  # 25 pairs above 4.5 z: no group by select's own rule
    summary = stages.select_stage(tiny_world["train"], embeddings, None, tmp_path, ScanConfig(neighbours=5), select,
                                  "unused", RefineConfig())
    assert summary["backdoor_evidence"] and summary["evidence_kind"] == "shared pattern" and summary["k"] == 25
    suspicious = pq.read_table(tmp_path / stages.SUSPICIOUS_FILE).to_pandas()
    assert sorted(suspicious[suspicious.selected].uid) == sorted(np.asarray(uids.to_pylist())[:25])
    assert json.loads((tmp_path / stages.SELECTION_FILE).read_text())["k"] == 25
