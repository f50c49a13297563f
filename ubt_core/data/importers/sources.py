"""Readers of the formats users already have, each yielding raw rows for `PairSink`.

A row is (uid, image bytes or None, caption or None, source file, row number, fault or None). Readers
stream: nothing holds more than one shard's current sample or one Parquet batch in memory.
"""

from __future__ import annotations

import csv
import json
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from pyarrow.fs import FileSelector

from ubt_core.data.contract import DataContractError, filesystem

Row = tuple[str | None, bytes | None, str | None, str, int, tuple[str, str] | None]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _listing(uri: str, suffix: str) -> list[str]:
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type.name == "NotFound":
        raise DataContractError(f"{uri}: no such file or directory.")
    if info.type.name == "File":
        return [root]
    paths = sorted(f.path for f in fs.get_file_info(FileSelector(root, recursive=True)) if f.path.endswith(suffix))
    if not paths:
        raise DataContractError(f"{uri}: no *{suffix} files found; check --source and --format.")
    return paths


def webdataset_rows(uri: str) -> Iterator[Row]:
    """img2dataset / WebDataset tar shards: members grouped by key (`KEY.jpg`, `KEY.txt`, `KEY.json`)."""
    fs, _ = filesystem(uri)
    for path in _listing(uri, ".tar"):
        try:
            yield from _shard_rows(fs, path)
        except (tarfile.TarError, EOFError) as e:
            raise DataContractError(f"{path}: not a readable tar shard ({e}); re-download it or move it out of "
                                    "--source; the import stopped and its output is incomplete.") from None


def _shard_rows(fs, path: str) -> Iterator[Row]:
    with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        key, sample, index = None, {}, 0
        for member in tar:
            if not member.isfile():
                continue
            name = posixpath.basename(member.name)
            stem, _, ext = name.partition(".")
            member_key = posixpath.join(posixpath.dirname(member.name), stem)
            if member_key != key and key is not None:
                yield _sample_row(key, sample, path, index)
                index, sample = index + 1, {}
            key = member_key
            sample[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield _sample_row(key, sample, path, index)


def _sample_row(key: str, sample: dict[str, bytes], path: str, index: int) -> Row:
    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    fault = None
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        caption = sample["txt"].decode("utf-8") if "txt" in sample else meta.get("caption")
    except UnicodeDecodeError as e:
        meta, caption, fault = {}, None, ("caption not UTF-8", f"sample {key!r}: text is not UTF-8 ({e.reason})")
    except json.JSONDecodeError as e:
        meta, caption, fault = {}, None, ("bad metadata", f"sample {key!r}: .json member is not JSON ({e.msg})")
    if image is None:
        fault = ("missing image", f"sample {key!r} has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
    uid = str(meta.get("key") or posixpath.basename(key))
    return uid, image, caption, path, index, fault


def parquet_rows(uri: str, image_key: str = "jpg", caption_key: str = "txt", uid_key: str = "key") -> Iterator[Row]:
    """Parquet with image bytes inside (img2dataset `--output_format parquet`), read batch by batch."""
    fs, _ = filesystem(uri)
    for path in _listing(uri, ".parquet"):
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            missing = {image_key, caption_key, uid_key} - set(parquet.schema_arrow.names)
            if missing:
                raise DataContractError(f"{path}: columns {sorted(missing)} not found (has "
                                        f"{', '.join(parquet.schema_arrow.names)}); pass --image-key, "
                                        "--caption-key and --uid-key.")
            row = 0
            for batch in parquet.iter_batches(columns=[uid_key, image_key, caption_key], batch_size=1024):
                for uid, image, caption in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                    yield (None if uid is None else str(uid)), image, caption, path, row, None
                    row += 1


def csv_rows(path: str, image_key: str = "filepath", caption_key: str = "title", sep: str = "\t",
             image_root: str | None = None) -> Iterator[Row]:
    """open_clip CSV/TSV (`filepath`/`title`, tab-separated) or CleanCLIP CSV (`image`/`caption`, comma).

    Relative image paths resolve against `image_root` (default: the CSV's own folder). The uid is the
    image path relative to that root, without extension.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataContractError(f"{path}: no such CSV file.")
    root = Path(image_root) if image_root else csv_path.parent
    with csv_path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        header = f.readline()
        names = next(csv.reader([header], delimiter=sep))
        if image_key not in names or caption_key not in names:
            other = next((s for s in ("\t", ",", ";", "|") if s != sep and s in header), None)
            hint = (f" The header splits on {other!r}, not {sep!r}: pass --sep {other!r}." if other else
                    f" Pass --image-key / --caption-key (found columns: {', '.join(names)}).")
            raise DataContractError(f"{path}: header has no {image_key!r} and {caption_key!r} columns.{hint}")
        reader = csv.DictReader(f, fieldnames=names, delimiter=sep)
        for row, record in enumerate(reader, start=1):
            rel = record.get(image_key) or ""
            image_path = Path(rel) if Path(rel).is_absolute() else root / rel
            try:
                image, fault = image_path.read_bytes(), None
            except OSError as e:
                image, fault = None, ("missing image file", f"image file {str(image_path)!r} unreadable ({e.strerror})")
            uid = str(Path(rel).with_suffix("")) if rel else None
            caption = record.get(caption_key)
            if fault is None and caption is not None and not _is_utf8(caption):
                caption, fault = None, ("caption not UTF-8", "caption has bytes that are not UTF-8")
            yield uid, image, caption, path, row, fault


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes from a non-UTF-8 file
        return False
    return True


def image_folder_rows(root: str, class_names: list[str]) -> Iterator[tuple[Row, int]]:
    """One sub-folder per class (sorted folder names are class indices); rows carry the class index."""
    base = Path(root)
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    if len(folders) != len(class_names):
        raise DataContractError(f"{root}: {len(folders)} class folders but {len(class_names)} class names; "
                                "give one name per folder, in sorted folder order.")
    for label, folder in enumerate(folders):
        for row, image_path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
            caption = f"a photo of a {class_names[label]}."
            uid = str(image_path.relative_to(base).with_suffix(""))
            yield (uid, image_path.read_bytes(), caption, str(folder), row, None), label
