"""The served-feature log: the feature vectors predictions actually used, sampled, as Parquet.

Each ``predict`` call appends its rows (sampled at ``sample_rate``) to a
buffer per model; the process's flusher writes each buffer as one Parquet
file ``<root>/<model>/<UTC time>-<uuid>.parquet`` (written to a temporary
name, then moved) once it holds ``max_rows`` rows or its oldest row is
``max_age_s`` old, so a busy service writes files of ``max_rows`` rows and a
quiet one a file per ``max_age_s``, not one per second. A file's schema metadata records the pinned feature
references and join keys it holds, and whether the features are named
``view__feature`` (as the model's training table named them), so a skew check
can recompute exactly the same features offline at the logged request times.

Every file read is checked against that metadata, from the schema the read
opens anyway: a file that is unreadable, lacks the metadata or
``request_time`` (another tool wrote it), or lacks a column for a join key or
feature its own metadata names (it would read as nulls: served nulls, skew on
every row) is a ``StoreError`` naming it. A writer removes the hidden
``.<name>.parquet.tmp`` files of writes that crashed once they are an hour old
(never a young one: another process may be writing it); readers skip them.

Columns: ``request_time`` (UTC), ``model``, ``model_version``, ``variant``,
the join keys, the features as served (nulls included), the model's
request-time inputs (columns of the entity rows that are not features)
prefixed ``input.``, then the outputs prefixed ``prediction.``: an output of one
value per row as ``prediction.<name>``, a wider one as one column per value,
``prediction.<name>[0]``, ``prediction.<name>[1]``, ... (row-major), so each
column keeps one type whatever the versions logged.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import _background
from .._checks import check_version
from .._leftovers import Sweeper, parquet_tmp
from .._time import utc_argument
from ..errors import DataError, DefinitionError, NotFoundError, StoreError
from ..features.definitions import parse_ref
from ..models.registry import NAME_PATTERN

__all__ = ["ServedLog", "LogGroup", "OWN_COLUMNS", "own_column_clash"]

OWN_COLUMNS = ("request_time", "model", "model_version", "variant")  # written for every row, before its values


def own_column_clash(names: Sequence[str]) -> list[str]:
    """The join keys or features among ``names`` named as one of the log's own columns: their rows cannot be
    logged (they went into the log's column of that name, and the flush dropped the model's rows whole)."""
    return [name for name in names if name in OWN_COLUMNS]


class LogGroup(NamedTuple):
    """Logged rows that share their pinned feature references, join keys and feature naming."""

    refs: list[str]
    keys: list[str]
    full_feature_names: bool  # features logged as view__feature (the training table's names)
    rows: pa.Table


class _Batch:
    def __init__(self, refs: Sequence[str], keys: Sequence[str], types: Mapping[str, pa.DataType],
                 full_feature_names: bool) -> None:
        self.refs, self.keys, self.types = list(refs), list(keys), dict(types)
        self.full_feature_names = full_feature_names
        self.columns: dict[str, list] = {}
        self.rows = 0


#: a killed write's hidden temporary file, which a later write in its folder removes once it is an hour old
_SWEEPER = Sweeper(parquet_tmp)

#: rows converted to Arrow at a time when a buffer is written; the GIL is let go between chunks
_CHUNK = 8192


def _column(values: list, type_: pa.DataType | None) -> pa.Array | pa.ChunkedArray:
    """Python values as an Arrow column, converted a chunk at a time with the GIL let go in between.

    Converting Python objects holds the GIL; done in one call for a 50,000-row buffer it held a
    serving thread back for milliseconds whenever the flusher wrote (predict p99 at 100 entities 4.4 ms
    with logging, 0.34 ms without). Between chunks a serving thread gets the GIL back at once.
    """
    if len(values) <= _CHUNK:
        return pa.array(values, type=type_)
    chunks = []
    for start in range(0, len(values), _CHUNK):
        if chunks:
            time.sleep(0)  # let a waiting thread run
        chunks.append(pa.array(values[start : start + _CHUNK], type=type_))
    if type_ is None:  # each chunk inferred its type: they must agree (all-null chunks aside), else one pass
        types = {c.type for c in chunks if not pa.types.is_null(c.type)}
        if len(types) != 1:
            return pa.array(values)  # e.g. ints, then floats: one pass widens to double
        common = types.pop()
        chunks = [c.cast(common) if pa.types.is_null(c.type) else c for c in chunks]
    return pa.chunked_array(chunks)


def _table(batch: _Batch) -> pa.Table:
    """A batch's rows as the Arrow table of one log file, its metadata pinning refs, keys and naming."""
    arrays = {name: _column(values, pa.timestamp("us", "UTC") if name == "request_time" else batch.types.get(name))
              for name, values in batch.columns.items()}
    return pa.table(arrays).replace_schema_metadata(
        {"mlplat.refs": json.dumps(batch.refs), "mlplat.keys": json.dumps(batch.keys),
         "mlplat.full_feature_names": json.dumps(batch.full_feature_names)})


