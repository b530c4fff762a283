"""A home's databases lie in the home whatever its name: '%XX' and '?' in a path were read as a URL's escape and
query (a home 'report%20v2' kept its database in 'report v2', one 'what?now' in a file 'what'), and a relative
``sqlite+pysqlite:///`` path stayed relative (a later os.chdir moved the database)."""
from __future__ import annotations

import os

import pytest

import mlplat as mp


@pytest.mark.parametrize("name", ["report%20v2", "what?now", "a#b c", "caf\u00e9%3F"])
def test_the_databases_of_a_home_lie_in_it(tmp_path, name):
    home = tmp_path / name
    with mp.Platform(home) as p:
        with p.runs.start("e") as run:
            run.log_param("a", 1)
        assert p.db.engine.url.database == str(home / "mlplat.db")
        assert p.features.online_store._path == home / "online.db"
    assert sorted(f.name for f in tmp_path.iterdir()) == [name]  # nothing beside the home
    with mp.Platform(home) as again:
        assert again.runs.get(run.id).params == {"a": "1"}


def test_a_relative_sqlite_path_with_a_driver_is_made_absolute(tmp_path, monkeypatch):
    odd = tmp_path / "what?now%41"
    odd.mkdir()
    monkeypatch.chdir(odd)
    for url in ("sqlite:///rel.db", "sqlite+pysqlite:///rel.db", "SQLite+pysqlite:///sub/rel.db?timeout=5"):
        settings = mp.Settings.resolve(tmp_path / "home", database_url=url, environ={})
        monkeypatch.chdir(tmp_path)  # a later chdir does not move it
        with mp.Platform(settings=settings) as p:
            database = p.db.engine.url.database
        monkeypatch.chdir(odd)
        assert database == os.path.join(str(odd), *url.split(":///")[1].split("?")[0].split("/")), url
