"""Importers: the same pairs written as WebDataset shards, img2dataset Parquet, open_clip TSV, CleanCLIP
CSV and an image folder all import to the same pair set; bad rows are refused or quarantined and counted."""

import csv
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ubt_core.data.contract import DataContractError, read_eval_set, read_pairs
from ubt_core.data.importers import ImportConfig, import_image_folder, import_pairs


@pytest.fixture(scope="module")
def source(tiny_world) -> list[tuple[str, bytes, str]]:
    table = read_pairs(tiny_world["train"]).table
    return list(zip(*(table.column(c).to_pylist() for c in ("uid", "image", "caption")), strict=True))


def _pair_set(uri: str) -> set[tuple[str, bytes, str]]:
    table = read_pairs(uri).table
    return set(zip(*(table.column(c).to_pylist() for c in ("uid", "image", "caption")), strict=True))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(rows, folder: Path, shards: int = 2, extra=()) -> Path:
    folder.mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for uid, image, caption in rows[shard::shards]:
                _add(tar, f"{uid}.png", image)
                _add(tar, f"{uid}.txt", caption.encode())
                _add(tar, f"{uid}.json", json.dumps({"key": uid, "status": "success"}).encode())
            for name, data in extra if shard == 0 else ():
                _add(tar, name, data)
    return folder


