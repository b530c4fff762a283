"""An active run: what a training script logs into.

Usage::

    with p.runs.start("fraud", params={"lr": 1e-3}) as run:
        run.log_input(train, name="train", feature_refs=refs)
        for step in range(100):
            run.log_metric("loss", loss, step=step)     # microseconds: buffered, written in batches
        run.log_model(model, "model")

Leaving the ``with`` block normally marks the run finished; an exception marks
it failed (with the error in the ``mlplat.error`` tag) and propagates.
"""
from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .._arrow import to_table
from .._checks import storable
from ..db.models import ModelVersion, RegisteredModel, Run, RunArtifact, RunInput, RunParam
from ..errors import DataError, NotFoundError
from .artifacts import check_name
from .datahash import schema_json, table_hash
from .metrics import MetricBuffer, metric_value
from .torch_io import Signature, save_torch_model

if TYPE_CHECKING:
    from .tracking import RunStore

__all__ = ["ActiveRun", "RUN_STATUSES"]

RUN_STATUSES = ("running", "finished", "failed", "killed")
_KEY_MAX = 255


def _check_mapping(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise DataError(f"{where} takes a mapping of names to values, got {type(value).__name__}")


def _check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key or len(key) > _KEY_MAX or any(ord(c) < 32 for c in key):
        raise DataError(f"{what} name {key!r} is invalid: a non-empty string of at most {_KEY_MAX} printable "
                        "characters")
    return storable(key, f"{what} name")


def check_text(value: Any, what: str, *, meaning: str = "a string", limit: int = _KEY_MAX) -> str:
    """``value`` if it is a string that fits a ``limit``-character column and that every database stores
    (:func:`storable`: no NUL, no lone surrogate), else DataError naming ``what``."""
    if not isinstance(value, str) or len(value) > limit:
        got = f"{value[:40]!r}... ({len(value)} characters)" if isinstance(value, str) else repr(value)
        raise DataError(f"{what} must be {meaning} of at most {limit} characters, got {got}")
    return storable(value, what)


#: what a param value may be: its text is the same in every process and on every machine
_PARAM_SCALARS = (str, int, float, np.number, np.bool_, PurePath, type(None))
#: how to pass a value of a refused kind instead
_PARAM_HINTS = ((Mapping, "log its entries as params of their own ('{key}.<name>'), or pass "
                          "json.dumps(value, sort_keys=True)"),
                ((set, frozenset), "pass sorted(value): a set's order changes from one process to the next"),
                ((bytes, bytearray, memoryview), "pass value.decode() or value.hex()"),
                (np.ndarray, "pass value.tolist() (str() of a large array leaves values out)"))


def _param_text(key: str, value: Any) -> str:
    """``str(value)`` for a param value whose text is stable, else DataError naming the key and the type.

    Params are write-once text: a value whose text may differ between processes (a set's order, an
    object's address) or leaves something out (a large array) would be stored wrong, or clash when a
    resumed run logs it again."""
    bad = _refused_param(value)
    if bad is not None:
        hint = next((h for types, h in _PARAM_HINTS if isinstance(bad, types)),
                    "pass str(value) if its text is the same in every process, or json.dumps(value)")
        inside = "" if bad is value else f" (holding a {type(bad).__name__})"
        raise DataError(f"param {key!r} is of type {type(value).__name__}{inside}, which a param cannot hold: it "
                        "takes str, int, float, bool, None, a numpy number, a path, or a list or tuple of those; "
                        + hint.format(key=key))
    return storable(_param_str(value), f"param {key!r}")


def _param_str(value: Any) -> str:
    """``str(value)``, with a list's or tuple's numpy numbers and paths written as plain numbers and strings
    are: a list's str() writes each item's repr(), so [np.int64(64)] was stored as '[np.int64(64)]' (numpy 2),
    not '[64]'. Other lists' text is str()'s (a numpy string item quoted; a namedtuple as its str())."""
    if type(value) is not list and type(value) is not tuple:
        return str(value)
    items = ", ".join(str(v) if isinstance(v, (np.number, np.bool_)) else repr(str(v)) if isinstance(v, (
        PurePath, np.str_)) else _param_str(v) if type(v) in (list, tuple) else repr(v) for v in value)
    return f"[{items}]" if type(value) is list else f"({items}{',' if len(value) == 1 else ''})"


def _refused_param(value: Any) -> Any:
    """The first part of ``value`` a param cannot hold (``value`` itself, or an item of its list), or None."""
    if isinstance(value, _PARAM_SCALARS):
        return None
    if isinstance(value, (list, tuple)):
        return next((bad for bad in map(_refused_param, value) if bad is not None), None)
    return value


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11+); on 3.10, ``__notes__`` as 3.11 keeps it (shown from 3.11 on)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def checked_values(values: Any, where: str, what: str) -> dict[str, str]:
    """A mapping of param or tag names to values as stored (values as strings), or DataError.

    A tag takes any value's text (tags may change later); a param only a value whose text is stable
    (see :func:`_param_text`)."""
    _check_mapping(values, where)
    if what == "param":
        return {_check_key(k, what): _param_text(k, v) for k, v in values.items()}
    return {_check_key(k, what): storable(str(v), f"tag {k!r}") for k, v in values.items()}


