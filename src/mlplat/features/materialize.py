"""Materialization and push: offline rows into the online store, the newer row winning.

``materialize`` writes, per entity, the row the offline rule picks at
``end_date``: it reads the source with the same two-pass scan and the same
Cython kernel as ``get_historical_features`` (one "entity row" per key, at
``end_date``), encodes the winners natively and writes them in batches that
the store applies with a server-side compare-and-set. Without ``start_date``
it continues from where the view's last materialization into this store
ended (recorded in the SQL database), so re-running it changes nothing.

``push`` writes fresh rows straight to the online store (and, when asked,
appends them to the offline source as a Parquet file).
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

from .. import _arrow, dtypes
from .._checks import shown
from .._leftovers import Sweeper, parquet_tmp
from .._time import utc_argument
from .._native import KeyFactorizer, asof_backward_on_ts_by_key
from .._native.codec import RecordBuffers, encode_records, entity_key_buffers, kind_of
from ..db import Database
from ..db.models import Materialization
from ..errors import DataError, DefinitionError, StoreError
from .catalog import Catalog
from .definitions import FeatureView
from .offline import ScanTimes, as_declared
from .online.store import OnlineStore
from .online_read import view_tag
from .parquet import ParquetFiles, concat, gather, list_files, plan_scan, read_footer
from .validation import check_source, key_values

__all__ = ["Materializer", "MaterializeResult"]


#: a killed push's hidden file in pushed/, removed by a later push once it is an hour old (readers skip it)
_SWEEPER = Sweeper(parquet_tmp)
_CLOCK_SLACK = timedelta(seconds=60)  # clocks of writers and this machine may differ a little


@dataclass(frozen=True)
class MaterializeResult:
    """What one view's materialization did."""

    view: str
    version: int
    start: datetime | None
    end: datetime
    rows: int  # entities with a row in the window
    written: int  # records the store took (the rest were older than what it held)
    seconds: float


