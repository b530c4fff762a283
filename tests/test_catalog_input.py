"""The catalog refuses what would break it, on SQLite and PostgreSQL: text no database stores, arguments of the
wrong type, a view change that takes a feature from an applied service; and lookups of names nothing can be
called answer NotFound on both backends."""
from __future__ import annotations

import pytest

import mlplat as mp
from test_catalog import USER, source, view  # noqa: F401 - source: a fixture


@pytest.mark.parametrize("bad", ["a\x00b", "bad \ud800"])
@pytest.mark.parametrize("where", ["description", "owner", "tag", "field"])
def test_text_no_database_stores_is_refused_when_the_definition_is_made(platform, source, bad, where):  # noqa: F811
    """A NUL was stored on SQLite and refused by PostgreSQL naming nothing; a lone surrogate was a raw
    UnicodeEncodeError on both."""
    changes = {"description": lambda: {"description": bad}, "owner": lambda: {"owner": bad},
               "tag": lambda: {"tags": {"k": bad}},
               "field": lambda: {"schema": [mp.Field("txn_count", mp.Int64, description=bad)]}}[where]
    with pytest.raises(mp.DefinitionError, match="NUL|lone surrogate"):
        platform.features.apply([USER, view(source, **changes())])  # refused as the definition is made
    assert platform.features.list() == []


@pytest.mark.parametrize("call, message", [
    (lambda p: p.features.apply(None), "apply takes"),
    (lambda p: p.features.apply(5), "apply takes"),
    (lambda p: p.features.apply("user_txn"), "apply takes"),
    (lambda p: p.features.get_feature_view(None), "name is a string"),
    (lambda p: p.features.versions("feature_view", 7), "name is a string"),
    (lambda p: p.features.list(tags={"k": 1}), "tags must be a dict of str to str"),
    (lambda p: p.features.list(tags=["k"]), "tags must be a dict of str to str"),
])
def test_arguments_of_the_wrong_type_are_definition_errors(platform, call, message):
    with pytest.raises(mp.DefinitionError, match=message):
        call(platform)


@pytest.mark.parametrize("views, message", [
    ([None], "views must be view names"), ([1], "views must be view names"), ([b"user_txn"], "views must be"),
    (["user_txn@"], "a definition version is a number"), (["user_txn@x"], "a definition version is a number"),
])
def test_materialize_names_a_bad_view_reference(platform, source, views, message):  # noqa: F811
    platform.features.apply([USER, view(source)])
    with pytest.raises(mp.DataError, match=message):  # [None] was a raw AttributeError; 'user_txn@' the latest
        platform.features.materialize(views=views, progress=False)


def test_names_and_tags_no_definition_can_have_are_not_found_on_both_backends(platform, source):  # noqa: F811
    platform.features.apply([USER, view(source)])
    for name in ("user_t\x00xn", "user_txn\udcff"):
        with pytest.raises(mp.NotFoundError, match="unknown feature view"):  # PostgreSQL: "refused a value"
            platform.features.get_feature_view(name)
    assert platform.features.list(tags={"team\x00": "risk"}) == []
    assert [e.name for e in platform.features.list(tags={"team": "risk"})] == ["user_txn"]


def test_a_view_cannot_drop_a_feature_an_applied_service_uses(platform, source):  # noqa: F811
    service = mp.FeatureService("scoring", features=["user_txn:txn_count", "user_txn:amount"])
    platform.features.apply([USER, view(source), service])
    narrower = view(source, schema=[mp.Field("txn_count", mp.Int64)])
    with pytest.raises(mp.DefinitionError, match="would no longer have feature 'amount', which the applied feature "
                                                 "service 'scoring' uses"):
        platform.features.apply([narrower])  # was accepted: every later use of 'scoring' failed
    assert platform.features.get_feature_view("user_txn").version == 1
    kept = mp.FeatureService("scoring", features=["user_txn:txn_count"])
    assert [r.version for r in platform.features.apply([narrower, kept])] == [2, 2]  # together: fine
    pinned = mp.FeatureService("pinned", features=["user_txn@1:amount"])
    platform.features.apply([pinned])
    wider = view(source, schema=[mp.Field("txn_count", mp.Int64), mp.Field("note", mp.String)])
    assert platform.features.apply([wider])[0].version == 3  # 'pinned' takes amount from v1, which keeps it
