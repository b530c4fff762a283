"""The feature catalog on SQLite and PostgreSQL: apply, versions, discovery, invalid definitions."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlplat as mp

TS = pa.timestamp("us", tz="UTC")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "txn"
    folder.mkdir()
    pq.write_table(pa.table({
        "user_id": pa.array([1, 2], pa.int64()),
        "event_timestamp": pa.array([0, 1], TS),
        "created_timestamp": pa.array([0, 1], TS),
        "txn_count": pa.array([1, 2], pa.int32()),
        "amount": pa.array([1.0, 2.0]),
        "note": ["a", "b"],
    }), folder / "part-0.parquet")
    return folder


USER = mp.Entity("user", join_keys=["user_id"], description="a card holder", tags={"domain": "payments"})


def view(src, **changes) -> mp.FeatureView:
    args = dict(
        entities=[USER], ttl=timedelta(days=30),
        schema=[mp.Field("txn_count", mp.Int64), mp.Field("amount", mp.Float64, description="sum of amounts")],
        source=mp.ParquetSource(src, created_timestamp_field="created_timestamp"),
        description="7-day transaction aggregates", tags={"team": "risk"}, owner="alice",
    )
    args.update(changes)
    return mp.FeatureView(args.pop("name", "user_txn"), **args)


def test_apply_is_idempotent_and_versions_changes(platform, source):
    first = platform.features.apply([USER, view(source)])
    assert [(r.kind, r.name, r.version, r.changed) for r in first] == [
        ("entity", "user", 1, True), ("feature_view", "user_txn", 1, True)]
    again = platform.features.apply([view(source), USER])
    assert [(r.version, r.changed) for r in again] == [(1, False), (1, False)]
    changed = platform.features.apply([view(source, ttl=timedelta(days=7))])
    assert (changed[0].version, changed[0].changed) == (2, True)
    assert platform.features.get_feature_view("user_txn").ttl == timedelta(days=7)
    assert platform.features.get_feature_view("user_txn", version=1).ttl == timedelta(days=30)
    assert [e.version for e in platform.features.versions("feature_view", "user_txn")] == [1, 2]
    # going back to an earlier definition is a change too: a new version, history kept
    assert platform.features.apply([view(source)])[0].version == 3


def test_stored_definition_round_trips(platform, source):
    v = view(source)
    platform.features.apply([USER, v])
    got = platform.features.get_feature_view("user_txn")
    assert got == v and got.version == 1 and got.created_at is not None
    assert got.key_types == {"user_id": "int"} and got.owner == "alice"
    assert got.field("amount").description == "sum of amounts"
    assert platform.features.get_entity("user").join_keys == ["user_id"]


def test_list_and_search_for_discovery(platform, source):
    svc = mp.FeatureService("fraud_model", features=["user_txn:amount"], description="features of the fraud model",
                            tags={"team": "risk"})
    platform.features.apply([USER, view(source), view(source, name="user_notes", tags={"team": "growth"},
                                                        schema=[mp.Field("note", mp.String)],
                                                        description="free text"), svc])
    names = lambda entries: [(e.kind, e.name) for e in entries]  # noqa: E731
    assert names(platform.features.list()) == [("entity", "user"), ("feature_service", "fraud_model"),
                                               ("feature_view", "user_notes"), ("feature_view", "user_txn")]
    assert names(platform.features.list("feature_view", tags={"team": "risk"})) == [("feature_view", "user_txn")]
    assert names(platform.features.list(tags={"team": "risk"})) == [("feature_service", "fraud_model"),
                                                                    ("feature_view", "user_txn")]
    assert names(platform.features.search("AMOUNT")) == [("feature_service", "fraud_model"),
                                                         ("feature_view", "user_txn")]
    assert names(platform.features.search("card holder")) == [("entity", "user")]
    assert names(platform.features.search("text", kind="feature_view")) == [("feature_view", "user_notes")]
    assert platform.features.search("nothing like this") == []
    entry = platform.features.list("feature_view", tags={"team": "growth"})[0]
    assert entry.tags == {"team": "growth"} and entry.definition().feature_names == ["note"]
    assert platform.features.get_feature_service("fraud_model").features == ["user_txn:amount"]


def test_unknown_names_suggest_close_matches(platform, source):
    platform.features.apply([USER, view(source)])
    with pytest.raises(mp.NotFoundError, match="did you mean 'user_txn'"):
        platform.features.get_feature_view("user_tx")
    with pytest.raises(mp.NotFoundError, match="has no version 4"):
        platform.features.get_feature_view("user_txn", version=4)
    with pytest.raises(mp.NotFoundError, match="nothing of that kind"):
        platform.features.get_feature_service("svc")
    with pytest.raises(mp.DefinitionError, match="unknown kind"):
        platform.features.list("tables")


@pytest.mark.parametrize("version", [10**30, 2**31, 0, -1, "2", 2.0, True])
def test_a_version_that_is_not_1_to_2_31_minus_1_is_a_data_error(platform, source, version):
    # 10**30 overflowed the database query (sqlite's OverflowError, PostgreSQL's NumericValueOutOfRange)
    platform.features.apply([USER, view(source)])
    with pytest.raises(mp.DataError, match=r"version must be a version number \(an int: 1, 2, ..., at most "
                                           r"2147483647\), got "):
        platform.features.get_feature_view("user_txn", version=version)
    with pytest.raises(mp.DataError, match="version must be a version number"):
        platform.features.catalog.get("feature_view", "user_txn", version)
    assert platform.features.get_feature_view("user_txn", version=1).version == 1


def test_a_feature_reference_past_the_last_version_is_a_data_error(platform, source):
    platform.features.apply([USER, view(source)])
    service = mp.FeatureService("svc", features=[f"user_txn@{10**30}:amount"])
    with pytest.raises(mp.DataError, match="version must be a version number"):
        platform.features.apply([service])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s: view(s, schema=[mp.Field("nope", mp.Int64)]), "field 'nope' is missing from the source"),
        (lambda s: view(s, schema=[mp.Field("note", mp.Int64)]), "field 'note' is declared Int64 but the source"),
        (lambda s: view(s, schema=[mp.Field("amount", mp.Float32)]), "declared Float32 but the source .* double"),
        (lambda s: view(s, source=mp.ParquetSource(s / "missing")), "does not exist"),
        (lambda s: view(s, source=mp.ParquetSource(s, timestamp_field="note")), "'note' is string.*not a timestamp"),
        (lambda s: view(s, source=mp.ParquetSource(s, timestamp_field="ts")), "timestamp field 'ts' is missing"),
        (lambda s: view(s, entities=[mp.Entity("user", join_keys=["uid"])]), "join key 'uid' is missing"),
        (lambda s: view(s, entities=[mp.Entity("user", join_keys=["amount"])], schema=[mp.Field("note", mp.String)]),
         "join key 'amount' is double.*integers or strings"),
        (lambda s: view(s, ttl=timedelta(days=365 * 400)), "ttl .* longer than 36525 days .* use ttl=None"),
        (lambda s: view(s, ttl=timedelta.max), "ttl .* longer than 36525 days"),
    ],
)
def test_invalid_definitions_are_refused_and_nothing_is_stored(platform, source, make, message):
    with pytest.raises(mp.DefinitionError, match=message):
        platform.features.apply([USER, make(source)])
    assert platform.features.list() == []  # the valid entity in the same call was not stored either


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda s: mp.Field("x", "int128"), "unknown dtype 'int128'"),
        (lambda s: mp.Field("x", int), "must be an mlplat dtype"),
        (lambda s: view(s, schema=[mp.Field("amount", mp.Float64), mp.Field("amount", mp.Float64)]),
         "duplicate field 'amount'"),
        (lambda s: view(s, schema=[]), "non-empty list of mp.Field"),
        (lambda s: view(s, schema=[mp.Field("user_id", mp.Int64)]), "also a join key"),
        (lambda s: view(s, entities=[]), "non-empty list of mp.Entity"),
        (lambda s: view(s, ttl=timedelta(days=-1)), "non-negative timedelta"),
        (lambda s: view(s, ttl=30), "non-negative timedelta"),
        (lambda s: view(s, tags={"team": 1}), "tags must be a dict of str to str"),
        (lambda s: view(s, name="bad name"), "name 'bad name' is invalid"),
        (lambda s: mp.Entity("user", join_keys="user_id"), "non-empty list"),
        (lambda s: mp.Entity("user", join_keys=["a", "a"]), "listed twice"),
        (lambda s: mp.FeatureService("svc", features=[]), "lists no features"),
        (lambda s: mp.FeatureService("svc", features=["v:a", "v:a"]), "twice"),
        (lambda s: mp.FeatureService("svc", features=["v"]), "'view:feature'"),
        (lambda s: mp.ParquetSource(s, timestamp_field="t", created_timestamp_field="t"), "must differ"),
        # a trailing newline is not part of a valid name ("$" matched before it)
        (lambda s: mp.Entity("user\n", join_keys=["user_id"]), r"entity name 'user\\n' is invalid"),
        (lambda s: mp.Field("x\n", mp.Int64), r"field name 'x\\n' is invalid"),
        (lambda s: mp.FeatureService("svc", features=["v:a\n"]), "'view:feature'"),
        # descriptions are text, on fields as on definitions
        (lambda s: mp.Field("x", mp.Int64, description=7), "field 'x': description must be a string, got int"),
        (lambda s: mp.Field("x", mp.Int64, description=None), "field 'x': description must be a string"),
        (lambda s: mp.Field("x", mp.Int64, description=b"x"), "field 'x': description must be a string"),
        (lambda s: mp.Entity("user", join_keys=["user_id"], description=None), "entity 'user': description"),
        (lambda s: view(s, description=3), "feature view 'user_txn': description must be a string"),
        (lambda s: mp.FeatureService("svc", features=["v:a"], description=None), "feature service 'svc': descr"),
        # one-shot iterables are read once: an empty one is empty, a non-iterable is refused
        (lambda s: view(s, schema=(f for f in [])), "non-empty list of mp.Field"),
        (lambda s: view(s, schema=mp.Field("amount", mp.Float64)), "non-empty list of mp.Field"),
        (lambda s: view(s, entities=(e for e in [])), "non-empty list of mp.Entity"),
        (lambda s: mp.Entity("user", join_keys=(k for k in [])), "non-empty list"),
        (lambda s: mp.Entity("user", join_keys=5), "non-empty list"),
        # lengths the database columns hold, checked when built and naming the definition
        (lambda s: view(s, owner="o" * 256), "feature view 'user_txn': owner is 256 characters long; at most 255"),
        (lambda s: mp.Entity("user", join_keys=["user_id"], tags={"k" * 256: "v"}),
         "entity 'user': tag key 'kkk.*' is 256 characters long; at most 255"),
        (lambda s: mp.FeatureService("svc", features=["v:a"], tags={"team": "v" * 1025}),
         "feature service 'svc': the value of tag 'team' is 1025 characters long; at most 1024"),
        # sub-microsecond ttl cannot be stored: refused, not rounded
        (lambda s: view(s, ttl=pd.Timedelta("7 days 1500ns")), "ttl .* below one microsecond.*round"),
    ],
)
def test_malformed_definitions_fail_when_built(source, build, message):
    with pytest.raises(mp.DefinitionError, match=message):
        build(source)


def test_references_between_definitions_are_checked(platform, source):
    with pytest.raises(mp.DefinitionError, match="entity 'user', which is not applied"):
        platform.features.apply([view(source)])
    platform.features.apply([USER, view(source)])
    other_user = mp.Entity("user", join_keys=["note"])
    with pytest.raises(mp.DefinitionError, match="join keys \\['note'\\], but the applied entity"):
        platform.features.apply([view(source, entities=[other_user])])
    with pytest.raises(mp.DefinitionError, match="refers to feature view 'ghost'"):
        platform.features.apply([mp.FeatureService("s", features=["ghost:x"])])
    with pytest.raises(mp.DefinitionError, match="has no feature 'note'"):
        platform.features.apply([mp.FeatureService("s", features=["user_txn:note"])])
    with pytest.raises(mp.DefinitionError, match="two different definitions of feature_view 'user_txn'"):
        platform.features.apply([view(source), view(source, ttl=None)])
    with pytest.raises(mp.DefinitionError, match="apply takes mp.Entity"):
        platform.features.apply(["user_txn"])
    assert [e.version for e in platform.features.list()] == [1, 1]


def test_catalog_survives_a_process_restart(database_url, tmp_path, source):
    with mp.Platform(tmp_path / "home", database_url=database_url) as p:
        p.features.apply([USER, view(source), mp.FeatureService("svc", features=["user_txn:amount"])])
    script = textwrap.dedent(f"""
        import mlplat as mp
        p = mp.Platform({str(tmp_path / "home")!r}, database_url={database_url!r})
        v = p.features.get_feature_view("user_txn")
        print(v.version, v.ttl.days, v.feature_names, v.key_types, p.features.get_feature_service("svc").features)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1 30 ['txn_count', 'amount'] {'user_id': 'int'} ['user_txn:amount']"


