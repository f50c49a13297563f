"""Streaming sink for importers: validates each row against the contract, writes part files as it goes
and quarantines or refuses faulty rows, counted by reason.

Memory stays flat in the number of rows: only one part file's rows are buffered, and duplicate uids
are found against a sorted array of 64-bit uid hashes (8 bytes per row seen), batch by batch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ubt_core.data.contract import PAIR_SCHEMA, QUARANTINE_SCHEMA, DataContractError, filesystem, row_fault, write_table


@dataclass
class ImportReport:
    rows_in: int = 0
    rows_out: int = 0
    quarantined: Counter = field(default_factory=Counter)  # reason -> rows set aside
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "quarantined": dict(self.quarantined),
                "files": len(self.files)}


def uid_hash(uid: str) -> int:
    """64-bit hash of a uid (a collision among a billion uids has odds below 1 in 30,000)."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "little")


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
        self._where: list[tuple[str, int]] = []  # (source, row) of each buffered row
        self._bad: list[dict] = []
        self._seen = np.empty(0, np.uint64)  # sorted hashes of the uids written so far
        fs, root = filesystem(out_uri)
        fs.create_dir(root, recursive=True)

    def add(self, uid: str | None, image: bytes | None, caption: str | None, *, source: str, row: int,
            label: int | None = None, fault: tuple[str, str] | None = None) -> None:
        """Validate and buffer one row; `fault` is a problem the importer already found (kind, detail)."""
        self.report.rows_in += 1
        values = {"uid": uid, "image": image, "caption": caption, "label": label, "poisoned": None}
        fault = fault or row_fault(uid, image, caption, label, self.n_classes, None)
        if fault is not None:
            self._reject(values, fault, source, row)
            return
        self._rows.append(values)
        self._where.append((source, row))
        if len(self._rows) >= self.rows_per_file:
            self._flush()

    def _reject(self, values: dict, fault: tuple[str, str], source: str, row: int) -> None:
        kind, detail = fault
        if self.quarantine is None:
            raise DataContractError(f"{source} row {row}: {detail}. Fix the input, or pass --quarantine FILE "
                                    "to set such rows aside.")
        self.report.quarantined[kind] += 1
        self._bad.append(values | {"reason": detail, "source_file": source, "source_row": row})

    def _flush(self) -> None:
        hashes = np.array([uid_hash(r["uid"]) for r in self._rows], np.uint64)
        _, first = np.unique(hashes, return_index=True)
        repeated_in_batch = np.ones(len(hashes), bool)
        repeated_in_batch[first] = False
        seen_before = np.zeros(len(hashes), bool)
        if len(self._seen):
            position = np.minimum(np.searchsorted(self._seen, hashes), len(self._seen) - 1)
            seen_before = self._seen[position] == hashes
        keep = []
        for i, duplicate in enumerate(repeated_in_batch | seen_before):
            if duplicate:
                self._reject(self._rows[i], ("duplicate uid", f"uid {self._rows[i]['uid']!r} was already imported"),
                             *self._where[i])
            else:
                keep.append(self._rows[i])
        if keep:
            path = f"{self.root.rstrip('/')}/part-{len(self.report.files):05d}.parquet"
            write_table(pa.Table.from_pylist(keep, schema=PAIR_SCHEMA), path)
            self.report.files.append(path)
            self.report.rows_out += len(keep)
        self._seen = np.union1d(self._seen, hashes)
        self._rows, self._where = [], []

    def close(self) -> ImportReport:
        """Write what is buffered (and the quarantine file); refuse an import that produced no rows."""
        if self._rows:
            self._flush()
        if self.quarantine is not None:
            write_table(pa.Table.from_pylist(self._bad, schema=QUARANTINE_SCHEMA), self.quarantine)
        if self.report.rows_out == 0:
            raise DataContractError(f"{self.root}: the import produced no valid rows ({self.report.rows_in} read, "
                                    f"quarantined: {dict(self.report.quarantined) or 'none'}); check the source "
                                    "path and format options.")
        return self.report
