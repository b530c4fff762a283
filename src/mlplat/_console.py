"""Rich rendering shared by the command line and the demo."""
from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

__all__ = ["as_text", "print_lineage", "print_skew", "table"]


#: columns whose values must be shown whole (ids, hashes, references), folded across lines when narrow
_WHOLE = {"id", "run", "value", "content hash", "feature refs", "entity", "at", "start", "end", "config", "path"}


def table(*columns: str, title: str | None = None, **kwargs: Any) -> Table:
    """A rich table; ids, hashes and references fold across lines instead of being cut with an ellipsis. Column
    names are shown as written (a compared run's param and metric names are the user's)."""
    out = Table(title=title, **kwargs)
    for name in columns:
        out.add_column(as_text(name), overflow="fold" if name in _WHOLE else "ellipsis")
    return out


def as_text(value: Any) -> str:
    """``value`` as text shown as written: a name, param, tag, note or entity value is the user's, and rich read
    '[/x]' in it as markup (an error, a crashed table) and '[red]x' as a red 'x'."""
    return escape(str(value))


def print_lineage(console: Any, info: dict[str, Any]) -> None:
    """``p.models.lineage(...)`` as a header, training data, approvals, params and metrics, stage history.

    Every value is the user's text, printed as written (never as rich markup)."""
    run, git = info["run"], info["git"]
    console.rule(f"[bold]{as_text(info['model'])} v{info['version']} ({as_text(info['stage'])})")
    head = table("key", "value", show_header=False, box=None)
    dirty = {"true": " (uncommitted changes)", "false": " (clean)"}.get(git["dirty"], "")
    rows = [
        ("registered", f"by {info['registered_by']} at {info['registered_at']}"),
        ("aliases", ", ".join(info["aliases"]) or "-"),
        ("run", f"{run['id']} in {run['experiment']!r} ({run['status']}, by {run['user']})"),
        ("git commit", (git["commit"] or "unknown") + dirty),
        ("entry point", run["entry_point"] or "-"),
        ("artifact", _artifact_text(info["artifact"])),
        ("inputs", _inputs_text(info["artifact"])),
    ]
    for key, value in rows:
        head.add_row(f"[bold]{key}", as_text(value))
    console.print(head)
    data = table("input", "rows", "content hash", "feature refs", "verified", title="training data")
    for d in info["data"]:
        check = d.get("verification")
        verified = "-" if not check else ("matches" if check.get("matches") else
                                          f"MISMATCH {check.get('reason', '')}".strip()) if check["checked"] else "n/a"
        data.add_row(as_text(d["name"]), f"{d['row_count']:,}", as_text(d["content_hash"]),
                     as_text("\n".join(d["feature_refs"]) or "-"), as_text(verified))
    console.print(data)
    approvals = table("stage", "approved by", "by", "at", "notes", title="approvals")
    for a in info["approvals"]:
        approvals.add_row(*(as_text(a[k]) for k in ("stage", "approved_by", "by", "at", "notes")))
    console.print(approvals)
    policy = info.get("policy") or {"require_distinct_approver": False, "changes": []}
    rule = "an approver other than the registrant" if policy["require_distinct_approver"] else "any approver"
    console.print(f"[bold]approval policy[/]: {rule}")
    if policy["changes"]:
        changes = table("distinct approver", "by", "at", "notes", title="policy changes")
        for c in policy["changes"]:
            changes.add_row("required" if c["require_distinct_approver"] else "not required",
                            *(as_text(c[k]) for k in ("by", "at", "notes")))
        console.print(changes)
    params = as_text(", ".join(f"{k}={v}" for k, v in sorted(info["params"].items())))
    metrics = as_text(", ".join(f"{k}={v:.4g}" for k, v in sorted(info["metrics"].items())))
    console.print(f"[bold]params[/]: {params or '-'}\n[bold]final metrics[/]: {metrics or '-'} (as registered)")
    if info.get("metrics_after_registration"):
        since = ", ".join(f"{k}={v:.4g}" for k, v in sorted(info["metrics_after_registration"].items()))
        console.print(f"[bold]logged since registration[/]: {as_text(since)}")
    if info.get("data_after_registration"):
        names = ", ".join(d["name"] for d in info["data_after_registration"])
        console.print(f"[bold]inputs logged after registration[/] (not this version's training data): "
                      f"{as_text(names)}")
    history = table("version", "from", "to", "by", "approved by", "at", "notes", title="stage history")
    for h in info["history"]:
        history.add_row(str(h["version"]), as_text(h["from"] or "-"), as_text(h["to"]), as_text(h["by"]),
                        as_text(h["approved_by"] or "-"), as_text(h["at"]), as_text(h["notes"]))
    console.print(history)


def _artifact_text(artifact: dict[str, Any]) -> str:
    """The model artifact, its sha256 and torch version, and whether it is what was registered (its record,
    and with ``--verify`` its stored files)."""
    text = (f"{artifact['path']} sha256 {artifact.get('sha256', '?')[:16]}... torch "
            f"{artifact.get('torch_version', '?')}")
    registered = artifact.get("registered_sha256")
    if registered is None:
        return f"{text} (no sha256 recorded at registration)"
    if artifact.get("matches_registration") is False:
        return f"{text} (CHANGED after registration: registered {registered[:16]}...)"
    check = artifact.get("verification")
    if check and check.get("checked"):
        return f"{text} (as registered; files " + ("match" if check.get("matches") else
                                                   f"MISMATCH {check.get('reason', '')}".strip()) + ")"
    return f"{text} (as registered)"


def _inputs_text(artifact: dict[str, Any]) -> str:
    """The model's input columns and what predict gives it for a missing value (its ``fill_null``)."""
    columns = ", ".join(artifact.get("columns") or []) or "the features, in reference order"
    if "fill_null" not in artifact:
        return f"{columns}; a missing value is 0 (logged before fill_null was recorded)"
    rule = artifact["fill_null"]
    if rule is None:
        return f"{columns}; a missing value is refused"
    if isinstance(rule, dict):
        filled = ", ".join(f"{c}={'refused' if v is None else v}" for c, v in rule.items())
        return f"{columns}; a missing value is filled: {filled or '-'}; any other column's is refused"
    return f"{columns}; a missing value is {rule} in every column"


def _value(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else as_text(v)


def _percent(share: float) -> str:
    """A share as a percentage with the digits it has: 0.001 is 0.1%, not 0% (which reads as exact)."""
    return f"{share * 100:.4g}%"


def print_skew(console: Any, report: Any, mismatches: int = 10) -> None:
    """A ``SkewReport``: per feature compared, mismatched, share, skewed; then the first mismatches.

    Names and entity values are the user's text, printed as written (never as rich markup)."""
    out = table("feature", "compared", "mismatched", "share", "skewed",
                title=f"training-serving skew of {as_text(report.model)} ({report.rows:,} served rows; tolerance "
                      f"{_percent(report.tolerance)}, threshold {_percent(report.threshold)})")
    for s in report.features.values():
        out.add_row(as_text(s.feature), f"{s.compared:,}", f"{s.mismatched:,}", f"{s.share:.1%}",
                    "[red]YES" if s.skewed else "no")
    console.print(out)
    if report.mismatches and mismatches:
        first = table("feature", "entity", "request time", "served", "recomputed offline", title="first mismatches")
        for m in report.mismatches[:mismatches]:
            first.add_row(as_text(m.feature), as_text(", ".join(f"{k}={v}" for k, v in m.entity.items())),
                          m.request_time.strftime("%Y-%m-%d %H:%M:%S"), _value(m.served), _value(m.recomputed))
        console.print(first)
