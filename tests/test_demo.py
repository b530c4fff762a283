"""`mlplat demo`: the whole journey, on SQLite, on Redis and on a real Triton server."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner
from rich.console import Console

import mlplat as mp
from mlplat.cli import cli, main
from mlplat.demo import generate_transactions, run_demo
from mlplat.demo.data import data_start
from mlplat.serving import TritonServer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo") / "home")


def test_demo_builds_a_point_in_time_training_set(demo):
    txns = generate_transactions(start=data_start())
    later = pc.greater_equal(txns.column("event_timestamp"),
                             pa.scalar(data_start() + timedelta(days=30), pa.timestamp("us", "UTC")))
    assert demo["rows"] == pc.sum(later.cast(pa.int64())).as_py() > 100_000  # every label row back once
    assert demo["columns"][-4:] == ["txn_count_7d", "amount_sum_7d", "fraud_rate_30d", "txn_count_30d"]
    assert [a[0] for a in demo["applied"]] == ["entity", "entity", "feature_view", "feature_view",
                                               "feature_service"]
    assert 0 < demo["matched"] <= demo["rows"]


def test_demo_serves_what_offline_retrieval_gives(demo):
    assert demo["materialized"] > 2000 and demo["consistent"] is True
    assert demo["online"]["txn_count_7d"][3] is None and demo["online"]["txn_count_7d"][0] > 0


def test_predict_takes_request_time_columns_from_any_table_form(demo):
    import pandas as pd

    import mlplat as mp

    rows = [{"user_id": u, "merchant_id": f"m{u % 7:04d}", "amount": 10.0 * u} for u in (1, 2, 3, 5000)]
    with mp.Platform(demo["home"], served_sample_rate=0.0) as p:  # the demo's own settings: SQLite under home
        want = p.serving.predict("fraud", rows, log=False)["output__0"]
        for form in (pd.DataFrame(rows), pa.Table.from_pylist(rows), {k: [r[k] for r in rows] for k in rows[0]}):
            assert p.serving.predict("fraud", form, log=False)["output__0"] == want
        with pytest.raises(mp.DataError, match="needs a column 'amount'"):
            p.serving.predict("fraud", pd.DataFrame(rows).drop(columns="amount"), log=False)


def test_demo_trains_registers_and_approves(demo):
    model = demo["model"]
    assert model["val_auc"] > 0.7 and model["challenger_val_auc"] > 0.7  # the labels carry learnable signal
    lineage = model["lineage"]
    assert lineage["stage"] == "production" and lineage["run"]["id"] == model["run_id"]
    assert lineage["approvals"][0]["approved_by"] == "risk-lead"
    assert lineage["data"][0]["content_hash"].startswith("blake2b-256:")
    assert "user_txn_7d@1:txn_count_7d" in lineage["data"][0]["feature_refs"]


def test_demo_routes_with_the_gateway_and_catches_the_planted_skew(demo):
    served = demo["served"]
    assert served["backend"].startswith("local backend") and served["requests"] == 500
    variants = served["ab"]["variants"]
    assert variants["champion"]["decisions"] + variants["challenger"]["decisions"] == 500
    assert 0 < variants["challenger"]["decisions"] < variants["champion"]["decisions"]
    skew = demo["skew"]
    assert skew["skewed"] == ["amount_sum_7d"]
    assert skew["found_users"] == sorted(skew["planted_users"]) and len(skew["planted_users"]) == 40


def test_demo_lineage_command_names_run_commit_hash_refs_and_approver(demo):
    lineage = demo["model"]["lineage"]
    result = CliRunner().invoke(cli, ["--home", demo["home"], "models", "lineage", "fraud", "--verify"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for text in (lineage["run"]["id"], lineage["git"]["commit"], lineage["data"][0]["content_hash"],
                 "user_txn_7d@1:txn_count_7d", "risk-lead", "matches"):
        assert text and text in result.output
    assert lineage["run"]["name"] == "champion"  # the demo's runs are named (a list showed blank names)


def test_demo_ignores_mlplat_environment_variables(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("MLPLAT_DATABASE_URL", f"sqlite:///{elsewhere / 'other.db'}")
    monkeypatch.setenv("MLPLAT_ARTIFACT_ROOT", str(elsewhere / "artifacts"))
    monkeypatch.setenv("MLPLAT_SERVED_SAMPLE", "0.05")  # would log 1 served row in 20
    out = io.StringIO()
    summary = run_demo(tmp_path / "home", console=Console(file=out, width=400))
    assert not elsewhere.exists() and (tmp_path / "home" / "mlplat.db").is_file()
    skew = summary["skew"]
    assert skew["found_users"] == sorted(skew["planted_users"]) and len(skew["planted_users"]) == 40
    # the commands it suggests read the demo's database, though the variables still point elsewhere
    (suggested,) = re.findall(r"next: mlplat (.*) models lineage fraud --verify", out.getvalue())
    assert f"--database-url sqlite:///{tmp_path / 'home' / 'mlplat.db'}" in suggested
    assert "with MLPLAT_ARTIFACT_ROOT unset" in out.getvalue()
    monkeypatch.delenv("MLPLAT_ARTIFACT_ROOT")
    result = CliRunner().invoke(cli, [*suggested.split(), "models", "lineage", "fraud"])
    assert result.exit_code == 0, result.output  # "unknown model 'fraud'" before


def test_the_closing_lines_hide_passwords_and_show_paths_as_written(tmp_path, monkeypatch):
    """The home line printed the online store's password (the next: line hid it), a home holding '[/x]' crashed
    the demo after all its work (rich markup), and the next: commands were not shell-quoted: run as printed, a
    home with a space ran `mlplat demo`; and at a pipe's 80 columns rich cut them into two lines."""
    import shlex
    from types import SimpleNamespace

    from mlplat.demo import report

    monkeypatch.delenv("MLPLAT_DATABASE_URL", raising=False)
    monkeypatch.delenv("MLPLAT_ONLINE_STORE", raising=False)
    home = tmp_path / "our team demos" / ("the fraud detection demo of the risk team " * 3) / "[bold]b[/x]"
    settings = SimpleNamespace(database_url=f"sqlite:///{home}/mlplat.db", online_store="redis://:s3cret@h:6379/0")
    out = io.StringIO()
    report.closing(Console(file=out, width=80), {"data": 1.0}, 1.0, home, settings)  # a pipe's width: not wrapped
    text = out.getvalue()
    assert "s3cret" not in text and f"home: {home}  (database sqlite:///{home}/mlplat.db, online store " \
        "redis://:***@h:6379/0)" in text
    (suggested,) = re.findall(r"next: mlplat (.*) models lineage fraud --verify", text)
    assert shlex.split(suggested) == ["--home", str(home), "--online-store", "redis://:***@h:6379/0"]


