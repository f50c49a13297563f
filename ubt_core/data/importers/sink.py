"""Streaming sink for importers: validates each row against the contract, writes part files as it goes
(memory stays flat whatever the input size) and quarantines or refuses faulty rows, counted by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from ubt_core.data.contract import (
    PAIR_SCHEMA,
    QUARANTINE_SCHEMA,
    DataContractError,
    filesystem,
    row_fault,
    write_table,
)


@dataclass
class ImportReport:
    rows_in: int = 0
    rows_out: int = 0
    quarantined: Counter = field(default_factory=Counter)  # reason -> rows set aside
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "quarantined": dict(self.quarantined),
                "files": len(self.files)}


class PairSink:
    """Collects imported rows into `part-NNNNN.parquet` files under `out_uri`."""

    def __init__(self, out_uri: str, *, quarantine: str | None = None, n_classes: int | None = None,
                 rows_per_file: int = 10_000):
        self.root = out_uri
        self.quarantine = quarantine
        self.n_classes = n_classes
        self.rows_per_file = rows_per_file
        self.report = ImportReport()
        self._rows: list[dict] = []
        self._bad: list[dict] = []
        self._seen: dict[str, str] = {}
        fs, root = filesystem(out_uri)
        fs.create_dir(root, recursive=True)

    def add(self, uid: str | None, image: bytes | None, caption: str | None, *, source: str, row: int,
            label: int | None = None, fault: tuple[str, str] | None = None) -> None:
        """Validate and buffer one row; `fault` is a problem the importer already found (kind, detail)."""
        self.report.rows_in += 1
        fault = fault or row_fault(uid, image, caption, label, self.n_classes, self._seen)
        values = {"uid": uid, "image": image, "caption": caption, "label": label, "poisoned": None}
        if fault is not None:
            kind, detail = fault
            if self.quarantine is None:
                raise DataContractError(f"{source} row {row}: {detail}. Fix the input, or pass --quarantine FILE "
                                        "to set such rows aside.")
            self.report.quarantined[kind] += 1
            self._bad.append(values | {"reason": detail, "source_file": source, "source_row": row})
            return
        self._seen[uid] = f"{source} row {row}"
        self._rows.append(values)
        if len(self._rows) >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        path = f"{self.root.rstrip('/')}/part-{len(self.report.files):05d}.parquet"
        write_table(pa.Table.from_pylist(self._rows, schema=PAIR_SCHEMA), path)
        self.report.files.append(path)
        self.report.rows_out += len(self._rows)
        self._rows = []

    def close(self) -> ImportReport:
        """Write what is buffered (and the quarantine file); refuse an import that produced no rows."""
        self._flush()
        if self.quarantine is not None:
            write_table(pa.Table.from_pylist(self._bad, schema=QUARANTINE_SCHEMA), self.quarantine)
        if self.report.rows_out == 0:
            raise DataContractError(f"{self.root}: the import produced no valid rows ({self.report.rows_in} read, "
                                    f"quarantined: {dict(self.report.quarantined) or 'none'}); check the source "
                                    "path and format options.")
        return self.report
