"""The ``mlplat`` command line.

Usage::

    mlplat demo [--home DIR]                              # the end-to-end demo on embedded defaults
    mlplat --home DIR models lineage fraud [--json]      # which model is in production, trained on what
    mlplat --version

``--home``, ``--database-url`` and ``--online-store`` (before the command)
pick the platform, like ``MLPLAT_HOME``, ``MLPLAT_DATABASE_URL`` and
``MLPLAT_ONLINE_STORE``. mlplat errors print one line and exit with status 1;
bad arguments exit with status 2.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import MlplatError

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlplat")
@click.option("--home", default=None, help="Platform home folder (default: $MLPLAT_HOME or ./mlplat-home).")
@click.option("--database-url", default=None, help="SQL database URL (default: SQLite under the home).")
@click.option("--online-store", default=None, help="Online store URL (default: SQLite under the home).")
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None, online_store: str | None) -> None:
    """mlplat: features, runs, models and serving in one library."""
    ctx.obj = {"home": home, "database_url": database_url, "online_store": online_store}


def _platform(ctx: click.Context):
    from .platform import Platform

    return Platform(ctx.obj["home"], database_url=ctx.obj["database_url"], online_store=ctx.obj["online_store"])


@cli.command()
@click.option("--home", "demo_home", default=None,
              help="Folder for the demo, wiped on each run (default: the global --home, else ./mlplat-demo).")
@click.option("--online-store", "demo_online", default=None, help="Online store URL, e.g. redis://127.0.0.1:6379/0.")
@click.pass_context
def demo(ctx: click.Context, demo_home: str, demo_online: str | None) -> None:
    """Run the fintech demo end to end in a fresh folder."""
    from .demo import run_demo

    run_demo(demo_home or ctx.obj["home"] or "mlplat-demo", online_store=demo_online or ctx.obj["online_store"])


@cli.group()
def models() -> None:
    """The model registry."""


@models.command("lineage")
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="A version number.")
@click.option("--stage", default=None, type=click.Choice(["none", "staging", "production", "archived"]),
              help="The version in this stage (default: production).")
@click.option("--alias", default=None, help="The version an alias points at.")
@click.option("--verify", is_flag=True, help="Rebuild the training data from the offline store and compare hashes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.pass_context
def lineage(ctx: click.Context, name: str, version: int | None, stage: str | None, alias: str | None, verify: bool,
            as_json: bool) -> None:
    """Which version of NAME, trained by which run, on what data, approved by whom."""
    with _platform(ctx) as p:
        info = p.models.lineage(name, version=version, stage=stage, alias=alias, verify=verify)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    _print_lineage(info)


def _print_lineage(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    run, git = info["run"], info["git"]
    console.rule(f"[bold]{info['model']} v{info['version']} ({info['stage']})")
    head = Table(show_header=False, box=None)
    dirty = {"true": " (uncommitted changes)", "false": " (clean)"}.get(git["dirty"], "")
    rows = [
        ("registered", f"by {info['registered_by']} at {info['registered_at']}"),
        ("aliases", ", ".join(info["aliases"]) or "-"),
        ("run", f"{run['id']} in {run['experiment']!r} ({run['status']}, by {run['user']})"),
        ("git commit", (git["commit"] or "unknown") + dirty),
        ("entry point", run["entry_point"] or "-"),
        ("artifact", f"{info['artifact']['path']} sha256 {info['artifact'].get('sha256', '?')[:16]}... torch "
                     f"{info['artifact'].get('torch_version', '?')}"),
    ]
    for key, value in rows:
        head.add_row(f"[bold]{key}", str(value))
    console.print(head)
    data = Table("input", "rows", "content hash", "feature refs", "verified", title="training data")
    for d in info["data"]:
        check = d.get("verification")
        verified = "-" if not check else ("matches" if check.get("matches") else
                                          f"MISMATCH {check.get('reason', '')}".strip()) if check["checked"] else "n/a"
        data.add_row(d["name"], f"{d['row_count']:,}", d["content_hash"], "\n".join(d["feature_refs"]) or "-",
                     verified)
    console.print(data)
    approvals = Table("stage", "approved by", "by", "at", "notes", title="approvals")
    for a in info["approvals"]:
        approvals.add_row(a["stage"], a["approved_by"], a["by"], a["at"], a["notes"])
    console.print(approvals)
    params = ", ".join(f"{k}={v}" for k, v in sorted(info["params"].items()))
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(info["metrics"].items()))
    console.print(f"[bold]params[/]: {params or '-'}\n[bold]final metrics[/]: {metrics or '-'}")
    history = Table("version", "from", "to", "by", "approved by", "at", "notes", title="stage history")
    for h in info["history"]:
        history.add_row(str(h["version"]), h["from"] or "-", h["to"], h["by"], h["approved_by"] or "-", h["at"],
                        h["notes"])
    console.print(history)


def main(argv: list[str] | None = None) -> int:
    """Entry point: mlplat errors become a one-line message and exit status 1."""
    try:
        cli.main(args=argv, prog_name="mlplat", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except MlplatError as exc:
        click.echo(f"mlplat: error: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