def write_csv(rows, folder: Path, keys=("filepath", "title"), sep="\t") -> Path:
    (folder / "images").mkdir(parents=True)
    with (folder / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(keys)
        for uid, image, caption in rows:
            (folder / "images" / f"{uid}.png").write_bytes(image)
            writer.writerow([f"{uid}.png", caption])
    return folder / "data.csv"


def test_every_pair_format_imports_to_the_same_pairs(source, tmp_path):
    expected = set(source)
    import_pairs("webdataset", str(write_webdataset(source, tmp_path / "wds")), str(tmp_path / "a"),
                 ImportConfig(rows_per_file=30))
    assert _pair_set(str(tmp_path / "a")) == expected
    assert len(list((tmp_path / "a").glob("part-*.parquet"))) == 3  # streamed in parts of 30

    uids, images, captions = map(list, zip(*source, strict=True))
    pq.write_table(pa.table({"key": uids, "jpg": images, "txt": captions, "status": ["success"] * len(uids)}),
                   tmp_path / "img2dataset.parquet")
    import_pairs("parquet", str(tmp_path / "img2dataset.parquet"), str(tmp_path / "b"))
    assert _pair_set(str(tmp_path / "b")) == expected

    tsv = write_csv(source, tmp_path / "openclip")
    import_pairs("csv", str(tsv), str(tmp_path / "c"), ImportConfig(image_root=str(tmp_path / "openclip" / "images")))
    assert _pair_set(str(tmp_path / "c")) == expected

    cleanclip = write_csv(source, tmp_path / "cleanclip", keys=("image", "caption"), sep=",")
    import_pairs("cleanclip-csv", str(cleanclip), str(tmp_path / "d"),
                 ImportConfig(image_root=str(tmp_path / "cleanclip" / "images")))
    assert _pair_set(str(tmp_path / "d")) == expected


def test_image_folder_imports_as_an_eval_set(tiny_world, tmp_path):
    pairs, classes = read_eval_set(tiny_world["eval"])
    table = pairs.table
    for uid, image, label in zip(*(table.column(c).to_pylist() for c in ("uid", "image", "label")), strict=True):
        folder = tmp_path / "folder" / classes.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{uid}.png").write_bytes(image)
    for name in classes.classes:  # a class without images still has its folder
        (tmp_path / "folder" / name).mkdir(parents=True, exist_ok=True)
    report = import_image_folder(str(tmp_path / "folder"), str(tmp_path / "eval"), templates=["a {} shape."])
    imported, imported_classes = read_eval_set(str(tmp_path / "eval"))
    assert report.rows_out == table.num_rows and imported_classes.templates == ["a {} shape."]
    got = {(uid.split("/")[-1], imported_classes.classes[label]) for uid, label in
           zip(imported.table.column("uid").to_pylist(), imported.table.column("label").to_pylist(), strict=True)}
    want = {(uid, classes.classes[label]) for uid, label in
            zip(table.column("uid").to_pylist(), table.column("label").to_pylist(), strict=True)}
    assert got == want


def test_wrong_csv_separator_names_the_fix(source, tmp_path):
    commas = write_csv(source[:3], tmp_path / "x", sep=",")
    with pytest.raises(DataContractError, match=r"splits on ',', not '\\t': pass --sep ','"):
        import_pairs("csv", str(commas), str(tmp_path / "out"))


def test_bad_rows_are_refused_or_quarantined_and_nothing_else_is_lost(source, tmp_path):
    extra = [("broken.png", b"\x89PNG truncated"), ("broken.txt", b"a caption"),
             ("noimage.txt", b"a caption without its image"),
             ("latin.png", source[0][1]), ("latin.txt", "caf\xe9".encode("latin-1")),
             (f"{source[0][0]}.png", source[1][1]), (f"{source[0][0]}.txt", b"same uid again")]
    shards = write_webdataset(source, tmp_path / "wds", extra=extra)
    with pytest.raises(DataContractError, match=r"00000\.tar row \d+: "):
        import_pairs("webdataset", str(shards), str(tmp_path / "strict"))
    report = import_pairs("webdataset", str(shards), str(tmp_path / "out"), quarantine=str(tmp_path / "q.parquet"))
    assert report.rows_in == len(source) + 4
    assert report.rows_out == len(source) and report.rows_out + sum(report.quarantined.values()) == report.rows_in
    assert dict(report.quarantined) == {"undecodable image": 1, "missing image": 1, "caption not UTF-8": 1,
                                        "duplicate uid": 1}
    assert pq.read_table(tmp_path / "q.parquet").num_rows == 4


def test_missing_csv_image_file_is_quarantined(source, tmp_path):
    tsv = write_csv(source[:5], tmp_path / "c")
    (tmp_path / "c" / "images" / f"{source[2][0]}.png").unlink()
    cfg = ImportConfig(image_root=str(tmp_path / "c" / "images"))
    report = import_pairs("csv", str(tsv), str(tmp_path / "out"), cfg, quarantine=str(tmp_path / "q.parquet"))
    assert report.rows_out == 4 and dict(report.quarantined) == {"missing image file": 1}


def test_empty_or_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataContractError, match="no such file or directory"):
        import_pairs("webdataset", str(tmp_path / "nothing"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataContractError, match=r"no \*\.tar files"):
        import_pairs("webdataset", str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(DataContractError, match="no such folder"):
        import_image_folder(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_duplicates_are_found_across_part_files_and_the_first_copy_is_kept(source, tmp_path):
    rows = list(source[:5]) + [source[1], source[4]]  # repeats land in later part files
    shards = write_webdataset(rows, tmp_path / "wds", shards=1)
    report = import_pairs("webdataset", str(shards), str(tmp_path / "out"), ImportConfig(rows_per_file=2),
                          quarantine=str(tmp_path / "q.parquet"))
    assert report.rows_out == 5 and dict(report.quarantined) == {"duplicate uid": 2}
    assert _pair_set(str(tmp_path / "out")) == set(source[:5])


def test_import_benchmark_reports_every_size_in_its_doc_section(tmp_path):
    from ubt_core.data.importers.bench import run_import_bench

    doc = tmp_path / "performance.md"
    markdown = run_import_bench(str(tmp_path / "work"), [30, 60], str(doc))
    rows = [line for line in markdown.splitlines() if line.startswith("| 30 ") or line.startswith("| 60 ")]
    assert [row.split("|")[2].strip() for row in rows] == ["30", "60"]  # rows written
    assert "<!-- import:webdataset:begin -->" in doc.read_text()


def test_a_truncated_shard_is_a_clear_error(source, tmp_path):
    shards = write_webdataset(source, tmp_path / "wds", shards=1)
    tar = shards / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(DataContractError, match=r"00000\.tar: not a readable tar shard"):
        import_pairs("webdataset", str(shards), str(tmp_path / "out"))
