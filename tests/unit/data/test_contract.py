"""The pair-dataset contract: what `read_pairs` / `read_eval_set` refuse, what they set aside, what they keep.

Every refusal is a `DataContractError` naming the file (and row) and saying what to do. With a quarantine
path, per-row faults go to that Parquet file with `reason`, `source_file`, `source_row` and are counted by
kind; rows in == rows kept + rows quarantined. Schema and file faults raise even with a quarantine path.
"""

import json
import posixpath
import re
import struct
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ubt_core.data.contract import (
    CLASSES_FILE,
    CONVERT_HINT,
    PAIR_SCHEMA,
    DataContractError,
    read_checked_pairs,
    read_eval_set,
    read_pairs,
    write_pairs,
)
from ubt_core.errors import UbtError

ROW_REMEDY = "Fix the row, or pass --quarantine FILE to set such rows aside."
QUARANTINE_COLUMNS = [*PAIR_SCHEMA.names, "reason", "source_file", "source_row"]
CLASSES = ["cat", "dog", "fox"]


def _refusal(uri: str, **kwargs) -> str:
    with pytest.raises(DataContractError) as e:
        read_pairs(uri, **kwargs)
    return str(e.value)


def _assert_set_aside(ps, qpath, written: list[pa.Table], kinds: dict[str, int], where: list[tuple[str, int]]):
    """`where` lists (source_file, source_row) of every quarantined row, in file and row order."""
    q = pq.read_table(qpath)
    assert q.column_names == QUARANTINE_COLUMNS
    assert list(zip(q["source_file"].to_pylist(), q["source_row"].to_pylist(), strict=True)) == where
    assert all(r and r.strip() for r in q["reason"].to_pylist())
    assert ps.quarantined == Counter(kinds)
    # nothing else lost: every written row is either kept or quarantined, exactly once
    uids_in = [u for t in written for u in t["uid"].to_pylist()]
    assert ps.table.num_rows + q.num_rows == len(uids_in) == ps.rows_in
    assert Counter(ps.table["uid"].to_pylist() + q["uid"].to_pylist()) == Counter(uids_in)
    return q