def test_concurrent_applies_give_one_version_per_change(database_url, tmp_path, source):
    errors = []

    def worker(i: int) -> None:
        try:
            with mp.Platform(tmp_path / "home", database_url=database_url) as p:
                p.features.apply([USER, view(source, description=f"variant {i % 2}")])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with mp.Platform(tmp_path / "home", database_url=database_url) as p:
        versions = p.features.versions("feature_view", "user_txn")
        assert [v.version for v in versions] == list(range(1, len(versions) + 1))
        # consecutive versions always differ: no duplicate rows for the same spec in a row
        assert all(a.spec != b.spec for a, b in zip(versions, versions[1:]))
        assert [e.version for e in p.features.versions("entity", "user")] == [1]


def test_generators_as_schema_and_entities_are_read_once(platform, source):
    fields = [mp.Field("txn_count", mp.Int64), mp.Field("amount", mp.Float64, description="sum of amounts")]
    v = view(source, schema=(f for f in fields), entities=(e for e in [USER]))
    assert v.feature_names == ["txn_count", "amount"] and v.join_keys == ["user_id"]
    assert mp.Entity("user", join_keys=(k for k in ["user_id"])).join_keys == ["user_id"]
    platform.features.apply([USER, v])
    assert platform.features.get_feature_view("user_txn") == v and v.key_types == {"user_id": "int"}


