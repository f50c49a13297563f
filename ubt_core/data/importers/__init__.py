"""Import the formats users already have into the pair-dataset contract (`ubt data import`).

Pair datasets: img2dataset / WebDataset tar shards, Parquet with image bytes (img2dataset's Parquet
output), open_clip CSV/TSV and CleanCLIP CSV. Eval sets: an image folder with one sub-folder per class.
Every importer streams into part files, and faulty rows are refused or quarantined and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ubt_core.data.contract import CLASSES_FILE, DataContractError, EvalClasses, write_json
from ubt_core.data.importers.sink import ImportReport, PairSink
from ubt_core.data.importers.sources import csv_rows, image_folder_rows, parquet_rows, webdataset_rows

Format = Literal["webdataset", "parquet", "csv", "cleanclip-csv"]


class ImportConfig(BaseModel):
    """Where the columns are; defaults follow each format's own tool."""

    model_config = ConfigDict(extra="forbid")

    image_key: str | None = None  # csv: "filepath" (open_clip), cleanclip-csv: "image", parquet: "jpg"
    caption_key: str | None = None  # csv: "title", cleanclip-csv: "caption", parquet: "txt"
    uid_key: str = "key"  # parquet only
    sep: str | None = None  # csv: tab (open_clip's default), cleanclip-csv: comma
    image_root: str | None = None  # csv: folder relative image paths start from (default: the CSV's)
    rows_per_file: int = 10_000


_CSV_DEFAULTS = {"csv": ("filepath", "title", "\t"), "cleanclip-csv": ("image", "caption", ",")}


def import_pairs(fmt: Format, source: str, out: str, cfg: ImportConfig | None = None,
                 quarantine: str | None = None) -> ImportReport:
    """Convert `source` (format `fmt`) into a pair dataset at `out`; returns the row counts."""
    cfg = cfg or ImportConfig()
    if fmt == "webdataset":
        rows = webdataset_rows(source)
    elif fmt == "parquet":
        rows = parquet_rows(source, cfg.image_key or "jpg", cfg.caption_key or "txt", cfg.uid_key)
    else:
        image_key, caption_key, sep = _CSV_DEFAULTS[fmt]
        rows = csv_rows(source, cfg.image_key or image_key, cfg.caption_key or caption_key, cfg.sep or sep,
                        cfg.image_root)
    sink = PairSink(out, quarantine=quarantine, rows_per_file=cfg.rows_per_file)
    for uid, image, caption, path, row, fault in rows:
        sink.add(uid, image, caption, source=path, row=row, fault=fault)
    return sink.close()


def import_image_folder(source: str, out: str, class_names: list[str] | None = None,
                        templates: list[str] | None = None, quarantine: str | None = None) -> ImportReport:
    """Convert an image folder (one sub-folder per class) into an eval set with `classes.json`."""
    if not Path(source).is_dir():
        raise DataContractError(f"{source}: no such folder; pass the folder that holds one sub-folder per class.")
    folders = sorted(p.name for p in Path(source).iterdir() if p.is_dir())
    classes = EvalClasses(classes=class_names or folders, **({"templates": templates} if templates else {}))
    sink = PairSink(out, quarantine=quarantine, n_classes=len(classes.classes))
    for (uid, image, caption, path, row, fault), label in image_folder_rows(source, classes.classes):
        sink.add(uid, image, caption, source=path, row=row, label=label, fault=fault)
    report = sink.close()
    write_json(classes.model_dump(), f"{out.rstrip('/')}/{CLASSES_FILE}")
    return report


__all__ = ["ImportConfig", "ImportReport", "import_image_folder", "import_pairs"]