def _overlaps(name: str, other: str) -> bool:
    """Whether artifact ``name`` is ``other``, lies inside it or holds it (logging it changes ``other``'s files)."""
    return name == other or name.startswith(other + "/") or other.startswith(name + "/")


def _where(name: str, other: str) -> str:
    """How artifact ``name`` stands to ``other`` (see :func:`_overlaps`), for a message: "... {where} <other>"."""
    return ("is" if other == name else f"lies inside artifact {other!r}, which is"
            if name.startswith(other + "/") else f"holds artifact {other!r}, which is")


def _check_unregistered(conn: Any, run_id: str, name: str, action: str) -> None:
    """DataError if logging artifact ``name`` of run ``run_id`` would change the files of an artifact a
    registered model version points to: that artifact itself, one inside it, or a folder holding it.

    A registered version is (run, artifact name); its approvals are of the files it had then, so those
    files are frozen."""
    rows = conn.execute(sa.select(RegisteredModel.name, ModelVersion.version, ModelVersion.artifact)
                        .join(RegisteredModel, RegisteredModel.id == ModelVersion.model_id)
                        .where(ModelVersion.run_id == run_id)
                        .order_by(RegisteredModel.name, ModelVersion.version)).all()
    hits = [r for r in rows if _overlaps(name, r.artifact)]
    if not hits:
        return
    artifact = hits[0].artifact
    versions: dict[str, list[str]] = {}
    for r in hits:
        if r.artifact == artifact:
            versions.setdefault(r.name, []).append(f"v{r.version}")
    registered = " and ".join(f"model {m!r} {', '.join(vs)}" for m, vs in versions.items())
    raise DataError(f"{action}: artifact {name!r} of run {run_id} {_where(name, artifact)} registered as "
                    f"{registered}; a registered version's files cannot change after registration (its approvals "
                    "are of those files), so nothing was written: log the new files under another name, or in a "
                    "new run, and register that as a new version")


def _check_not_evidence(conn: Any, run_id: str, name: str, action: str, *, own: str | None = None) -> None:
    """DataError if logging artifact ``name`` of run ``run_id`` would change the entity rows an input of the
    run keeps (``RunInput.feature_refs["entity_rows"]``): that file, one inside it, or a folder holding it.

    Lineage's verify rebuilds the input's table from those rows, so they are frozen once logged (whether or
    not a model is registered). ``own``: the input being logged, whose rows these are."""
    rows = conn.execute(sa.select(RunInput.name, RunInput.feature_refs).where(RunInput.run_id == run_id)
                        .order_by(RunInput.name)).all()
    kept = [(r.name, r.feature_refs.get("entity_rows")) for r in rows
            if r.name != own and isinstance(r.feature_refs, dict)]
    hits = [(input_name, path) for input_name, path in kept if isinstance(path, str) and _overlaps(name, path)]
    if not hits:
        return
    input_name, path = hits[0]
    raise DataError(f"{action}: artifact {name!r} of run {run_id} {_where(name, path)} the entity rows kept for "
                    f"input {input_name!r}; an input's kept entity rows cannot change (lineage's verify rebuilds "
                    "the input's data from them), so nothing was written: log the new files under another name")