def check_log_name(name: object, what: str) -> None:
    """A model or view name, before it becomes a folder of the log (``..`` or ``a/b`` would leave it)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DataError(f"{what} must be the name of a model or feature view (letters, digits, '_', '-' and '.', "
                        f"not first), got {name!r}")


class ServedLog:
    """Sampled feature vectors of served predictions, per model, flushed in the background (and in a
    forked child process by its own flusher: the rows buffered at the fork stay the parent's)."""

    _owner = "the served-feature log"  # how a failed background flush names it

    def __init__(self, root: str | Path, *, sample_rate: float = 1.0, max_rows: int = 50_000,
                 max_age_s: float = 30.0, seed: int | None = None) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate}")
        self.root = Path(root)
        self.sample_rate = sample_rate
        self._max = max_rows
        self._max_age = max_age_s
        self._oldest = 0.0  # time.monotonic() of the oldest buffered row
        self._batches: dict[tuple[str, int], _Batch] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time: a flush returns after one running elsewhere
        self._seed = seed
        self._random = random.Random(seed)
        self._count = 0
        self._failing()
        self._closed = False  # close() let the flusher go: the next add() registers again
        _background.register(self)

    def forked(self) -> None:
        """In a forked child (a pre-fork server's worker): empty buffers and fresh locks. The rows buffered
        at the fork are the parent's to write (the child wrote them again), and a lock a thread held at the
        fork (the flusher, mid-write) is never released in the child: its flushes hung."""
        self._lock, self._flush_lock = threading.Lock(), threading.Lock()
        self._batches, self._count = {}, 0
        self._failing()
        if self._seed is None:
            self._random = random.Random()  # workers sample independently

    def _failing(self, failures: int = 0) -> None:
        """How writes have gone: ``failures`` in a row (0: the last one worked)."""
        self._failures = failures
        self._out = 0  # rows a flush took and has not written yet (they come back if it fails)
        now = time.monotonic()
        # the flusher waits longer after each failure (each try converts the whole backlog again), up to 30 s
        self._retry_at = now + min(30.0, 2.0 ** failures) if failures else 0.0
        self._pressing_after = now + _PRESS_AGAIN_S if failures else 0.0  # when add() may write in its thread
        if not failures:
            self._dropping = False  # no rows dropped since the last write that worked (warned once per run)

    def add(self, model: str, version: int, variant: str, keys: Mapping[str, list], features: Mapping[str, list],
            outputs: Mapping[str, Sequence], *, refs: Sequence[str], types: Mapping[str, pa.DataType],
            full_feature_names: bool = False, inputs: Mapping[str, Sequence] | None = None) -> int:
        """Log the sampled rows of one prediction call; returns how many were kept. ``features`` are
        named as ``refs`` resolve with ``full_feature_names``; ``inputs`` (request-time inputs, typed by
        ``types`` under ``input.<name>``) are logged as ``input.<name>``."""
        n = len(next(iter(keys.values()))) if keys else 0
        if self.sample_rate >= 1.0:
            take = range(n)
        else:
            take = [i for i in range(n) if self._random.random() < self.sample_rate]
        if not take:
            return 0
        short = [name for name, values in (*keys.items(), *features.items(), *(inputs or {}).items(),
                                           *outputs.items()) if len(values) != n]
        if short:  # a buffer's columns must stay aligned: refuse before touching it
            raise DataError(f"served-log columns {short} of {model!r} do not have the {n} rows the keys have")
        clash = own_column_clash([*keys, *features])
        if clash:
            raise DataError(f"served-log columns {clash} of {model!r} are named as the log's own columns")
        now = time.time_ns() // 1000
        with self._lock:
            if self._failures and self._count + self._out >= _FULL * self._max:  # a full disk: serving goes on
                if not self._dropping:
                    self._dropping = True
                    _log.warning("the served-feature log of %r holds %d rows it could not write to %s: it drops "
                                 "new rows until a flush writes them", model, self._count, self.root)
                return 0
            batch = self._batches.get((model, version))
            if batch is None:
                batch = self._batches[(model, version)] = _Batch(refs, list(keys), types, full_feature_names)
            cols = batch.columns
            for name, value in zip(OWN_COLUMNS, (now, model, version, variant)):
                cols.setdefault(name, []).extend([value] * len(take))
            every = len(take) == n  # no sampling: whole columns, without picking row by row
            for name, values in (*keys.items(), *features.items()):
                cols.setdefault(name, []).extend(values if every else [values[i] for i in take])
            for name, values in (inputs or {}).items():
                cols.setdefault(f"input.{name}", []).extend(values if every else [values[i] for i in take])
            for name, values in _prediction_columns(outputs, n).items():
                cols.setdefault(name, []).extend(values if every else [values[i] for i in take])
            batch.rows += len(take)
            if not self._count:
                self._oldest = time.monotonic()
            self._count += len(take)
            count = self._count
            reopened, self._closed = self._closed, False
            # a backlog is written in the caller's thread (back-pressure), while writes fail one caller at a time
            # and not for a while after a failure (each try converts the whole backlog again)
            press = count >= _background.BACKLOG * self._max and (not self._failures
                                                                   or time.monotonic() >= self._pressing_after)
            if press:
                self._pressing_after = time.monotonic() + _PRESS_AGAIN_S
        if reopened:  # used after close() (a closed platform opens again on later use): written as before
            _background.register(self)
        try:
            _background.added(self, count if press else min(count, self._max), self._max)
        except StoreError:  # the disk is full or unwritable: the rows stay buffered (the flusher warns and retries)
            pass
        return len(take)

    def __len__(self) -> int:
        return self._count

    def due(self) -> bool:
        """Whether the background flusher should write now: ``max_rows`` buffered, or the oldest
        row ``max_age_s`` old."""
        now = time.monotonic()
        return now >= self._retry_at and (self._count >= self._max
                                          or (self._count > 0 and now - self._oldest >= self._max_age))

    def flush(self) -> None:
        """Write every row logged so far; returns once they are on disk (also those a flush already
        running in another thread, e.g. the background flusher's, had taken).

        Rows a failed write (a full disk, no permission) could not store stay buffered for the next
        flush; rows that cannot become a Parquet table (values of the wrong type) never will: they are
        dropped and a DataError says so, after the other models' rows are written."""
        dropped: list[str] = []
        with self._flush_lock:
            with self._lock:
                batches, self._batches, self._out, self._count = self._batches, {}, self._count, 0
            left = [item for item in batches.items() if item[1].rows]
            try:
                while left:
                    (model, version), batch = left[0]
                    try:
                        table = _table(batch)
                    except (pa.ArrowException, TypeError, ValueError) as exc:
                        dropped.append(f"{batch.rows} rows of {model!r} v{version} ({exc})")
                    else:
                        self._write(model, table)
                    left.pop(0)
            except BaseException:
                with self._lock:  # keep what was not written, ahead of what came meanwhile, for the next try
                    self._failing(self._failures + 1)
                    for key, batch in left:
                        newer = self._batches.get(key)
                        if newer is not None:
                            for name, values in newer.columns.items():
                                batch.columns.setdefault(name, []).extend(values)
                            batch.rows += newer.rows
                            self._count -= newer.rows
                        self._batches[key] = batch
                        self._count += batch.rows
                raise
            with self._lock:
                self._failing()
        if dropped:
            raise DataError("the served-feature log dropped rows it could not store: " + "; ".join(dropped))

    def _write(self, model: str, table: pa.Table) -> None:
        folder = self.root / model
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex}.parquet"
        tmp = folder / f".{name}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, tmp)
            tmp.replace(folder / name)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # a full disk: no half-written file left behind
                tmp.unlink(missing_ok=True)
            if isinstance(exc, (OSError, pa.ArrowException)):
                raise StoreError(f"the served-feature log of {model!r}: writing to {folder} failed "
                                 f"({_one_line(exc)}); its rows stay buffered: the next flush() or close() writes "
                                 "them") from None
            raise
        _SWEEPER.sweep(pafs.LocalFileSystem(), str(folder))

    def _files_by_refs(self, model: str) -> dict[tuple[tuple[str, ...], tuple[str, ...], bool],
                                                  list[tuple[Path, pa.Schema]]]:
        """The model's files and their schemas, grouped by the (feature references, join keys, naming)
        their metadata pins; a file that fails its check is a StoreError naming it."""
        folder = self.root / model
        groups: dict[tuple[tuple[str, ...], tuple[str, ...], bool], list[tuple[Path, pa.Schema]]] = {}
        bad = []
        for f in sorted(folder.glob("*.parquet")) if folder.exists() else []:
            pinned, schema, problem = _checked(f)
            if problem:
                bad.append(f"{f.name} ({problem})")
            else:
                groups.setdefault(pinned, []).append((f, schema))
        if bad:
            raise _not_log_files(model, folder, bad)
        return groups

    def _read_files(self, model: str, files: list[tuple[Path, pa.Schema]], since: Any,
                    features_only: bool = False) -> pa.Table:
        """The files' rows under the union of their columns: versions sharing feature references may log
        other request-time inputs and outputs, which are null in the files without them."""
        import pyarrow.dataset as pads  # here, not at import: it loads pandas (0.2 s of every `import mlplat`)

        try:
            schema = pa.unify_schemas([s for _, s in files], promote_options="permissive")
            columns = None
            if features_only:
                columns = [n for n in schema.names
                           if n not in ("model", "variant") and not n.startswith(("prediction.", "input."))]
            data = pads.dataset([str(f) for f, _ in files], schema=schema, format="parquet")
            if since is not None and getattr(since, "nanosecond", 0):  # a pandas Timestamp: up to the log's unit
                since = since.replace(nanosecond=0) + timedelta(microseconds=1)  # (cut down, rows before it came in)
            where = None if since is None else pads.field("request_time") >= pa.scalar(since,
                                                                                        pa.timestamp("us", "UTC"))
            table = data.to_table(columns=columns, filter=where)
        except (pa.ArrowException, OSError) as exc:  # a file damaged past its footer, or types that do not merge
            raise _unreadable(model, self.root / model, [f for f, _ in files], exc) from exc
        return table if features_only else table.sort_by("request_time")  # files are not in time order

    def groups(self, model: str, since: datetime | None = None, *, features_only: bool = False
               ) -> list[LogGroup]:
        """The log of ``model`` split by the feature references it pins (and their naming), rows oldest
        first: versions trained on different feature definitions land in different groups.
        ``features_only`` reads just the request time, model version, keys and features (what a skew
        check needs), not the variant, model name, request-time inputs and predictions, and leaves the rows in
        file order."""
        if since is not None:
            since = utc_argument("since", since)
        self.flush()
        return [LogGroup(list(refs), list(keys), full, self._read_files(model, files, since, features_only))
                for (refs, keys, full), files in self._files_by_refs(model).items()]

    def read(self, model: str, since: datetime | None = None) -> pa.Table:
        """Everything logged for ``model`` (after ``since``, a datetime), oldest first; columns a group
        lacks are null. NotFoundError when nothing was ever logged for ``model``."""
        check_log_name(model, "model")
        tables = [g.rows for g in self.groups(model, since)]  # groups() flushes first
        if not tables:
            if not (self.root / model).is_dir():
                raise _nothing_logged(model)
            return pa.table({})
        return _joined(model, tables)

    def version_rows(self, model: str, version: int, since: datetime | None = None) -> pa.Table:
        """The logged rows of one version of ``model`` (after ``since``), oldest first, from the groups that
        hold its rows only: another version's columns, of other types or names, do not come into it.
        NotFoundError when nothing was ever logged for ``model``.

        >>> p.serving.served_log.version_rows("fraud", 2).num_rows  # doctest: +SKIP
        500
        """
        check_log_name(model, "model")
        version = check_version(version)
        self.flush()  # this process's rows first: the folder comes with the first file
        if not (self.root / model).is_dir():
            raise _nothing_logged(model)
        tables = []
        for group in self.groups(model, since):
            rows = group.rows.filter(pc.equal(group.rows.column("model_version"), version))
            if rows.num_rows:
                tables.append(rows)
        return _joined(model, tables) if tables else pa.table({})

    def refs(self, model: str) -> tuple[list[str], list[str]]:
        """The pinned feature references and join keys of the newest file of ``model`` (checked as every
        file read is)."""
        self.flush()
        folder = self.root / model
        files = sorted(folder.glob("*.parquet")) if folder.exists() else []
        if not files:
            return [], []
        pinned, _, problem = _checked(files[-1])
        if problem:
            raise _not_log_files(model, folder, [f"{files[-1].name} ({problem})"])
        return list(pinned[0]), list(pinned[1])

    def ref_sets(self, model: str) -> list[tuple[list[str], list[str]]]:
        """Every distinct (pinned feature references, join keys) in the log of ``model``."""
        self.flush()
        return [(list(r), list(k)) for r, k in dict.fromkeys((r, k) for r, k, _ in self._files_by_refs(model))]

    def close(self) -> None:
        """Write what is buffered and let the background flusher go; a later add() takes it up again."""
        self.flush()
        _background.unregister(self)
        with self._lock:
            self._closed = not self._count  # rows added meanwhile: registered again, as after close()
        if not self._closed:
            _background.register(self)


def _nothing_logged(model: str) -> NotFoundError:
    return NotFoundError(f"no served features are logged for a model named {model!r}: predict logs them when the "
                         "platform's served_log_sample_rate is above 0")


def _joined(model: str, tables: list[pa.Table]) -> pa.Table:
    """The log groups' rows as one table, oldest first; StoreError naming the column where versions logged
    one of another type (a feature redefined from strings to integers)."""
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive").sort_by("request_time")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise StoreError(f"the served-feature log of {model!r} holds versions that logged a column under one "
                         f"name with types that do not merge ({_one_line(exc)}); read it from after the change "
                         "with since=, or one version's rows at a time with "
                         "p.serving.served_log.version_rows(model, version)") from exc


#: a log buffering this many times its flush size (its writes failing for long) drops new rows
_FULL = 4 * _background.BACKLOG
#: seconds after a failed write in add() before add() writes in the caller's thread again
_PRESS_AGAIN_S = 5.0
_log = logging.getLogger("mlplat")


_NOT_PREDICTS = "not written by predict: no served-log metadata or request_time"


def _checked(f: Path) -> tuple[Any, pa.Schema | None, str | None]:
    """One log file's schema (its footer, read once: the read that follows reuses it) checked against the
    served log's metadata: ``((refs, keys, full_feature_names), schema, None)``, or what is wrong with it."""
    try:
        schema = pq.read_schema(f)
    except (pa.ArrowException, OSError) as exc:
        return None, None, f"unreadable: {_one_line(exc)}"
    meta = schema.metadata or {}
    if b"mlplat.refs" not in meta or "request_time" not in schema.names:
        return None, schema, _NOT_PREDICTS
    try:
        refs, keys = json.loads(meta[b"mlplat.refs"]), json.loads(meta.get(b"mlplat.keys", b"[]"))
        full = json.loads(meta.get(b"mlplat.full_feature_names", b"false"))
        if not (isinstance(refs, list) and isinstance(keys, list) and isinstance(full, bool)
                and all(isinstance(k, str) for k in keys)):
            raise ValueError("not lists of names")
        names = [parse_ref(r).column(full) for r in refs]
    except (ValueError, DefinitionError):  # json's errors are ValueErrors
        return None, schema, "its served-log metadata is not what predict writes"
    missing = [n for n in dict.fromkeys((*keys, *names)) if n not in schema.names]
    if missing:  # read as nulls, they were served nulls: skew on every row, drift on nothing
        return None, schema, f"no column for {missing}, which its metadata names"
    return (tuple(refs), tuple(keys), full), schema, None


