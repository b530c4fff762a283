"""Settings: arguments over MLPLAT_* variables over defaults, validated."""
from __future__ import annotations

from pathlib import Path

import pytest

import mlplat as mp
from mlplat.settings import Settings


def test_defaults_live_under_home(tmp_path):
    s = Settings.resolve(tmp_path / "h", environ={})
    assert s.home == (tmp_path / "h").resolve()
    assert s.database_url == f"sqlite:///{s.home / 'mlplat.db'}"
    assert s.online_store == f"sqlite:///{s.home / 'online.db'}"
    assert s.artifact_root == str(s.home / "artifacts")
    assert s.threads >= 1


def test_empty_variables_mean_unset_home_included(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.resolve(environ={"MLPLAT_HOME": "", "MLPLAT_DATABASE_URL": "", "MLPLAT_ARTIFACT_ROOT": ""})
    assert s.home == (tmp_path / "mlplat-home").resolve()  # not the current directory
    assert s.database_url == f"sqlite:///{s.home / 'mlplat.db'}" and s.artifact_root == str(s.home / "artifacts")


def test_environment_fills_what_arguments_leave_out(tmp_path):
    env = {
        "MLPLAT_HOME": str(tmp_path / "envhome"),
        "MLPLAT_DATABASE_URL": "postgresql://u@h/db",
        "MLPLAT_ONLINE_STORE": "redis://127.0.0.1:6379/2",
        "MLPLAT_ARTIFACT_ROOT": "s3://bucket/artifacts",
        "MLPLAT_THREADS": "3",
        "MLPLAT_DB_POOL_SIZE": "7",
    }
    s = Settings.resolve(environ=env)
    assert (s.home, s.database_url, s.online_store, s.artifact_root, s.threads, s.db_pool_size) == (
        Path(env["MLPLAT_HOME"]), "postgresql://u@h/db", "redis://127.0.0.1:6379/2", "s3://bucket/artifacts", 3, 7)
    s = Settings.resolve(tmp_path, database_url="sqlite:////abs/x.db", threads=1, environ=env)
    assert (s.home, s.database_url, s.threads) == (tmp_path, "sqlite:////abs/x.db", 1)


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://h:1/0", "redis+cluster://h:7000", "sqlite:////abs/o.db"])
def test_online_store_schemes(url, tmp_path):
    assert Settings.resolve(tmp_path, online_store=url, environ={}).online_store == url


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({"database_url": "mysql://h/db"}, {}, "database_url 'mysql://h/db' has an unsupported scheme 'mysql'"),
        ({"online_store": "memcached://h"}, {}, "online_store .* unsupported scheme"),
        ({"online_store": "redis+foo://h"}, {}, "unsupported scheme 'redis\\+foo'"),
        ({}, {"MLPLAT_THREADS": "many"}, "threads must be a whole number, got 'many' \\(\\$MLPLAT_THREADS\\)$"),
        ({}, {"MLPLAT_THREADS": "2.5"}, "threads must be a whole number, got '2.5' \\(\\$MLPLAT_THREADS\\)$"),
        ({"threads": 2.7}, {"MLPLAT_THREADS": "4"}, "threads must be a whole number, got 2.7 \\(argument threads=\\)$"),
        ({"threads": True}, {}, "threads must be a whole number, got True"),
        ({"threads": "2"}, {}, None),
        ({"served_sample_rate": float("nan")}, {}, "served_sample_rate must be a number, got nan"),
        ({}, {"MLPLAT_SERVED_SAMPLE": "nan"}, "served_sample_rate must be a number, got 'nan'"),
        ({}, {"MLPLAT_SERVED_SAMPLE": "1.5"}, "served_sample_rate must be at most 1"),
        ({"db_pool_timeout": float("inf")}, {}, "db_pool_timeout must be a number, got inf"),
        ({"threads": 0}, {}, "threads must be at least 1"),
        ({}, {"MLPLAT_DB_POOL_TIMEOUT": "-1"}, "db_pool_timeout must be at least 0"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, kwargs, env, message):
    if message is None:  # a numeric string passed as an argument is read as the environment's would be
        assert Settings.resolve(tmp_path, environ=env, **kwargs).threads == 2
        return
    with pytest.raises(mp.ConfigError, match=message):
        Settings.resolve(tmp_path, environ=env, **kwargs)


def test_platform_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLAT_HOME", str(tmp_path / "from-env"))
    with mp.Platform() as p:
        assert p.settings.home == tmp_path / "from-env"
        assert (tmp_path / "from-env" / "mlplat.db").exists()


@pytest.mark.parametrize("kwargs, env, message", [
    ({"database_url": "postgresql+psycopg://a:b@[::1"}, {},
     r"database_url 'postgresql\+psycopg://a:\*\*\*@\[::1' is not a valid URL \(Invalid IPv6 URL\)"
     r".*\(argument database_url=\)"),
    ({}, {"MLPLAT_ONLINE_STORE": "redis://127.0.0.1:99999/0"},
     r"online_store 'redis://127.0.0.1:99999/0' is not a valid URL \(Port out of range.*\(\$MLPLAT_ONLINE_STORE\)"),
    ({"online_store": "redis://[::1"}, {"MLPLAT_ONLINE_STORE": "redis://h:1/0"},
     r"online_store 'redis://\[::1' is not a valid URL.*\(argument online_store=\)"),
    ({}, {"MLPLAT_ONLINE_STORE": "redis://127.0.0.1:6379/abc"},
     r"the Redis database 'abc' is not a number; write redis://host:port/0 .*\(\$MLPLAT_ONLINE_STORE\)"),
    ({"online_store": "rediss://h:1/0/1"}, {}, "the Redis database '0/1' is not a number"),
    ({}, {"MLPLAT_DATABASE_URL": "mysql://h/db"}, r"unsupported scheme 'mysql'.*\(\$MLPLAT_DATABASE_URL\)"),
    ({"database_url": "sqlite://rel.db"}, {},  # a raw ArgumentError from SQLAlchemy; 'in-memory' on the command line
     r"'sqlite://rel.db': a SQLite URL has no host; a file is sqlite:///rel.db .*\(argument database_url=\)"),
    ({}, {"MLPLAT_ONLINE_STORE": "sqlite://h/o.db"}, r"a file is sqlite:///h/o.db .*\(\$MLPLAT_ONLINE_STORE\)"),
    ({"database_url": "sqlite://app:s3cret@h/x.db"}, {},
     r"'sqlite://app:\*\*\*@h/x.db': .*a file is sqlite:///h/x.db "),
    ({"online_store": "sqlite://:s3cret@/online.db"}, {}, r"a file is sqlite:///online.db "),  # taken as a relative
    ({"database_url": "sqlite://:5/x.db"}, {}, r"a file is sqlite:///:5/x.db "),  # file of the current folder
], ids=["open-bracket", "port-past-65535-env", "argument-over-env", "redis-db-not-a-number", "redis-db-path",
        "scheme-env", "sqlite-host", "sqlite-host-env", "sqlite-host-password", "sqlite-password-no-host",
        "sqlite-port"])
def test_a_malformed_url_is_a_config_error_naming_the_setting_and_where_it_came_from(tmp_path, kwargs, env, message):
    # urllib's ValueError reached the caller raw; a Redis path that is not a number silently meant database 0
    with pytest.raises(mp.ConfigError, match=message):
        Settings.resolve(tmp_path, environ=env, **kwargs)


@pytest.mark.parametrize("url", ["redis://h:6379", "redis://h:6379/", "redis://h:6379/15", "redis+cluster://h:7000/0"])
def test_redis_urls_with_or_without_a_database_number_are_taken(tmp_path, url):
    assert Settings.resolve(tmp_path, online_store=url, environ={}).online_store == url


def test_an_in_memory_database_is_a_library_setting(tmp_path):
    # one process's platform (tests, notebooks); the command line refuses it (each command is a process)
    assert Settings.resolve(tmp_path, database_url="sqlite://", environ={}).database_url == "sqlite://"


def test_surrounding_white_space_in_variables_is_dropped_and_blank_means_unset(tmp_path, monkeypatch):
    # a value read from a file or a Kubernetes secret ends in a newline: the database was named 'db\n', the
    # home ' /x ' a folder under the current one, a Redis URL refused; a blank MLPLAT_THREADS was an error
    monkeypatch.chdir(tmp_path)
    env = {"MLPLAT_HOME": f" {tmp_path / 'h'}\n", "MLPLAT_DATABASE_URL": "postgresql://u@h/db\n",
           "MLPLAT_ONLINE_STORE": " redis://127.0.0.1:6379/2 ", "MLPLAT_ARTIFACT_ROOT": "  ", "MLPLAT_THREADS": " ",
           "MLPLAT_DB_POOL_SIZE": " 7\n", "MLPLAT_TRITON_URL": "\t", "MLPLAT_SERVED_SAMPLE": ""}
    s = Settings.resolve(environ=env)
    assert s.home == tmp_path / "h"
    assert (s.database_url, s.online_store, s.artifact_root) == (
        "postgresql://u@h/db", "redis://127.0.0.1:6379/2", str(tmp_path / "h" / "artifacts"))
    assert (s.threads >= 1, s.db_pool_size, s.triton_url, s.served_sample_rate) == (True, 7, None, 1.0)
    s = Settings.resolve(tmp_path, database_url=" sqlite:////abs/x.db\n", environ={})
    assert s.database_url == "sqlite:////abs/x.db"


def test_relative_paths_are_taken_from_the_current_folder_when_resolved(tmp_path, monkeypatch):
    """A relative SQLite path or artifact folder stayed relative and was looked up again at each use: after an
    os.chdir (a notebook, a job) new connections opened other files, and runs recorded relative artifact URIs."""
    monkeypatch.chdir(tmp_path)
    s = Settings.resolve("home", database_url="sqlite:///data/m.db?timeout=5", online_store="sqlite:///o.db",
                         artifact_root="art", environ={})
    assert s.home == tmp_path / "home"
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'm.db'}?timeout=5"
    assert s.online_store == f"sqlite:///{tmp_path / 'o.db'}"
    assert s.artifact_root == str(tmp_path / "art")
    for kept in ("sqlite://", "sqlite:///:memory:", "sqlite:///~/x.db"):  # in memory; ~ is the engine's to expand
        assert Settings.resolve("home", database_url=kept, environ={}).database_url == kept
    assert Settings.resolve("home", artifact_root="s3://b/p", environ={}).artifact_root == "s3://b/p"
    with mp.Platform(settings=s) as p:
        run = p.runs.start("relative")
        run.end()
        monkeypatch.chdir(tmp_path / "home")
        p.db.dispose()  # new connections from here on, as another thread or a forked worker opens
        assert p.runs.get(run.id).artifact_uri.startswith(str(tmp_path / "art"))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["data", "home"]  # nothing opened under home/


