"""The download ledger: one row per input row, stored as part files and read lazily.

A download (or import) stage folder keeps its ledger as ``ledger/part-NNNNN.parquet``: the rows in
row order, a part's worth (``rows_per_file``) per file, one arrow schema for all.  Readers never
assume one file: :func:`ledger_dataset` concatenates the files lazily (a ``pyarrow.dataset``),
:func:`read_ledger` reads the columns (and rows) a reader asks for, :func:`iter_ledger` streams
batches.  A folder written before this layout (one ``ledger.parquet``) reads the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

LEDGER_DIR = "ledger"
LEGACY_FILE = "ledger.parquet"


def ledger_location(folder: str | Path) -> Path:
    """Where ``folder``'s ledger is: its ``ledger/`` part files, else a single ``ledger.parquet``."""
    folder = Path(folder)
    parts = folder / LEDGER_DIR
    if parts.is_dir() and any(parts.glob("part-*.parquet")):
        return parts
    if (folder / LEGACY_FILE).is_file():
        return folder / LEGACY_FILE
    raise FileNotFoundError(f"no download ledger in {folder}: neither {parts}/part-*.parquet nor "
                            f"{folder / LEGACY_FILE} exists (is it a download or import stage folder?)")


def ledger_files(folder: str | Path) -> list[Path]:
    loc = ledger_location(folder)
    return sorted(loc.glob("part-*.parquet")) if loc.is_dir() else [loc]


def ledger_dataset(folder: str | Path) -> pds.Dataset:
    """The ledger of a stage folder as one lazy dataset over its files, in row order."""
    return pds.dataset([str(p) for p in ledger_files(folder)], format="parquet")


def read_ledger(folder: str | Path, columns: Sequence[str] | None = None,
                filter: pds.Expression | None = None) -> pd.DataFrame:
    """The ledger's ``columns`` (all by default) as a frame, rows optionally restricted by ``filter``."""
    dset = ledger_dataset(folder)
    if columns is not None:
        missing = [c for c in columns if c not in dset.schema.names]
        if missing:
            raise ValueError(f"the ledger in {ledger_location(folder)} lacks column(s) {missing}; "
                             f"it has {dset.schema.names}")
    return dset.to_table(columns=list(columns) if columns is not None else None, filter=filter).to_pandas()


def iter_ledger(folder: str | Path, columns: Sequence[str] | None = None,
                batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The ledger as record batches (bounded memory), in row order."""
    yield from ledger_dataset(folder).to_batches(columns=list(columns) if columns is not None else None,
                                                 batch_size=batch_rows)


def count_rows(folder: str | Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in ledger_files(folder))


def write_ledger(folder: str | Path, ledger: pd.DataFrame | pa.Table, rows_per_file: int) -> list[Path]:
    """Write ``ledger`` (rows in row order) as ``folder/ledger/part-NNNNN.parquet``, ``rows_per_file``
    rows each, one schema for every file; each file atomically.  An empty ledger is one empty file."""
    folder = Path(folder)
    table = ledger if isinstance(ledger, pa.Table) else pa.Table.from_pandas(ledger, preserve_index=False)
    out = folder / LEDGER_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    step = max(1, int(rows_per_file))
    paths = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), step)):
        path = out / f"part-{i:05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(table.slice(start, step), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    return paths


def compact_copy(folder: str | Path, columns: Sequence[str], dest: Path, batch_rows: int = 65_536) -> Path:
    """Stream ``columns`` of the ledger into one parquet file ``dest`` (for a reader that takes a file
    path, such as the dedup stage's ``run_dedup``); memory: one batch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dset = ledger_dataset(folder)
    schema = pa.schema([dset.schema.field(c) for c in columns])
    with pq.ParquetWriter(dest, schema) as w:
        for batch in dset.to_batches(columns=list(columns), batch_size=batch_rows):
            w.write_batch(batch)
    return dest


class LedgerWriter:
    """Write a ledger part by part as its rows arrive (in row order): every ``rows_per_file`` rows
    become ``folder/ledger/part-NNNNN.parquet`` (atomically, one ``schema`` for all), so a writer
    holds at most one part's rows.  :meth:`close` writes the rest (an empty ledger: one empty file)
    and returns the paths.  Same files as :func:`write_ledger` of the whole ledger."""

    def __init__(self, folder: str | Path, rows_per_file: int, schema: pa.Schema) -> None:
        self.out = Path(folder) / LEDGER_DIR
        self.out.mkdir(parents=True, exist_ok=True)
        for old in self.out.glob("part-*.parquet"):
            old.unlink()
        self.step = max(1, int(rows_per_file))
        self.schema = schema
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.rows = 0
        self.paths: list[Path] = []

    def add(self, rows: pd.DataFrame | pa.Table) -> None:
        t = rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(rows, schema=self.schema,
                                                                         preserve_index=False)
        t = t.cast(self.schema) if t.schema != self.schema else t
        self.pending.append(t)
        self.n_pending += t.num_rows
        self.rows += t.num_rows
        while self.n_pending >= self.step:
            self._flush(self.step)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        path = self.out / f"part-{len(self.paths):05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(table.slice(0, n), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.paths.append(path)
        rest = table.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.n_pending = rest.num_rows

    def close(self) -> list[Path]:
        if self.n_pending or not self.paths:
            self._flush(self.n_pending)
        return self.paths
