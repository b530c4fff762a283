"""``mp.ABGateway``: champion/challenger routing that a user cannot flip between.

A user's bucket is XXH64 (native, :mod:`mlplat._native._hashing`) of the salt
(by default the experiment id, so that two experiments split users independently)
and the user id, as a number in [0, 1): the same on every process, machine and
Python version, unlike Python's ``hash()``, which is salted per process. Users
in [0, challenger_fraction) get the challenger. Every decision (user, variant,
model version, time) and every recorded outcome is written to the SQL
database in the background; ``summary()`` compares the variants.

Model references: ``"fraud"`` (the production version), ``"fraud@3"`` (version 3),
``"fraud@staging"`` (a stage), ``"fraud@champion"`` (an alias).

Usage::

    gateway = mp.ABGateway("fraud", "fraud@staging", challenger_fraction=0.1, experiment_id="fraud-v7",
                           salt="2026-11", platform=p)
    result = gateway.predict(user_id=42, entity_rows=[{"user_id": 42, "merchant_id": "m0001", "amount": 19.9}])
    gateway.record_outcome(42, 1.0)
    gateway.summary()
"""
from __future__ import annotations

import math
import numbers
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa

from .. import _background
from .._checks import as_int, require_number, shown, storable
from .._expiring import Expiring
from .._native import _hashing
from .._time import utc_argument
from ..db.batches import OnceWriter
from ..db.models import ABDecision, ABOutcome
from ..errors import DataError, ServingError
from ..models.registry import STAGES

if TYPE_CHECKING:
    from .predict import Prediction

__all__ = ["ABGateway", "Decision", "parse_model_ref", "user_key"]

_SCALE = 2.0 ** -53
_MAX_ROWS = 10_000  # decisions and outcomes waiting that wake the flusher (it also writes every second)


def parse_model_ref(ref: str) -> tuple[str, dict[str, Any]]:
    """``"fraud@3"`` -> ("fraud", {"version": 3}); stages and aliases likewise; bare: production.

    >>> parse_model_ref("fraud@staging")
    ('fraud', {'stage': 'staging'})
    """
    if not isinstance(ref, str) or not ref or ref.count("@") > 1:
        raise DataError(f"model reference {ref!r}: write 'name', 'name@version', 'name@stage' or 'name@alias'")
    name, _, sel = ref.partition("@")
    if not sel:
        return name, {"stage": "production"}
    if sel.isdigit():
        return name, {"version": int(sel)}
    if sel.lower() in STAGES:  # "fraud@Production" is the stage (no alias may be named so)
        return name, {"stage": sel.lower()}
    return name, {"alias": sel}


@dataclass(frozen=True)
class Decision:
    user_id: str
    variant: str
    model: str
    version: int
    bucket: float


def user_key(user_id: Any) -> str:
    """A user id as the gateway hashes and logs it: a string as it is, an integer in decimal, and a float
    that holds a whole number as that integer (an id column with a missing value arrives from pandas as
    floats: 42.0 is user 42), a UUID as its string. Bools, None, NaN and other types are refused (their
    strings may hold a memory address, different in every process), and so is an id the decision log cannot
    store: over 255 characters as written, or holding a NUL or a lone surrogate (PostgreSQL refused such a
    row in the background, and with it every row the experiment logged after it).

    >>> user_key(42), user_key(42.0), user_key("u-42")
    ('42', '42', 'u-42')
    """
    if isinstance(user_id, (str, uuid.UUID)):
        key = str(user_id)
    elif (number := as_int(user_id)) is not None:  # int, numpy integers
        if number.bit_length() > 900:  # over 255 digits, and str() refuses past 4300
            raise DataError(f"a user id is at most {_USER_KEY_MAX} characters as written, got an integer of "
                            f"{number.bit_length()} bits")
        key = str(number)
    elif isinstance(user_id, (float, np.floating)) and math.isfinite(user_id):
        key = str(int(user_id)) if float(user_id).is_integer() else repr(float(user_id))
    else:
        raise DataError(f"a user id must be a string or a number, got {user_id!r}")
    if len(key) > _USER_KEY_MAX:
        raise DataError(f"a user id is at most {_USER_KEY_MAX} characters as written (the decision log's column), "
                        f"got {len(key)}: {shown(key)}")
    return storable(key, "a user id")