class Materializer:
    """Moves feature rows into an online store."""

    def __init__(self, db: Database, catalog: Catalog, store: Callable[[], OnlineStore], threads: int,
                 in_use: Callable[[], Iterable[tuple[str, int]]] = tuple) -> None:
        self._db = db
        self._catalog = catalog
        self._store = store
        self._threads = threads
        self._in_use = in_use  # (view, version) pairs that models in service read, besides the latest

    # ------------------------------------------------------------ materialize
    def materialize(
        self,
        end_date: datetime | None = None,
        start_date: datetime | None = None,
        views: Sequence[str] | None = None,
        *,
        progress: bool | None = None,
    ) -> list[MaterializeResult]:
        end = utc_argument("end_date", end_date) if end_date is not None else datetime.now(timezone.utc)
        start_date = utc_argument("start_date", start_date) if start_date is not None else None
        now = datetime.now(timezone.utc)
        if end > now + _CLOCK_SLACK:
            raise DataError(f"end_date {end.isoformat()} is in the future (now is {now.isoformat()}): the online "
                            "store would serve values before their event time; materialize up to now at most")
        if start_date is not None and start_date > end:
            raise DataError(f"start_date {start_date.isoformat()} is after end_date {end.isoformat()}")
        targets = self._targets(views)
        show = sys.stderr.isatty() if progress is None else progress
        return [self._one(view, start_date, end, show) for view in targets]

    def _targets(self, names: Sequence[str] | None) -> list[FeatureView]:
        if names is None:  # the latest version of each view served online, and the versions models in service read
            latest = [e.definition() for e in self._catalog.list("feature_view")]
            seen = {(v.name, v.version) for v in latest}
            older = [self._catalog.get("feature_view", name, version)
                     for name, version in self._in_use() if (name, version) not in seen]
            return [v for v in latest + older if v.online]
        if isinstance(names, str):
            names = [names]
        out = []
        for ref in names:
            if not isinstance(ref, str):
                raise DataError(f"views must be view names (or 'name@version'), got {type(ref).__name__} {ref!r}")
            name, at, version = ref.partition("@")
            if at and not version.isdigit():
                raise DataError(f"view {name}@{version}: a definition version is a number, e.g. {name}@2")
            view = self._catalog.get("feature_view", name, int(version) if version else None)
            if not view.online:
                raise DefinitionError(f"feature view {name!r} is not served online (online=False)")
            out.append(view)
        return out

    def last_end(self, view: FeatureView) -> datetime | None:
        """Where the last materialization of this view version into this store ended."""
        m = Materialization
        with self._db.session() as s:
            return s.scalar(
                sa.select(sa.func.max(m.end)).where(
                    m.view == view.name, m.view_version == view.version, m.online_store == self._store().identity
                )
            )

    def _one(self, view: FeatureView, start: datetime | None, end: datetime, show: bool) -> MaterializeResult:
        t0 = time.perf_counter()
        start = start if start is not None else self.last_end(view)
        end_ns = _arrow.datetime_ns(end)
        lo = _arrow.INT64_MIN if start is None else _arrow.datetime_ns(start)
        if view.ttl is not None:
            lo = max(lo, end_ns - _arrow.timedelta_ns(view.ttl))
        winners = self._latest(view, lo, end_ns)
        written = 0
        if winners is not None:
            records = self._encode(view, *winners)
            with _progress(show, f"{view.name}@{view.version}", len(records)) as advance:
                written = self._store().write(view_tag(view), records, advance)
            self._store().delete_expired(view_tag(view))
        rows = 0 if winners is None else winners[0].num_rows
        with self._db.session(write=True) as s:
            s.add(Materialization(view=view.name, view_version=view.version, online_store=self._store().identity,
                                  start=start, end=end, rows=rows, written=written))
        return MaterializeResult(view.name, view.version, start, end, rows, written, time.perf_counter() - t0)

    def _latest(self, view: FeatureView, lo: int, hi: int):
        """Per entity, the row the offline rule picks at ``hi`` among rows with event time in [lo, hi]."""
        src = view.source
        files = ParquetFiles(src, self._threads)
        check_source(view, files, view.feature_names, error=StoreError, applied_key_types=view.key_types)
        scan = plan_scan(files, ts_field=src.timestamp_field, ts_range=(lo, hi), int_key=None)
        if scan.n_rows == 0:
            return None
        times = ScanTimes(view, scan)  # as offline retrieval: nulls kept apart from INT64_MIN, a real time
        parts: list[tuple[int, pa.Table]] = []

        def consume(table: pa.Table, start: int) -> None:
            times.consume(table, start)
            parts.append((start, table.select(view.join_keys)))

        scan.read(view.join_keys + times.columns, consume, self._threads)
        table = concat([t for _, t in sorted(parts, key=lambda p: p[0])], src)
        parts.clear()
        try:  # as offline retrieval's scan: a key above int64 is the source's problem
            factorizer = KeyFactorizer([table.column(k) for k in view.join_keys])
        except pa.ArrowInvalid as exc:
            raise StoreError(f"feature view {view.name!r}: {exc}") from None
        del table
        codes = factorizer.codes
        times.drop_untimed(codes)  # rows without an event time never win
        n = factorizer.size
        picked = asof_backward_on_ts_by_key(
            codes, times.ts, times.tie_breaks(), np.arange(n, dtype=np.int64), np.full(n, lo, dtype=np.int64),
            np.full(n, hi, dtype=np.int64), n, self._threads,
        )
        winners = np.sort(picked[picked >= 0])
        if len(winners) == 0:
            return None
        rows = gather(files, scan, winners, view.join_keys + view.feature_names, self._threads)
        # records keep created times as they are, a null as INT64_MIN: the record format's "none"
        created = times.created[winners] if len(times.created) else np.full(len(winners), _arrow.INT64_MIN)
        return rows, times.ts[winners], created

    def _encode(self, view: FeatureView, rows: pa.Table, event_ns: np.ndarray, created_ns: np.ndarray) -> RecordBuffers:
        columns = [as_declared(rows.column(f.name), f) for f in view.schema]
        for f, col in zip(view.schema, columns):
            if f.dtype.kind == "timestamp":
                _check_nanoseconds(view, f.name, col)
        data, offsets = encode_records([kind_of(f.dtype) for f in view.schema], columns, event_ns, created_ns)
        key_data, key_offsets = entity_key_buffers([rows.column(k) for k in view.join_keys],
                                                   [view.key_types[k] for k in view.join_keys])
        if view.ttl is None:
            expire = np.zeros(len(event_ns), dtype=np.int64)
        else:  # the key outlives the last instant the offline rule still sees the row, by 1 ms
            ttl_ns = _arrow.timedelta_ns(view.ttl)  # saturated: a row stamped near 2262 does not wrap to 1677
            expire = (np.minimum(event_ns, np.iinfo(np.int64).max - ttl_ns) + ttl_ns) // 1_000_000 + 1
            np.maximum(expire, 1, out=expire)  # 0 and below mean "never expires": a row whose ttl ended before 1970
        return RecordBuffers(key_data, key_offsets, data, offsets, expire)

    # ------------------------------------------------------------------- push
    def push(self, view_name: str, rows: Any, *, to_offline: bool = False) -> int:
        view = self._catalog.get("feature_view", view_name)
        if not view.online and not to_offline:  # the rows would go nowhere
            raise DefinitionError(f"feature view {view.name!r} is not served online (online=False): push it "
                                  "with to_offline=True to append the rows to its source")
        src = view.source
        table = _push_table(rows)
        if table.num_rows == 0 and all(pa.types.is_null(t) for t in table.schema.types):
            return 0  # [] or empty lists: no rows, and no types to check (a typed empty table is checked)
        table = _check_push_columns(view, table)
        older = self._pushed_too(view, table)
        if table.num_rows == 0:
            return 0
        target = _offline_target(view) if to_offline else None
        if src.created_timestamp_field and src.created_timestamp_field not in table.column_names:
            table = table.append_column(src.created_timestamp_field,
                                        _created_now(table.num_rows, target and target[2], src.created_timestamp_field))
        event_ns = np.empty(table.num_rows, dtype=np.int64)
        created_ns = np.full(table.num_rows, _arrow.INT64_MIN)  # a null created time: INT64_MIN, the record's none
        for name, out in ((src.timestamp_field, event_ns), (src.created_timestamp_field, created_ns)):
            try:
                if name:
                    _arrow.timestamps_ns_into(table.column(name), out)
            except pa.ArrowInvalid as exc:
                raise DataError(f"push to {view.name!r}: {exc}, in column {name!r}") from None
        now = datetime.now(timezone.utc)
        if int(event_ns.max()) > _arrow.datetime_ns(now + _CLOCK_SLACK):
            latest = pc.max(table.column(src.timestamp_field)).as_py()
            raise DataError(f"push to {view.name!r}: a row's {src.timestamp_field!r} is in the future ({latest} "
                            f"> now, {now.isoformat()}); the online store would serve it before its time, when "
                            "offline retrieval would not yet see it. Push rows once they have happened")
        staged = None
        if target:  # online then serves the values as the source's file holds them (a float32 column rounds them)
            staged, table = _stage_offline(view, table, target)
        try:
            targets = ([view] if view.online else []) + older
            records = [(v, self._encode(v, table, event_ns, created_ns)) for v in targets]
            took = [self._store().write(view_tag(v), buffers) for v, buffers in records]
            written = took[0] if view.online else 0
        except BaseException:
            if staged is not None:
                staged.discard()  # the source stays as it was: a retry does not add the rows twice
            raise
        if staged is not None:
            staged.publish(f"push to {view.name!r}")
        return written

    def _pushed_too(self, view: FeatureView, rows: pa.Table) -> list[FeatureView]:
        """The older online versions of ``view`` that models in service read from the same source, which a push
        of ``rows`` reaches too (DataError, before anything is written, if the rows lack what one needs)."""
        out = []
        for name, version in self._in_use():
            if name != view.name or version == view.version:
                continue
            older = self._catalog.get("feature_view", name, version)
            if not older.online or older.source.to_spec() != view.source.to_spec():
                continue  # reads other files: what its offline side will never see is not served for it
            try:
                _check_push_columns(older, rows)
            except DataError as exc:
                raise DataError(f"{exc}; definition version {version}, which a model in service was trained on, "
                                "reads the same source, so a push reaches it too: include what it needs") from None
            out.append(older)
        return out