@pytest.mark.parametrize("kwargs, env", [
    ({"database_url": "mysql://app:s3cret@h/db"}, {}),
    ({}, {"MLPLAT_DATABASE_URL": "postgresql://app:s3cret@[::1/db"}),
    ({}, {"MLPLAT_ONLINE_STORE": "redis://:s3cret@h:6379/abc"}),
    ({"online_store": "redis://app:s3c@ret@h:99999/0"}, {}),
    ({"database_url": "sqlite://app:s3cret@h/x.db"}, {}),  # the suggestion printed it: sqlite:///app:s3cret@h/x.db
    ({"database_url": "postgresql://app:s3c/ret@h/db"}, {}),  # urllib's message quoted 's3c' as a port
    ({"database_url": "sqlite://app:s3c/ret@h/x.db"}, {}),
    ({"database_url": "postgresql://app:s3c?retXY@h/db"}, {}),
    ({"database_url": "sqlite+pysqlcipher://:s3cret@mydb.db"}, {}),  # SQLCipher's key with a host: accepted, then
    ({"online_store": "redis://:9s3c/ret@cache:6379/0"}, {}),  # printed; the path quoted the password's end
], ids=["scheme", "malformed", "redis-db", "at-sign-in-password", "sqlite-host", "slash-in-password",
        "sqlite-slash-in-password", "question-mark-in-password", "sqlcipher-host", "redis-slash-in-password"])
