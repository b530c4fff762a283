"""The default materialize keeps fresh every view version a model in a stage (or with an alias) reads: a production
model trained on user_txn@1 goes on reading version 1 online after a newer version is applied (a description edited,
a ttl changed), and materializing only the latest version let version 1 go stale, then empty, without a word."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mlplat as mp


def _rows(path, value: float, at: datetime) -> None:
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()),
                             "event_timestamp": pa.array([at], pa.timestamp("us", "UTC")),
                             "amount": pa.array([value])}), path)


def _view(source, **changes) -> mp.FeatureView:
    spec = dict(entities=[mp.Entity("user", join_keys=["user_id"])], ttl=timedelta(days=1),
                schema=[mp.Field("amount", mp.Float64)], source=mp.ParquetSource(source), description="spend")
    return mp.FeatureView("txn", **{**spec, **changes})


def _model(p: mp.Platform, name: str, stage: str | None, alias: str | None = None) -> None:
    """A model trained on the latest txn version, registered, then put in ``stage`` and given ``alias``."""
    now = datetime.now(timezone.utc)
    labels = pa.table({"user_id": [1], "event_timestamp": pa.array([now], pa.timestamp("us", "UTC"))})
    train = p.features.get_historical_features(labels, ["txn:amount"])
    with p.runs.start(name) as run:
        run.log_input(train, "train", feature_refs=["txn:amount"])
        run.log_model(torch.nn.Linear(1, 1), "model", example_input=torch.zeros(2, 1), columns=["amount"])
    v = p.models.register(name, run.id)
    if stage:
        p.models.promote(name, v.version, stage, approved_by="reviewer")
    if alias:
        p.models.set_alias(name, alias, v.version)


@pytest.fixture
def platform_with_models(tmp_path, database_url):
    src = tmp_path / "txn"
    src.mkdir()
    _rows(src / "a.parquet", 1.0, datetime.now(timezone.utc) - timedelta(hours=2))
    p = mp.Platform(tmp_path / "home", database_url=database_url)
    view = _view(src)
    p.features.apply([view.entities[0], view])
    p.features.materialize(end_date=datetime.now(timezone.utc) - timedelta(minutes=30), progress=False)
    yield p, src
    p.close()


@pytest.mark.parametrize("change", [{"description": "spend, in euros"}, {"ttl": timedelta(days=2)}])
def test_a_production_model_keeps_fresh_features_after_a_new_view_version(platform_with_models, change):
    p, src = platform_with_models
    _model(p, "fraud", "production")
    _model(p, "shelved", None)  # registered, in no stage: its versions are not kept fresh
    assert p.features.apply([_view(src, **change)])[0].version == 2
    _rows(src / "b.parquet", 2.0, datetime.now(timezone.utc) - timedelta(minutes=1))  # new data arrives

    done = p.features.materialize(progress=False)

    assert sorted((r.view, r.version) for r in done) == [("txn", 1), ("txn", 2)]
    served = p.serving.predict("fraud", [{"user_id": 1}], backend=p.serving.local_backend())
    assert served.features == {"amount": [2.0]}  # was 1.0: version 1 was no longer materialized
    assert p.features.get_online_features(["txn@1:amount"], {"user_id": [1]})["amount"] == [2.0]


def test_versions_read_by_aliased_or_staged_models_only_and_each_once(platform_with_models):
    p, src = platform_with_models
    _model(p, "fraud", None, alias="champion")
    p.features.apply([_view(src, description="edited")])  # version 2
    _model(p, "fraud", "staging")  # trained on version 2: nothing more to materialize for it
    p.features.apply([_view(src, description="edited again")])  # version 3, read by no model
    _model(p, "other", "archived")  # archived: not served

    done = p.features.materialize(progress=False)
    assert sorted((r.view, r.version) for r in done) == [("txn", 1), ("txn", 2), ("txn", 3)]
    assert sorted((r.view, r.version) for r in p.features.materialize(views=["txn"], progress=False)) == [("txn", 3)]


def test_an_older_version_a_model_reads_stays_served_when_the_newest_is_offline_only(platform_with_models):
    """A newer version with online=False is not materialized; the online version the production model reads is
    (predict needs it until the model is replaced)."""
    p, src = platform_with_models
    _model(p, "fraud", "production")
    p.features.apply([_view(src, online=False)])
    assert [(r.view, r.version) for r in p.features.materialize(progress=False)] == [("txn", 1)]
    with pytest.raises(mp.DefinitionError, match="not served online"):
        p.features.materialize(views=["txn"], progress=False)


def _push(p: mp.Platform, value: float, **kwargs) -> int:
    row = {"user_id": 1, "event_timestamp": datetime.now(timezone.utc) - timedelta(seconds=1), "amount": value}
    return p.features.push("txn", [{**row, **kwargs}])


def _online(p: mp.Platform, version: int):
    return p.features.get_online_features([f"txn@{version}:amount"], {"user_id": [1]})["amount"]


def test_a_push_reaches_the_version_a_production_model_reads(platform_with_models):
    """push wrote the latest version only: the production model trained on txn@1 never saw pushed values."""
    p, src = platform_with_models
    _model(p, "fraud", "production")
    p.features.apply([_view(src, description="edited")])
    assert _push(p, 9.0) == 1
    assert _online(p, 2) == [9.0] and _online(p, 1) == [9.0]
    served = p.serving.predict("fraud", [{"user_id": 1}], backend=p.serving.local_backend())
    assert served.features == {"amount": [9.0]}


def test_a_push_leaves_versions_no_model_reads_or_of_another_source(platform_with_models, tmp_path):
    p, src = platform_with_models
    _model(p, "shelved", None)  # reads txn@1 but is in no stage
    p.features.apply([_view(src, description="edited")])  # version 2
    _model(p, "fraud", "production")  # reads txn@2
    other = tmp_path / "other"
    other.mkdir()
    _rows(other / "a.parquet", 5.0, datetime.now(timezone.utc) - timedelta(hours=2))
    p.features.apply([_view(other)])  # version 3 reads other files
    p.features.materialize(progress=False)
    assert _push(p, 9.0) == 1
    assert _online(p, 3) == [9.0]
    assert _online(p, 2) == [1.0]  # the production model's version reads src, whose offline side never sees the row
    assert _online(p, 1) == [1.0]


def test_a_push_an_in_use_version_cannot_take_is_refused_whole(platform_with_models):
    p, src = platform_with_models
    wide = _view(src, schema=[mp.Field("amount", mp.Float64), mp.Field("count", mp.Int64)])
    _rows_with_count = pa.table({"user_id": pa.array([1], pa.int64()),
                                 "event_timestamp": pa.array([datetime.now(timezone.utc) - timedelta(hours=2)],
                                                             pa.timestamp("us", "UTC")),
                                 "amount": [1.0], "count": pa.array([3], pa.int64())})
    pq.write_table(_rows_with_count, src / "a.parquet")
    p.features.apply([wide])  # version 2 has 'count'
    p.features.materialize(views=["txn"], progress=False)
    _model(p, "fraud", "production")  # reads txn@2
    p.features.apply([_view(src, description="narrow again")])  # version 3: amount only
    with pytest.raises(mp.DataError, match=r"no feature 'count'.*definition version 2, which a model in service"):
        _push(p, 9.0)
    assert _online(p, 3) == [None] and _online(p, 2) == [1.0]  # nothing written anywhere
    assert _push(p, 9.0, count=4) == 1
    assert _online(p, 3) == [9.0] and _online(p, 2) == [9.0]
