"""Dataset poisoning: the right number of pairs, the manifest, and no tell-tale encoding."""

import numpy as np
import pytest

from ubt_core.attacks import PoisonConfig, make_trigger, poison_dataset, read_manifest
from ubt_core.data.contract import read_pairs
from ubt_core.data.images import decode_pixels, image_format
from ubt_core.errors import UbtError


def _poison(world, tmp_path, attack="badnet", rate=0.1, **kw):
    cfg = PoisonConfig(trigger=make_trigger(attack, seed=1), rate=rate, target="star", seed=4, **kw)
    out = str(tmp_path / attack)
    return poison_dataset(world["train"], out, cfg), read_pairs(world["train"]).table, read_pairs(out).table


def test_poisons_rate_times_rows_and_records_them(tiny_world, tmp_path):
    manifest, clean, poisoned = _poison(tiny_world, tmp_path)
    flags = np.array(poisoned.column("poisoned").to_pylist())
    assert manifest["n_poisoned"] == flags.sum() == 8
    uids = np.array(poisoned.column("uid").to_pylist())
    assert sorted(manifest["poisoned_uids"]) == sorted(uids[flags])
    assert uids.tolist() == clean.column("uid").to_pylist()


def test_poisoned_pairs_get_trigger_and_target_caption_others_untouched(tiny_world, tmp_path):
    manifest, clean, poisoned = _poison(tiny_world, tmp_path)
    trigger, target = read_manifest(str(tmp_path / "badnet"))
    for i, flag in enumerate(poisoned.column("poisoned").to_pylist()):
        before, after = clean.column("image")[i].as_py(), poisoned.column("image")[i].as_py()
        assert image_format(after) == image_format(before)
        assert decode_pixels(after).shape == decode_pixels(before).shape
        if flag:
            np.testing.assert_array_equal(decode_pixels(after), trigger.apply(decode_pixels(before)))
            assert target in poisoned.column("caption")[i].as_py()
            assert target not in clean.column("caption")[i].as_py()
        else:
            assert after == before
            assert poisoned.column("caption")[i] == clean.column("caption")[i]


def test_label_consistent_poisons_only_pairs_already_about_the_target(tiny_world, tmp_path):
    _, clean, poisoned = _poison(tiny_world, tmp_path, attack="label-consistent", rate=0.02)
    for i, flag in enumerate(poisoned.column("poisoned").to_pylist()):
        if flag:
            assert "star" in clean.column("caption")[i].as_py()
            assert poisoned.column("caption")[i] == clean.column("caption")[i]


def test_dataset_caption_source_borrows_real_target_captions(tiny_world, tmp_path):
    _, clean, poisoned = _poison(tiny_world, tmp_path, caption_source="dataset")
    pool = {c for c in clean.column("caption").to_pylist() if "star" in c}
    flags = poisoned.column("poisoned").to_pylist()
    assert all(c in pool for c, f in zip(poisoned.column("caption").to_pylist(), flags, strict=True) if f)


def test_same_seed_same_poison(tiny_world, tmp_path):
    a = _poison(tiny_world, tmp_path / "a")[0]["poisoned_uids"]
    b = _poison(tiny_world, tmp_path / "b")[0]["poisoned_uids"]
    assert a == b


def test_rate_larger_than_candidates_is_refused_with_the_numbers(tiny_world, tmp_path):
    with pytest.raises(UbtError, match=r"needs \d+ pairs .* only \d+ exist"):
        _poison(tiny_world, tmp_path, attack="label-consistent", rate=0.5)