def _check_nanoseconds(view: FeatureView, feature: str, column: pa.Array) -> None:
    """Online records keep times as int64 nanoseconds; a source time outside them is refused by name."""
    try:
        pc.cast(column, pa.timestamp("ns", "UTC"))
    except pa.ArrowInvalid:
        raise StoreError(f"feature view {view.name!r}: feature {feature!r} holds a time outside 1677-09-21 .. "
                         "2262-04-11, which the online store (int64 nanoseconds) cannot keep; write such "
                         "'no end' sentinels as null, or serve the view offline only (online=False)") from None


def _push_table(rows: Any) -> pa.Table:
    if isinstance(rows, (list, dict)):
        odd = next((r for r in rows if not isinstance(r, dict)), None) if isinstance(rows, list) else None
        if odd is not None:
            raise DataError(f"push: a list of rows holds one dict per row, got {type(odd).__name__} {shown(odd)}")
        try:
            return pa.Table.from_pylist(rows) if isinstance(rows, list) else pa.table(rows)
        except OverflowError as exc:  # an int past 64 bits, which no column type holds
            raise DataError(f"push: rows hold an integer that does not fit in 64 bits ({exc})") from None
        except UnicodeEncodeError as exc:
            raise DataError(f"push: rows hold a string that is not valid Unicode text (a lone surrogate, "
                            f"{exc.object[exc.start:exc.end]!r}); it cannot be stored") from None
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise DataError(f"push: rows cannot be read as a table: {exc}") from None
    return _arrow.to_table(rows, "push rows")


