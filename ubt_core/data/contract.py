"""The pair-dataset contract: a directory (local path or s3:// URI) of Parquet files.

Columns: `uid` (string, unique), `image` (encoded PNG/JPEG bytes), `caption` (non-empty string), and
optionally `label` (int) and `poisoned` (bool, ground truth for benchmarks). An eval set adds `label`
to every row and a `classes.json` with class names and prompt templates.

Reading validates everything. Schema faults always raise. Per-row faults (undecodable image, empty
caption, duplicate uid, label out of range) raise with file and row, or, when a quarantine path is
given, go to that Parquet file with their reason and are counted; no row is ever dropped silently.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError, field_validator

from ubt_core.data.images import decode_image
from ubt_core.errors import UbtError

CLASSES_FILE = "classes.json"
REQUIRED = ("uid", "image", "caption")
ACCEPTED_TYPES = {  # column -> (type name for messages, Arrow type checks it may pass; large ones are cast)
    "uid": ("string", (pa.types.is_string, pa.types.is_large_string)),
    "image": ("binary", (pa.types.is_binary, pa.types.is_large_binary)),
    "caption": ("string", (pa.types.is_string, pa.types.is_large_string)),
    "label": ("integer", (pa.types.is_integer,)),
    "poisoned": ("bool", (pa.types.is_boolean,)),
}
PAIR_SCHEMA = pa.schema(
    [("uid", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("label", pa.int64()),
     ("poisoned", pa.bool_())]
)
CONVERT_HINT = "convert the data to the pair-dataset contract (README, 'Data contract')"
QUARANTINE_EXTRA = [("reason", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64())]
QUARANTINE_SCHEMA = pa.schema([*PAIR_SCHEMA, *(pa.field(n, t) for n, t in QUARANTINE_EXTRA)])


class DataContractError(UbtError):
    """Input that breaks the pair-dataset contract; the message names the file, row or key."""


class EvalClasses(BaseModel):
    """`classes.json` of an eval set: class names (index = label) and zero-shot prompt templates."""

    classes: list[str]
    templates: list[str] = ["a photo of a {}."]

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v) or any(not c.strip() for c in v):
            raise ValueError("must be a non-empty list of distinct, non-empty class names")
        return v

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t.count("{}") != 1]
        if not v or bad:
            raise ValueError(f"each template needs exactly one '{{}}' for the class name; fix {bad or v}")
        return v


@dataclass
class PairSet:
    """Validated pairs of one dataset, all files concatenated in file order."""

    table: pa.Table
    files: list[str]
    quarantined: Counter = field(default_factory=Counter)  # reason -> rows sent to quarantine

    @property
    def rows_in(self) -> int:
        return self.table.num_rows + sum(self.quarantined.values())


def use_s3_endpoint(endpoint_url: str | None) -> None:
    """Point every s3:// read and write of this process (pyarrow, s3fs, Ray workers it starts) at an
    S3-compatible server; None keeps AWS (or an AWS_ENDPOINT_URL already set)."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a local path or s3:// URI into (pyarrow filesystem, path on it)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), posixpath.abspath(uri)