def test_errors_and_the_settings_repr_never_show_a_password(tmp_path, kwargs, env):
    with pytest.raises(mp.ConfigError) as raised:
        Settings.resolve(tmp_path, environ=env, **kwargs)
    assert "s3c" not in str(raised.value) and ":***@" in str(raised.value)
    s = Settings.resolve(tmp_path, database_url="postgresql://app:s3cret@h/db",
                         online_store="redis://:s3cret@h:6379/0", environ={})
    assert s.database_url == "postgresql://app:s3cret@h/db"  # the value itself is intact
    assert "s3cret" not in repr(s) and "postgresql://app:***@h/db" in repr(s) and "redis://:***@h:6379/0" in repr(s)


def test_a_home_with_a_nul_character_is_a_config_error():
    """mp.Platform("a\\0b") was a raw ValueError (embedded null byte)."""
    with pytest.raises(mp.ConfigError, match=r"home 'a\\x00b' is not a folder path this process can use \(embedded "
                                             r"null byte\) \(argument home=\)"):
        Settings.resolve("a\x00b", environ={})
    with pytest.raises(mp.ConfigError, match=r"home '~nosuchuser_xyz/h' is not a folder path"):  # a raw RuntimeError
        Settings.resolve("~nosuchuser_xyz/h", environ={})
    with pytest.raises(mp.ConfigError, match=r"\(\$MLPLAT_HOME\)"):
        Settings.resolve(environ={"MLPLAT_HOME": "a\x00b"})


@pytest.mark.parametrize("kwargs", [{"database_url": "sqlite:///rel.db"}, {"artifact_root": "art"},
                                    {"online_store": "sqlite:///o.db"}, {}])
def test_a_current_folder_deleted_under_the_process_is_a_config_error(tmp_path, monkeypatch, kwargs):
    """Relative paths are made absolute against the current folder: a deleted one was a raw FileNotFoundError."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    home = (tmp_path / "home") if kwargs else "rel-home"
    with pytest.raises(mp.ConfigError, match="current folder no longer exists"):
        Settings.resolve(home, environ={}, **kwargs)