def _check_push_columns(view: FeatureView, table: pa.Table) -> pa.Table:
    """The rows with every feature as its declared type; a missing or unreadable column is a DataError."""
    src = view.source
    where = f"push to {view.name!r}"
    for k in view.join_keys:
        if k not in table.column_names:
            raise DataError(f"{where}: rows have no join key column {k!r}")
        table = table.set_column(table.schema.get_field_index(k), k, key_values(table.column(k), k, where))
        if table.column(k).null_count:
            raise DataError(f"{where}: join key {k!r} has nulls")
        if dtypes.key_kind(table.column(k).type) != view.key_types[k]:
            raise DataError(f"{where}: join key {k!r} is {table.column(k).type}, the view has {view.key_types[k]} keys")
    if src.timestamp_field not in table.column_names:
        raise DataError(f"{where}: rows have no timestamp column {src.timestamp_field!r}")
    if table.column(src.timestamp_field).null_count:
        raise DataError(f"{where}: every row needs a {src.timestamp_field!r} time")
    for name in filter(None, (src.timestamp_field, src.created_timestamp_field)):
        if name in table.column_names and not _arrow.is_timestamp_type(table.column(name).type):
            raise DataError(f"{where}: {name!r} must hold timestamps, found {table.column(name).type}")
    for f in view.schema:
        if f.name not in table.column_names:
            raise DataError(f"{where}: rows have no feature {f.name!r} (push every feature of the view)")
        col = table.column(f.name)
        numeric = _arrow.is_numeric(col.type)
        if not (f.dtype.accepts(col.type) or pa.types.is_null(col.type) or
                (numeric and f.dtype.kind in ("int", "float"))):
            raise DataError(f"{where}: feature {f.name!r} is {col.type}, which cannot be read as {f.dtype.name}")
        target = pa.timestamp("ns", "UTC") if f.dtype.kind == "timestamp" else f.dtype.arrow
        if col.type != target:
            try:  # Python floats arrive as float64: rounding to a Float32 feature is expected; overflow is not
                col = col.cast(target, safe=f.dtype.kind != "float")
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"{where}: feature {f.name!r} cannot be stored as {f.dtype.name}: {exc}") from None
            if f.dtype.kind == "float" and pa.types.is_floating(table.column(f.name).type):
                overflow = pc.and_(pc.is_finite(table.column(f.name)), pc.invert(pc.is_finite(col)))
                if pc.any(overflow).as_py():
                    at = pc.index(overflow, True).as_py()
                    raise DataError(f"{where}: feature {f.name!r} holds {table.column(f.name)[at].as_py()!r} "
                                    f"(row {at}), beyond the range of {f.dtype.name}")
            table = table.set_column(table.schema.get_field_index(f.name), f.name, col)
    return table


class _Staged:
    """Rows written to a hidden file in the source's ``pushed/`` folder; published (moved into place) once
    the online write has succeeded, or discarded, so a reader never sees half a file or a failed push."""

    def __init__(self, fs, tmp: str, folder: str) -> None:
        self._fs, self._tmp, self._folder = fs, tmp, folder

    def publish(self, where: str) -> None:
        try:
            self._fs.move(self._tmp, f"{self._folder}/{_pushed_name()}")
        except OSError as exc:  # gone meanwhile (swept as a killed push's after an online write over an hour)
            self.discard()
            raise StoreError(f"{where}: the online store took the rows, but moving them into {self._folder!r} "
                             f"failed ({exc}); push them again with to_offline=True, so that offline retrieval and "
                             "materialize see them too") from None

    def discard(self) -> None:
        try:
            self._fs.delete_file(self._tmp)
        except OSError:
            pass


_last_push_ns = 0
_push_clock = threading.Lock()