_USER_KEY_MAX = 255


def _insert_rows(conn: sa.Connection, taken: dict[Any, list[dict]]) -> None:
    for table, rows in taken.items():
        if rows:
            conn.execute(sa.insert(table), rows)


class _Writes:
    """Rows waiting for one INSERT per table, flushed by the background thread; ``owner`` names them in errors."""

    def __init__(self, db, owner: str = "the A/B gateway") -> None:
        self._db = db
        self._owner = owner
        self._rows: dict[Any, list[dict]] = {ABDecision: [], ABOutcome: []}
        # re-entrant: a signal handler may close() the gateway on a thread inside add(), flush() or serving()
        self._lock = threading.RLock()
        self._flush_lock = threading.RLock()  # one flush at a time: a flush returns after one running elsewhere
        self._closed = False
        self._serving: dict[int, int] = {}  # thread -> predictions under way there, whose decisions close() waits for
        self._idle = threading.Condition(self._lock)
        self._flushing: int | None = None  # the thread inside flush()
        self._close_pending: int | None = None  # the thread busy here that close() was called on: it finishes it
        # each flush's rows are written once, also when an interrupt hides the commit (mlplat.db.batches)
        self._once: OnceWriter[dict[Any, list[dict]], dict[Any, list[dict]]] = OnceWriter(
            db, _insert_rows, lambda taken: taken)
        _background.register(self)

    def forked(self) -> None:
        """In a forked child: nothing buffered (the parent writes what was buffered at the fork) and fresh
        locks (one held by a thread at the fork is never released in the child)."""
        self._lock, self._flush_lock = threading.RLock(), threading.RLock()
        self._idle, self._serving, self._flushing = threading.Condition(self._lock), {}, None
        self._close_pending = None
        self._rows = {ABDecision: [], ABOutcome: []}
        self._once.forked()

    def add(self, table, row: dict, *, serving: bool = False) -> None:
        """Buffer one row; refused once closed, except the decision of a prediction made inside
        :meth:`serving`, which close() waits for."""
        with self._lock:  # closed under the same lock: a row added here is in close()'s flush, or refused
            if self._closed and not serving:
                raise self.closed_error()
            self._rows[table].append(row)
            n = len(self._rows[ABDecision]) + len(self._rows[ABOutcome])
        _background.added(self, n, _MAX_ROWS)

    def __len__(self) -> int:
        return sum(len(r) for r in self._rows.values()) + self._once.waiting

    def _take(self) -> tuple[dict[Any, list[dict]], int]:
        with self._lock:
            taken, self._rows = self._rows, {ABDecision: [], ABOutcome: []}
        return taken, sum(len(r) for r in taken.values())

    def flush(self) -> None:
        """Write what is buffered, and the rows of failed flushes first (no transaction when there is none)."""
        me = threading.get_ident()
        with self._flush_lock:
            if self._flushing == me:  # called again inside a flush of this thread (a signal handler's p.close()):
                return  # the flush under way writes; a nested one failed on its own thread's write lock
            self._flushing = me
            try:
                self._once.flush(self._take)
            finally:
                self._flushing = None
        self._close_if_pending()

    def closed_error(self) -> ServingError:
        return ServingError(f"{self._owner} is closed: it logs no more decisions or outcomes (nothing was "
                            "logged or served); make a new mp.ABGateway to go on with the experiment")

    @contextmanager
    def serving(self) -> Iterator[None]:
        """A prediction whose decision is logged once it is made: refused once closed, and close() waits for
        it (a close meanwhile failed the caller with "nothing was served" after the model had served it)."""
        me = threading.get_ident()
        with self._lock:
            if self._closed:
                raise self.closed_error()
            self._serving[me] = self._serving.get(me, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._serving[me] -= 1
                if not self._serving[me]:
                    del self._serving[me]
                self._idle.notify_all()
            self._close_if_pending()

    def _close_if_pending(self) -> None:
        """Finish a close() called on this thread while it predicted or flushed, once it no longer does (only
        this thread: another's prediction, or the background flusher, would wait for it in close())."""
        with self._lock:
            me = threading.get_ident()
            if self._close_pending != me or me in self._serving or self._flushing == me:
                return
            self._close_pending = None
        self.close()

    def check_open(self) -> None:
        if self._closed:
            raise self.closed_error()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            me = threading.get_ident()
            if me in self._serving or self._flushing == me:  # a signal handler interrupting this thread here:
                self._close_pending = me  # waiting for itself hung for ever; what it was doing ends the close
                return
            self._idle.wait_for(lambda: not self._serving)  # each ends within its backend's timeout
        self.flush()  # a failure leaves the rows buffered (and registered): a later flush() or close() retries
        with self._flush_lock:
            self._once.tidy()
        _background.unregister(self)


class ABGateway:
    """Routes each user to the champion or the challenger by a stable hash, and logs every decision."""

    def __init__(self, champion: str, challenger: str, challenger_fraction: float, experiment_id: str,
                 salt: str | None = None, *, platform: Any, version_cache_seconds: float = 10.0) -> None:
        if isinstance(challenger_fraction, numbers.Real) and not isinstance(challenger_fraction, bool):
            challenger_fraction = float(challenger_fraction)  # np.float32(0.1) too
        require_number("challenger_fraction", challenger_fraction, low=0, high=1, meaning="a share between 0 and 1")
        if not isinstance(experiment_id, str) or not experiment_id.strip() or len(experiment_id) > 255:
            raise DataError(f"experiment_id must be a non-empty string, got {experiment_id!r}")
        storable(experiment_id, "experiment_id")
        if salt is not None and not isinstance(salt, str):
            raise DataError(f"salt must be a string (or None: the experiment id), got {type(salt).__name__} "
                            f"{salt!r}")
        self.champion, self.challenger = parse_model_ref(champion), parse_model_ref(challenger)
        self.challenger_fraction = float(challenger_fraction)
        self.experiment_id = experiment_id
        # by default each experiment splits its own way: one salt for all routed the same users to every
        # experiment's challenger (a 10 % challenger of one was the 10 % of the next)
        self.salt = experiment_id if salt is None else salt
        self._platform = platform
        self._writes = _Writes(platform.db, f"ABGateway of experiment {experiment_id!r}")
        platform.serving._gateways.add(self)  # p.close() writes what it buffered (a worker may exit without atexit)
        self._versions: Expiring[int] = Expiring(version_cache_seconds)  # variant -> its version

    # ------------------------------------------------------------ routing
    def bucket(self, user_id: Any) -> float:
        """The user's place in [0, 1): XXH64 of the salt (by default the experiment id) and the user id (as
        :func:`user_key` writes it), the same everywhere."""
        h = _hashing.xxh64(f"{self.salt}\x00{user_key(user_id)}".encode())
        return (h >> 11) * _SCALE

    def variant(self, user_id: Any) -> str:
        """``"challenger"`` for the first ``challenger_fraction`` of buckets, else ``"champion"``."""
        return "challenger" if self.bucket(user_id) < self.challenger_fraction else "champion"

    def _version(self, variant: str) -> tuple[str, int]:
        name, sel = self.champion if variant == "champion" else self.challenger
        return name, self._versions.get(variant, lambda: self._platform.models.get(name, **sel).version)

    def route(self, user_id: Any) -> Decision:
        """Decide and log (in the background) which variant serves this user; ServingError once closed."""
        self._writes.check_open()
        decision = self._decide(user_id)
        self._log(decision)
        return decision

    def predict(self, user_id: Any, entity_rows: Any, **kwargs: Any) -> Prediction:
        """Route the user, then ``p.serving.predict`` with the chosen model version. The decision is logged
        once the prediction is made: a request refused (bad entity rows, say) is not counted as served."""
        chosen = sorted(set(kwargs) & {"version", "stage", "alias", "variant", "model"})
        if chosen:
            raise DataError(f"gateway.predict chooses the model version and variant itself; leave out "
                            f"{', '.join(chosen)} (p.serving.predict serves a version of your choosing)")
        with self._writes.serving():  # not served when its decision could not be logged
            decision = self._decide(user_id)
            result = self._platform.serving.predict(decision.model, entity_rows, version=decision.version,
                                                    variant=decision.variant, **kwargs)
            if any(len(column) for column in result.values()):  # a request of no rows served nothing to count
                self._log(decision, serving=True)
        return result

    def _decide(self, user_id: Any) -> Decision:
        bucket = self.bucket(user_id)
        variant = "challenger" if bucket < self.challenger_fraction else "champion"
        model, version = self._version(variant)
        return Decision(user_key(user_id), variant, model, version, bucket)

    def _log(self, d: Decision, *, serving: bool = False) -> None:
        self._writes.add(ABDecision, {"experiment_id": self.experiment_id, "user_id": d.user_id,
                                      "variant": d.variant, "model": d.model, "model_version": d.version,
                                      "at": datetime.now(timezone.utc)}, serving=serving)

    def record_outcome(self, user_id: Any, outcome: float, at: datetime | None = None) -> None:
        """An observed outcome (e.g. 1.0 for fraud caught) for a user of this experiment; ServingError once
        the gateway is closed."""
        self._writes.check_open()
        if not isinstance(outcome, numbers.Real) or isinstance(outcome, (bool, np.bool_)):
            raise DataError(f"an outcome must be a number (an int or a float), got {type(outcome).__name__} "
                            f"{outcome!r}")  # '1.5', True and b'1' were stored as 1.5, 1.0 and 1.0
        try:
            value = float(outcome)
        except OverflowError:  # an int past the float range
            value = math.inf
        if not math.isfinite(value):
            raise DataError(f"an outcome must be a finite number, not NaN or infinity, got {value}")
        when = datetime.now(timezone.utc) if at is None else utc_argument("at", at)
        self._writes.add(ABOutcome, {"experiment_id": self.experiment_id, "user_id": user_key(user_id),
                                     "outcome": value, "at": when})

    def flush(self) -> None:
        """Write every decision and outcome logged so far."""
        self._writes.flush()

    def close(self) -> None:
        """Write what is buffered (decisions, outcomes) and stop logging: ``route``, ``predict`` and
        ``record_outcome`` raise ServingError from then on (``bucket``, ``variant`` and ``summary`` still
        answer). Predictions under way finish first, with their decisions written. Closing again writes what a
        failed close left buffered."""
        self._writes.close()

    # ------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        """Per variant: decisions, users, outcomes, mean and standard deviation; and challenger minus champion
        with a 95 % confidence interval (normal approximation) whose standard error takes the user as the
        unit, as the split randomizes users: the delta method for the mean outcome of clustered rows, which
        is Welch's standard error when every user has one outcome. (Counting each outcome as independent
        understates the error when users report several: ten users with a hundred like outcomes each are
        ten observations, not a thousand.)"""
        self.flush()
        e = self.experiment_id
        with self._platform.db.connect() as conn:
            counts = conn.execute(sa.select(ABDecision.variant, sa.func.count(),
                                            sa.func.count(sa.distinct(ABDecision.user_id)))
                                  .where(ABDecision.experiment_id == e).group_by(ABDecision.variant)).all()
            stats = {row[0]: row[1:] for row in conn.execute(_outcome_stats(e))}
            by_user = {row[0]: (row[1], *map(float, row[2:])) for row in conn.execute(_user_stats(e))}  # PG: numeric
        variants: dict[str, dict[str, Any]] = {
            v: {"model": (self.champion if v == "champion" else self.challenger)[0], "decisions": 0, "users": 0,
                "outcomes": 0, "outcome_users": 0, "mean": None, "std": None} for v in ("champion", "challenger")}
        for v, n, users in counts:
            variants[v].update(decisions=n, users=users)
        for v, (n, mean, squares) in stats.items():
            var = squares / (n - 1) if n > 1 else None
            variants[v].update(outcomes=n, outcome_users=by_user[v][0], mean=mean,
                               std=math.sqrt(var) if var is not None else None)
        a, b = variants["champion"], variants["challenger"]
        difference = None
        if a["outcome_users"] > 1 and b["outcome_users"] > 1:
            est = b["mean"] - a["mean"]
            se = math.sqrt(sum(_clustered_variance(*by_user[v]) for v in ("champion", "challenger")))
            difference = {"estimate": est, "ci95": [est - 1.96 * se, est + 1.96 * se], "std_error": se}
        return {"experiment_id": e, "challenger_fraction": self.challenger_fraction, "variants": variants,
                "difference": difference}


def _clustered_variance(users: int, mean_sum: float, mean_count: float, ss: float, nn: float, sn: float) -> float:
    """The variance of a variant's mean outcome (sum over count of the users' outcomes) by the delta method,
    from the users' outcome sums S and counts N: their number, means, and summed squared deviations
    (S, N) and cross products. With one outcome per user it is the outcomes' variance over their number.

    >>> _clustered_variance(4, 2.5, 1.0, 5.0, 0.0, 0.0)  # one outcome each: 1, 2, 3, 4
    0.4166666666666667
    """
    ratio = mean_sum / mean_count
    spread = (ss - 2 * ratio * sn + ratio * ratio * nn) / (users - 1)
    return max(spread, 0.0) / (users * mean_count * mean_count)


def _computed_once(query: sa.Select, name: str) -> sa.CTE:
    """``query`` as a WITH query that PostgreSQL computes once: joined back to what it aggregates, a subquery
    was re-run for every user in a nested loop the planner chose on its row estimate of 1 (summary() of 3,000
    users took 10 s, of 20,000 minutes); SQLite computes it once either way."""
    return query.cte(name).prefix_with("MATERIALIZED", dialect="postgresql")


def _assigned_outcomes(experiment_id: str) -> sa.CTE:
    """Each outcome with its user and the variant of that user's first decision: a user routed to both (the
    split changed during a ramp-up, two gateways with different fractions) counts once, for the first."""
    d = ABDecision
    ranked = sa.select(d.user_id, d.variant, sa.func.row_number().over(  # a tie: the variant first by name
        partition_by=d.user_id, order_by=(d.at, d.variant)).label("nth")).where(d.experiment_id == experiment_id)
    ranked = ranked.subquery()
    assigned = sa.select(ranked.c.user_id, ranked.c.variant).where(ranked.c.nth == 1).subquery()
    return _computed_once(sa.select(assigned.c.variant, assigned.c.user_id, ABOutcome.outcome.label("x"))
                          .join(assigned, assigned.c.user_id == ABOutcome.user_id)
                          .where(ABOutcome.experiment_id == experiment_id), "outcomes")


def _outcome_stats(experiment_id: str) -> sa.Select:
    """Per variant: outcomes, their mean and their squared deviations from it, summed.

    Two passes (the mean, then the deviations from it) instead of ``avg(x*x) - avg(x)^2``, which
    cancels to nothing for large outcomes (1e9 + a few: a standard deviation of 0).
    """
    outcomes = _assigned_outcomes(experiment_id)
    means = _computed_once(sa.select(outcomes.c.variant, sa.func.count().label("n"),
                                     sa.func.avg(outcomes.c.x).label("mean")).group_by(outcomes.c.variant), "means")
    deviation = outcomes.c.x - means.c.mean
    return (sa.select(means.c.variant, means.c.n, means.c.mean, sa.func.sum(deviation * deviation))
            .join(means, means.c.variant == outcomes.c.variant)
            .group_by(means.c.variant, means.c.n, means.c.mean))


def _user_stats(experiment_id: str) -> sa.Select:
    """Per variant, over its users with outcomes: their number, the mean of their outcome sums S and counts N,
    and the summed squared deviations of S and of N and their cross products (two passes, as above)."""
    outcomes = _assigned_outcomes(experiment_id)
    per_user = _computed_once(sa.select(outcomes.c.variant, sa.func.sum(outcomes.c.x).label("s"),
                                        sa.func.count().label("n"))
                              .group_by(outcomes.c.variant, outcomes.c.user_id), "per_user")
    means = _computed_once(sa.select(per_user.c.variant, sa.func.count().label("users"),
                                     sa.func.avg(per_user.c.s).label("ms"), sa.func.avg(per_user.c.n).label("mn"))
                           .group_by(per_user.c.variant), "means")
    ds, dn = per_user.c.s - means.c.ms, per_user.c.n - means.c.mn
    return (sa.select(means.c.variant, means.c.users, means.c.ms, means.c.mn, sa.func.sum(ds * ds),
                      sa.func.sum(dn * dn), sa.func.sum(ds * dn))
            .join(means, means.c.variant == per_user.c.variant)
            .group_by(means.c.variant, means.c.users, means.c.ms, means.c.mn))