def test_a_bad_online_store_url_leaves_the_last_demo_as_it_was(tmp_path):
    """The folder was emptied first and the URL refused after: the last demo was gone and nothing made."""
    from mlplat.demo.data import fresh_home
    from mlplat.errors import ConfigError

    home = tmp_path / "home"
    fresh_home(home)  # what a demo run leaves, besides its data
    (home / "mlplat.db").write_text("the last demo's database")
    with pytest.raises(ConfigError, match="'abc' is not a number"):
        run_demo(home, online_store="redis://127.0.0.1:6379/abc", console=Console(quiet=True))
    assert (home / "mlplat.db").read_text() == "the last demo's database"
    # URLs the settings take but the store does not (found at the materialize step, 12 s in, the demo wiped)
    for url, error in (("sqlite://", ConfigError), ("redis://127.0.0.1:1/0", mp.OnlineStoreError),
                       ("sqlite:////proc/no-such-dir/online.db", mp.OnlineStoreError),
                       ("redis+cluster://127.0.0.1:6379/3", mp.OnlineStoreError)):
        with pytest.raises(error):
            run_demo(home, online_store=url, console=Console(quiet=True))
        assert (home / "mlplat.db").read_text() == "the last demo's database"
    project = tmp_path / "project"  # a folder the demo may not wipe is refused before the store is opened
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a demo folder"):
        run_demo(project, online_store=f"sqlite:///{tmp_path / 'stores' / 'online.db'}", console=Console(quiet=True))
    assert not (tmp_path / "stores").exists()


def test_demo_reports_the_time_of_each_step(demo):
    """The closing table's numbers (how long they are is the machine's: timings are not asserted here)."""
    timings = demo["timings"]
    assert list(timings) == ["data", "apply", "training_set", "models", "materialize", "serve", "skew", "total"]
    assert all(t > 0 for t in timings.values()) and timings["total"] >= sum(timings.values()) - timings["total"]


def test_demo_on_redis(tmp_path, redis_url):
    import io

    out = io.StringIO()
    summary = run_demo(tmp_path / "demo", online_store=redis_url, console=Console(file=out, width=300))
    # the next commands name the online store, which the home does not record (they left it out)
    assert f"next: mlplat --home {tmp_path / 'demo'} --online-store {redis_url} models lineage" in out.getvalue()
    assert summary["consistent"] is True and summary["materialized"] > 2000
    assert summary["skew"]["found_users"] == sorted(summary["skew"]["planted_users"])


def test_demo_on_a_real_triton_server(tmp_path, triton_python):
    (tmp_path / "empty").mkdir()  # the demo sends its models to the server: nothing shared on disk
    with TritonServer(tmp_path / "empty", python=triton_python) as server:
        summary = run_demo(tmp_path / "demo", triton_url=server.grpc_url)
    assert summary["served"]["backend"] == f"Triton at {server.grpc_url}"
    assert summary["skew"]["skewed"] == ["amount_sum_7d"]


def test_demo_command_reruns_in_its_own_folder(tmp_path):
    runner = CliRunner()
    for _ in range(2):  # the second run wipes what the first wrote
        result = runner.invoke(cli, ["demo", "--home", str(tmp_path / "d")], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert re.search(r"the skew check names 40 users \(in (\d+) served rows: a user may be served twice\), "
                         r"exactly those", result.output)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--home", str(tmp_path / "mine")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlplat: error: ") and err.count("\n") == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_demo_with_an_unreachable_triton_says_so(tmp_path, capsys):
    assert main(["demo", "--home", str(tmp_path / "d"), "--triton-url", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "no ready Triton server at 127.0.0.1:9" in err and err.count("\n") == 1


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "mlplat", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout
