"""Reading a ParquetSource: only the files, row groups and columns a request needs.

Retrieval reads a source in two passes (late materialization):

1. :func:`plan_scan` picks the row groups whose statistics overlap the
   request (event time within ``[min t - ttl, max t]``; for a single integer
   key, the entity keys' range) and :meth:`Scan.read` streams their join key
   and timestamp columns to the caller, file by file.
2. :func:`gather` reads the feature columns of only the row groups holding a
   row the join picked, and takes those rows.

Rows are numbered in read order (files in path order, rows in file order),
the order the tie-break rule of DESIGN.md uses.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import StoreError
from .definitions import ParquetSource

__all__ = ["ParquetFiles", "Scan", "plan_scan", "gather", "concat"]

_UNIT_NS = {"MILLIS": 1_000_000, "MICROS": 1_000, "NANOS": 1, "milliseconds": 1_000_000,
            "microseconds": 1_000, "nanoseconds": 1}
#: Arrow's view types (a polars frame exported with CompatLevel.newest() keeps them in the file's schema) are read
#: as the offset types, which every kernel takes: Arrow has no ``take`` for views
_VIEW_AS = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or a URI."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise StoreError(f"cannot open source {path!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def list_files(source: ParquetSource) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, root, the source's Parquet files in read order); the root itself when it is a file.

    Read order is path order, except that the files ``push(to_offline=True)`` adds under ``pushed/`` come
    last, oldest first: a pushed row then wins a tie (same event and created time) offline as it does online,
    where it was written last."""
    fs, root = resolve(source.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise StoreError(f"source path {source.path!r} does not exist")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = sorted((i.path for i in infos if i.type == pafs.FileType.File and not _hidden(i.path[len(root):])),
                       key=lambda path: (path[len(root):].lstrip("/").startswith("pushed/"), path))
    else:
        paths = [root]
    if not paths:
        raise StoreError(f"source path {source.path!r} holds no Parquet files")
    return fs, root, paths


def read_footer(fs: pafs.FileSystem, source: ParquetSource, path: str) -> pq.FileMetaData:
    """One file's Parquet footer (schema, row groups, statistics)."""
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"source {source.path!r}: {path} is not a readable Parquet file: {exc}") from None


class ParquetFiles:
    """The Parquet files of a source in path order, with their footers read once."""

    def __init__(self, source: ParquetSource, threads: int = 1) -> None:
        self.source = source
        self.fs, _, self.paths = list_files(source)
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(self.paths)))) as pool:
            self.metadata: list[pq.FileMetaData] = list(pool.map(self._footer, self.paths))
        self._schemas: list[tuple[str, pa.Schema]] | None = None

    def _footer(self, path: str) -> pq.FileMetaData:
        return read_footer(self.fs, self.source, path)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the first file, with the types :meth:`read` gives."""
        return _readable(self.metadata[0].schema.to_arrow_schema())

    def schemas(self) -> list[tuple[str, pa.Schema]]:
        """(path, Arrow schema) of every file, converted from the footers once (checks and retrieval read them
        per field)."""
        if self._schemas is None:
            self._schemas = [(p, md.schema.to_arrow_schema()) for p, md in zip(self.paths, self.metadata)]
        return self._schemas

    def read(self, index: int, row_groups: Sequence[int], columns: Sequence[str], use_threads: bool) -> pa.Table:
        """``columns`` of some row groups of one file; string and binary views come as large_string and
        large_binary."""
        path = self.paths[index]
        try:
            with self.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f, metadata=self.metadata[index])
                table = pf.read_row_groups(list(row_groups), columns=list(columns), use_threads=use_threads)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"source {self.source.path!r}: reading {path} failed: {exc}") from None
        readable = _readable(table.schema)
        return table if readable.equals(table.schema) else table.cast(readable)


def _readable(schema: pa.Schema) -> pa.Schema:
    """``schema`` with string and binary views as large_string and large_binary."""
    return pa.schema([f.with_type(_VIEW_AS.get(f.type, f.type)) for f in schema], metadata=schema.metadata)


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


@dataclass
class _Part:
    file: int
    row_groups: list[int]
    rg_rows: np.ndarray  # rows in each read row group
    start: int = 0  # read position of the part's first row


@dataclass
class Scan:
    """Pass 1's plan: per file, which row groups to read, and where their rows start in read order."""

    files: ParquetFiles
    parts: list[_Part] = field(default_factory=list)
    n_rows: int = 0

    def read(self, columns: Sequence[str], consume: Callable[[pa.Table, int], None], threads: int) -> None:
        """Read ``columns`` of every planned part and hand each table to ``consume(table, start)``.

        Parts are read and consumed in worker threads and dropped afterwards, so
        only a few files' columns are in memory at once.
        """

        def one(part: _Part) -> None:
            table = self.files.read(part.file, part.row_groups, columns, use_threads=threads > 1)
            if table.num_rows != int(part.rg_rows.sum()):
                raise StoreError(
                    f"source {self.files.source.path!r}: {self.files.paths[part.file]} changed while it was read"
                )
            consume(table, part.start)

        _run(one, self.parts, threads)


def _run(fn: Callable, items: list, threads: int) -> list:
    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(fn, items))
    return [fn(item) for item in items]


def _overlaps(lo: int | None, hi: int | None, want_lo: int | None, want_hi: int | None) -> bool:
    if lo is None or hi is None:
        return True
    if want_hi is not None and lo > want_hi:
        return False
    if want_lo is not None and hi < want_lo:
        return False
    return True