def _pushed_name() -> str:
    """A pushed file's name, taken once the online write is done: ``<UTC second>.<nanoseconds>-<uuid>``, so
    that files sort as they were published (in a process strictly, however close together) and offline reads
    a later push later, as online wrote it later (of two rows with equal times the later push wins on both
    sides). Names from the second alone sorted two pushes of one second by their random uuid."""
    global _last_push_ns
    with _push_clock:
        ns = _last_push_ns = max(time.time_ns(), _last_push_ns + 1)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(ns // 10**9))}.{ns % 10**9:09d}-{uuid.uuid4().hex}.parquet"


def _created_now(rows: int, schema: pa.Schema | None, name: str) -> pa.Array:
    """A pushed row's created time when the rows have none: now, to the unit the source's files store it in
    (microseconds for online-only pushes), so the offline file holds what the online store compares."""
    unit = "us"
    if schema is not None and name in schema.names and pa.types.is_timestamp(schema.field(name).type):
        unit = schema.field(name).type.unit
    now = time.time_ns()
    now -= now % _arrow.NS_PER_UNIT[unit]
    return pa.array(np.full(rows, now, np.int64)).cast(pa.timestamp("ns", "UTC"))


def _offline_target(view: FeatureView) -> tuple[Any, str, pa.Schema]:
    """Where a push to offline goes: the source's filesystem, its folder and its first file's schema."""
    fs, root, paths = list_files(view.source)
    if paths == [root]:
        raise DataError(f"push to {view.name!r}: to_offline needs a folder source, {view.source.path!r} is a file")
    # the schema of the first file, as ParquetFiles.schema, but without every file's footer (each push adds one)
    return fs, root, read_footer(fs, view.source, paths[0]).schema.to_arrow_schema()


def _stage_offline(view: FeatureView, table: pa.Table,
                   target: tuple[Any, str, pa.Schema]) -> tuple[_Staged, pa.Table]:
    """The rows as a hidden file for ``<source>/pushed/<time>-<uuid>.parquet``, in the first file's schema,
    and the rows as that file holds them: a float pushed to a narrower float column (a Float64 feature
    backed by float32) is rounded in the file, so the online copy takes the rounded value too, as a
    materialization would; a time the source's date column would cut to its day is refused."""
    where = f"push to {view.name!r}"
    fs, root, first = target
    columns, fields = {}, []
    for field in first:
        if field.name not in table.column_names:
            if not field.nullable:
                raise DataError(f"{where}: the source's files have a column {field.name!r} that may not be null; "
                                "include it in the rows")
            columns[field.name] = pa.nulls(table.num_rows, field.type)
            fields.append(field)
            continue
        given = table.column(field.name)
        if pa.types.is_null(field.type):  # null in every row of the first file (pandas writes such a column
            # as Arrow's null type, which backs any field): this file holds the view's type (the reader merges)
            field = field.with_type(view.field(field.name).dtype.arrow if field.name in view.feature_names
                                    else given.type)
        fields.append(field)
        try:
            columns[field.name] = stored = given.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{where}: column {field.name!r} cannot be written as the source's {field.type} "
                            f"({exc}); the source's files fix each column's type") from None
        if pa.types.is_temporal(given.type) and pa.types.is_temporal(field.type) and given.type != field.type:
            back = stored.cast(given.type)  # arrow's cast of a time to a date drops the time of day, unasked
            cut = pc.fill_null(pc.not_equal(back, given), False)
            if pc.any(cut).as_py():
                at = pc.index(cut, True).as_py()
                raise DataError(f"{where}: column {field.name!r} holds {given[at].as_py()} (row {at}), which the "
                                f"source's {field.type} column would keep as {back[at].as_py()}; push times that "
                                "column holds as they are (midnight for a date column)")
        elif field.name in view.feature_names and pa.types.is_floating(given.type) and given.type != field.type:
            i = table.schema.get_field_index(field.name)
            table = table.set_column(i, field.name, stored.cast(given.type))  # rounded as the file holds it
    folder = f"{root.rstrip('/')}/pushed"
    staged = _Staged(fs, f"{folder}/.{uuid.uuid4().hex}.parquet.tmp", folder)
    try:
        fs.create_dir(folder, recursive=True)
        _SWEEPER.sweep(fs, folder)
        with fs.open_output_stream(staged._tmp) as out:
            pq.write_table(pa.table(columns, schema=pa.schema(fields, metadata=first.metadata)), out)
    except (OSError, pa.ArrowException) as exc:
        staged.discard()
        raise StoreError(f"{where}: could not write the rows to {folder!r}: {exc}") from None
    return staged, table


class _progress:
    """A rich progress bar on a terminal, nothing elsewhere; yields a callback taking a count."""

    def __init__(self, show: bool, label: str, total: int) -> None:
        self.show, self.label, self.total = show, label, total
        self._bar = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.show:
            return None
        from rich.progress import Progress

        self._bar = Progress(transient=False)
        self._bar.start()
        task = self._bar.add_task(f"materialize {self.label}", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

