"""What the demo prints after each step, and its closing summary."""
from __future__ import annotations

import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from .._console import as_text, print_lineage, print_skew, table
from ..settings import hide_password

__all__ = ["closing", "definitions", "lineage", "models", "online", "serving", "skew", "training_set"]


def _cell(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def definitions(console: Any, applied: list, objects: list) -> None:
    out = table("kind", "name", "version", "description", title="feature definitions")
    for r, obj in zip(applied, objects):
        out.add_row(r.kind, r.name, str(r.version), obj.description)
    console.print(out)


def training_set(console: Any, train: pa.Table, seconds: float) -> None:
    shown = ["user_id", "merchant_id", "event_timestamp", "is_fraud", "txn_count_7d", "amount_sum_7d",
             "fraud_rate_30d"]
    head = table(*shown, title="point-in-time training set (first rows)")
    for row in train.select(shown).slice(0, 5).to_pylist():
        head.add_row(*[_cell(v) for v in row.values()])
    console.print(head)
    matched = train.num_rows - train.column("txn_count_7d").null_count
    console.print(
        f"training set: {train.num_rows:,} rows x {train.num_columns} columns in {seconds:.2f} s; "
        f"{matched:,} rows have user features"
        + (" (the others had no card activity in the 7 days before)" if matched < train.num_rows else ""))


def models(console: Any, champion_auc: float, challenger_auc: float) -> None:
    out = table("version", "stage", "validation AUC", "registered by", "approved by", title="model 'fraud'")
    out.add_row("1", "production", f"{champion_auc:.3f}", "data-scientist", "risk-lead")
    out.add_row("2", "staging", f"{challenger_auc:.3f}", "data-scientist", "risk-lead")
    console.print(out)


def online(console: Any, rows: int, values: dict[str, list], consistent: bool) -> None:
    console.print(f"materialized {rows:,} entities")
    look = table(*values.keys(), title="online lookup (user 5000 does not exist: None)")
    for row in zip(*values.values()):
        look.add_row(*[_cell(v) for v in row])
    console.print(look)
    console.print(f"online equals offline retrieval at the same moment: {'yes' if consistent else '[red]NO'}")


def serving(console: Any, ab: dict[str, Any], latencies: list[float]) -> None:
    ms = np.asarray(latencies) * 1e3
    console.print(f"predict (online features + model + served-feature log), one request at a time: "
                  f"p50 {np.median(ms):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms")
    out = table("variant", "model", "requests", "users", "right decisions", title="A/B gateway")
    for name, v in ab["variants"].items():
        mean = "-" if v["mean"] is None else f"{v['mean']:.1%}"
        out.add_row(name, v["model"], str(v["decisions"]), str(v["users"]), mean)
    console.print(out)
    diff = ab["difference"]
    if diff:
        lo, hi = diff["ci95"]
        console.print(f"challenger - champion: {diff['estimate']:+.2%} (95% CI {lo:+.2%} .. {hi:+.2%})")


def skew(console: Any, skew: Any, planted: list[int]) -> None:
    print_skew(console, skew, mismatches=0)
    found = sorted({m.entity["user_id"] for m in skew.mismatches})
    rows = sum(1 for m in skew.mismatches if m.entity["user_id"] in planted)
    console.print(f"planted: a streaming job pushed amount_sum_7d in cents for {len(planted)} users, online only; "
                  f"the skew check names {len(found)} users (in {rows} served rows: a user may be served twice), "
                  + ("exactly those." if found == sorted(planted) else "[red]not the same set."))
    for m in skew.mismatches[:3]:
        console.print(f"  user {m.entity['user_id']} at {m.request_time:%H:%M:%S}: served {_cell(m.served)}, "
                      f"recomputed offline {_cell(m.recomputed)}")


def lineage(console: Any, info: dict[str, Any]) -> None:
    console.rule("[bold]lineage: which model is in production, and what data was it trained on?")
    print_lineage(console, info)


def closing(console: Any, timings: dict[str, float], total: float, home: Path, settings: Any) -> None:
    out = table("step", "seconds", title=f"mlplat demo: done in {total:.1f} s")
    for name, seconds in timings.items():
        out.add_row(name.replace("_", " "), f"{seconds:.2f}")
    console.print(out)
    console.print(as_text(f"home: {home}  (database {hide_password(settings.database_url)}, online store "
                          f"{hide_password(settings.online_store)})"), soft_wrap=True)
    # the online store is not recorded in the home: a command reading it must be told (materialize, predict);
    # and the demo ignored MLPLAT_* variables, which the next commands would follow to another database
    env = {k: v for k, v in os.environ.items() if k.startswith("MLPLAT_") and v.strip()}
    where = f"--home {shlex.quote(str(home))}"  # quoted: the commands run as printed, a home with spaces too
    if "MLPLAT_DATABASE_URL" in env:
        where += f" --database-url {shlex.quote(hide_password(settings.database_url))}"
    if not settings.online_store.startswith("sqlite") or "MLPLAT_ONLINE_STORE" in env:
        where += f" --online-store {shlex.quote(hide_password(settings.online_store))}"
    console.print(as_text(f"next: mlplat {where} models lineage fraud --verify"), soft_wrap=True)  # not cut: they
    console.print(as_text(f"      mlplat {where} monitor skew fraud"), soft_wrap=True)  # run as printed
    if "MLPLAT_ARTIFACT_ROOT" in env:
        console.print("      (with MLPLAT_ARTIFACT_ROOT unset: the demo's artifacts are under the home)")