def _column_index(md: pq.FileMetaData, name: str) -> int | None:
    schema = md.schema
    for i in range(len(schema)):
        if schema.column(i).path == name:
            return i
    return None


def _stats_range(md: pq.FileMetaData, rg: int, col: int | None, kind: str) -> tuple[int | None, int | None]:
    """(min, max) of a column chunk in int64 (timestamps in ns), or (None, None) when unknown."""
    if col is None:
        return None, None
    chunk = md.row_group(rg).column(col)
    st = chunk.statistics
    if st is None or not st.has_min_max or st.physical_type != "INT64":
        return None, None
    logical = st.logical_type
    if kind == "int":  # uint64 keys: raw as signed (2**63 + 1 read as negative) and their stats' order uncertain
        unsigned = logical is not None and json.loads(logical.to_json()).get("isSigned") is False
        return (None, None) if unsigned else (int(st.min_raw), int(st.max_raw))
    unit = json.loads(logical.to_json()).get("timeUnit") if logical is not None else None
    scale = _UNIT_NS.get(unit or "")
    if scale is None:
        return None, None
    return int(st.min_raw) * scale, int(st.max_raw) * scale + (scale - 1)


def plan_scan(
    files: ParquetFiles,
    *,
    ts_field: str,
    ts_range: tuple[int | None, int | None],
    int_key: tuple[str, int, int] | None,
) -> Scan:
    """Pass 1's plan: the row groups whose statistics say they can hold a matching row.

    ``ts_range`` is (lowest, highest) event time in ns any entity row can see;
    ``int_key`` is (column, min, max) of a single integer join key on the entity side.
    """
    scan = Scan(files)
    for index, md in enumerate(files.metadata):
        ts_col = _column_index(md, ts_field)
        key_col = _column_index(md, int_key[0]) if int_key else None
        keep, rows = [], []
        for rg in range(md.num_row_groups):
            if md.row_group(rg).num_rows == 0:
                continue
            if not _overlaps(*_stats_range(md, rg, ts_col, "ts"), *ts_range):
                continue
            if int_key and not _overlaps(*_stats_range(md, rg, key_col, "int"), int_key[1], int_key[2]):
                continue
            keep.append(rg)
            rows.append(md.row_group(rg).num_rows)
        if keep:
            part = _Part(index, keep, np.asarray(rows, dtype=np.int64), scan.n_rows)
            scan.parts.append(part)
            scan.n_rows += int(part.rg_rows.sum())
    return scan


def gather(files: ParquetFiles, scan: Scan, selected: np.ndarray, columns: Sequence[str], threads: int) -> pa.Table:
    """Pass 2: the rows at ``selected`` (sorted global read positions) of ``columns``, in that order."""
    jobs = []
    for part in scan.parts:
        n = int(part.rg_rows.sum())
        lo, hi = np.searchsorted(selected, [part.start, part.start + n])
        if hi > lo:
            local = selected[lo:hi] - part.start
            rg_start = np.concatenate(([0], np.cumsum(part.rg_rows)))
            which = np.searchsorted(rg_start, local, side="right") - 1
            needed = np.unique(which)
            # position of each needed row group inside the table we read
            needed_start = np.concatenate(([0], np.cumsum(part.rg_rows[needed])))[:-1]
            shift = np.zeros(len(part.rg_rows), dtype=np.int64)
            shift[needed] = rg_start[needed] - needed_start
            jobs.append((part.file, [part.row_groups[i] for i in needed], local - shift[which]))

    def run(job) -> pa.Table:
        index, row_groups, take = job
        table = files.read(index, row_groups, columns, use_threads=threads > 1)
        return table.take(pa.array(take))

    pieces = _run(run, jobs, threads)
    if not pieces:
        schema = files.schema
        return pa.table({c: pa.array([], type=schema.field(c).type) for c in columns})
    return concat(pieces, files.source)


def concat(pieces: Sequence[pa.Table], source: ParquetSource) -> pa.Table:
    """Tables read from different files of one source, as one table.

    Files may differ in ways a definition allows: int32 beside int64 keys, ms beside us times, naive beside
    UTC times, dates beside times, dictionary beside plain strings (a pandas category column). Such columns
    are brought to one type first; pyarrow's own promotion widens numbers and units only.

    >>> a = pa.table({"t": pa.array([0], pa.timestamp("ms")), "s": pa.array(["x"]).dictionary_encode()})
    >>> b = pa.table({"t": pa.array([1], pa.timestamp("us", "UTC")), "s": pa.array(["y"])})
    >>> concat([a, b], ParquetSource("data/")).schema
    t: timestamp[us, tz=UTC]
    s: string
    """
    if all(p.schema.equals(pieces[0].schema) for p in pieces[1:]):
        return pa.concat_tables(pieces)
    try:
        return pa.concat_tables([_uniform(p) for p in pieces], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise StoreError(f"source {source.path!r}: its files hold a column as types that cannot be read as one "
                         f"({exc}); rewrite the odd files with the type the others have") from None


def _uniform(table: pa.Table) -> pa.Table:
    for i, f in enumerate(table.schema):
        t = f.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_timestamp(t):
            t = pa.timestamp(t.unit, "UTC")  # naive times are UTC
        elif pa.types.is_date(t):
            t = pa.timestamp("us", "UTC")
        if t != f.type:
            table = table.set_column(i, f.name, table.column(i).cast(t))
    return table