def list_parquet_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a dataset directory, sorted by name; raises if there are none."""
    fs, root = filesystem(uri)
    try:
        info = fs.get_file_info(root)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False)) if info.type == pafs.FileType.Directory \
            else []
    except OSError as e:  # unreachable endpoint, denied or missing credentials
        raise DataContractError(f"{uri}: cannot list the dataset ({e}); check the address, the S3 endpoint "
                                "(s3.endpoint_url or AWS_ENDPOINT_URL) and the AWS_* credentials.") from e
    if info.type == pafs.FileType.NotFound:
        raise DataContractError(f"{uri}: no such dataset directory; check the path or run `ubt data synth`.")
    if info.type == pafs.FileType.File:
        return fs, [root]
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise DataContractError(f"{uri}: no .parquet files in this directory; is it the right dataset?")
    return fs, files


def _check_schema(path: str, schema: pa.Schema) -> None:
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise DataContractError(
            f"{path}: column(s) {', '.join(missing)} missing (found {', '.join(schema.names)}); "
            f"rename them or {CONVERT_HINT}."
        )
    for name, (type_name, checks) in ACCEPTED_TYPES.items():
        if name in schema.names and not any(check(schema.field(name).type) for check in checks):
            raise DataContractError(
                f"{path}: column {name!r} has type {schema.field(name).type}, expected {type_name}; "
                f"{CONVERT_HINT}."
            )


def row_fault(uid, image, caption, label, n_classes: int | None, seen: dict | None) -> tuple[str, str] | None:
    """(kind, detail) of the first fault in one row, or None; `kind` is what quarantine counts.

    `seen` maps earlier uids to where they were; None leaves duplicate checks to the caller.
    """
    if uid is None or not str(uid).strip():
        return "missing uid", "uid is empty"
    if seen is not None and uid in seen:
        return "duplicate uid", f"uid {uid!r} already used at {seen[uid]}"
    if caption is None or not caption.strip():
        return "empty caption", "caption is empty"
    if n_classes is not None and (label is None or not 0 <= label < n_classes):
        shown = "missing" if label is None else f"{label}, outside 0..{n_classes - 1}"
        return "bad label", f"label is {shown} (classes.json has {n_classes} classes)"
    if image is None:
        return "undecodable image", "image bytes are missing"
    try:
        decode_image(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        return "undecodable image", f"image bytes do not decode ({type(e).__name__}: {e})"
    return None


def _read_file(fs: pafs.FileSystem, path: str) -> pa.Table:
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataContractError(f"{path}: not a readable Parquet file ({e}); re-export or remove it.") from e
    _check_schema(path, table.schema)
    return table


def read_pairs(uri: str, *, quarantine: str | None = None, n_classes: int | None = None) -> PairSet:
    """Read and validate a pair dataset.

    Args:
        uri: dataset directory (or single file), local or s3://.
        quarantine: Parquet path for rows with per-row faults; without it the first fault raises.
        n_classes: when set, every row needs a `label` in [0, n_classes) (eval sets).
    """
    fs, files = list_parquet_files(uri)
    seen: dict[str, str] = {}
    good, bad, reasons = [], [], Counter()
    for path in files:
        table = _read_file(fs, path)
        if n_classes is not None and "label" not in table.column_names:
            raise DataContractError(f"{path}: eval sets need a `label` column (found {', '.join(table.column_names)}); "
                                    "add each image's class index (into classes.json) as `label`.")
        table = _conform(table, path)
        cols = [table.column(c).to_pylist() for c in ("uid", "image", "caption", "label")]
        keep = []
        for row, (uid, image, caption, label) in enumerate(zip(*cols, strict=True)):
            fault = row_fault(uid, image, caption, label, n_classes, seen)
            if fault is None:
                seen[uid] = f"{path} row {row}"
                keep.append(row)
                continue
            kind, detail = fault
            if quarantine is None:
                raise DataContractError(
                    f"{path} row {row}: {detail}. Fix the row, or pass --quarantine FILE to set such rows aside."
                )
            reasons[kind] += 1
            bad.append(_with_reason(table.slice(row, 1), detail, path, row))
        good.append(table.take(keep))
    if quarantine is not None:  # written even when empty, so a stale file never outlives its run
        write_table(pa.concat_tables(bad) if bad else QUARANTINE_SCHEMA.empty_table(), quarantine)
    return PairSet(pa.concat_tables(good), files, reasons)


def read_checked_pairs(uri: str) -> pa.Table:
    """A dataset that already passed `read_pairs` (an earlier stage validated it), without checking every row again.

    File-level checks (readable Parquet, schema) still apply; rows are not decoded.
    """
    fs, files = list_parquet_files(uri)
    return pa.concat_tables([_conform(_read_file(fs, path), path) for path in files])


def _conform(table: pa.Table, path: str) -> pa.Table:
    """Cast to the canonical schema; absent optional columns become nulls."""
    columns = []
    for f in PAIR_SCHEMA:
        if f.name in table.column_names:
            try:
                columns.append(table.column(f.name).cast(f.type))
            except pa.ArrowInvalid as e:
                raise DataContractError(f"{path}: column {f.name!r} does not fit {f.type} ({e}); "
                                        f"store it as {f.type}.") from e
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=PAIR_SCHEMA)


def _with_reason(row: pa.Table, reason: str, path: str, index: int) -> pa.Table:
    for name, dtype in QUARANTINE_EXTRA:
        value = {"reason": reason, "source_file": path, "source_row": index}[name]
        row = row.append_column(pa.field(name, dtype), pa.array([value], dtype))
    return row


@contextmanager
def parquet_writer(path: str) -> Iterator[Callable[[pa.Table], None]]:
    """`with parquet_writer(path) as write: write(table); ...`: one Parquet file written in pieces (the first
    piece sets the schema) under a temporary name, renamed into place only when the block completes."""
    fs, target = filesystem(path)
    parent = posixpath.dirname(target)
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
    writer = None
    with fs.open_output_stream(tmp) as stream:
        def write(table: pa.Table) -> None:
            nonlocal writer
            writer = writer or pq.ParquetWriter(stream, table.schema)
            writer.write_table(table)
        try:
            yield write
            if writer is None:
                raise UbtError(f"{path}: nothing to write (no rows came in); check the input dataset.")
            writer.close()
        except BaseException:
            if writer is not None:
                writer.close()
            stream.close()
            fs.delete_file(tmp)
            raise
    fs.move(tmp, target)


def write_table(table: pa.Table, path: str) -> None:
    """Write one Parquet file atomically (temporary name, then rename), local or s3://."""
    with parquet_writer(path) as write:
        write(table)