def test_a_failed_apply_leaves_the_callers_objects_as_they_were(platform, source):
    user, v = mp.Entity("user", join_keys=["user_id"]), view(source)
    with pytest.raises(mp.DefinitionError, match="has no feature 'nope'"):
        platform.features.apply([user, v, mp.FeatureService("svc", features=["user_txn:nope"])])
    assert (user.version, v.version, v.created_at, v.key_types) == (None, None, None, {})
    # a failure inside the transaction (here: a service changed after it was built, so that it cannot be
    # stored) rolls back the entity and the view stored before it, and leaves their objects alone too
    bad = mp.FeatureService("svc", features=["user_txn:amount"])
    bad.tags = {"team": object()}
    with pytest.raises(TypeError):
        platform.features.apply([user, v, bad])
    assert platform.features.list() == []
    assert (user.version, v.version, v.created_at, v.key_types) == (None, None, None, {})
    platform.features.apply([user, v])  # a committed apply tells the objects what they became
    assert (user.version, v.version, v.key_types) == (1, 1, {"user_id": "int"}) and v.created_at is not None


def test_search_reads_rows_stored_with_descriptions_that_are_not_text(platform, source):
    from mlplat.db.models import FeatureDefinition
    from mlplat.features.catalog import spec_hash

    spec = view(source).to_spec()  # as older mlplat stored it: field descriptions were not checked
    spec["schema"][0]["description"], spec["schema"][1]["description"] = None, 7
    with platform.db.session(write=True) as s:
        s.add(FeatureDefinition(kind="feature_view", name="user_txn", version=1, spec=spec, spec_hash=spec_hash(spec),
                                description="old", owner=None))
    assert [e.name for e in platform.features.search("txn")] == ["user_txn"]
    assert [e.name for e in platform.features.search("7")] == ["user_txn"]
    got = platform.features.get_feature_view("user_txn")
    assert [f.description for f in got.schema] == ["", "7"]


