"""`mlplat demo` and the command line around it."""
from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
from click.testing import CliRunner

from mlplat.cli import cli, main
from mlplat.demo import run_demo


def test_demo_builds_a_point_in_time_training_set(tmp_path):
    summary = run_demo(tmp_path / "demo")
    assert summary["rows"] == 180_000 and 0 < summary["matched"] <= summary["rows"]
    assert summary["columns"][-4:] == ["txn_count_7d", "amount_sum_7d", "fraud_rate_30d", "txn_count_30d"]
    assert [a[0] for a in summary["applied"]] == ["entity", "entity", "feature_view", "feature_view",
                                                  "feature_service"]
    # the snapshots a label row may use are stamped at the end of a day before the label's time
    snapshots = pq.read_table(tmp_path / "demo" / "data" / "user_txn_7d").column("event_timestamp")
    assert snapshots.num_chunks > 0
    # materialized and served: the online answer equals offline retrieval at the same moment
    assert summary["materialized"] > 2000 and summary["consistent"] is True
    assert summary["online"]["txn_count_7d"][3] is None and summary["online"]["txn_count_7d"][0] > 0
    # a tracked, registered, approved model whose lineage names run, data hash, feature refs and approver
    lineage = summary["model"]["lineage"]
    assert summary["model"]["val_auc"] > 0.7  # the labels carry signal the features can learn
    assert lineage["stage"] == "production" and lineage["approvals"][0]["approved_by"] == "risk-lead"
    assert lineage["data"][0]["content_hash"].startswith("blake2b-256:")
    assert "user_txn_7d@1:txn_count_7d" in lineage["data"][0]["feature_refs"]
    result = CliRunner().invoke(cli, ["--home", summary["home"], "models", "lineage", "fraud", "--verify"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in (lineage["run"]["id"], lineage["data"][0]["content_hash"], "risk-lead", "matches"):
        assert text in result.output


def test_demo_on_redis(tmp_path, redis_url):
    summary = run_demo(tmp_path / "demo", online_store=redis_url)
    assert summary["consistent"] is True and summary["materialized"] > 2000


def test_demo_command_reruns_in_its_own_folder(tmp_path):
    runner = CliRunner()
    for _ in range(2):  # the second run wipes what the first wrote
        result = runner.invoke(cli, ["demo", "--home", str(tmp_path / "d")])
        assert result.exit_code == 0, result.output
        assert "training set: 180,000 rows" in result.output


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--home", str(tmp_path / "mine")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlplat: error: ") and err.count("\n") == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_arguments_and_version():
    assert main(["nonsense"]) == 2
    assert main(["demo", "--bogus"]) == 2
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("mlplat, version ")


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "mlplat", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout
