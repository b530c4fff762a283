"""``p.runs``: experiments and runs on SQL; search with a real filter language; comparisons.

Usage::

    with p.runs.start("fraud", params={"lr": 1e-3}, tags={"team": "risk"}) as run:
        ...
    page = p.runs.search("fraud", filter="metrics.val_auc > 0.9 and params.lr = '0.001'",
                         order_by=["metrics.val_auc desc"])
    p.runs.compare([r.id for r in page])
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import json
import sys
import threading
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY as PG_ARRAY

from .._checks import as_int, storable
from ..db import Database
from ..db.models import Experiment, LatestMetric, Run, RunArtifact, RunInput, RunParam, RunTag
from ..errors import DataError, NotFoundError
from .artifacts import ArtifactStore
from .metrics import read_history
from .run import ActiveRun, check_text, checked_values
from .search import canonical, page_query, parse_filter, sort_keys, to_sql
from .system import system_tags
from .torch_io import checked_columns, checked_fill_null, example_dtype, example_width, probe_model
from .training import Training, flatten_config

__all__ = ["RunStore", "RunInfo", "RunPage", "MetricPoint"]

_MAX_RESULTS = 50_000
_NAME_MAX = 255  # the experiments.name and runs.user columns


@dataclass(frozen=True)
class MetricPoint:
    step: int
    timestamp_ms: int
    value: float


@dataclass(frozen=True)
class RunInfo:
    """A run as stored: attributes, params, latest metrics, tags, inputs and artifacts."""

    id: str
    experiment: str
    name: str
    status: str
    start_time: datetime
    end_time: datetime | None
    parent_run_id: str | None
    user: str
    artifact_uri: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)


class RunPage(list):
    """A page of search results; ``next_page_token`` is None on the last page."""

    def __init__(self, runs: list[RunInfo], next_page_token: str | None) -> None:
        super().__init__(runs)
        self.next_page_token = next_page_token


class RunStore:
    """Experiment tracking. Reach it as ``Platform(...).runs``."""

    def __init__(self, db: Database, artifacts: ArtifactStore, features: Any = None) -> None:
        self._db = db
        self.artifacts = artifacts
        self._features = features  # FeatureStore, to pin feature definition versions in log_input
        #: runs started or resumed through this store that have not ended (flushed by ``flush()``)
        self._active: weakref.WeakSet[ActiveRun] = weakref.WeakSet()
        _open_runs_register_hooks()

    # ------------------------------------------------------------- start
    def start(
        self,
        experiment: str,
        *,
        name: str = "",
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent: str | ActiveRun | None = None,
    ) -> ActiveRun:
        """Start a run in ``experiment`` (created on first use); records git commit, dirty flag, host, user,
        python and package versions and the entry point as ``mlplat.*`` tags. Bad arguments are refused
        before anything is written."""
        _check_experiment(experiment)
        name = name or ""
        check_text(name, "run name")
        param_values = checked_values({} if params is None else params, "start(params=...)", "param")
        tag_values = checked_values({} if tags is None else tags, "start(tags=...)", "tag")
        parent_id = parent.id if isinstance(parent, ActiveRun) else parent
        if parent_id is not None:
            check_text(parent_id, "parent run id")
            self.get(parent_id)  # NotFoundError for an unknown parent
        exp_id = self._experiment_id(experiment)
        run_id = uuid.uuid4().hex
        sys_tags = system_tags()
        with self._db.connect(write=True) as conn:
            conn.execute(sa.insert(Run).values(
                id=run_id, experiment_id=exp_id, name=name, status="running", parent_run_id=parent_id,
                user=sys_tags.get("mlplat.user", "")[:_NAME_MAX], artifact_uri=self.artifacts.uri(run_id)))
        active = ActiveRun(self, run_id, experiment)
        _OPEN_RUNS.add(active)
        self._active.add(active)
        try:
            self._set_tags(run_id, {**sys_tags, **tag_values})
            if param_values:
                active.log_params(param_values)
        except BaseException:
            active.end("failed")
            raise
        return active

    def resume(self, run_id: str) -> ActiveRun:
        """Log into an existing run (from another process, say).

        Ending it (``run.end()`` or its ``with`` block) sets the run's status. Interpreter exit writes what
        it buffered but does not end it: the status stays its owner's, so a pool worker that resumes its
        parent's run never ends it, however the worker exits (spawn, fork, terminated or not).

        Example::

            with mp.Platform() as p:
                run = p.runs.resume(run_id)
                run.log_metric("loss", 0.1)
        """
        info = self.get(run_id)
        active = ActiveRun(self, run_id, info.experiment, resumed=True)
        self._active.add(active)
        return active

    def flush(self) -> None:
        """Write the metrics buffered by every run started or resumed through this store that has not
        ended (``Platform.close()`` calls it). The runs stay open: a run ends when its ``with`` block
        ends, at ``run.end()``, or at interpreter exit in the process that started it. Every
        run is flushed even when one fails; then the first failure is raised (its points stay buffered)."""
        while True:
            try:
                runs = list(self._active)
                break
            except RuntimeError:  # another thread started a run meanwhile: copy again
                continue
        failure: BaseException | None = None
        for run in runs:
            try:
                run.flush()
            except Exception as exc:  # noqa: BLE001 - the other runs must still be written
                failure = failure or exc
        if failure is not None:
            raise failure

    def _experiment_id(self, name: str) -> int:
        _check_experiment(name)
        for _ in range(3):
            with self._db.connect() as conn:
                found = conn.scalar(sa.select(Experiment.id).where(Experiment.name == name))
            if found is not None:
                return found
            try:
                with self._db.connect(write=True) as conn:
                    return conn.scalar(sa.insert(Experiment).values(name=name).returning(Experiment.id))
            except sa.exc.IntegrityError:
                continue  # created by someone else meanwhile
        raise DataError(f"experiment {name!r} could not be created")

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Upsert tags in one transaction, sorted by key: rows locked in one order by every process (two
        processes setting the same tags in different orders deadlocked on PostgreSQL)."""
        if not tags:
            return
        insert = (postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert)(RunTag)
        with self._db.connect(write=True) as conn:
            conn.execute(insert.on_conflict_do_update(index_elements=["run_id", "key"],
                                                      set_={"value": insert.excluded.value}),
                         [{"run_id": run_id, "key": k, "value": tags[k]} for k in sorted(tags)])

    def _forget(self, run: ActiveRun) -> None:
        _OPEN_RUNS.discard(run)
        self._active.discard(run)

    def _resolve_features(self, refs: Any, columns: Sequence[str]) -> tuple[list, list[str], bool]:
        """The views' requests, the feature columns, and whether the table names them ``view__feature``."""
        if self._features is None:
            raise DataError("feature_refs need the feature store: use the RunStore of a Platform")
        # the table was retrieved with plain or full feature names: whichever the columns hold (another column
        # with "__" in its name, a label "label__v2", said nothing about the features' naming)
        missing = []
        for full in (False, True):
            requests, outputs = self._features.resolve(refs, full_feature_names=full)
            missing.append([o for o in outputs if o not in columns])
            if not missing[-1]:
                return requests, outputs, full
        first = min(missing, key=len)[0]
        raise DataError(f"log_input: the table has no column {first!r} for the feature refs given (the columns "
                        "get_historical_features names them, plain or with full_feature_names=True)")

    def training(
        self,
        experiment: str,
        *,
        config: Any = None,
        data: Any = None,
        features: Any = None,
        model: Any = None,
        example_input: Any = None,
        columns: Sequence[str] | None = None,
        fill_null: Any = 0.0,
        name: str = "",
        tags: Mapping[str, Any] | None = None,
    ) -> Training:
        """A run for a training loop: params from ``config``, ``data`` fingerprinted (with its feature
        definitions when ``features`` is given), ``t.epoch(...)`` per epoch, ``model`` logged at the end
        (with ``example_input``, ``columns`` and ``fill_null``, as :meth:`ActiveRun.log_model` takes them;
        ``fill_null`` is checked here, before the run starts, not after the training).

        Usage::

            with p.runs.training("fraud", config=cfg, data=train, features=refs, model=model) as t:
                for epoch in range(cfg["epochs"]):
                    t.epoch(loss=train_one_epoch(), val_auc=evaluate())
        """
        # what log_model will check at the end, checked before the run starts (not after the training)
        columns = checked_columns(columns, example_width(example_input))
        checked_fill_null(fill_null, columns, example_dtype(example_input))
        if model is not None:
            probe_model(model, example_input)
        run = self.start(experiment, name=name, params=flatten_config(config), tags=tags)
        try:
            return Training(run, data=data, features=features, model=model, example_input=example_input,
                            columns=columns, fill_null=fill_null)
        except BaseException as exc:
            run.__exit__(type(exc), exc, exc.__traceback__)
            raise

    # -------------------------------------------------------------- read
    def experiments(self) -> list[str]:
        """Names of all experiments."""
        with self._db.connect() as conn:
            return list(conn.scalars(sa.select(Experiment.name).order_by(Experiment.name)))

    def get(self, run_id: str) -> RunInfo:
        """A run with everything logged to it."""
        runs = self._load([_checked_run_id(run_id)], details=True)
        if not runs:
            raise NotFoundError(_unknown_run(run_id))
        return runs[0]

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every point of one metric, by step then time (NaN and infinities as logged)."""
        check_text(key, "metric name", limit=_NAME_MAX)
        steps, stamps, values = read_history(self._db, _checked_run_id(run_id), key)
        if not len(steps):
            self._check_run(run_id)  # a mistyped (or shortened) id is not a run without the metric
        return [MetricPoint(s, t, v) for s, t, v in zip(steps.tolist(), stamps.tolist(), values.tolist())]

    def _check_run(self, run_id: str) -> None:
        """NotFoundError unless a run has this id."""
        with self._db.connect() as conn:
            if conn.scalar(sa.select(Run.id).where(Run.id == run_id)) is None:
                raise NotFoundError(_unknown_run(run_id))

    def latest_points(self, run_id: str) -> dict[str, MetricPoint]:
        """Each metric's latest point (greatest step, then time): its step, time and value (NaN as logged)."""
        with self._db.connect() as conn:
            rows = conn.execute(sa.select(LatestMetric.key, LatestMetric.step, LatestMetric.timestamp,
                                          LatestMetric.value).where(LatestMetric.run_id == _checked_run_id(run_id))
                                .order_by(LatestMetric.key)).all()
        if not rows:
            self._check_run(run_id)
        return {r.key: MetricPoint(r.step, r.timestamp, float("nan") if r.value is None else r.value) for r in rows}

    def _in(self, column, ids: list[str]):
        """``column IN ids``: one array parameter on PostgreSQL (no per-id binds to render and parse)."""
        if self._db.dialect == "postgresql":
            return column == sa.any_(sa.cast(sa.bindparam(None, ids, type_=PG_ARRAY(sa.String)),
                                             PG_ARRAY(sa.String)))
        return column.in_(ids)

    def _load(self, ids: Sequence[str], *, details: bool = False, conn=None) -> list[RunInfo]:
        if not ids:
            return []
        if conn is None:
            with self._db.connect() as conn:
                return self._load(ids, details=details, conn=conn)
        ids = list(ids)
        # .all() fetches in one call; iterating a result would fetch row by row
        runs = {row.id: row for row in conn.execute(sa.select(
            Run.id, Experiment.name.label("experiment"), Run.name, Run.status, Run.start_time, Run.end_time,
            Run.parent_run_id, Run.user, Run.artifact_uri).join(Experiment).where(self._in(Run.id, ids))).all()}
        params: dict[str, dict] = {i: {} for i in runs}
        metrics: dict[str, dict] = {i: {} for i in runs}
        tags: dict[str, dict] = {i: {} for i in runs}
        # params, latest metrics and tags in one round trip: (kind, run, key, text value, number value)
        def part(kind: int, table, text, number):
            return sa.select(sa.literal(kind).label("kind"), table.run_id, table.key, text.label("text"),
                             number.label("number")).where(self._in(table.run_id, ids))

        no_text, no_number = sa.null().cast(sa.Text), sa.null().cast(sa.Double)
        union = sa.union_all(part(0, RunParam, RunParam.value, no_number),
                             part(1, LatestMetric, no_text, LatestMetric.value),
                             part(2, RunTag, RunTag.value, no_number))
        nan = float("nan")
        for kind, rid, key, text, number in conn.execute(union).all():
            if kind == 0:
                params[rid][key] = text
            elif kind == 1:
                metrics[rid][key] = nan if number is None else number
            else:
                tags[rid][key] = text
        inputs: dict[str, list] = {i: [] for i in runs}
        artifacts: dict[str, list] = {i: [] for i in runs}
        if details:
            # in the order they were logged: "the run's first input" (what a model was trained on) means that one
            for r in conn.execute(sa.select(RunInput).where(self._in(RunInput.run_id, ids))
                                  .order_by(RunInput.id)).mappings():
                inputs[r["run_id"]].append({k: r[k] for k in ("name", "content_hash", "row_count", "schema",
                                                               "feature_refs", "created_at")})
            for r in conn.execute(sa.select(RunArtifact).where(self._in(RunArtifact.run_id, ids))
                                  .order_by(RunArtifact.path)).mappings():
                artifacts[r["run_id"]].append({k: r[k] for k in ("path", "kind", "size", "sha256", "meta")})
        out = []
        for rid in ids:
            r = runs.get(rid)
            if r is None:
                continue
            out.append(RunInfo(r.id, r.experiment, r.name, r.status, r.start_time, r.end_time, r.parent_run_id,
                               r.user, r.artifact_uri, params[rid], metrics[rid], tags[rid], inputs[rid],
                               artifacts[rid]))
        return out

    # ------------------------------------------------------------ search
    def search(
        self,
        experiments: str | Sequence[str] | None = None,
        *,
        filter: str | None = None,  # noqa: A002 - the name users expect
        order_by: Sequence[str] | None = None,
        max_results: int = 100,
        page_token: str | None = None,
    ) -> RunPage:
        """Runs matching a filter (see :mod:`mlplat.runs.search` for the language), ordered and paged.

        Pages are keyset pages: ``next_page_token`` holds the sort values of the page's last run (and is
        bound to this search), and the next page is the runs that sort after it. A run that exists through
        the whole listing and keeps its sort values is listed exactly once, whatever else is started,
        deleted or changed between pages; a run started meanwhile is listed if it sorts after the cursor.

        Usage::

            p.runs.search("fraud", filter="metrics.val_auc > 0.9 and (params.lr = '0.001' or tags.team = 'risk')",
                          order_by=["metrics.val_auc desc"], max_results=20)
        """
        max_results = _count(max_results)
        if filter is not None and not isinstance(filter, str):
            raise DataError(f"search: filter must be a string such as \"metrics.val_auc > 0.9\" (or None), "
                            f"got {type(filter).__name__} {filter!r}")
        order = _strings(order_by, "order_by", "a list of strings such as ['metrics.val_auc desc']")
        names = None if experiments is None else _strings(experiments, "experiments",
                                                            "an experiment name or a list of names")
        where = parse_filter(filter) if filter else None
        q = sa.select(Run.id).join(Experiment)
        if names is not None:
            q = q.where(Experiment.name.in_(names))
        if where is not None:
            q = q.where(to_sql(where))
        q, keys = sort_keys(q, order)
        query_hash = _query_hash(names, where, keys)
        q = page_query(q, keys, _decode_token(page_token, query_hash, keys), max_results + 1)
        with self._db.connect() as conn:  # ids and their page in one transaction: one consistent answer
            rows = conn.execute(q).all()
            more = len(rows) > max_results
            runs = self._load([r[0] for r in rows[:max_results]], conn=conn)
        return RunPage(runs, _encode_token(query_hash, keys, rows[max_results - 1][1:]) if more else None)

    def compare(self, run_ids: Sequence[str]) -> pa.Table:
        """One row per run: id, experiment, name, status, then every param and every latest metric."""
        if isinstance(run_ids, (str, bytes)) or not isinstance(run_ids, Iterable):
            raise DataError(f"run_ids must be a list of run ids (strings), got {type(run_ids).__name__} "
                            f"{run_ids!r:.100}")
        run_ids = [_checked_run_id(r) for r in run_ids]
        runs = self._load(run_ids)
        missing = set(run_ids) - {r.id for r in runs}
        if missing:
            raise NotFoundError(_unknown_run(sorted(missing)[0]))
        params = sorted({k for r in runs for k in r.params})
        metrics = sorted({k for r in runs for k in r.metrics})
        columns: dict[str, list] = {
            "run_id": [r.id for r in runs], "experiment": [r.experiment for r in runs],
            "name": [r.name for r in runs], "status": [r.status for r in runs],
        }
        for k in params:
            columns[f"params.{k}"] = [r.params.get(k) for r in runs]
        for k in metrics:
            columns[f"metrics.{k}"] = pa.array([r.metrics.get(k) for r in runs], pa.float64())
        return pa.table(columns)


