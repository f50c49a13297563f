"""The synthetic benchmark: deterministic per seed, and what it writes obeys the pair-dataset contract."""

import numpy as np
import pytest

from ubt_core.data.contract import PAIR_SCHEMA, read_eval_set, read_pairs
from ubt_core.data.images import decode_image, decode_pixels
from ubt_core.data.synth import CLASSES, EVAL_TEMPLATES, SynthConfig, synth_benchmark, synth_pairs

CFG = SynthConfig(train_pairs=40, eval_images=30, rows_per_file=16)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    """The benchmark written once for this module: its output dir and the URIs synth_benchmark returned."""
    out = str(tmp_path_factory.mktemp("synth"))
    return {"out": out, "uris": synth_benchmark(out, CFG)}


def test_synth_pairs_is_deterministic_for_a_seed():
    a = synth_pairs(6, 16, seed=3, prefix="t", desc="a")
    b = synth_pairs(6, 16, seed=3, prefix="t", desc="b")

    assert a.equals(b)
    assert a.column_names == ["uid", "image", "caption", "label"]
    assert a["uid"].to_pylist() == [f"t-{i:07d}" for i in range(6)]


def test_synth_pairs_differs_for_another_seed():
    a = synth_pairs(6, 16, seed=3, prefix="t", desc="a")
    b = synth_pairs(6, 16, seed=4, prefix="t", desc="b")

    assert a["uid"].to_pylist() == b["uid"].to_pylist()  # uids depend on position only
    assert all(x != y for x, y in zip(a["image"].to_pylist(), b["image"].to_pylist(), strict=True))
    assert a["caption"].to_pylist() != b["caption"].to_pylist()


def test_synth_pairs_images_have_the_requested_size():
    t = synth_pairs(3, 16, seed=0, prefix="t", desc="s")

    assert [decode_pixels(b).shape for b in t["image"].to_pylist()] == [(16, 16, 3)] * 3


def test_benchmark_returns_train_and_eval_uris(bench):
    assert bench["uris"] == {"train": f"{bench['out']}/train", "eval": f"{bench['out']}/eval"}


def test_benchmark_train_split_passes_the_contract(bench):
    ps = read_pairs(bench["uris"]["train"])

    assert ps.table.schema == PAIR_SCHEMA
    assert ps.table.num_rows == 40
    assert [f.rsplit("/", 1)[1] for f in ps.files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert ps.quarantined.total() == 0
    assert ps.table["uid"].to_pylist() == [f"train-{i:07d}" for i in range(40)]


def test_benchmark_eval_split_passes_the_contract(bench):
    ps, classes = read_eval_set(bench["uris"]["eval"])

    assert ps.table.num_rows == 30
    assert len(ps.files) == 2
    assert ps.quarantined.total() == 0
    assert classes.classes == CLASSES
    assert classes.templates == EVAL_TEMPLATES
    assert ps.table["uid"].to_pylist() == [f"eval-{i:07d}" for i in range(30)]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_benchmark_labels_are_in_range_and_captions_name_their_class(bench, split):
    t = read_pairs(bench["uris"][split]).table
    labels, captions = t["label"].to_pylist(), t["caption"].to_pylist()

    assert all(isinstance(y, int) and 0 <= y < len(CLASSES) for y in labels)
    assert len(set(labels)) > 1  # not a constant label
    missing = [(c, CLASSES[y]) for c, y in zip(captions, labels, strict=True) if CLASSES[y] not in c]
    assert missing == []


@pytest.mark.parametrize("split", ["train", "eval"])
def test_benchmark_images_decode_to_square_rgb(bench, split):
    images = read_pairs(bench["uris"][split]).table["image"].to_pylist()

    decoded = [decode_image(b) for b in images]
    assert {(im.mode, im.size) for im in decoded} == {("RGB", (CFG.image_size, CFG.image_size))}
    assert all(decode_pixels(b).dtype == np.uint8 for b in images)


def test_benchmark_train_and_eval_are_drawn_from_different_seeds(bench):
    train = read_pairs(bench["uris"]["train"]).table["image"].to_pylist()
    evals = read_pairs(bench["uris"]["eval"]).table["image"].to_pylist()

    assert set(train).isdisjoint(evals)
