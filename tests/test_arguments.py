"""Arguments of the wrong kind are refused with an error naming them, in the library and on the command line.

An empty value is not quietly the current folder (``--repository ""``, ``--home ""``) nor replaced by a
default (``--triton-name ""``); a mistyped setting is an ``mp.ConfigError`` naming the argument, not a
TypeError (or an AttributeError much later); ``Platform(settings=..., home=...)`` does not drop ``home``;
a number past the width of Triton's config field is a bad argument (exit status 2), as other ranges are.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import mlplat as mp
from mlplat.cli import cli
from mlplat.settings import Settings

INT32 = 2**31 - 1


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="mlplat", env={"COLUMNS": "250", **(env or {})})


def error(result: Result, code: int, *names: str) -> str:
    """Exit status ``code`` with one line on stderr that names each of ``names``; no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("mlplat: error: ") and result.stderr.count("\n") == 1, result.stderr
    for name in names:
        assert name in result.stderr, (name, result.stderr)
    return result.stderr


@pytest.fixture
def home(tmp_path) -> Path:
    """An empty platform home (a database, no model)."""
    mp.Platform(tmp_path / "home").close()
    return tmp_path / "home"


# ------------------------------------------------------------------ empty values
@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_home_argument_counts_as_unset_like_an_empty_variable(tmp_path, monkeypatch, empty):
    monkeypatch.chdir(tmp_path)
    assert Settings.resolve(empty, environ={}).home == (tmp_path / "mlplat-home").resolve()  # not the cwd
    s = Settings.resolve(empty, environ={"MLPLAT_HOME": str(tmp_path / "envhome")})
    assert s.home == (tmp_path / "envhome").resolve()


def test_an_empty_global_home_option_counts_as_unset(home, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = invoke("--home", "", "models", "list", "--json", env={"MLPLAT_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert list((tmp_path / "cwd").iterdir()) == []  # the current folder did not become a home


@pytest.mark.parametrize("option", ["--repository", "--triton-name"])
@pytest.mark.parametrize("empty", ["", " "])
def test_serve_export_refuses_an_empty_repository_or_triton_name(home, tmp_path, monkeypatch, option, empty):
    monkeypatch.chdir(tmp_path)
    values = {"--repository": str(tmp_path / "repo"), "--triton-name": "fraud_triton", option: empty}
    result = invoke("--home", home, "serve", "export", "fraud", *[x for kv in values.items() for x in kv])
    error(result, 2, option, "is empty")
    assert not (tmp_path / "fraud").exists() and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("kwargs, name", [
    ({"repository": ""}, "repository="),
    ({"repository": "   "}, "repository="),
    ({"repository": 5}, "repository="),
    ({"repository": "REPO", "triton_name": ""}, "triton_name="),
    ({"repository": "REPO", "triton_name": 0}, "triton_name="),
])
def test_export_triton_refuses_an_empty_repository_or_triton_name(home, tmp_path, monkeypatch, kwargs, name):
    monkeypatch.chdir(tmp_path)
    kwargs = {k: str(tmp_path / "repo") if v == "REPO" else v for k, v in kwargs.items()}
    with mp.Platform(home) as p, pytest.raises(mp.DataError, match=name):
        p.serving.export_triton("fraud", **kwargs)  # refused before the (unknown) model is looked up
    assert sorted(x.name for x in tmp_path.iterdir()) == ["home"]


# ------------------------------------------------------------ types of settings
@pytest.mark.parametrize("kwargs, name", [
    ({"home": 123}, "home"),
    ({"home": b"/tmp/x"}, "home"),
    ({"database_url": 5}, "database_url"),
    ({"online_store": 5}, "online_store"),
    ({"artifact_root": 5}, "artifact_root"),
    ({"triton_url": 5}, "triton_url"),
    ({"triton_url": ["127.0.0.1:8001"]}, "triton_url"),
])
def test_a_setting_of_the_wrong_type_is_a_config_error_naming_the_argument(tmp_path, kwargs, name):
    kwargs = {"home": tmp_path / "h", **kwargs}
    with pytest.raises(mp.ConfigError, match=rf"^{name} must be .*\(argument {name}=\)$"):
        Settings.resolve(environ={}, **kwargs)
    with pytest.raises(mp.ConfigError, match=rf"\(argument {name}=\)"):
        mp.Platform(**kwargs)
    assert not (tmp_path / "h").exists()


def test_path_settings_take_a_path_object(tmp_path):
    s = Settings.resolve(tmp_path / "h", artifact_root=tmp_path / "art", environ={})
    assert s.home == (tmp_path / "h").resolve() and s.artifact_root == str(tmp_path / "art")


# ----------------------------------------------------- settings= and arguments
@pytest.mark.parametrize("kwargs", [
    {"home": "OTHER"},
    {"database_url": "sqlite:///OTHER/x.db"},
    {"online_store": "redis://127.0.0.1:6379/12"},
    {"artifact_root": "OTHER"},
    {"threads": 1},
    {"triton_url": "127.0.0.1:8001"},
    {"served_sample_rate": 0.5},
], ids=lambda kwargs: next(iter(kwargs)))
def test_settings_combined_with_another_setting_argument_is_a_config_error(tmp_path, kwargs):
    settings = Settings.resolve(tmp_path / "h", environ={})
    kwargs = {k: v.replace("OTHER", str(tmp_path / "other")) if isinstance(v, str) else v for k, v in kwargs.items()}
    name = next(iter(kwargs))
    with pytest.raises(mp.ConfigError, match=rf"settings= cannot be combined with {name}=: pass either"):
        mp.Platform(settings=settings, **kwargs)
    assert not (tmp_path / "h").exists() and not (tmp_path / "other").exists()
    with mp.Platform(settings=settings) as p:  # alone it is taken
        assert p.settings is settings


def test_settings_must_be_a_settings_object(tmp_path):
    with pytest.raises(mp.ConfigError, match="settings= must be an mp.Settings"):
        mp.Platform(settings={"home": str(tmp_path)})


# ------------------------------------------------- CLI numbers with library bounds
@pytest.mark.parametrize("option, bad, good", [
    ("--max-batch-size", INT32 + 1, INT32),
    ("--max-batch-size", 99999999999, 0),
    ("--instances", INT32 + 1, INT32),
    ("--max-queue-delay-us", 2**64, 2**64 - 1),
    ("--preferred-batch-sizes", "0,4", "4"),
    ("--preferred-batch-sizes", f"4,{INT32 + 1}", f"4,{INT32}"),
])
def test_serve_export_numbers_past_the_library_bounds_are_bad_arguments(home, tmp_path, option, bad, good):
    export = ("--home", home, "serve", "export", "fraud", "--repository", tmp_path / "repo")
    error(invoke(*export, option, bad), 2, option)
    # in range, the value reaches the library: here the missing model (exit 1), not a bad argument
    error(invoke(*export, option, good), 1, "fraud")