def _checked_run_id(run_id: Any) -> str:
    """A run id to look up: a string a database can hold (an unknown one is NotFoundError later), else
    DataError (PostgreSQL refused a NUL in the query itself, where SQLite found no such run)."""
    return check_text(run_id, "run id", meaning="a string (run.id)", limit=_NAME_MAX)


def _check_experiment(name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > _NAME_MAX:
        raise DataError(f"experiment name {name!r} is invalid: a non-empty string of at most {_NAME_MAX} characters")
    storable(name, "experiment name")


def _count(value: Any) -> int:
    """``max_results`` as an int (numpy ints too; not a bool, float or string), or DataError."""
    number = as_int(value)
    if number is None or not 1 <= number <= _MAX_RESULTS:
        raise DataError(f"search: max_results must be an int between 1 and {_MAX_RESULTS}, got {value!r}")
    return number


def _strings(value: Any, what: str, meaning: str) -> list[str]:
    """A string or a list (tuple, ...) of strings as a list; None as []; else DataError naming ``what``."""
    if value is None:
        return []
    try:
        items = [value] if isinstance(value, str) else list(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, str) for v in items):
        raise DataError(f"search: {what} must be {meaning}, got {value!r}")
    for v in items:  # what the database cannot hold is refused as a filter value is (not a raw driver error)
        storable(v, f"search: {what}")
    return items