def test_lengths_at_the_database_columns_limits_are_stored(platform, source):
    v = view(source, owner="o" * 255, tags={"k" * 255: "v" * 1024})
    platform.features.apply([USER, v])
    entry = platform.features.list("feature_view")[0]
    assert entry.owner == "o" * 255 and entry.tags == {"k" * 255: "v" * 1024}


def test_a_pandas_timedelta_ttl_becomes_a_timedelta_and_round_trips(platform, source):
    v = view(source, ttl=pd.Timedelta("7 days 2us"))
    assert type(v.ttl) is timedelta and v.ttl == timedelta(days=7, microseconds=2)
    platform.features.apply([USER, v])
    got = platform.features.get_feature_view("user_txn")
    assert got == v
    assert [(r.version, r.changed) for r in platform.features.apply([got])] == [(1, False)]


def _open_files(folder: Path, *names: str) -> list[str]:
    """Files under ``folder`` called one of ``names`` (or their -wal/-shm) that this process holds open."""
    fds = Path("/proc/self/fd")
    paths = []
    for fd in fds.iterdir():
        try:
            paths.append(os.readlink(fd))
        except OSError:
            pass
    return [p for p in paths if p.startswith(str(folder)) and Path(p).name.split("-")[0] in names]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files through /proc")
def test_threads_racing_on_first_use_share_one_online_store_and_backend(tmp_path, monkeypatch):
    import mlplat.features.store as store_module
    from mlplat.serving.service import ServingService

    opened, backends = [], []
    real_open, real_backend = store_module.open_online_store, ServingService.local_backend

    def slow_open(url):  # the real store, opened slowly: every thread arrives while the first is opening
        time.sleep(0.05)
        opened.append(real_open(url))
        return opened[-1]

    def slow_backend(self, **kwargs):
        time.sleep(0.05)
        backends.append(real_backend(self, **kwargs))
        return backends[-1]

    monkeypatch.setattr(store_module, "open_online_store", slow_open)
    monkeypatch.setattr(ServingService, "local_backend", slow_backend)
    p = mp.Platform(tmp_path / "home")
    barrier, got = threading.Barrier(8), []

    def first_use() -> None:
        barrier.wait()
        got.append((p.features.online_store, p.serving.backend))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1 and len(backends) == 1
    assert all(store is opened[0] and backend is backends[0] for store, backend in got)
    p.close()
    assert _open_files(tmp_path / "home", "online.db") == []


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files through /proc")
def test_close_closes_every_part_when_one_fails(tmp_path):
    home = tmp_path / "home"
    p = mp.Platform(home)
    p.features.list()
    assert p.features.online_store is not None  # opened
    assert _open_files(home, "mlplat.db", "online.db")
    (home / "served").write_text("a file where the served-feature log's folder belongs")
    p.serving.served_log.add("fraud", 1, "default", {"user_id": [1]}, {"amount": [1.0]}, {"output__0": [0.5]},
                             refs=["user_txn:amount"], types={"user_id": pa.int64(), "amount": pa.float64()})
    with pytest.raises(mp.StoreError, match="served-feature log of 'fraud': writing to .*served/fraud failed .*the "
                                            "next flush\\(\\) or close\\(\\) writes them"):
        p.close()
    assert _open_files(home, "mlplat.db", "online.db") == []  # the database and online store were closed anyway
    (home / "served").unlink()
    p.close()  # the buffered rows are written now
    assert len(list((home / "served" / "fraud").glob("*.parquet"))) == 1