def _truncated_png(png) -> bytes:
    data = png(1)
    return data[: len(data) // 2]  # cuts into the IDAT chunk


@pytest.fixture
def qpath(tmp_path) -> str:
    return str(tmp_path / "quarantine" / "bad.parquet")  # parent does not exist yet: read_pairs creates it


@pytest.fixture
def classes_json(dataset_dir) -> str:
    """A valid classes.json with 3 classes in the dataset directory; returns its path."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    path = dataset_dir / CLASSES_FILE
    path.write_text(json.dumps({"classes": CLASSES, "templates": ["a photo of a {}."]}))
    return str(path)


def test_data_contract_error_is_a_ubt_error():
    # the CLI turns UbtError into a clean one-line message
    assert issubclass(DataContractError, UbtError)


# ---------------------------------------------------------------- happy path


def test_write_then_read_round_trips_rows_in_order_across_files(pairs, dataset_dir):
    table = pairs(7).append_column("poisoned", pa.array([i % 2 == 1 for i in range(7)]))
    paths = write_pairs(table, str(dataset_dir), rows_per_file=3)

    assert paths == [str(dataset_dir / f"part-0000{i}.parquet") for i in range(3)]
    assert [pq.read_metadata(p).num_rows for p in paths] == [3, 3, 1]
    ps = read_pairs(str(dataset_dir))
    assert ps.files == paths
    assert ps.table.schema == PAIR_SCHEMA
    assert ps.table["uid"].to_pylist() == [f"p-{i}" for i in range(7)]
    assert ps.table["caption"].to_pylist() == [f"p caption {i}" for i in range(7)]
    assert ps.table["label"].to_pylist() == [0, 1, 2, 0, 1, 2, 0]
    assert ps.table["poisoned"].to_pylist() == [False, True, False, True, False, True, False]
    assert ps.table["image"].to_pylist() == table["image"].to_pylist()
    assert ps.quarantined == Counter()
    assert ps.rows_in == 7


def test_checked_read_gives_the_validated_table_without_decoding_rows(pairs, dataset_dir, tmp_path):
    write_pairs(pairs(7), str(dataset_dir), rows_per_file=3)
    assert read_checked_pairs(str(dataset_dir)).equals(read_pairs(str(dataset_dir)).table)
    broken = pairs(2, image=[b"not an image", b"nor this"])
    write_pairs(broken, str(tmp_path / "broken"))
    assert read_checked_pairs(str(tmp_path / "broken")).num_rows == 2  # rows are not checked again
    with pytest.raises(DataContractError):
        read_checked_pairs(str(tmp_path / "missing"))


def test_large_string_and_large_binary_columns_are_accepted(pairs, write_parquet, dataset_dir):
    small = pairs(3)
    large = pa.table(
        {
            "uid": small["uid"].cast(pa.large_string()),
            "image": small["image"].cast(pa.large_binary()),
            "caption": small["caption"].cast(pa.large_string()),
        }
    )
    write_parquet(large, "ds/part-00000.parquet")

    ps = read_pairs(str(dataset_dir))
    assert ps.table.schema == PAIR_SCHEMA
    assert ps.table["uid"].to_pylist() == ["p-0", "p-1", "p-2"]
    assert ps.table["image"].to_pylist() == small["image"].to_pylist()
    assert ps.table["caption"].to_pylist() == small["caption"].to_pylist()


def test_absent_optional_columns_become_null(pairs, write_parquet, dataset_dir):
    write_parquet(pairs(3, label=None), "ds/part-00000.parquet")

    ps = read_pairs(str(dataset_dir))
    assert ps.table.schema == PAIR_SCHEMA
    assert ps.table["label"].to_pylist() == [None, None, None]
    assert ps.table["poisoned"].to_pylist() == [None, None, None]


def test_narrow_integer_label_is_accepted_and_widened(pairs, write_parquet, dataset_dir):
    write_parquet(pairs(3, label=pa.array([2, 0, 1], pa.int8())), "ds/part-00000.parquet")

    ps = read_pairs(str(dataset_dir))
    assert ps.table["label"].type == pa.int64()
    assert ps.table["label"].to_pylist() == [2, 0, 1]


def test_a_single_parquet_file_is_a_dataset(pairs, write_parquet):
    path = write_parquet(pairs(2), "one.parquet")

    ps = read_pairs(path)
    assert ps.files == [path]
    assert ps.table["uid"].to_pylist() == ["p-0", "p-1"]


def test_valid_rows_with_quarantine_path_write_an_empty_quarantine_file(pairs, dataset_dir, qpath, write_parquet):
    write_parquet(pairs(1), "quarantine/bad.parquet")  # a stale file from an earlier run
    write_pairs(pairs(3), str(dataset_dir))

    ps = read_pairs(str(dataset_dir), quarantine=qpath)
    assert ps.table.num_rows == 3
    assert ps.quarantined == Counter()
    stale_gone = pq.read_table(qpath)
    assert stale_gone.num_rows == 0 and "reason" in stale_gone.column_names


def test_eval_set_reads_pairs_and_classes(pairs, dataset_dir, classes_json):
    write_pairs(pairs(4), str(dataset_dir), rows_per_file=2)

    ps, classes = read_eval_set(str(dataset_dir))
    assert classes.classes == CLASSES
    assert classes.templates == ["a photo of a {}."]
    assert ps.table["label"].to_pylist() == [0, 1, 2, 0]
    assert len(ps.files) == 2  # classes.json sits beside the Parquet files and is not read as data


# ---------------------------------------------------------------- file-level faults


def test_path_that_does_not_exist_is_refused(tmp_path):
    missing = str(tmp_path / "nope")

    assert _refusal(missing) == f"{missing}: no such dataset directory; check the path or run `ubt data synth`."


def test_directory_without_parquet_files_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not data")
    (empty / "shard.parquet").mkdir()  # a directory named like a Parquet file is not one

    assert _refusal(str(empty)) == f"{empty}: no .parquet files in this directory; is it the right dataset?"


@pytest.mark.parametrize("with_quarantine", [False, True], ids=["no_quarantine", "quarantine"])
def test_garbage_file_with_parquet_suffix_is_refused(pairs, dataset_dir, qpath, tmp_path, with_quarantine):
    write_pairs(pairs(2), str(dataset_dir))  # part-00000 is fine; the garbage file comes after it
    garbage = dataset_dir / "part-00001.parquet"
    garbage.write_bytes(b"garbage bytes, not parquet at all")

    with pytest.raises(DataContractError) as e:
        read_pairs(str(dataset_dir), quarantine=qpath if with_quarantine else None)
    msg = str(e.value)
    assert msg.startswith(f"{garbage}: not a readable Parquet file (")
    assert msg.endswith("); re-export or remove it.")
    assert isinstance(e.value.__cause__, pa.ArrowInvalid)
    assert not (tmp_path / "quarantine").exists()


# ---------------------------------------------------------------- schema faults (raise even with quarantine)


@pytest.mark.parametrize("with_quarantine", [False, True], ids=["no_quarantine", "quarantine"])
def test_missing_caption_column_is_refused_listing_columns_found(
    pairs, write_parquet, dataset_dir, qpath, tmp_path, with_quarantine
):
    t = pairs(2)
    renamed = pa.table({"uid": t["uid"], "image": t["image"], "text": t["caption"]})
    path = write_parquet(renamed, "ds/part-00000.parquet")

    msg = _refusal(str(dataset_dir), quarantine=qpath if with_quarantine else None)
    assert msg == (
        f"{path}: column(s) caption missing (found uid, image, text); "
        "rename them or convert the data to the pair-dataset contract (README, 'Data contract')."
    )
    assert not (tmp_path / "quarantine").exists()


@pytest.mark.parametrize("with_quarantine", [False, True], ids=["no_quarantine", "quarantine"])
def test_image_stored_as_string_is_refused(pairs, write_parquet, dataset_dir, qpath, with_quarantine):
    path = write_parquet(pairs(2, image=pa.array(["x.png", "y.png"])), "ds/part-00000.parquet")

    msg = _refusal(str(dataset_dir), quarantine=qpath if with_quarantine else None)
    assert msg == f"{path}: column 'image' has type string, expected binary; {CONVERT_HINT}."


@pytest.mark.parametrize("with_quarantine", [False, True], ids=["no_quarantine", "quarantine"])
def test_label_stored_as_string_is_refused_naming_the_bad_file(
    pairs, write_parquet, dataset_dir, qpath, with_quarantine
):
    write_parquet(pairs(2), "ds/part-00000.parquet")
    bad = write_parquet(pairs(2, prefix="q", label=pa.array(["0", "1"])), "ds/part-00001.parquet")

    msg = _refusal(str(dataset_dir), quarantine=qpath if with_quarantine else None)
    assert msg == f"{bad}: column 'label' has type string, expected integer; {CONVERT_HINT}."


def test_eval_set_without_label_column_is_refused(pairs, write_parquet, dataset_dir, classes_json, qpath):
    path = write_parquet(pairs(2, label=None), "ds/part-00000.parquet")

    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir), quarantine=qpath)
    assert str(e.value) == (f"{path}: eval sets need a `label` column (found uid, image, caption); "
                            "add each image's class index (into classes.json) as `label`.")


# ---------------------------------------------------------------- per-row faults: undecodable image


@pytest.mark.parametrize(
    ("bad", "detail"),
    [
        ("garbage", "image bytes do not decode (UnidentifiedImageError: "),
        ("truncated_png", "image bytes do not decode (OSError: "),
        ("null", "image bytes are missing."),
    ],
)
def test_undecodable_image_is_refused_with_file_and_row(pairs, write_parquet, dataset_dir, png, bad, detail):
    bad_bytes = {"garbage": b"not an image", "truncated_png": _truncated_png(png), "null": None}[bad]
    path = write_parquet(pairs(3, image=[png(0), bad_bytes, png(2)]), "ds/part-00000.parquet")

    msg = _refusal(str(dataset_dir))
    assert msg.startswith(f"{path} row 1: {detail}")
    assert msg.endswith(ROW_REMEDY)


def test_undecodable_images_are_set_aside_with_quarantine(pairs, write_parquet, dataset_dir, png, qpath):
    t = pairs(5, image=[png(0), b"not an image", png(2), _truncated_png(png), None])
    path = write_parquet(t, "ds/part-00000.parquet")

    ps = read_pairs(str(dataset_dir), quarantine=qpath)
    assert ps.table["uid"].to_pylist() == ["p-0", "p-2"]
    q = _assert_set_aside(ps, qpath, [t], {"undecodable image": 3}, [(path, 1), (path, 3), (path, 4)])
    reasons = q["reason"].to_pylist()
    assert reasons[0].startswith("image bytes do not decode (UnidentifiedImageError: ")
    assert reasons[1].startswith("image bytes do not decode (OSError: ")
    assert reasons[2] == "image bytes are missing"
    # the quarantined row keeps its original content, so it can be inspected and repaired
    assert q["image"].to_pylist()[0] == b"not an image"
    assert q["caption"].to_pylist() == ["p caption 1", "p caption 3", "p caption 4"]


def _bomb_png(png) -> bytes:
    """A valid PNG whose IHDR (with a correct CRC) claims 20000 x 20000 pixels."""
    data = png(0)
    ihdr = bytearray(data[16:29])  # 8-byte signature, 4-byte length, b"IHDR", then 13 bytes of header data
    struct.pack_into(">II", ihdr, 0, 20_000, 20_000)
    return data[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr))) + data[33:]


def test_image_claiming_a_huge_size_is_set_aside_not_crashing(pairs, write_parquet, dataset_dir, png, qpath):
    t = pairs(3, image=[png(0), _bomb_png(png), png(2)])
    path = write_parquet(t, "ds/part-00000.parquet")

    ps = read_pairs(str(dataset_dir), quarantine=qpath)
    _assert_set_aside(ps, qpath, [t], {"undecodable image": 1}, [(path, 1)])


# ---------------------------------------------------------------- per-row faults: empty caption, missing uid


@pytest.mark.parametrize("caption", ["", "   ", None], ids=["empty", "blank", "null"])
def test_empty_caption_is_refused_with_file_and_row(pairs, write_parquet, dataset_dir, caption):
    path = write_parquet(pairs(3, caption=["a cat", caption, "a dog"]), "ds/part-00000.parquet")

    assert _refusal(str(dataset_dir)) == f"{path} row 1: caption is empty. {ROW_REMEDY}"


def test_empty_captions_are_set_aside_with_quarantine(pairs, write_parquet, dataset_dir, qpath):
    t = pairs(5, caption=["a cat", "", "   ", None, "a dog"])
    path = write_parquet(t, "ds/part-00000.parquet")

    ps = read_pairs(str(dataset_dir), quarantine=qpath)
    assert ps.table["caption"].to_pylist() == ["a cat", "a dog"]
    q = _assert_set_aside(ps, qpath, [t], {"empty caption": 3}, [(path, 1), (path, 2), (path, 3)])
    assert q["reason"].to_pylist() == ["caption is empty"] * 3
    assert q["caption"].to_pylist() == ["", "   ", None]


@pytest.mark.parametrize("uid", ["", None], ids=["empty", "null"])
def test_missing_uid_is_refused_with_file_and_row(pairs, write_parquet, dataset_dir, uid):
    path = write_parquet(pairs(2, uid=["a", uid]), "ds/part-00000.parquet")

    assert _refusal(str(dataset_dir)) == f"{path} row 1: uid is empty. {ROW_REMEDY}"


# ---------------------------------------------------------------- per-row faults: duplicate uid


def test_duplicate_uid_within_a_file_is_refused_naming_the_first(pairs, write_parquet, dataset_dir):
    path = write_parquet(pairs(3, uid=["a", "b", "a"]), "ds/part-00000.parquet")

    assert _refusal(str(dataset_dir)) == f"{path} row 2: uid 'a' already used at {path} row 0. {ROW_REMEDY}"


def test_duplicate_uid_across_files_is_refused_naming_the_first(pairs, write_parquet, dataset_dir):
    first = write_parquet(pairs(2, uid=["a", "b"]), "ds/part-00000.parquet")
    second = write_parquet(pairs(2, uid=["c", "a"]), "ds/part-00001.parquet")

    assert _refusal(str(dataset_dir)) == f"{second} row 1: uid 'a' already used at {first} row 0. {ROW_REMEDY}"


def test_duplicate_uids_are_set_aside_with_quarantine(pairs, write_parquet, dataset_dir, qpath):
    t0, t1 = pairs(3, uid=["a", "b", "a"]), pairs(2, prefix="q", uid=["c", "b"])
    first = write_parquet(t0, "ds/part-00000.parquet")
    second = write_parquet(t1, "ds/part-00001.parquet")

    ps = read_pairs(str(dataset_dir), quarantine=qpath)
    assert ps.table["uid"].to_pylist() == ["a", "b", "c"]
    assert ps.table["caption"].to_pylist() == ["p caption 0", "p caption 1", "q caption 0"]  # first ones kept
    q = _assert_set_aside(ps, qpath, [t0, t1], {"duplicate uid": 2}, [(first, 2), (second, 1)])
    assert q["reason"].to_pylist() == [
        f"uid 'a' already used at {first} row 0",
        f"uid 'b' already used at {first} row 1",
    ]


# ---------------------------------------------------------------- per-row faults: eval labels


@pytest.mark.parametrize("label", [3, -1, 100])
def test_eval_label_out_of_range_is_refused(pairs, write_parquet, dataset_dir, classes_json, label):
    path = write_parquet(pairs(3, label=[0, label, 2]), "ds/part-00000.parquet")

    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir))
    assert str(e.value) == f"{path} row 1: label is {label}, outside 0..2 (classes.json has 3 classes). {ROW_REMEDY}"


def test_eval_null_label_is_refused(pairs, write_parquet, dataset_dir, classes_json):
    path = write_parquet(pairs(3, label=[0, None, 2]), "ds/part-00000.parquet")

    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir))
    assert str(e.value) == f"{path} row 1: label is missing (classes.json has 3 classes). {ROW_REMEDY}"


def test_eval_bad_labels_are_set_aside_with_quarantine(pairs, write_parquet, dataset_dir, classes_json, qpath):
    t = pairs(5, label=[0, 3, None, -1, 2])
    path = write_parquet(t, "ds/part-00000.parquet")

    ps, classes = read_eval_set(str(dataset_dir), quarantine=qpath)
    assert classes.classes == CLASSES
    assert ps.table["uid"].to_pylist() == ["p-0", "p-4"]
    assert ps.table["label"].to_pylist() == [0, 2]
    q = _assert_set_aside(ps, qpath, [t], {"bad label": 3}, [(path, 1), (path, 2), (path, 3)])
    assert q["label"].to_pylist() == [3, None, -1]


def test_labels_are_not_range_checked_outside_eval_sets(pairs, write_parquet, dataset_dir):
    write_parquet(pairs(2, label=[-5, 99]), "ds/part-00000.parquet")

    assert read_pairs(str(dataset_dir)).table["label"].to_pylist() == [-5, 99]


def test_uint64_label_that_does_not_fit_int64_is_refused_with_contract_error(pairs, write_parquet, dataset_dir):
    path = write_parquet(pairs(2, label=pa.array([0, 2**63], pa.uint64())), "ds/part-00000.parquet")

    assert path in _refusal(str(dataset_dir))


# ---------------------------------------------------------------- mixed faults across files


def test_mixed_faults_across_files_are_counted_by_kind(pairs, write_parquet, dataset_dir, png, qpath):
    t0 = pairs(3, uid=["a", "b", "c"], caption=["ok", " ", "ok"], image=[png(0), png(1), b"not an image"])
    t1 = pairs(3, prefix="q", uid=["a", "d", ""])
    first = write_parquet(t0, "ds/part-00000.parquet")
    second = write_parquet(t1, "ds/part-00001.parquet")

    ps = read_pairs(str(dataset_dir), quarantine=qpath)
    assert ps.table["uid"].to_pylist() == ["a", "d"]
    assert ps.files == [first, second]
    _assert_set_aside(
        ps,
        qpath,
        [t0, t1],
        {"empty caption": 1, "undecodable image": 1, "duplicate uid": 1, "missing uid": 1},
        [(first, 1), (first, 2), (second, 0), (second, 2)],
    )


# ---------------------------------------------------------------- classes.json


def _write_classes(dataset_dir, text: str) -> str:
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / CLASSES_FILE).write_text(text)
    return posixpath.join(str(dataset_dir), CLASSES_FILE)


@pytest.mark.parametrize(
    "templates",
    [["a photo of a cat"], ["a {} and a {}"], ["a photo of a {}.", "a {0} shape"]],
    ids=["no_slot", "two_slots", "one_bad_of_two"],
)
def test_template_without_exactly_one_slot_is_refused(pairs, write_parquet, dataset_dir, templates):
    write_parquet(pairs(2), "ds/part-00000.parquet")
    cj = _write_classes(dataset_dir, json.dumps({"classes": CLASSES, "templates": templates}))
    bad = [t for t in templates if t.count("{}") != 1]

    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir))
    msg = str(e.value)
    assert msg.startswith(f"{cj}: templates: ")
    assert "needs exactly one '{}' for the class name" in msg
    assert "{{}}" not in msg  # the f-string escape must not leak into the message
    assert f"fix {bad}" in msg
    assert isinstance(e.value.__cause__, ValidationError)


@pytest.mark.parametrize(
    "classes", [["cat", "dog", "cat"], [], ["cat", "  "]], ids=["duplicate", "empty_list", "blank_name"]
)
def test_bad_class_names_are_refused(pairs, write_parquet, dataset_dir, classes):
    write_parquet(pairs(2), "ds/part-00000.parquet")
    cj = _write_classes(dataset_dir, json.dumps({"classes": classes}))

    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir))
    msg = str(e.value)
    assert msg.startswith(f"{cj}: classes: ")
    assert "must be a non-empty list of distinct, non-empty class names" in msg


def test_classes_json_that_is_not_json_is_refused(pairs, write_parquet, dataset_dir):
    write_parquet(pairs(2), "ds/part-00000.parquet")
    cj = _write_classes(dataset_dir, '{"classes": ["cat", "dog"')

    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir))
    assert str(e.value).startswith(f"{cj}: not valid JSON (")
    assert isinstance(e.value.__cause__, json.JSONDecodeError)


def test_missing_classes_json_is_refused(pairs, write_parquet, dataset_dir):
    write_parquet(pairs(2), "ds/part-00000.parquet")

    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir))
    assert str(e.value) == (f"{posixpath.join(str(dataset_dir), CLASSES_FILE)}: file not found; check the path, "
                            "or write it (see the data contract in the README).")


# ---------------------------------------------------------------- messages that do not yet say what to do

_ACTION = re.compile(r"\b(fix|rename|convert|cast|re-?export|remove|check|run|regenerate|recreate|write|add)\b", re.I)


def _message_for(case: str, pairs, write_parquet, dataset_dir) -> tuple[str, str]:
    """(path the message starts with, message) for a fault whose message lacks advice today."""
    if case == "image_as_string":
        path = write_parquet(pairs(2, image=pa.array(["x.png", "y.png"])), "ds/part-00000.parquet")
        return path, _refusal(str(dataset_dir))
    write_parquet(pairs(2), "ds/part-00000.parquet")
    cj = posixpath.join(str(dataset_dir), CLASSES_FILE)
    if case == "classes_not_json":
        _write_classes(dataset_dir, "{oops")
    with pytest.raises(DataContractError) as e:
        read_eval_set(str(dataset_dir))
    return cj, str(e.value)


@pytest.mark.parametrize("case", ["image_as_string", "classes_not_json", "classes_missing"])
def test_message_says_what_to_do(pairs, write_parquet, dataset_dir, case):
    path, msg = _message_for(case, pairs, write_parquet, dataset_dir)

    assert msg.startswith(path)
    assert _ACTION.search(msg.removeprefix(path)), msg