# A page token is the last run of its page as the order saw it, bound to the search it came from:
# URL-safe base64 of the JSON ``["k1", query, [value, ...], check]``: ``query`` a hash of the experiments,
# the parsed filter and the whole order; one value per sort key, type-tagged so that it binds back exactly
# (["f", float.hex()], ["s", text], ["t", ISO time with microseconds and offset], ["n"] for NULL); ``check``
# a hash of the rest, so that a token changed by hand or cut short is refused. Neither hash is a secret:
# the values only ever travel as bound parameters.
_TOKEN_VERSION = "k1"
_FIRST_PAGE = "start from the first page (page_token=None; on the command line, leave out --page-token)"


def _digest(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _query_hash(experiments: list[str] | None, where: Any, keys: list) -> str:
    return _digest([None if experiments is None else sorted(set(experiments)),
                    None if where is None else canonical(where),
                    [[*k.field, k.desc] for k in keys]])


def _encode_value(value: Any, type_: str) -> list:
    if value is None:
        return ["n"]
    if type_ == "float":
        return ["f", float(value).hex()]
    if type_ == "time":
        return ["t", value.isoformat(timespec="microseconds")]
    return ["s", value]


def _decode_value(item: Any, key: Any) -> Any:
    if item == ["n"] and key.nullable:
        return None
    tag, text = item  # ValueError, TypeError where it is not a pair
    if not isinstance(text, str):
        raise ValueError(item)
    if tag == "f" and key.type == "float":
        return float.fromhex(text)
    if tag == "t" and key.type == "time":
        value = datetime.fromisoformat(text)
        if value.tzinfo is None:
            raise ValueError(text)
        return value
    if tag == "s" and key.type == "str":
        return text
    raise ValueError(item)


def _encode_token(query: str, keys: list, values: Sequence[Any]) -> str:
    encoded = [_encode_value(v, k.type) for k, v in zip(keys, values)]
    body = [_TOKEN_VERSION, query, encoded]
    text = json.dumps([*body, _digest(body)], separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(text.encode()).decode()


def _decode_token(token: str | None, query: str, keys: list) -> list[Any] | None:
    """The sort values of the run a page ended with (None for the first page), or DataError."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise DataError(f"page_token must be the next_page_token of a page (a string), got {token!r}")
    try:
        body = json.loads(base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True))
        if not (isinstance(body, list) and len(body) == 4 and body[0] == _TOKEN_VERSION
                and body[3] == _digest(body[:3]) and isinstance(body[2], list)):
            raise ValueError(body)
    except (ValueError, TypeError, UnicodeError, RecursionError):  # binascii.Error and JSON's are ValueErrors
        raise DataError(f"page_token {token!r} is not one mlplat gave (it is changed, cut short, or from an "
                        f"older mlplat): {_FIRST_PAGE}") from None
    if body[1] != query:
        raise DataError("page_token belongs to another search (other experiments, filter or order_by): a token "
                        "continues only the search that gave it; "
                        f"{_FIRST_PAGE}")
    try:
        if len(body[2]) != len(keys):
            raise ValueError(body[2])
        return [_decode_value(item, key) for item, key in zip(body[2], keys)]
    except (ValueError, TypeError, OverflowError):
        raise DataError(f"page_token {token!r} is not one mlplat gave (its values do not fit its search): "
                        f"{_FIRST_PAGE}") from None


# ---------------------------------------------------- runs left open at exit
#: runs this process started, held strongly until they end: a run whose script dropped every reference
#: to it (and its buffered metrics) is still flushed and closed at exit. Resumed runs are not here: their
#: status is their owner's (their buffered points are written at exit by the background flusher's hook)
_OPEN_RUNS: set[ActiveRun] = set()
_HOOKS = threading.Lock()
_failed = threading.Event()
_hooked = False


def _open_runs_register_hooks() -> None:
    """Once per process: end runs still open at exit (failed after an uncaught exception, else finished)."""
    global _hooked
    with _HOOKS:
        if _hooked:
            return
        _hooked = True
        previous = sys.excepthook

        def hook(exc_type, exc, tb):
            _failed.set()
            previous(exc_type, exc, tb)

        sys.excepthook = hook
        atexit.register(_end_open_runs)


def _end_open_runs() -> None:
    for run in list(_OPEN_RUNS):
        try:
            run.end("failed" if _failed.is_set() else "finished")
        except Exception:  # noqa: BLE001 - the database may be gone at exit
            pass


def _unknown_run(run_id: object) -> str:
    """The message for a run id no run has; a shortened one (as a listing may show it) is told so."""
    if isinstance(run_id, str) and 0 < len(run_id) < 32 and all(c in "0123456789abcdef" for c in run_id.lower()):
        return (f"unknown run {run_id!r}: a run id has 32 hex characters (run.id; `mlplat runs list` shows "
                "them whole); give the whole id")
    return f"unknown run {run_id!r}"