#: the first key of the transaction-level advisory lock (two int4 keys: not the migrations' bigint one) under
#: which a PostgreSQL transaction puts a run's artifact files in place, the second being the run id's hash
_PG_ARTIFACTS_LOCK = 0x6D6C6172  # "mlar"


def _lock_rows(conn: Any, run_id: str, name: str) -> None:
    """On PostgreSQL, take the run's artifact lock, then lock the artifact rows of run ``run_id`` that logging
    ``name`` changes the files of (see :func:`_overlaps`), in path order. The first keeps two writers of one new
    name (no row to lock yet) from swapping their files in one order and upserting their rows in the other (a
    row's sha256 not that of the files). ``register`` reads its artifact's row FOR UPDATE, so a registration
    either committed before (and the checks that follow see it) or waits until this transaction is done and
    records the sha256 of the files it put in place. SQLite renders no FOR UPDATE: its write transactions
    (BEGIN IMMEDIATE) already run one at a time."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k, hashtext(:run))"),
                     {"k": _PG_ARTIFACTS_LOCK, "run": run_id})
    conn.execute(sa.select(RunArtifact.path).where(
        RunArtifact.run_id == run_id,
        sa.or_(RunArtifact.path.in_([*_holders(name), name]), RunArtifact.path.startswith(name + "/", autoescape=True)))
        .order_by(RunArtifact.path).with_for_update()).all()


def _holders(name: str) -> list[str]:
    """The folders holding artifact ``name``: ``a`` and ``a/b`` for ``a/b/c``."""
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@dataclass(frozen=True)
class LoggedInput:
    """What log_input recorded."""

    name: str
    content_hash: str
    row_count: int
    feature_refs: list[str]


def _clean_exit(exc: BaseException) -> bool:
    """``sys.exit()`` / ``sys.exit(0)``: the program is done and says it succeeded."""
    return isinstance(exc, SystemExit) and exc.code in (None, 0)


class ActiveRun:
    """A run that is being logged to. Get one from ``p.runs.start`` or ``p.runs.resume``."""

    def __init__(self, store: RunStore, run_id: str, experiment: str, *, resumed: bool = False) -> None:
        self._store = store
        self.id = run_id
        self.experiment = experiment
        self._metrics = MetricBuffer(store._db, run_id, resumed=resumed)
        self._metric_keys: set[str] = set()
        self._ended = False
        self._pid = os.getpid()  # the process that started or resumed it: only it ends it

    def __repr__(self) -> str:
        return f"ActiveRun(id={self.id!r}, experiment={self.experiment!r})"

    # ------------------------------------------------------------- params
    def log_param(self, key: str, value: Any) -> None:
        """Record a parameter. Parameters are write-once: the same value again is fine, another is an error."""
        self.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record several parameters in one transaction (all or none)."""
        values = checked_values(params, "log_params", "param")
        if not values:
            return
        db = self._store._db
        with db.connect(write=True) as conn:
            insert = (postgresql.insert if db.dialect == "postgresql" else sqlite.insert)(RunParam)
            # sorted by key: every process takes the rows' locks in one order (no deadlock on PostgreSQL)
            conn.execute(insert.on_conflict_do_nothing(), [{"run_id": self.id, "key": k, "value": values[k]}
                                                         for k in sorted(values)])
            stored = dict(conn.execute(sa.select(RunParam.key, RunParam.value).where(
                RunParam.run_id == self.id, RunParam.key.in_(list(values)))).all())
            # a list stored before numpy numbers in lists were written as numbers ('[np.int64(64)]') is the same
            clash = {k: (stored[k], v) for k, v in values.items() if stored.get(k) not in (v, str(params[k]))}
            if clash:  # raising rolls back this call's inserts too
                k, (old, new) = next(iter(clash.items()))
                raise DataError(f"param {k!r} of run {self.id} is already {old!r}; params are write-once, so "
                                f"{new!r} cannot replace it: log it under another key or start a new run")

    # --------------------------------------------------------------- tags
    def set_tag(self, key: str, value: Any) -> None:
        """Set one tag (``set_tags`` for several in one transaction)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (they may change later, unlike params)."""
        self._store._set_tags(self.id, checked_values(tags, "set_tags", "tag"))

    # ------------------------------------------------------------ metrics
    def log_metric(self, key: str, value: float, step: int | None = None, timestamp_ms: int | None = None) -> None:
        """Log one point (buffered; NaN and infinities are kept). ``step`` defaults to the key's next step.
        Once the run has ended, the point is written at once (as params and tags are): nothing flushes an
        ended run's buffer any more."""
        try:
            known = key in self._metric_keys  # validate each key once: a set lookup per call after that
        except TypeError:  # unhashable (a list): _check_key names it
            known = False
        if not known:
            self._metric_keys.add(_check_key(key, "metric"))
        self._metrics.add(key, value, step, timestamp_ms)
        if self._ended:
            self._metrics.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one point for each key of ``metrics`` (at the same ``step``): every key and value is checked
        first, so a bad one logs none of them."""
        _check_mapping(metrics, "log_metrics")
        values = {_check_key(k, "metric"): metric_value(k, v) for k, v in metrics.items()}
        self._metric_keys.update(values)
        for key, value in values.items():
            self._metrics.add(key, value, step, None)
        if self._ended:
            self._metrics.flush()

    def flush(self) -> None:
        """Write every metric logged so far, now; once this returns they survive a crash."""
        self._metrics.flush()

    # ------------------------------------------------------------- inputs
    def log_input(self, table: Any, name: str = "train", *, feature_refs: Sequence[str] | Any = None,
                  timestamp_column: str = "event_timestamp", keep_entity_rows: bool = True) -> LoggedInput:
        """Fingerprint a data set the run used: a hash of every row and column, the row count and schema.

        With ``feature_refs`` (the references, or the FeatureService, the table
        was retrieved with), the definition version of every view is pinned and
        the entity rows (the table's columns that are not features) are kept as
        an artifact, so ``p.models.lineage(..., verify=True)`` can rebuild the
        table from the offline store and check it still matches.
        """
        _check_key(check_name(name), "input")
        data = to_table(table, "log_input")
        self._check_input_free(name)  # before anything is written: a refused call changes nothing
        refs: list[str] = []
        entity = None
        full_names = False
        if feature_refs is not None:
            requests, outputs, full_names = self._store._resolve_features(feature_refs, data.column_names)
            refs = [f"{r.view.name}@{r.view.version}:{f}" for r in requests for f in r.features]
            if keep_entity_rows:
                entity = data.select([c for c in data.column_names if c not in set(outputs)])
                if timestamp_column not in entity.column_names:
                    raise DataError(f"log_input: the table has no {timestamp_column!r} column to rebuild it from; "
                                    "pass timestamp_column= or keep_entity_rows=False")
        logged = LoggedInput(name, table_hash(data), data.num_rows, refs)
        entity_path = None if entity is None else f"inputs/{name}/entity_rows.parquet"
        info = {"refs": refs, "entity_rows": entity_path, "timestamp_column": timestamp_column,
                "full_feature_names": full_names}
        if entity is not None:  # the rebuilt table is hashed in this layout (Parquet keeps no timestamp[s])
            info["arrow_schema"] = base64.b64encode(data.schema.remove_metadata().serialize().to_pybytes()).decode()
        row = {"run_id": self.id, "name": name, "content_hash": logged.content_hash, "row_count": logged.row_count,
               "schema": schema_json(data), "feature_refs": info}
        staged = None if entity is None else self._stage_table(entity, entity_path)
        try:
            with self._store._db.connect(write=True) as conn:
                self._check_input_free(name, conn)
                conn.execute(sa.insert(RunInput).values(**row))
                if staged is not None:  # into place only once the name is ours
                    self._place(staged, entity_path, "file", {}, "log_input", conn=conn, own_input=name)
                    staged = None
        except sa.exc.IntegrityError:  # the same name, logged by another process meanwhile
            raise self._input_taken(name) from None
        finally:
            if staged is not None:
                self._store.artifacts.discard(staged[0])
        return logged

    def _check_input_free(self, name: str, conn: Any = None) -> None:
        """DataError if this run already logged an input called ``name``."""
        if conn is None:
            with self._store._db.connect() as conn:
                return self._check_input_free(name, conn)
        exists = conn.execute(sa.select(RunInput.id).where(RunInput.run_id == self.id, RunInput.name == name))
        if exists.first() is not None:
            raise self._input_taken(name)

    def _input_taken(self, name: str) -> DataError:
        return DataError(f"run {self.id} already logged an input named {name!r}; log this one under another name")

    def _stage_table(self, table, name: str) -> tuple[str, int, str]:
        """Stage ``table`` as the Parquet artifact ``name`` (see ArtifactStore.stage_file): (staged, size, sha256)."""
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "t.parquet"
            pq.write_table(table, local)
            return self._store.artifacts.stage_file(self.id, local, name)

    # ---------------------------------------------------------- artifacts
    def log_artifact(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Store a local file or folder as an artifact of this run; returns its name.

        A name a registered model version points to, or the entity rows a logged input keeps (or one inside
        either, or a folder holding either) is refused with a DataError before anything is written: a
        registered version's files, and the evidence lineage's verify rebuilds an input from, are frozen."""
        source = Path(path)
        name = check_name(source.name if name is None else name)
        if not source.is_dir() and not source.is_file():
            raise DataError(f"log_artifact: {str(path)!r} is not a file or folder")
        self._check_writable(name, "log_artifact")
        stage = self._store.artifacts.stage_dir if source.is_dir() else self._store.artifacts.stage_file
        self._place(stage(self.id, source, name), name, "file", {}, "log_artifact")
        return name

    def log_model(self, model: Any, name: str = "model", *, signature: Signature | Mapping | None = None,
                  example_input: Any = None, columns: Sequence[str] | None = None,
                  fill_null: float | Mapping[str, float | None] | None = 0.0) -> dict[str, Any]:
        """Store a torch module: TorchScript when scriptable (or traceable on ``example_input``), its state
        dict, its signature (given, or read off ``example_input``) and the torch version. ``columns``
        names the input tensor's columns in order (features and request-time fields) for predict.

        ``fill_null`` is what ``p.serving.predict`` gives the model where an input has no value (an entity
        the online store has no row for, a null feature value, a None request-time value): fill as the
        training data was filled, so the model sees at serving what it saw in training.

        - a number (default 0.0): that value for every column;
        - a mapping column -> number: the value for each column it names; a column it does not name, or
          names with None, is refused where missing (as with None), so no column is filled by accident;
        - None: never fill: predict raises a DataError naming the column(s) and entity rows with no value.

        Numbers are ints or finite floats (not bools) that the input's type holds (a whole number for an
        integer input); mapping keys must be among ``columns`` when given. A bad value is a DataError and
        nothing is stored. The rule is kept in the artifact's metadata (``fill_null``).

        A name a registered model version points to (or an input's kept entity rows, as for log_artifact)
        is refused with a DataError, and nothing is stored: log the new model under another name, or in a
        new run, and register that. A registration running at the same time either comes first (and this
        call is refused) or records the files this call stored."""
        check_name(name)
        self._check_writable(name, "log_model")
        with tempfile.TemporaryDirectory() as tmp:
            meta = save_torch_model(model, Path(tmp) / "model", signature=signature, example_input=example_input,
                                    columns=columns, fill_null=fill_null)
            staged = self._store.artifacts.stage_dir(self.id, Path(tmp) / "model", name)
        self._place(staged, name, "model", meta, "log_model")
        return meta

    def _check_writable(self, name: str, action: str) -> None:
        """The checks of :meth:`_place`, made early (before the files are staged) so a refused call is cheap."""
        with self._store._db.connect() as conn:
            _check_unregistered(conn, self.id, name, action)
            _check_not_evidence(conn, self.id, name, action)

    def _place(self, staged: tuple[str, int, str], name: str, kind: str, meta: dict, action: str, *,
               conn: Any = None, own_input: str | None = None) -> None:
        """Put ``staged`` (ArtifactStore.stage_file/stage_dir's (path, size, sha256)) in place as artifact
        ``name`` and upsert its row, in one write transaction (``conn``'s when given): lock the rows, check
        (not registered, not an input's kept entity rows), swap the files in, record them. A failure before
        the swap changes nothing; the staged copy is then discarded (here, or by the caller that passed
        ``conn``)."""
        db = self._store._db
        if conn is None:
            try:
                with db.connect(write=True) as conn:
                    return self._place(staged, name, kind, meta, action, conn=conn, own_input=own_input)
            except BaseException:
                self._store.artifacts.discard(staged[0])  # nothing there once it was swapped in
                raise
        path, size, sha = staged
        _lock_rows(conn, self.id, name)
        _check_unregistered(conn, self.id, name, action)
        _check_not_evidence(conn, self.id, name, action, own=own_input)
        self._store.artifacts.swap_in(self.id, path, name)
        # The files are in place. Should the upsert or the commit still fail (the database gone), the row keeps
        # describing the files they replaced (or is missing) while the store holds the new ones: no version
        # can have been registered on it meanwhile (the lock), one registered later records the old sha256, so
        # load refuses these files ("changed after registration") rather than serve files nobody registered;
        # logging the artifact again sets the row right.
        insert = (postgresql.insert if db.dialect == "postgresql" else sqlite.insert)(RunArtifact)
        conn.execute(insert.values(run_id=self.id, path=name, kind=kind, size=size, sha256=sha,
                                   meta=meta).on_conflict_do_update(
            index_elements=["run_id", "path"], set_={"kind": kind, "size": size, "sha256": sha, "meta": meta}))
        # what it replaced whole (artifacts inside it) is gone; the folders holding it now hold other files
        mine = RunArtifact.run_id == self.id
        conn.execute(sa.delete(RunArtifact).where(mine, RunArtifact.path.startswith(name + "/", autoescape=True)))
        for holder in conn.scalars(sa.select(RunArtifact.path).where(mine, RunArtifact.path.in_(_holders(name)))).all():
            size, sha = self._store.artifacts.measure(self.id, holder)
            conn.execute(sa.update(RunArtifact).where(mine, RunArtifact.path == holder).values(size=size, sha256=sha))

    # ---------------------------------------------------------------- end
    def end(self, status: str = "finished") -> None:
        """Flush metrics and close the run with ``status`` (finished, failed or killed)."""
        if status not in RUN_STATUSES[1:]:
            raise DataError(f"a run ends as one of {', '.join(RUN_STATUSES[1:])}, not {status!r}")
        if self._ended:
            return
        if os.getpid() != self._pid:  # a forked child's copy (its exit ended the parent's running run)
            self._metrics.flush()  # the points the child logged; the run's status is its owner's to set
            return
        failure: BaseException | None = None  # the root cause, raised once the run's status is settled
        try:
            self._metrics.close()
        except BaseException as exc:  # metrics could not be written: the run did not end well
            failure, status = exc, "failed"
            try:
                self._store._set_tags(self.id, {"mlplat.error": f"writing metrics failed: {exc}"[:4000]})
            except Exception as tag_exc:  # noqa: BLE001 - the database is likely gone: keep the first error
                _add_note(exc, f"setting the mlplat.error tag of run {self.id} failed too: {tag_exc}")
        try:
            with self._store._db.connect(write=True) as conn:
                ended = conn.execute(sa.update(Run).where(Run.id == self.id).values(
                    status=status, end_time=datetime.now(timezone.utc)))
                if ended.rowcount == 0:
                    raise NotFoundError(f"run {self.id} is no longer in the database (was it reset, or the run "
                                        "deleted?): it cannot be ended; start a new run")
        except BaseException as exc:  # the run stays open, as its row says: end() may be called again
            if failure is None:
                raise
            _add_note(failure, f"marking run {self.id} {status} failed too: {exc}; the run is still open "
                               "(running): call run.end() again once the database answers")
        else:
            self._ended = True
            self._store._forget(self)
        if failure is not None:  # raised here, not in the handler above: its context stays its own
            raise failure

    def __enter__(self) -> ActiveRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or os.getpid() != self._pid or _clean_exit(exc):  # a forked child leaving: see end()
            self.end("finished")
            return
        # the block's own exception goes on: failing to record it (the database gone, say) is added to it as
        # a note, not raised in its place (which would hide why the block failed)
        status = "killed" if isinstance(exc, KeyboardInterrupt) else "failed"
        steps = (("tag it with the error", lambda: self._store._set_tags(
                     self.id, {"mlplat.error": f"{exc_type.__name__}: {exc}"[:4000]})),
                 (f"end it as {status}", lambda: self.end(status)))
        for what, step in steps:
            try:
                step()
            except Exception as failure:  # noqa: BLE001 - reported on the block's exception
                _add_note(exc, f"mlplat could not {what} (run {self.id}): {type(failure).__name__}: {failure}")