def write_pairs(table: pa.Table, uri: str, *, rows_per_file: int = 10_000) -> list[str]:
    """Write pairs as `part-NNNNN.parquet` files under `uri`, each written atomically.

    Args:
        table: rows with the contract's columns (optional ones may be absent).
    """
    fs, root = filesystem(uri)
    fs.create_dir(root, recursive=True)
    table = table.select([f.name for f in PAIR_SCHEMA if f.name in table.column_names])
    paths = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        path = posixpath.join(root, f"part-{i:05d}.parquet")
        write_table(table.slice(start, rows_per_file), path)
        paths.append(path)
    return paths


def write_json(obj: dict, uri: str) -> None:
    """Write a small JSON document atomically (classes.json, manifests)."""
    fs, target = filesystem(uri)
    fs.create_dir(posixpath.dirname(target), recursive=True)
    tmp = target + f".{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(obj, indent=2).encode())
    fs.move(tmp, target)


def read_json(uri: str) -> dict:
    """Read a small JSON document; a missing or malformed file raises with its path."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError as e:
        raise DataContractError(
            f"{uri}: file not found; check the path, or write it (see the data contract in the README)."
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataContractError(f"{uri}: not valid JSON ({e}); fix the file's syntax.") from e


def read_eval_classes(uri: str) -> EvalClasses:
    """Read `classes.json` from an eval-set directory."""
    path = posixpath.join(uri, CLASSES_FILE)
    try:
        return EvalClasses.model_validate(read_json(path))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise DataContractError(f"{path}: {problems}.") from e


def read_eval_set(uri: str, *, quarantine: str | None = None) -> tuple[PairSet, EvalClasses]:
    """Read an eval set: labelled pairs plus `classes.json`; labels must index the class list."""
    classes = read_eval_classes(uri)
    return read_pairs(uri, quarantine=quarantine, n_classes=len(classes.classes)), classes