def _not_log_files(model: str, folder: Path, bad: list[str]) -> StoreError:
    return StoreError(f"the served-feature log of {model!r} holds files that are no served-log files: "
                      f"{'; '.join(bad)}; move them out of {folder} and read it again")


def _unreadable(model: str, folder: Path, files: list[Path], cause: BaseException) -> StoreError:
    """The error for files whose footers read but whose rows do not (damaged mid-file), naming them: each
    file is read alone to find them (the error path only)."""
    bad = []
    for f in files:
        try:
            pq.read_table(f)
        except (pa.ArrowException, OSError) as exc:
            bad.append(f"{f.name} (unreadable: {_one_line(exc)})")
    if bad:
        return _not_log_files(model, folder, bad)
    return StoreError(f"the served-feature log of {model!r} in {folder} could not be read ({_one_line(cause)}); "
                      "its files do not read together: move out the ones predict did not write")


def _one_line(exc: BaseException) -> str:
    """pyarrow's message on one line (a thrift error spans several), without its closing period."""
    return " ".join(str(exc).split()).rstrip(".")


def _prediction_columns(outputs: Mapping[str, Sequence], n: int) -> dict[str, list[float]]:
    """The logged columns of ``n`` rows of outputs: ``prediction.<name>`` for one number per row, else
    ``prediction.<name>[j]`` per value of a row (rows of lists, flattened row-major).

    >>> _prediction_columns({"p": [0.5, 1], "q": [[0.1, 0.9], [0.7, 0.3]]}, 2)
    {'prediction.p': [0.5, 1.0], 'prediction.q[0]': [0.1, 0.7], 'prediction.q[1]': [0.9, 0.3]}
    """
    cols: dict[str, list[float]] = {}
    for name, values in outputs.items():
        matrix = np.asarray(values, dtype=np.float64).reshape(n, -1)
        if n and not isinstance(values[0], (list, tuple, np.ndarray)):
            cols[f"prediction.{name}"] = matrix[:, 0].tolist()
            continue
        for j in range(matrix.shape[1]):
            cols[f"prediction.{name}[{j}]"] = matrix[:, j].tolist()
    return cols
