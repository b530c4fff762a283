"""The ``mlplat`` command line, every command through click's test runner, bad arguments included.

One demo home (two 'fraud' versions, v1 in production approved by 'risk-lead', v2 in staging, an
online store, 500 served requests with a planted skew in amount_sum_7d) is built once for the module.
Commands that change a home (promote, apply, materialize) run on a fresh copy of it.

Conventions checked on every failure: exit status 1 for an mlplat error, 2 for bad arguments, 3 for
``--check`` findings; exactly one line on stderr, starting ``mlplat: error: `` and naming the problem;
no traceback.
"""
from __future__ import annotations

import json
import re
import shutil
import textwrap
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from mlplat import __version__
from mlplat.cli import cli, main
from mlplat.demo import run_demo

FEATURES = ["txn_count_7d", "amount_sum_7d", "fraud_rate_30d", "txn_count_30d"]
GROUPS = {"features": ["list", "describe", "apply"], "runs": ["list", "show", "compare"],
          "models": ["list", "lineage", "promote"], "serve": ["export"], "monitor": ["skew", "drift", "adoption"]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return run_demo(tmp_path_factory.mktemp("cli") / "home", console=Console(quiet=True))


@pytest.fixture(scope="module")
def home(demo) -> str:
    return demo["home"]


@pytest.fixture
def scratch(home, tmp_path) -> str:
    """A copy of the demo home, for commands that change it (its views still read the original's Parquet)."""
    shutil.copytree(home, tmp_path / "home")
    return str(tmp_path / "home")


def invoke(*args: object, home: str | None = None) -> Result:
    argv = (["--home", home] if home is not None else []) + [str(a) for a in args]
    return CliRunner().invoke(cli, argv, prog_name="mlplat", env={"COLUMNS": "250"})


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert result.exception is None, repr(result.exception)
    return result.stdout


def ok_json(result: Result):
    return json.loads(ok(result))


def error(result: Result, code: int, *names: str, stdout_empty: bool = True) -> str:
    """Exit status ``code`` with one line on stderr that names each of ``names``; no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("mlplat: error: ") and result.stderr.count("\n") == 1, result.stderr
    for name in names:
        assert name in result.stderr, (name, result.stderr)
    if stdout_empty:
        assert result.stdout == ""
    return result.stderr


# ------------------------------------------------------ top level and help
def test_version():
    result = invoke("--version")
    assert ok(result) == f"mlplat, version {__version__}\n"


@pytest.mark.parametrize("group", [None, *GROUPS])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_on_each_group(group, flag):
    result = invoke(*([group] if group else []), flag)
    out = ok(result)
    assert out.startswith(f"Usage: mlplat{' ' + group if group else ''} [OPTIONS] COMMAND") and result.stderr == ""
    for command in GROUPS.get(group, [*GROUPS, "materialize", "demo"]):
        assert f"  {command} " in out


@pytest.mark.parametrize("path", [["materialize"], ["demo"]] + [[g, c] for g, cs in GROUPS.items() for c in cs],
                         ids=" ".join)
def test_help_on_each_command(path):
    out = ok(invoke(*path, "--help"))
    assert out.startswith(f"Usage: mlplat {' '.join(path)} [OPTIONS]")
    if path != ["demo"]:
        assert "--json" in out  # every listing takes --json


def test_unknown_command():
    error(invoke("nonsense"), 2, "No such command 'nonsense'", "mlplat --help")


def test_unknown_subcommand_suggests_the_right_one():
    error(invoke("features", "lsit"), 2, "No such command 'lsit'", "Did you mean 'list'?")


def test_unknown_option():
    error(invoke("demo", "--bogus"), 2, "No such option '--bogus'", "mlplat demo --help")


@pytest.mark.parametrize("group", [None, *GROUPS])
def test_a_group_without_a_command_shows_its_help(group):
    result = invoke(*([group] if group else []))
    assert result.exit_code == 2 and result.stderr == ""  # a usage error, answered with the group's help
    assert result.stdout.startswith(f"Usage: mlplat {group + ' ' if group else ''}[OPTIONS] COMMAND")


def test_bad_database_url(tmp_path):
    error(invoke("--database-url", "nonsense://x", "models", "list", home=str(tmp_path / "h")), 1,
          "'nonsense'", "sqlite://")


def test_bad_online_store(tmp_path):
    error(invoke("--online-store", "bogus://x", "materialize", home=str(tmp_path / "h")), 1, "'bogus'", "redis://")


def test_home_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    error(invoke("models", "list", home=str(tmp_path / "file")), 1, str(tmp_path / "file"))


@pytest.mark.parametrize("args", [["models", "list"], ["runs", "list"], ["features", "list"],
                                  ["models", "lineage", "fraud"], ["monitor", "adoption"], ["materialize"]])
def test_a_home_that_does_not_exist_is_refused_not_created(tmp_path, args):
    # a typo in --home must not answer "no models" from a new, empty home
    missing = tmp_path / "no-such-home"
    error(invoke(*args, home=str(missing)), 1, str(missing), "is not an mlplat home", "mlplat features apply")
    assert not missing.exists()


def test_an_unparsable_database_url_is_one_line(tmp_path):
    error(invoke("--database-url", "sqlite:", "models", "list", home=str(tmp_path / "h")), 1, "'sqlite:'",
          "not a valid URL")


def test_a_database_url_under_the_users_home_is_found(home, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(Path(home) / "mlplat.db", tmp_path / "copy.db")
    listed = ok_json(invoke("--database-url", "sqlite:///~/copy.db", "models", "list", "--json",
                            home=str(tmp_path / "elsewhere")))
    assert [m["name"] for m in listed] == ["fraud"]


def test_a_database_elsewhere_starts_no_home_and_a_missing_one_is_blamed_on_the_url(home, tmp_path, monkeypatch):
    """`--database-url sqlite:///x.db models list` made an empty ./mlplat-home; a mistyped URL was blamed on the
    home ('is not an mlplat home ... give --home')."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(home) / "mlplat.db", tmp_path / "copy.db")
    listed = ok_json(invoke("--database-url", "sqlite:///copy.db", "models", "list", "--json"))
    assert [m["name"] for m in listed] == ["fraud"] and not (tmp_path / "mlplat-home").exists()
    ok_json(invoke("--database-url", "sqlite:///copy.db", "models", "list", "--json", home=str(tmp_path / "x" / "y")))
    assert not (tmp_path / "x").exists()  # nor the parents it made
    error(invoke("--database-url", "sqlite:///typo.db", "models", "list"), 1,
          f"--database-url (or $MLPLAT_DATABASE_URL) names the SQLite database {tmp_path / 'typo.db'}, which does "
          "not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db"]


def test_features_apply_starts_a_new_home(home, tmp_path):
    path = tmp_path / "defs.py"
    path.write_text(DEFINITIONS.format(source=str(Path(home) / "data" / "user_txn_7d")))
    new = tmp_path / "new-home"
    assert [r["name"] for r in ok_json(invoke("features", "apply", path, "--json", home=str(new)))] == \
        ["user", "user_spend_7d"]
    assert (new / "mlplat.db").is_file()
    assert ok_json(invoke("models", "list", "--json", home=str(new))) == []


@pytest.mark.parametrize("other", ["apply", "run"])
def test_a_failed_first_apply_keeps_what_another_process_wrote_into_the_new_home(home, tmp_path, other):
    """A failing first apply removed the home it had found new, with what another process had committed into it
    meanwhile (definitions, a run and its artifacts): the home was gone ('is not an mlplat home')."""
    good = tmp_path / "good.py"
    good.write_text(DEFINITIONS.format(source=str(Path(home) / "data" / "user_txn_7d")))
    new = tmp_path / "new-home"
    meanwhile = ([sys.executable, "-m", "mlplat", "--home", str(new), "features", "apply", str(good)]
                 if other == "apply" else
                 [sys.executable, "-c", "import mlplat as mp\n"
                  f"with mp.Platform({str(new)!r}) as p, p.runs.start('e') as run: run.log_params({{'a': 1}})"])
    bad = tmp_path / "bad.py"  # while this apply runs (after it found the home new), another process writes there
    bad.write_text(textwrap.dedent(f"""
        import subprocess
        import mlplat as mp

        class Racing(mp.Entity):
            raced = False

            def to_spec(self):
                if not Racing.raced:
                    Racing.raced = True
                    subprocess.run({meanwhile!r}, check=True, capture_output=True)
                return super().to_spec()

        a = Racing("user", join_keys=["user_id"])
        b = mp.Entity("user", join_keys=["other_id"])
    """))
    error(invoke("features", "apply", bad, home=str(new)), 1, "two different definitions of entity 'user'")
    if other == "apply":
        listed = ok_json(invoke("features", "list", "--json", home=str(new)))
        assert [r["name"] for r in listed] == ["user", "user_spend_7d"]
    else:
        assert len(ok_json(invoke("runs", "list", "--json", home=str(new)))) == 1
    error(invoke("features", "apply", bad, home=str(tmp_path / "alone" / "home")), 1, "two different definitions")
    assert not (tmp_path / "alone").exists()  # a failed apply alone still starts no home, nor its parents


def test_a_failed_apply_into_an_existing_home_with_a_new_database_removes_that_database(home, tmp_path):
    """The database a mistyped --database-url made was kept (the home beside it held files), and later commands
    then read that empty database instead of saying it does not exist."""
    bad = tmp_path / "bad.py"
    bad.write_text("import mlplat as mp\na = mp.Entity('user', join_keys=['user_id'])\n"
                   "b = mp.Entity('user', join_keys=['other_id'])\n")
    typo = tmp_path / "typo.db"
    error(invoke("--database-url", f"sqlite:///{typo}", "features", "apply", bad, home=home), 1,
          "two different definitions")
    assert not typo.exists() and (Path(home) / "mlplat.db").exists()
    error(invoke("--database-url", f"sqlite:///{tmp_path / 'typo_dir' / 'sub' / 'm.db'}", "features", "apply", bad,
                 home=home), 1, "two different definitions")
    assert not (tmp_path / "typo_dir").exists()  # nor the folders made for it
    error(invoke("--database-url", f"sqlite:///{typo}", "models", "list", home=home), 1, "which does not exist")


@pytest.mark.parametrize("option, url", [
    ("--database-url", "postgresql+psycopg://a:b@[::1"),  # urllib: Invalid IPv6 URL
    ("--online-store", "redis://127.0.0.1:99999/0"),  # urllib: Port out of range
], ids=["open-bracket", "port-past-65535"])
def test_a_malformed_url_is_one_line(home, option, url):
    setting = option[2:].replace("-", "_")
    shown = url.replace("a:b@", "a:***@")  # a password is never printed
    error(invoke(option, url, "materialize", home=home), 1, f"{setting} {shown!r} is not a valid URL",
          f"argument {setting}=")


def test_a_malformed_url_from_the_environment_is_one_line(home):
    result = CliRunner().invoke(cli, ["--home", home, "models", "list"], prog_name="mlplat",
                                env={"COLUMNS": "250", "MLPLAT_ONLINE_STORE": "redis://[::1"})
    error(result, 1, "'redis://[::1' is not a valid URL", "$MLPLAT_ONLINE_STORE")


def test_an_in_memory_database_is_refused(home):
    # each command is a process of its own: an in-memory database answered every command from an empty platform
    error(invoke("--database-url", "sqlite://", "models", "list", home=home), 1, "'sqlite://' is an in-memory SQLite",
          "every command would see an empty platform")


def test_library_errors_once_unexpected_name_the_problem(tmp_path, home):
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("not a database\n" * 100)
    error(invoke("--database-url", f"sqlite:///{not_a_database}", "models", "list", home=home), 1,
          f"database {not_a_database}: the file is not a SQLite database")
    error(invoke("runs", "list", "--filter", " and ".join(["params.a = '1'"] * 3000), home=home), 1,
          "filter: holds more than 200 comparisons")


def test_an_unexpected_error_is_one_line_not_a_traceback(home, monkeypatch):
    from mlplat.models.registry import ModelRegistry

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(ModelRegistry, "list", broken)
    error(invoke("models", "list", home=home), 1, "unexpected ZeroDivisionError: division by zero", "MLPLAT_DEBUG=1")
    debug = CliRunner().invoke(cli, ["--home", home, "models", "list"], prog_name="mlplat", env={"MLPLAT_DEBUG": "1"})
    assert debug.exit_code == 1 and isinstance(debug.exception, ZeroDivisionError)  # the traceback, for a bug report


def _closed_pipe(*args: str) -> tuple[int, str]:
    """Run ``python -m mlplat ARGS`` with its stdout a pipe whose reader is gone (``| head`` that exited)."""
    import os
    import subprocess

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "mlplat", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    return done.returncode, done.stderr


@pytest.mark.parametrize("args", [["runs", "list", "--json"], ["runs", "list"], ["models", "lineage", "fraud"]],
                         ids=["json", "table", "lineage"])
def test_output_into_a_closed_pipe_is_silent(home, args):
    # `mlplat runs list --json | head -1`: no 'mlplat: error: Broken pipe', no traceback; 141 as a shell reports it
    assert _closed_pipe("--home", home, *args) == (141, "")


# ------------------------------------------------------------------ main()
def test_main_returns_the_exit_status(home, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("mlplat, version ")
    assert main(["nonsense"]) == 2
    assert main(["--home", home, "runs", "show", "nope"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("mlplat: error: No such command") and err[1] == "mlplat: error: unknown run 'nope'"
    assert main(["--home", home, "monitor", "skew", "fraud", "--check", "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["skewed"] == ["amount_sum_7d"]
    assert main(["--home", home, "monitor", "skew", "fraud", "--check", "--json", "--threshold", "0.5"]) == 0


def test_help_agrees_with_behaviour():
    promote = " ".join(ok(invoke("models", "promote", "--help")).split())  # help wraps at 80 columns
    # under a distinct-approver policy the approver may not be the registrant; the actor may
    assert "--actor TEXT" in promote and "it may be the version's registrant" in promote
    assert "approver policy, not the version's registrant" in promote.split("--actor")[0]
    assert "answer at --end (default: now)" in " ".join(ok(invoke("materialize", "--help")).split())
    apply = ok(invoke("features", "apply", "--help"))
    assert apply.startswith("Usage: mlplat features apply [OPTIONS] FILE") and "``" not in apply
    assert "--home DIR" in ok(invoke("--help"))


@pytest.mark.parametrize("args", [
    ["features", "describe", "user_txn_7d", "--version", "99999999999999999999999"],  # overflowed the query
    ["models", "lineage", "fraud", "--version", "0"],
    ["models", "promote", "fraud", "99999999999999999999999", "staging"],
    ["monitor", "drift", "fraud", "--version", "-1"],
    ["serve", "export", "fraud", "--repository", "repo", "--version", "2147483648"],
], ids=["describe", "lineage", "promote", "drift", "export"])
def test_a_version_out_of_range_is_a_bad_argument(home, args):
    error(invoke(*args, home=home), 2, "1<=x<=2147483647")


@pytest.mark.parametrize("args", [["materialize", "--end"], ["monitor", "skew", "fraud", "--since"],
                                  ["monitor", "drift", "fraud", "--since"]], ids=" ".join)
def test_a_time_past_year_9999_in_utc_is_a_bad_argument(home, args):
    error(invoke(*args, "9999-12-31T23:59:59-12:00", home=home), 2, "out of range", "years 1 to 9999")


# -------------------------------------------------------------------- demo
def test_demo_refuses_a_database_url(tmp_path):
    error(invoke("--database-url", f"sqlite:///{tmp_path / 'x.db'}", "demo", "--home", tmp_path / "d"), 2,
          "--database-url")
    assert not (tmp_path / "d").exists()


def test_demo_with_a_bad_online_store(tmp_path):
    error(invoke("demo", "--home", tmp_path / "d", "--online-store", "bogus://x"), 1, "'bogus'", stdout_empty=False)


# ---------------------------------------------------------- features list
def test_features_list_json(home):
    entries = ok_json(invoke("features", "list", "--json", home=home))
    assert {(e["kind"], e["name"], e["version"]) for e in entries} == {
        ("entity", "user", 1), ("entity", "merchant", 1), ("feature_view", "user_txn_7d", 1),
        ("feature_view", "merchant_30d", 1), ("feature_service", "fraud_model", 1)}
    view = next(e for e in entries if e["name"] == "user_txn_7d")
    assert view["tags"] == {"team": "risk"} and view["owner"] == "demo" and "card holder" in view["description"]


def test_features_list_table(home):
    out = ok(invoke("features", "list", home=home))
    for text in ("feature definitions", "user_txn_7d", "merchant_30d", "fraud_model", "team=risk"):
        assert text in out


def test_features_list_filters(home):
    def names(*args):
        return sorted(e["name"] for e in ok_json(invoke("features", "list", "--json", *args, home=home)))

    assert names("--kind", "entity") == ["merchant", "user"]
    assert names("--tag", "team=risk") == ["merchant_30d", "user_txn_7d"]
    assert names("--tag", "team=nobody") == []
    assert names("--search", "card holder") == ["user", "user_txn_7d"]


def test_features_list_requires_every_repeated_tag(home):
    def names(*args):
        return sorted(e["name"] for e in ok_json(invoke("features", "list", "--json", *args, home=home)))

    # one tag holds one value: a key required with two values matches nothing, whichever comes last
    assert names("--tag", "team=nobody", "--tag", "team=risk") == []
    assert names("--tag", "team=risk", "--tag", "team=nobody") == []
    assert names("--tag", "team=risk", "--tag", "team=risk") == ["merchant_30d", "user_txn_7d"]


def test_features_list_bad_arguments(home):
    error(invoke("features", "list", "--tag", "badtag", home=home), 2, "--tag 'badtag'", "key=value")
    error(invoke("features", "list", "--kind", "bogus", home=home), 2, "'bogus' is not one of")


# ------------------------------------------------------ features describe
def test_features_describe_table(home):
    out = ok(invoke("features", "describe", "user_txn_7d", home=home))
    for text in ("feature_view user_txn_7d v1", "txn_count_7d", "amount_sum_7d", "Int64", "Float64",
                 "card holder activity", "user_id"):
        assert text in out


def test_features_describe_json(home):
    spec = ok_json(invoke("features", "describe", "user_txn_7d", "--json", home=home))
    assert [(f["name"], f["dtype"]) for f in spec["schema"]] == [("txn_count_7d", "Int64"),
                                                                  ("amount_sum_7d", "Float64")]
    assert spec["version"] == 1 and spec["versions"] == [1] and spec["ttl_seconds"] == 7 * 86400
    assert spec["source"]["path"] == str(Path(home) / "data" / "user_txn_7d")


def test_features_describe_other_kinds(home):
    service = ok_json(invoke("features", "describe", "fraud_model", "--kind", "feature_service", "--json", home=home))
    assert service["features"] == [f"{v}:{f}" for v, f in zip(["user_txn_7d"] * 2 + ["merchant_30d"] * 2, FEATURES)]
    assert "join_keys: ['user_id']" in ok(invoke("features", "describe", "user", "--kind", "entity", home=home))


def test_features_describe_errors(home):
    error(invoke("features", "describe", "nope", home=home), 1, "'nope'", "merchant_30d, user_txn_7d")
    error(invoke("features", "describe", "user_txn_7d", "--version", "99", home=home), 1, "no version 99")
    error(invoke("features", "describe", "user_txn_7d", "--version", "x", home=home), 2, "'--version'")
    error(invoke("features", "describe", home=home), 2, "Missing argument 'NAME'")


# --------------------------------------------------------- features apply
DEFINITIONS = '''\
from datetime import timedelta

import mlplat as mp

user = mp.Entity("user", join_keys=["user_id"], description="a card holder")
spend = mp.FeatureView("user_spend_7d", entities=[user], ttl=timedelta(days=7),
                       schema=[mp.Field("amount_sum_7d", mp.Float64)],
                       source=mp.ParquetSource({source!r}), description="spend only", tags={{"team": "growth"}})
'''


def test_features_apply_imports_each_folders_own_sibling_modules(tmp_path):
    """In one process, a second folder's `from entities import user` got the first folder's module (cached in
    sys.modules) and applied its entity, exit 0; a namespace package (no __init__.py) too. A file of the
    folder named like a module Python already loaded (platform.py) does not replace it for others."""
    import platform

    for folder in ("a", "b"):
        (tmp_path / folder / "shared").mkdir(parents=True)
        (tmp_path / folder / "entities.py").write_text(
            f"import mlplat as mp\nuser = mp.Entity('user_{folder}', join_keys=['user_id'])\n")
        (tmp_path / folder / "shared" / "kinds.py").write_text(
            f"import mlplat as mp\nshop = mp.Entity('shop_{folder}', join_keys=['shop_id'])\n")
        (tmp_path / folder / "platform.py").write_text("raise RuntimeError('the folder platform.py ran')\n")
        (tmp_path / folder / "definitions.py").write_text(
            "import platform\nfrom entities import user\nfrom shared.kinds import shop\n"
            "assert platform.python_implementation()\n")
        applied = ok_json(invoke("features", "apply", tmp_path / folder / "definitions.py", "--json",
                                 home=str(tmp_path / f"home_{folder}")))
        assert sorted((r["kind"], r["name"]) for r in applied) == [("entity", f"shop_{folder}"),
                                                                    ("entity", f"user_{folder}")]
    assert sys.modules["platform"] is platform and "entities" not in sys.modules and "shared" not in sys.modules
    # a package installed in a virtualenv kept inside the folder (uv's .venv) is not one of the folder's
    site = tmp_path / "a" / ".venv" / "site-packages"
    (site / "installed_pkg").mkdir(parents=True)
    (site / "installed_pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "a" / "definitions.py").write_text("import installed_pkg\nfrom entities import user\n")
    sys.path.append(str(site))
    try:
        ok_json(invoke("features", "apply", tmp_path / "a" / "definitions.py", "--json", home=str(tmp_path / "h")))
        assert "installed_pkg" in sys.modules  # forgotten, and imported anew (a second copy) by the next user
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("installed_pkg", None)


def test_features_apply_and_again(scratch, home, tmp_path):
    path = tmp_path / "defs.py"
    path.write_text(DEFINITIONS.format(source=str(Path(home) / "data" / "user_txn_7d")))
    first = ok_json(invoke("features", "apply", path, "--json", home=scratch))
    assert first == [{"kind": "entity", "name": "user", "version": 1, "changed": False},
                     {"kind": "feature_view", "name": "user_spend_7d", "version": 1, "changed": True}]
    again = ok_json(invoke("features", "apply", path, "--json", home=scratch))
    assert [r["changed"] for r in again] == [False, False] and [r["version"] for r in again] == [1, 1]
    assert "user_spend_7d" in ok(invoke("features", "apply", path, home=scratch))  # the table
    listed = ok_json(invoke("features", "list", "--tag", "team=growth", "--json", home=scratch))
    assert [(e["name"], e["description"]) for e in listed] == [("user_spend_7d", "spend only")]


@pytest.mark.parametrize("source, names", [
    ("x = (\n", ["failed to run: SyntaxError"]),
    ("raise RuntimeError('boom')\n", ["failed to run: RuntimeError: boom"]),
    ("x = 1\n", ["defines no mp.Entity, mp.FeatureView or mp.FeatureService"]),
    ("import mlplat as mp\nv = mp.Field('x', 'nonsense_type')\n", ["unknown dtype 'nonsense_type'"]),
], ids=["syntax-error", "raises", "defines-nothing", "bad-definition"])
def test_features_apply_a_broken_file(scratch, tmp_path, source, names):
    path = tmp_path / "defs.py"
    path.write_text(source)
    error(invoke("features", "apply", path, home=scratch), 1, *names)


def test_features_apply_a_view_missing_from_its_source(scratch, home, tmp_path):
    path = tmp_path / "defs.py"
    path.write_text(DEFINITIONS.format(source=str(Path(home) / "data" / "user_txn_7d"))
                    .replace('mp.Field("amount_sum_7d"', 'mp.Field("no_such_column"'))
    error(invoke("features", "apply", path, home=scratch), 1, "'no_such_column' is missing from the source")
    names = [e["name"] for e in ok_json(invoke("features", "list", "--json", home=scratch))]
    assert "user_spend_7d" not in names


def test_features_apply_imports_modules_next_to_the_file(scratch, home, tmp_path):
    folder = tmp_path / "defs"
    folder.mkdir()
    module = f"mlplat_test_entities_{tmp_path.name.replace('-', '_')}"  # a name no other test imports
    (folder / f"{module}.py").write_text("import mlplat as mp\nuser = mp.Entity('user', join_keys=['user_id'])\n")
    source = str(Path(home) / "data" / "user_txn_7d")
    (folder / "views.py").write_text(
        f"from datetime import timedelta\nimport mlplat as mp\nfrom {module} import user\n"
        f"spend = mp.FeatureView('user_spend_7d', entities=[user], ttl=timedelta(days=7),\n"
        f"                       schema=[mp.Field('amount_sum_7d', mp.Float64)],\n"
        f"                       source=mp.ParquetSource({source!r}))\n")
    path_before = list(sys.path)
    try:
        rows = ok_json(invoke("features", "apply", folder / "views.py", "--json", home=scratch))
    finally:
        sys.modules.pop(module, None)
    assert [(r["kind"], r["name"]) for r in rows] == [("entity", "user"), ("feature_view", "user_spend_7d")]
    assert sys.path == path_before  # the file's folder is on sys.path only while it runs


def test_features_apply_bad_paths(scratch, tmp_path):
    error(invoke("features", "apply", tmp_path / "missing.py", home=scratch), 2, "missing.py", "does not exist")
    error(invoke("features", "apply", tmp_path, home=scratch), 2, "is a directory")


def test_features_apply_error_stays_on_one_line(scratch, tmp_path):
    path = tmp_path / "defs.py"
    path.write_text("raise RuntimeError('line one\\nline two')\n")
    error(invoke("features", "apply", path, home=scratch), 1, "line one")


def test_features_apply_sends_what_the_file_prints_to_stderr(scratch, home, tmp_path):
    path = tmp_path / "defs.py"
    source = str(Path(home) / "data" / "user_txn_7d")
    path.write_text("print('loading definitions')\n" + DEFINITIONS.format(source=source))
    result = invoke("features", "apply", path, "--json", home=scratch)
    assert [r["name"] for r in ok_json(result)] == ["user", "user_spend_7d"]  # stdout: one JSON document
    assert result.stderr == "loading definitions\n"


def test_features_apply_sends_what_a_subprocess_of_the_file_writes_to_stderr(scratch, home, tmp_path):
    """Output at the file-descriptor level (os.system, a subprocess, a C library) went to stdout, so --json
    was no longer one JSON document."""
    import subprocess
    import sys

    path = tmp_path / "defs.py"
    source = str(Path(home) / "data" / "user_txn_7d")
    path.write_text("import os\nos.system('echo from-a-subprocess')\n" + DEFINITIONS.format(source=source))
    result = subprocess.run([sys.executable, "-m", "mlplat", "--home", scratch, "features", "apply", str(path),
                             "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in json.loads(result.stdout)] == ["user", "user_spend_7d"]
    assert "from-a-subprocess" in result.stderr


# ------------------------------------------------------------ materialize
def test_materialize_json_and_incremental(scratch):
    first = ok_json(invoke("materialize", "--json", "--start", "2000-01-01", home=scratch))
    assert [r["view"] for r in first] == ["merchant_30d", "user_txn_7d"]
    assert all(r["version"] == 1 and 0 < r["written"] <= r["rows"] for r in first)
    again = ok_json(invoke("materialize", "--json", "--view", "user_txn_7d", home=scratch))
    assert [r["view"] for r in again] == ["user_txn_7d"]
    assert again[0]["start"] == first[1]["end"]  # continues where the last run ended


def test_materialize_table(scratch):
    end = (datetime.now(timezone.utc) - timedelta(days=1)).replace(microsecond=0)
    out = ok(invoke("materialize", "--view", "merchant_30d@1", "--end", end.isoformat(), home=scratch))
    assert "materialized" in out and "merchant_30d" in out and str(end) in out


def test_materialize_bad_arguments(scratch):
    error(invoke("materialize", "--end", "notadate", home=scratch), 2, "'notadate' is not an ISO date")
    error(invoke("materialize", "--start", "2026-13-45", home=scratch), 2, "'2026-13-45'")
    error(invoke("materialize", "--view", "nope", home=scratch), 1, "'nope'", "merchant_30d, user_txn_7d")
    error(invoke("materialize", "--view", "user_txn_7d@x", home=scratch), 1, "user_txn_7d@x")
    error(invoke("materialize", "--view", "user_txn_7d@7", home=scratch), 1, "no version 7")
    error(invoke("materialize", "--start", "2021-01-01", "--end", "2020-01-01", home=scratch), 1,
          "is after end_date")


# ------------------------------------------------------------------- runs
def test_runs_list_json(home, demo):
    runs = ok_json(invoke("runs", "list", "fraud-demo", "--json", home=home))
    assert {r["id"] for r in runs} == {demo["model"]["run_id"], demo["model"]["challenger_run_id"]}
    assert all(r["experiment"] == "fraud-demo" and r["status"] == "finished" for r in runs)
    assert {r["params"]["lr"] for r in runs} == {"0.01", "0.02"}


def test_json_output_is_strict_json_with_nan_metrics_as_null(scratch, demo):
    import math

    import mlplat as mp

    with mp.Platform(scratch) as p:
        with p.runs.start("nan-metrics") as run:
            run.log_metrics({"val_loss": float("nan"), "gain": float("inf"), "ok": 0.5})

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    [row] = strict(ok(invoke("runs", "list", "nan-metrics", "--json", home=scratch)))
    assert row["metrics"] == {"val_loss": None, "gain": None, "ok": 0.5}
    assert strict(ok(invoke("runs", "show", run.id, "--json", home=scratch)))["metrics"]["val_loss"] is None
    with mp.Platform(scratch) as p:  # the stored values are untouched
        assert math.isnan(p.runs.get(run.id).metrics["val_loss"])


def test_runs_list_of_an_experiment_that_does_not_exist_says_so(home, demo):
    result = invoke("runs", "list", "frad-demo", "--json", home=home)  # it printed an empty list, nothing more
    assert ok_json(result) == []
    assert result.stderr == "mlplat: no experiment named 'frad-demo'; did you mean 'fraud-demo'?\n"
    assert invoke("runs", "list", "fraud-demo", "--filter", "metrics.val_auc > 2", home=home).stderr == ""


def test_runs_list_table(home, demo):
    out = ok(invoke("runs", "list", home=home))
    for text in (demo["model"]["run_id"], demo["model"]["challenger_run_id"], "fraud-demo", "val_auc="):
        assert text in out


def test_runs_list_filter_order_and_max(home, demo):
    def ids(*args):
        return [r["id"] for r in ok_json(invoke("runs", "list", "fraud-demo", "--json", *args, home=home))]

    assert len(ids("--filter", "metrics.val_auc > 0.5")) == 2
    assert ids("--filter", "metrics.val_auc > 2") == []
    assert ids("--filter", "params.lr = '0.01'") == [demo["model"]["run_id"]]
    runs = ok_json(invoke("runs", "list", "--json", "--order-by", "metrics.val_auc desc", home=home))
    assert [r["metrics"]["val_auc"] for r in runs] == sorted((r["metrics"]["val_auc"] for r in runs), reverse=True)
    assert len(ids("--max", "1")) == 1


def test_runs_list_bad_arguments(home):
    error(invoke("runs", "list", "--filter", "metrics.val_auc >>> 0.5", home=home), 1, "filter", "position")
    error(invoke("runs", "list", "--filter", "nonsense.x > 1", home=home), 1, "'nonsense'")
    error(invoke("runs", "list", "--order-by", "metrics.val_auc sideways", home=home), 1, "sideways")
    error(invoke("runs", "list", "--max", "0", home=home), 2, "'--max'", "1<=x<=50000")
    error(invoke("runs", "list", "--filter", "attributes.start_time > 1e20", home=home), 1, "1e+20 is not a time")
    error(invoke("runs", "list", "--filter", "metrics.x > 1" + "0" * 400, home=home), 1, "too large")
    assert ok_json(invoke("runs", "list", "--json", "--filter", "attributes.status = 1", home=home)) == []


def test_runs_show(home, demo):
    run_id = demo["model"]["run_id"]
    data = ok_json(invoke("runs", "show", run_id, "--json", home=home))
    assert data["id"] == run_id and data["params"]["lr"] == "0.01" and data["metrics"]["val_auc"] > 0.7
    assert data["inputs"][0]["content_hash"] == demo["model"]["lineage"]["data"][0]["content_hash"]
    assert data["tags"]["mlplat.git.commit"] == demo["model"]["lineage"]["git"]["commit"]
    assert {a["path"] for a in data["artifacts"]} >= {"model"}
    out = ok(invoke("runs", "show", run_id, home=home))
    for text in (f"run {run_id}", "val_auc", "blake2b-256:", "user_txn_7d@1:txn_count_7d", "artifacts"):
        assert text in out


def test_runs_show_errors(home):
    # a listing's shortened id (as a user copies it) is told so; it said only "unknown run"
    error(invoke("runs", "show", "deadbeef", home=home), 1, "unknown run 'deadbeef': a run id has 32 hex characters",
          "give the whole id")
    error(invoke("runs", "show", "nope", home=home), 1, "unknown run 'nope'")
    error(invoke("runs", "show", home=home), 2, "Missing argument 'RUN_ID'")


def test_runs_compare(home, demo):
    ids = [demo["model"]["run_id"], demo["model"]["challenger_run_id"]]
    rows = ok_json(invoke("runs", "compare", *ids, "--json", home=home))
    assert [r["run_id"] for r in rows] == ids
    assert [r["params.lr"] for r in rows] == ["0.01", "0.02"] and all("metrics.val_auc" in r for r in rows)
    out = ok(invoke("runs", "compare", *ids, home=home))
    assert "params.hidden" in out and ids[0] in out and ids[1] in out


def test_runs_compare_errors(home, demo):
    error(invoke("runs", "compare", demo["model"]["run_id"], "deadbeef", home=home), 1, "'deadbeef'")
    error(invoke("runs", "compare", home=home), 2, "Missing argument 'RUN_IDS...'")


def test_user_text_is_shown_as_written_not_as_rich_markup(scratch):
    import mlplat as mp

    with mp.Platform(scratch) as p:
        with p.runs.start("markup", params={"note": "[/oops]", "style": "[bold red]x"}, tags={"t": "[/]"}) as run:
            run.log_metric("m", 1.0)
        p.models.promote("fraud", 2, "staging", notes="see [/oops] and [red]this")
    for args in (["runs", "show", run.id], ["runs", "compare", run.id]):
        out = ok(invoke(*args, home=scratch))  # '[/oops]' was a MarkupError traceback
        assert "[/oops]" in out and "[bold red]x" in out
    assert "see [/oops] and [red]this" in ok(invoke("models", "lineage", "fraud", "--version", "2", home=scratch))


def test_lineage_and_skew_printers_show_user_text_as_written(scratch):
    # the demo calls them directly: '[/oops]' crashed them (MarkupError) and '[red]x' printed a red 'x'
    import io
    from types import SimpleNamespace

    import mlplat as mp
    from mlplat._console import print_lineage, print_skew

    with mp.Platform(scratch) as p:
        p.models.promote("fraud", 2, "staging", notes="see [/oops] and [red]this")
        p.models.set_policy("fraud", require_distinct_approver=True, actor="carol", notes="[red]audit")
        info = p.models.lineage("fraud", version=2)
    info["params"]["[/p]"] = "[bold]v"
    out = io.StringIO()
    console = Console(file=out, width=400, color_system=None)
    print_lineage(console, info)
    assert "see [/oops] and [red]this" in out.getvalue() and "[/p]=[bold]v" in out.getvalue()
    assert "approval policy: an approver other than the registrant" in out.getvalue()  # and who set it, why
    assert re.search(r"required[ │]+carol[ │]+\S+[ │]+\[red\]audit", out.getvalue())
    # the input columns and the fill rule predict follows (fill_null, logged with the model)
    assert "amount, txn_count_7d, amount_sum_7d, fraud_rate_30d, txn_count_30d; a missing value is 0.0 in every " \
           "column" in out.getvalue()
    for rule, text in (({"amount": -1, "txn_count_7d": None}, "filled: amount=-1, txn_count_7d=refused; any other "
                                                              "column's is refused"),
                       (None, "a missing value is refused"), ("absent", "0 (logged before fill_null was recorded)")):
        artifact = {k: v for k, v in info["artifact"].items() if k != "fill_null"}
        shown = io.StringIO()
        print_lineage(Console(file=shown, width=400, color_system=None),
                      {**info, "artifact": artifact if rule == "absent" else {**artifact, "fill_null": rule}})
        assert text in shown.getvalue()
    feature = SimpleNamespace(feature="[red]f", compared=2, mismatched=1, share=0.5, skewed=True)
    mismatch = SimpleNamespace(feature="[red]f", entity={"user": "[/u]"}, request_time=datetime(2024, 1, 1),
                               served="[b]s", recomputed=1.5)
    report = SimpleNamespace(model="[/m]", rows=2, tolerance=0.01, threshold=0.1, features={"[red]f": feature},
                             mismatches=[mismatch])
    out = io.StringIO()
    print_skew(Console(file=out, width=400, color_system=None), report)
    for text in ("training-serving skew of [/m]", "[red]f", "user=[/u]", "[b]s", "YES"):
        assert text in out.getvalue()


# ----------------------------------------------------------------- models
def test_models_list(home):
    models = ok_json(invoke("models", "list", "--json", home=home))
    assert [(m["name"], m["latest"], m["production"]) for m in models] == [("fraud", 2, 1)]
    assert "fraud" in ok(invoke("models", "list", home=home))


def test_models_lineage_json(home, demo):
    info = ok_json(invoke("models", "lineage", "fraud", "--json", home=home))
    assert (info["model"], info["version"], info["stage"]) == ("fraud", 1, "production")
    assert info["run"]["id"] == demo["model"]["run_id"]
    assert len(info["git"]["commit"]) == 40
    assert info["data"][0]["content_hash"].startswith("blake2b-256:")
    assert info["data"][0]["feature_refs"] == [f"{v}@1:{f}" for v, f in
                                               zip(["user_txn_7d"] * 2 + ["merchant_30d"] * 2, FEATURES)]
    assert [(a["stage"], a["approved_by"]) for a in info["approvals"]] == [("production", "risk-lead")]


def test_models_lineage_of_a_version(home, demo):
    info = ok_json(invoke("models", "lineage", "fraud", "--version", "2", "--json", home=home))
    assert (info["version"], info["stage"]) == (2, "staging")
    assert info["run"]["id"] == demo["model"]["challenger_run_id"]
    staged = ok_json(invoke("models", "lineage", "fraud", "--stage", "staging", "--json", home=home))
    assert staged["version"] == 2


def test_models_lineage_table(home, demo):
    lineage = demo["model"]["lineage"]
    out = ok(invoke("models", "lineage", "fraud", home=home))
    for text in ("fraud v1 (production)", lineage["run"]["id"], lineage["git"]["commit"],
                 lineage["data"][0]["content_hash"], "user_txn_7d@1:amount_sum_7d", "risk-lead"):
        assert text in out


def test_models_lineage_errors(home):
    error(invoke("models", "lineage", "nope", home=home), 1, "unknown model 'nope'")
    error(invoke("models", "lineage", "fraud", "--version", "9", home=home), 1, "no version 9")
    error(invoke("models", "lineage", "fraud", "--alias", "nope", home=home), 1, "no alias 'nope'")
    error(invoke("models", "lineage", "fraud", "--version", "1", "--stage", "production", home=home), 1, "one of")
    error(invoke("models", "lineage", "fraud", "--stage", "bogus", home=home), 2, "'bogus' is not one of")
    error(invoke("models", "lineage", home=home), 2, "Missing argument 'NAME'")


def test_models_lineage_of_an_empty_stage(home):
    error(invoke("models", "lineage", "fraud", "--stage", "archived", home=home), 1,
          "model 'fraud' has no version in stage 'archived'")


def test_models_promote_archives_the_previous_production(scratch):
    done = ok_json(invoke("models", "promote", "fraud", "2", "production", "--approved-by", "x", "--json",
                          home=scratch))
    assert done == {"model": "fraud", "version": 2, "stage": "production"}
    assert ok_json(invoke("models", "list", "--json", home=scratch))[0]["production"] == 2
    v1 = ok_json(invoke("models", "lineage", "fraud", "--version", "1", "--json", home=scratch))
    assert v1["stage"] == "archived"
    info = ok_json(invoke("models", "lineage", "fraud", "--json", home=scratch))
    assert info["version"] == 2 and ("production", "x") in [(a["stage"], a["approved_by"]) for a in info["approvals"]]
    out = ok(invoke("models", "promote", "fraud", "1", "staging", "--notes", "back for a retest", home=scratch))
    assert out == "fraud v1 is now in staging\n"


def test_models_promote_errors(scratch):
    error(invoke("models", "promote", "fraud", "2", "production", home=scratch), 1, "approved_by")
    error(invoke("models", "promote", "fraud", "2", "live", home=scratch), 2, "'live' is not one of")
    error(invoke("models", "promote", "fraud", "two", "staging", home=scratch), 2, "'two' is not a valid integer")
    error(invoke("models", "promote", "fraud", "9", "staging", home=scratch), 1, "no version 9")
    error(invoke("models", "promote", "nope", "1", "staging", home=scratch), 1, "unknown model 'nope'")
    error(invoke("models", "promote", "fraud", home=scratch), 2, "Missing argument 'VERSION'")
    assert ok_json(invoke("models", "list", "--json", home=scratch))[0]["production"] == 1  # nothing moved


def test_models_promote_without_a_stage(scratch):
    error(invoke("models", "promote", "fraud", "2", home=scratch), 2, "Missing argument")


def _history(home: str, version: int) -> list:
    return ok_json(invoke("models", "lineage", "fraud", "--version", version, "--json", home=home))["history"]


def test_models_promote_records_the_actor(scratch):
    assert "--actor" in ok(invoke("models", "promote", "--help"))
    ok(invoke("models", "promote", "fraud", "2", "staging", "--actor", "ci-bot", "--notes", "retest", home=scratch))
    assert [(h["to"], h["by"], h["notes"]) for h in _history(scratch, 2)][-1] == ("staging", "ci-bot", "retest")
    before = _history(scratch, 2)
    error(invoke("models", "promote", "fraud", "2", "staging", "--actor", " ", home=scratch), 1,
          "actor must be a user name, got the blank ' '")
    assert _history(scratch, 2) == before


def test_models_promote_distinct_approver_policy(scratch):
    import mlplat as mp

    with mp.Platform(scratch) as p:  # v2 was registered by 'data-scientist'
        p.models.set_policy("fraud", require_distinct_approver=True)
    before = _history(scratch, 2)
    error(invoke("models", "promote", "fraud", "2", "production", "--approved-by", "Data-Scientist ", "--actor",
                 "risk-lead", home=scratch), 1, "approver other than the registrant ('data-scientist')")
    assert _history(scratch, 2) == before  # refused: nothing recorded, nothing moved
    assert ok_json(invoke("models", "list", "--json", home=scratch))[0]["production"] == 1
    done = ok_json(invoke("models", "promote", "fraud", "2", "production", "--approved-by", "risk-lead",
                          "--actor", "data-scientist", "--json", home=scratch))
    assert done == {"model": "fraud", "version": 2, "stage": "production"}
    assert (_history(scratch, 2)[-1]["by"], _history(scratch, 2)[-1]["approved_by"]) == ("data-scientist", "risk-lead")


def test_models_promote_refuses_notes_past_the_limit(scratch):
    before = _history(scratch, 2)
    error(invoke("models", "promote", "fraud", "2", "production", "--approved-by", "x", "--notes", "n" * 10_001,
                 home=scratch), 1, "notes is 10001 characters long, more than the 10000 allowed")
    assert _history(scratch, 2) == before
    assert ok_json(invoke("models", "list", "--json", home=scratch))[0]["production"] == 1
    ok(invoke("models", "promote", "fraud", "2", "staging", "--notes", "n" * 10_000, home=scratch))
    assert _history(scratch, 2)[-1]["notes"] == "n" * 10_000


# ------------------------------------------------------------------ serve
def test_serve_export(home, demo, tmp_path):
    repo = tmp_path / "repo"
    data = ok_json(invoke("serve", "export", "fraud", "--repository", repo, "--json", home=home))
    assert (data["model"], data["version"], data["backend"]) == ("fraud", 1, "python")
    assert data["config"] == str(repo / "fraud" / "config.pbtxt") and "model.py" in data["files"]
    config = (repo / "fraud" / "config.pbtxt").read_text()
    for text in ('name: "fraud"', 'backend: "python"', "max_batch_size: 64", 'string_value: "production"',
                 f'string_value: "{demo["model"]["run_id"]}"'):
        assert text in config
    assert "dynamic_batching {" in config  # on by default for a batched model, with no wait
    assert sorted(p.name for p in (repo / "fraud" / "1").iterdir()) == sorted(data["files"])
    plain = tmp_path / "plain"
    ok(invoke("serve", "export", "fraud", "--repository", plain, "--no-dynamic-batching", home=home))
    assert "dynamic_batching" not in (plain / "fraud" / "config.pbtxt").read_text()
    error(invoke("serve", "export", "fraud", "--repository", plain, "--no-dynamic-batching",
                 "--max-queue-delay-us", "10", home=home), 2, "cannot be combined")


def test_serve_export_with_options(home, tmp_path):
    repo = tmp_path / "repo"
    out = ok(invoke("serve", "export", "fraud", "--repository", repo, "--version", "2", "--preferred-batch-sizes",
                    "8,16", "--max-queue-delay-us", "200", "--instances", "2", "--triton-name", "fraud_v2", home=home))
    assert out == f"wrote fraud_v2 v2 (python) to {repo}\n"
    config = (repo / "fraud_v2" / "config.pbtxt").read_text()
    for text in ('name: "fraud_v2"', "preferred_batch_size: [ 8, 16 ]", "max_queue_delay_microseconds: 200",
                 "count: 2", 'string_value: "staging"'):
        assert text in config


def test_serve_export_bad_arguments(home, tmp_path):
    repo = tmp_path / "repo"
    error(invoke("serve", "export", "fraud", "--repository", repo, "--preferred-batch-sizes", "8,a", home=home), 2,
          "--preferred-batch-sizes '8,a'", "integers")
    error(invoke("serve", "export", "fraud", "--repository", repo, "--preferred-batch-sizes", "8,128",
                 "--max-batch-size", "64", home=home), 1, "preferred batch size 128 is above max_batch_size 64")
    assert not (repo / "fraud" / "config.pbtxt").exists()
    error(invoke("serve", "export", "fraud", home=home), 2, "Missing option '--repository'")
    error(invoke("serve", "export", "fraud", "--repository", repo, "--backend", "tensorflow", home=home), 2,
          "'tensorflow' is not one of")
    error(invoke("serve", "export", "fraud", "--repository", repo, "--max-batch-size", "-1", home=home), 2,
          "'--max-batch-size'")
    error(invoke("serve", "export", "nope", "--repository", repo, home=home), 1, "unknown model 'nope'")
    error(invoke("serve", "export", "fraud", "--repository", repo, "--version", "9", home=home), 1, "no version 9")
    (tmp_path / "file").write_text("x")
    error(invoke("serve", "export", "fraud", "--repository", tmp_path / "file", home=home), 2, "is a file")


def test_serve_export_into_a_path_below_a_file(home, tmp_path):
    (tmp_path / "file").write_text("x")
    error(invoke("serve", "export", "fraud", "--repository", tmp_path / "file" / "repo", home=home), 1, "file")


# ---------------------------------------------------------------- monitor
def test_monitor_skew_table(home):
    out = ok(invoke("monitor", "skew", "fraud", home=home))
    assert "training-serving skew of fraud (500 served rows" in out
    flagged = [line for line in out.splitlines() if "YES" in line]
    assert len(flagged) == 1 and "amount_sum_7d" in flagged[0]
    assert "first mismatches" in out and "user_id=" in out
    out = ok(invoke("monitor", "skew", "fraud", "--tolerance", "0.001", "--threshold", "0.025", home=home))
    assert "tolerance 0.1%, threshold 2.5%)" in " ".join(out.split())  # was "tolerance 0%, threshold 2%"


def test_monitor_skew_json(home, demo):
    report = ok_json(invoke("monitor", "skew", "fraud", "--json", home=home))
    assert report["model"] == "fraud" and report["rows"] == 500 and report["skewed"] == ["amount_sum_7d"]
    assert list(report["features"]) == FEATURES
    assert {m["feature"] for m in report["mismatches"]} == {"amount_sum_7d"}
    assert sorted({m["entity"]["user_id"] for m in report["mismatches"]}) == sorted(demo["skew"]["planted_users"])
    view = ok_json(invoke("monitor", "skew", "user_txn_7d", "--json", home=home))  # a view works as well
    assert [name.rpartition(":")[2] for name in view["skewed"]] == ["amount_sum_7d"]  # 'fraud:amount_sum_7d' or not


def test_monitor_skew_check(home):
    result = invoke("monitor", "skew", "fraud", "--check", "--json", home=home)
    assert result.exit_code == 3 and result.stderr == ""
    assert json.loads(result.stdout)["skewed"] == ["amount_sum_7d"]  # the report is still printed
    assert invoke("monitor", "skew", "fraud", "--check", home=home).exit_code == 3
    relaxed = ok_json(invoke("monitor", "skew", "fraud", "--threshold", "0.5", "--check", "--json", home=home))
    assert relaxed["skewed"] == [] and relaxed["threshold"] == 0.5


def test_monitor_skew_errors(home):
    error(invoke("monitor", "skew", "nope", home=home), 1, "'nope'")
    error(invoke("monitor", "skew", "fraud", "--threshold", "2", home=home), 2, "'--threshold'", "0<=x<=1")
    error(invoke("monitor", "skew", "fraud", "--sample", "0", home=home), 2, "'--sample'")
    error(invoke("monitor", "skew", "fraud", "--since", "yesterday", home=home), 2, "'yesterday' is not an ISO date")
    error(invoke("monitor", "skew", home=home), 2, "Missing argument 'MODEL_OR_VIEW'")


def test_monitor_drift_json_and_check(home):
    result = invoke("monitor", "drift", "fraud", "--json", "--check", home=home)
    report = json.loads(result.stdout)
    assert result.exit_code == (3 if report["drifted"] else 0) and result.stderr == ""
    assert report["model"] == "fraud" and report["version"] == 1
    assert list(report["features"]) == [*FEATURES, "amount"]  # and the request-time input
    for d in report["features"].values():
        assert d["psi"] >= 0 and 0 <= d["p_value"] <= 1 and d["served_rows"] > 0 and d["training_rows"] > 0
    assert report["drifted"] == [name for name, d in report["features"].items() if d["drifted"]]
    assert ok_json(invoke("monitor", "drift", "fraud", "--version", "2", "--json", home=home))["version"] == 2


def test_monitor_drift_table(home):
    out = ok(invoke("monitor", "drift", "fraud", home=home))
    assert "drift of fraud v1" in out and "PSI" in out and all(f in out for f in FEATURES)


def test_monitor_drift_errors(home):
    error(invoke("monitor", "drift", "nope", home=home), 1, "unknown model 'nope'")
    error(invoke("monitor", "drift", "fraud", "--version", "7", home=home), 1, "no version 7")
    error(invoke("monitor", "drift", "fraud", "--since", "2099-01-01", home=home), 1, "no served features")
    error(invoke("monitor", "drift", "fraud", "--since", "bad", home=home), 2, "'bad' is not an ISO date")
    error(invoke("monitor", "drift", "fraud", "--alpha", "2", home=home), 2, "'--alpha'")
    for option in ("--alpha", "--psi-threshold"):  # nan passed the range (every comparison with it is False): exit 1
        error(invoke("monitor", "drift", "fraud", option, "nan", home=home), 2, f"'{option}'", "'nan' is not a number")
    for option in ("--tolerance", "--threshold"):
        error(invoke("monitor", "skew", "fraud", option, "NaN", home=home), 2, f"'{option}'")


def test_monitor_drift_bins_past_the_limit_is_a_bad_argument(home):
    error(invoke("monitor", "drift", "fraud", "--bins", "1001", home=home), 2, "'--bins'", "2<=x<=1000")


def test_monitor_adoption(home):
    data = ok_json(invoke("monitor", "adoption", "--json", home=home))
    assert data["runs"] == 2 and data["production_models"] == 1
    assert data["share_production_with_complete_lineage"] == 1.0 and data["incomplete_lineage"] == []
    assert data["share_runs_with_input_and_commit"] == 1.0 and sum(data["runs_per_week"].values()) == 2
    assert list(data["time_to_production"]) == ["fraud"] and data["time_to_production"]["fraud"]["days"] >= 0
    out = ok(invoke("monitor", "adoption", home=home))
    assert "runs: 2;" in out and "production models: 1;" in out and "time to production" in out


def test_monitor_adoption_bad_argument(home):
    error(invoke("monitor", "adoption", "fraud", home=home), 2, "unexpected extra argument")


def test_lineage_says_whether_the_artifact_is_what_was_registered(scratch):
    """The sha256 recorded at registration: lineage prints whether the artifact's record (and with --verify its
    files) still hold it."""
    import sqlalchemy as sa

    import mlplat as mp
    from mlplat.db.models import RunArtifact

    assert "(as registered; files match)" in ok(invoke("models", "lineage", "fraud", "--verify", home=scratch))
    with mp.Platform(scratch) as p:  # a record changed out of band (mlplat refuses to log over it)
        info = p.models.get("fraud", stage="production")  # what lineage shows by default
        with p.db.connect(write=True) as conn:
            conn.execute(sa.update(RunArtifact).where(RunArtifact.run_id == info.run_id,
                                                      RunArtifact.path == info.artifact).values(sha256="0" * 64))
    out = ok(invoke("models", "lineage", "fraud", home=scratch))
    assert f"(CHANGED after registration: registered {info.artifact_sha256[:16]}...)" in out


def test_choosing_a_version_twice_names_the_command_line_options(home):
    """The message named the Python keywords only (version=, stage= or alias=)."""
    error(invoke("models", "lineage", "fraud", "--version", "1", "--stage", "staging", home=home), 1,
          "--version, --stage or --alias")
