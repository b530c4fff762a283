"""The ``mlplat`` command line.

Usage::

    mlplat demo [--home DIR] [--online-store URL] [--triton-url HOST:PORT]
    mlplat [--home DIR] features list|describe|apply ...
    mlplat [--home DIR] materialize [--end ISO] [--view NAME ...]
    mlplat [--home DIR] runs list|show|compare ...
    mlplat [--home DIR] models list|lineage|promote ...
    mlplat [--home DIR] serve export NAME --repository DIR ...
    mlplat [--home DIR] monitor skew|drift|adoption ...

``--home``, ``--database-url`` and ``--online-store`` (before the command) pick
the platform, like MLPLAT_HOME, MLPLAT_DATABASE_URL and MLPLAT_ONLINE_STORE.
Every listing takes ``--json``. Exit status: 0 on success, 1 on an mlplat error
(one line on stderr), 2 on bad arguments, 3 when ``--check`` finds skew or drift,
130 when interrupted, 141 when the reader of the output went away (``| head``).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from . import __version__
from ._checks import BINS_MAX, TRITON_INT32_MAX, TRITON_UINT64_MAX, VERSION_MAX, close_names
from ._console import as_text, print_lineage, print_skew, table
from ._folders import missing_folders, remove_empty
from ._time import as_utc
from .errors import ConfigError, MlplatError
from .settings import hide_password

__all__ = ["main", "cli"]

CHECK_FAILED = 3
#: the exit status when the output's reader went away (``mlplat ... | head``): 128 + SIGPIPE, as a shell reports it
BROKEN_PIPE = 141
#: a version number as the registry and catalog store it (_checks.VERSION_MAX)
_VERSION = click.IntRange(1, VERSION_MAX)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


#: every listing's ``--json``: the same data as one JSON document on stdout
_json_flag = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts).")


def _echo_json(data: Any) -> None:
    """``data`` as strict JSON: NaN and infinities (a metric may be one) are written as null."""
    click.echo(json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False))


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float, however deeply nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _time(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO date or time option (naive means UTC), checked by click so errors name the option."""
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO date or time (e.g. 2026-11-26T12:00)") from None
    try:
        return as_utc(t)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last UTC time Python holds
        raise click.BadParameter(f"{value!r} is out of range: in UTC it falls outside years 1 to 9999") from None


#: what to do instead of giving an empty value, for the options _not_empty checks
_INSTEAD_OF_EMPTY = {"repository": "give the Triton model repository's folder (. for the current one)",
                     "triton_name": "leave it out to use NAME"}


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An option that must not be empty or blank (``--repository "$UNSET"`` would mean the current folder)."""
    if value is not None and not value.strip():
        raise click.BadParameter(f"is empty: {_INSTEAD_OF_EMPTY[param.name]}")
    return value


def _home(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A ``--home``: empty or blank counts as not given, as an empty MLPLAT_HOME does (not the current folder)."""
    return value if value and value.strip() else None


def _console():
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1 on its own; leave it to _Group.main (silent, 141)
            raise BrokenPipeError

    return _Console()


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    out = table(*columns, title=title)
    for row in rows:
        out.add_row(*["-" if v is None else as_text(v) for v in row])
    _console().print(out)


def _one_line(message: str) -> str:
    return " ".join(message.split())


class _Group(click.Group):
    """The ``mlplat`` group: every failure ends as one line on stderr with a Unix exit status.

    mlplat errors exit 1, bad arguments 2 (with a pointer to ``--help``), ``--check`` findings 3;
    none shows a traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:  # `mlplat ... | head`: the reader has what it wanted; no message, no traceback
            _silence_stdout()
            raise click.exceptions.Exit(BROKEN_PIPE) from None
        except MlplatError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # the environment, not mlplat: a full disk, a path that is a file, no permission
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None
        except Exception as exc:  # a bug below the CLI: still one line; MLPLAT_DEBUG=1 shows where
            if os.environ.get("MLPLAT_DEBUG"):
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (a bug in mlplat: please report it with the command; "
                "MLPLAT_DEBUG=1 shows the traceback)") from None

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `mlplat` or a group alone: its help, as usage
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"mlplat: error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"mlplat: error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("mlplat: aborted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (an in-process caller's buffer)
        pass


class _Finite(click.FloatRange):
    """A float range that refuses nan (every comparison with it is False, so a range let it through): a bad
    argument, exit status 2, as one out of range."""

    name = "finite float range"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number in the range {self._describe_range()}.", param, ctx)
        return number


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlplat")
@click.option("--home", default=None, metavar="DIR", callback=_home,
              help="Platform home folder (default: $MLPLAT_HOME or ./mlplat-home; empty counts as not given).")
@click.option("--database-url", default=None, metavar="URL", help="SQL database URL (default: SQLite under the home).")
@click.option("--online-store", default=None, metavar="URL", help="Online store URL (default: SQLite under the home).")
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None, online_store: str | None) -> None:
    """mlplat: features, runs, models, serving and monitoring in one library."""
    ctx.obj = {"home": home, "database_url": database_url, "online_store": online_store}


def _settings(ctx: click.Context):
    """The Settings the global options name, and the SQLite database file they use (None: not SQLite)."""
    from .db.engine import sqlite_file
    from .settings import Settings

    settings = Settings.resolve(ctx.obj["home"], database_url=ctx.obj["database_url"],
                                online_store=ctx.obj["online_store"])
    return settings, sqlite_file(settings.database_url)


def _platform(ctx: click.Context, *, create: bool = False):
    """The Platform the global options name; only ``create=True`` commands may start a new home."""
    from .platform import Platform

    settings, database = _settings(ctx)
    if database is None and settings.database_url.lower().startswith("sqlite"):
        raise ConfigError(
            f"--database-url (or $MLPLAT_DATABASE_URL) {hide_password(settings.database_url)!r} is an in-memory SQLite "
            "database: it "
            "lives only as long as "
            "this one command, so every command would see an empty platform; give a file "
            "(sqlite:////path/mlplat.db) or a PostgreSQL URL")
    if not create and database is not None and not database.exists():
        if ctx.obj["database_url"] or os.environ.get("MLPLAT_DATABASE_URL", "").strip():  # the URL named it
            raise ConfigError(f"--database-url (or $MLPLAT_DATABASE_URL) names the SQLite database {database}, which "
                              "does not exist: give the file of an existing platform, or start one with "
                              "'mlplat features apply FILE'")
        raise ConfigError(
            f"{settings.home} is not an mlplat home (it has no database {database}): give --home or MLPLAT_HOME "
            "of an existing home (the demo's is ./mlplat-demo: mlplat --home mlplat-demo ...), or start one with "
            "'mlplat features apply FILE'")
    made = missing_folders(settings.home)
    if not create and made:  # the database is elsewhere: a home (and parents) left empty are not kept
        ctx.call_on_close(functools.partial(remove_empty, made))
    return Platform(settings=settings)


# ------------------------------------------------------------------- demo
@cli.command()
@click.option("--home", "demo_home", default=None, callback=_home,
              help="Folder for the demo, wiped on each run (default: the global --home, else ./mlplat-demo).")
@click.option("--online-store", "demo_online", default=None, help="Online store URL, e.g. redis://127.0.0.1:6379/0.")
@click.option("--triton-url", default=None, help="Also serve through this Triton server (gRPC host:port).")
@click.pass_context
def demo(ctx: click.Context, demo_home: str | None, demo_online: str | None, triton_url: str | None) -> None:
    """Run the fintech demo end to end in a fresh folder.

    Data, features, training set, two tracked models, approval, online store, A/B-routed
    predictions, a skew check and lineage. The folder holds everything, its own SQLite
    database included, whatever MLPLAT_* variables say.
    """
    from .demo import run_demo

    if ctx.obj["database_url"]:
        raise click.UsageError("the demo keeps its own SQLite database in its folder: leave --database-url out")

    run_demo(demo_home or ctx.obj["home"] or "mlplat-demo", online_store=demo_online or ctx.obj["online_store"],
             triton_url=triton_url)


# --------------------------------------------------------------- features
@cli.group()
def features() -> None:
    """Feature definitions: list, describe, apply."""


@features.command("list")
@click.option("--kind", type=click.Choice(["entity", "feature_view", "feature_service"]), default=None)
@click.option("--tag", "tags", multiple=True, help="key=value; repeat to require several.")
@click.option("--search", "text", default=None, help="Text in names, descriptions, feature names or tags.")
@_json_flag
@click.pass_context
def features_list(ctx: click.Context, kind: str | None, tags: tuple[str, ...], text: str | None, as_json: bool) -> None:
    """The latest version of every definition."""
    wanted = _tag_filters(tags)
    with _platform(ctx) as p:
        entries = p.features.search(text, tags={k: v[0] for k, v in wanted.items()} or None, kind=kind)
    # every --tag is required: a key given with two values matches nothing, as one tag holds one value
    entries = [e for e in entries if all(e.tags.get(k) == v for k, values in wanted.items() for v in values)]
    if as_json:
        _echo_json([{"kind": e.kind, "name": e.name, "version": e.version, "description": e.description,
                     "tags": e.tags, "owner": e.owner, "created_at": e.created_at} for e in entries])
        return
    _table("feature definitions", ["kind", "name", "version", "owner", "tags", "description"],
           [[e.kind, e.name, e.version, e.owner, ", ".join(f"{k}={v}" for k, v in e.tags.items()), e.description]
            for e in entries])


def _tag_filters(tags: tuple[str, ...]) -> dict[str, list[str]]:
    """``--tag key=value`` options as the values each key must have (a repeated key collects them all)."""
    wanted: dict[str, list[str]] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep:
            raise click.BadParameter(f"--tag {tag!r}: write key=value")
        wanted.setdefault(key, []).append(value)
    return wanted


@features.command("describe")
@click.argument("name")
@click.option("--kind", type=click.Choice(["entity", "feature_view", "feature_service"]), default="feature_view",
              show_default=True)
@click.option("--version", type=_VERSION, default=None, help="A version number (default: the latest).")
@_json_flag
@click.pass_context
def features_describe(ctx: click.Context, name: str, kind: str, version: int | None, as_json: bool) -> None:
    """One definition in full, with its versions."""
    with _platform(ctx) as p:
        obj = p.features.catalog.get(kind, name, version)
        versions = [e.version for e in p.features.versions(kind, name)]
    spec = {**obj.to_spec(), "kind": kind, "version": obj.version, "versions": versions}
    if as_json:
        _echo_json(spec)
        return
    console = _console()
    console.rule(f"[bold]{kind} {as_text(name)} v{obj.version}")
    for key, value in spec.items():
        if key not in ("schema", "name"):
            console.print(f"[bold]{key}[/]: {as_text(value)}")
    if "schema" in spec:
        _table("features", ["name", "dtype", "description"],
               [[f["name"], f["dtype"], f["description"]] for f in spec["schema"]])


@features.command("apply")
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@_json_flag
@click.pass_context
def features_apply(ctx: click.Context, path: str, as_json: bool) -> None:
    """Apply the Entity, FeatureView and FeatureService objects a Python file defines.

    The file runs as 'python FILE' would run it: modules next to it can be imported. What it
    prints goes to stderr, so that stdout holds only the result (one JSON document with --json).
    """
    from .features.definitions import _Definition

    try:
        namespace = _run_file(path)
    except MlplatError:
        raise
    except SystemExit as exc:
        raise click.ClickException(f"{path} called sys.exit({exc.code!r}) instead of defining features") from None
    except Exception as exc:  # noqa: BLE001 - the user's file failed: say where
        raise click.ClickException(f"{path} failed to run: {type(exc).__name__}: {exc}") from None
    objects = [v for v in namespace.values() if isinstance(v, _Definition)]
    if not objects:
        raise click.ClickException(f"{path} defines no mp.Entity, mp.FeatureView or mp.FeatureService")
    settings, database = _settings(ctx)
    new_database = database if database is not None and not database.exists() else None
    folders = [missing_folders(start)  # made for the home and for the database
               for start in (Path(settings.home), *([database.parent] if database is not None else []))]
    try:
        with _platform(ctx, create=True) as p:
            results = p.features.apply(objects)
    except BaseException:  # an apply that failed starts no home (a mistyped --home stays an error for later
        _undo(new_database, folders)  # commands) and no database, unless another process wrote there meanwhile
        raise
    rows = [{"kind": r.kind, "name": r.name, "version": r.version, "changed": r.changed} for r in results]
    if as_json:
        _echo_json(rows)
        return
    _table("applied", ["kind", "name", "version", "changed"], [list(r.values()) for r in rows])


def _undo(database: Path | None, folders: list[list[Path]]) -> None:
    """Remove the SQLite database a failed command made, if no row but the schema's version is in it, then the
    folders it made that are empty now, each chain innermost first: another process may have written there."""
    if database is not None and _empty_database(database):
        _remove_database(database)
    for chain in folders:
        remove_empty(chain)


def _empty_database(database: Path) -> bool:
    """Whether a SQLite database holds no row but its schema's version (False where it cannot tell)."""
    import sqlite3

    if not database.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True,
                                                timeout=10)) as conn:
            tables = [row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                "AND name != 'alembic_version'")]
            return not any(conn.execute(f'SELECT EXISTS (SELECT 1 FROM "{name}")').fetchone()[0] for name in tables)
    except (OSError, sqlite3.Error):
        return False


def _remove_database(path: Path) -> None:
    """Remove a SQLite database file with its journals."""
    for file in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        file.unlink(missing_ok=True)


def _run_file(path: str) -> dict[str, Any]:
    """Run a Python file with its folder first on ``sys.path`` (as ``python FILE`` does); its globals.

    The modules it imports from its folder are forgotten afterwards: in one process (``cli.main`` called
    twice) a second folder's ``from entities import user`` got the first folder's module, cached in
    ``sys.modules``, and applied its definitions."""
    import runpy

    folder = os.path.dirname(os.path.abspath(path))
    before = set(sys.modules)
    tops = {name.partition(".")[0] for name in before}  # packages already imported (mlplat): not the folder's
    sys.path.insert(0, folder)
    try:
        with _stdout_to_stderr():  # what the file prints must not break the result on stdout
            return runpy.run_path(path)
    finally:
        try:
            sys.path.remove(folder)  # the first entry equal to it: ours, unless the file moved it
        except ValueError:
            pass
        new = {n.partition(".")[0] for n in sys.modules if n not in before} - tops
        mine = {t for t in new if _found_in(sys.modules.get(t), folder)}
        for name in [n for n in sys.modules if n.partition(".")[0] in mine]:
            del sys.modules[name]


def _found_in(module: Any, folder: str) -> bool:
    """Whether a top-level module was found through ``folder`` on sys.path: a file or extension right in it,
    or a package or namespace package that is a folder of it (not one of a virtualenv kept inside it)."""
    file = getattr(module, "__file__", None)
    places = [os.path.dirname(file)] if file and not file.endswith("__init__.py") else []
    places += [os.path.dirname(p) for p in getattr(module, "__path__", None) or []]
    return any(os.path.abspath(p) == folder for p in places)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """sys.stdout and file descriptor 1 both to stderr: a print, and what a subprocess (``os.system``) or a
    C library writes to the process's stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (a closed stdout): Python's prints only
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


# ------------------------------------------------------------ materialize
@cli.command()
@click.option("--end", default=None, callback=_time, help="End time (ISO; default now).")
@click.option("--start", default=None, callback=_time, help="Start time (ISO; default: where the last run ended).")
@click.option("--view", "views", multiple=True, help="A view (or view@version); repeat. Default: all online views.")
@_json_flag
@click.option("--progress/--no-progress", default=None, help="A progress bar (default: on a terminal).")
@click.pass_context
def materialize(ctx: click.Context, end: datetime | None, start: datetime | None, views: tuple[str, ...], as_json: bool,
                progress: bool | None) -> None:
    """Write the offline rule's answer at --end (default: now) into the online store."""
    with _platform(ctx) as p:
        results = p.features.materialize(end_date=end, start_date=start, views=list(views) or None,
                                         progress=False if as_json else progress)
    rows = [{"view": r.view, "version": r.version, "start": r.start, "end": r.end, "rows": r.rows,
             "written": r.written, "seconds": round(r.seconds, 3)} for r in results]
    if as_json:
        _echo_json(rows)
        return
    _table("materialized", ["view", "version", "start", "end", "rows", "written", "seconds"],
           [list(r.values()) for r in rows])


# ------------------------------------------------------------------- runs
@cli.group()
def runs() -> None:
    """Experiment runs: list, show, compare."""


def _run_row(r) -> dict[str, Any]:
    return {"id": r.id, "experiment": r.experiment, "name": r.name, "status": r.status,
            "start_time": r.start_time, "params": r.params, "metrics": r.metrics}


@runs.command("list")
@click.argument("experiment", required=False)
@click.option("--filter", "flt", default=None, help="e.g. \"metrics.val_auc > 0.9 and params.lr = '0.001'\"")
@click.option("--order-by", "order_by", multiple=True, help="e.g. 'metrics.val_auc desc'; repeat.")
@click.option("--max", "max_results", type=click.IntRange(1, 50_000), default=50, show_default=True)
@click.option("--page-token", default=None, help="Continue a listing (the token a previous page printed).")
@_json_flag
@click.pass_context
def runs_list(ctx: click.Context, experiment: str | None, flt: str | None, order_by: tuple[str, ...],
              max_results: int, page_token: str | None, as_json: bool) -> None:
    """Runs (of EXPERIMENT) matching a filter, newest first unless --order-by says otherwise."""
    with _platform(ctx) as p:
        page = p.runs.search(experiment, filter=flt, order_by=list(order_by) or None, max_results=max_results,
                             page_token=page_token)
        known = p.runs.experiments() if experiment is not None and not page else None
    if known is not None and experiment not in known:  # on stderr: --json output stays one JSON document
        click.echo(f"mlplat: no experiment named {experiment!r}{close_names(experiment, known, 'no runs yet')}",
                   err=True)
    if as_json:
        _echo_json([_run_row(r) for r in page])
    else:
        _table("runs", ["id", "experiment", "name", "status", "started", "metrics"],
               [[r.id, r.experiment, r.name, r.status, r.start_time.strftime("%Y-%m-%d %H:%M"),
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()))] for r in page])
    if page.next_page_token:  # on stderr, so --json output stays one JSON document
        click.echo(f"more runs: --page-token {page.next_page_token}", err=True)


@runs.command("show")
@click.argument("run_id")
@_json_flag
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """One run with its params, metrics, tags, inputs and artifacts."""
    with _platform(ctx) as p:
        r = p.runs.get(run_id)
    data = {**_run_row(r), "end_time": r.end_time, "user": r.user, "parent_run_id": r.parent_run_id,
            "tags": r.tags, "inputs": r.inputs, "artifacts": r.artifacts, "artifact_uri": r.artifact_uri}
    if as_json:
        _echo_json(data)
        return
    console = _console()
    console.rule(f"[bold]run {r.id}")
    for key in ("experiment", "name", "status", "user", "start_time", "end_time", "artifact_uri"):
        console.print(f"[bold]{key}[/]: {as_text(data[key])}")
    _table("params", ["key", "value"], [[k, v] for k, v in sorted(r.params.items())])
    _table("metrics (latest)", ["key", "value"], [[k, v] for k, v in sorted(r.metrics.items())])
    _table("tags", ["key", "value"], [[k, v] for k, v in sorted(r.tags.items())])
    _table("inputs", ["name", "rows", "content hash", "feature refs"],
           [[i["name"], i["row_count"], i["content_hash"], ", ".join(i["feature_refs"].get("refs", []))]
            for i in r.inputs])
    _table("artifacts", ["path", "kind", "size"], [[a["path"], a["kind"], a["size"]] for a in r.artifacts])


@runs.command("compare")
@click.argument("run_ids", nargs=-1, required=True)
@_json_flag
@click.pass_context
def runs_compare(ctx: click.Context, run_ids: tuple[str, ...], as_json: bool) -> None:
    """Params and latest metrics of several runs side by side."""
    with _platform(ctx) as p:
        table = p.runs.compare(list(run_ids))
    rows = table.to_pylist()
    if as_json:
        _echo_json(rows)
        return
    _table("compare", table.column_names, [list(r.values()) for r in rows])


# ----------------------------------------------------------------- models
@cli.group()
def models() -> None:
    """The model registry: list, lineage, promote."""


@models.command("list")
@_json_flag
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Registered models, their latest version and what is in production."""
    with _platform(ctx) as p:
        rows = p.models.list()
    if as_json:
        _echo_json(rows)
        return
    _table("models", ["name", "latest", "production", "description"],
           [[r["name"], r["latest"], r["production"], r["description"]] for r in rows])


@models.command("lineage")
@click.argument("name")
@click.option("--version", "version", type=_VERSION, default=None, help="A version number.")
@click.option("--stage", default=None, type=click.Choice(["none", "staging", "production", "archived"]),
              help="The version in this stage (default: production).")
@click.option("--alias", default=None, help="The version an alias points at.")
@click.option("--verify", is_flag=True,
              help=f"Rebuild the training data from the offline store and hash the model's files; exit with status "
                   f"{CHECK_FAILED} when either no longer matches.")
@_json_flag
@click.pass_context
def lineage(ctx: click.Context, name: str, version: int | None, stage: str | None, alias: str | None, verify: bool,
            as_json: bool) -> None:
    """Which version of NAME, trained by which run, on what data, approved by whom."""
    with _platform(ctx) as p:
        info = p.models.lineage(name, version=version, stage=stage, alias=alias, verify=verify)
    if as_json:
        _echo_json(info)
    else:
        print_lineage(_console(), info)
    checks = [d.get("verification") or {} for d in info["data"]] + [info["artifact"].get("verification") or {}]
    if any(c.get("checked") and not c.get("matches") for c in checks):
        ctx.exit(CHECK_FAILED)  # a scheduled `lineage --verify` must notice changed training data or files


@models.command("promote")
@click.argument("name")
@click.argument("version", type=_VERSION)
@click.argument("stage", metavar="STAGE", type=click.Choice(["none", "staging", "production", "archived"]))
@click.option("--approved-by", default=None,
              help="Who approved (required for production); under a distinct-approver policy, not the version's "
                   "registrant.")
@click.option("--actor", default=None,
              help="Who promotes, as recorded in the history (default: the operating-system user); it may be "
                   "the version's registrant.")
@click.option("--notes", default="", help="Why (at most 10000 characters).")
@_json_flag
@click.pass_context
def models_promote(ctx: click.Context, name: str, version: int, stage: str, approved_by: str | None,
                   actor: str | None, notes: str, as_json: bool) -> None:
    """Move VERSION of NAME to STAGE (production archives the previous one)."""
    with _platform(ctx) as p:
        info = p.models.promote(name, version, stage, approved_by=approved_by, notes=notes, actor=actor)
    data = {"model": info.name, "version": info.version, "stage": info.stage}
    if as_json:
        _echo_json(data)
        return
    click.echo(f"{info.name} v{info.version} is now in {info.stage}")


# ------------------------------------------------------------------ serve
@cli.group()
def serve() -> None:
    """Serving: export to Triton."""


@serve.command("export")
@click.argument("name")
@click.option("--repository", required=True, type=click.Path(file_okay=False), callback=_not_empty,
              help="Triton model repository.")
@click.option("--version", "version", type=_VERSION, default=None, help="A version number.")
@click.option("--stage", default=None, type=click.Choice(["none", "staging", "production", "archived"]),
              help="The version in this stage (default: production).")
@click.option("--alias", default=None, help="The version an alias points at.")
@click.option("--backend", default="python", show_default=True,
              type=click.Choice(["python", "pytorch_libtorch", "onnxruntime"]))
@click.option("--max-batch-size", type=click.IntRange(0, TRITON_INT32_MAX), default=64, show_default=True)
@click.option("--preferred-batch-sizes", default="", help="Comma-separated, e.g. 16,64: the dynamic batcher's aims.")
@click.option("--max-queue-delay-us", type=click.IntRange(0, TRITON_UINT64_MAX), default=None,
              help="Dynamic batching's wait for more requests (default 0).")
@click.option("--no-dynamic-batching", is_flag=True,
              help="A config without Triton's dynamic batcher (on by default when --max-batch-size > 0).")
@click.option("--instances", type=click.IntRange(1, TRITON_INT32_MAX), default=1, show_default=True)
@click.option("--triton-name", default=None, callback=_not_empty, help="Model name in the repository (default: NAME).")
@_json_flag
@click.pass_context
def serve_export(ctx: click.Context, name: str, repository: str, version: int | None, stage: str | None,
                 alias: str | None, backend: str, max_batch_size: int, preferred_batch_sizes: str,
                 max_queue_delay_us: int | None, no_dynamic_batching: bool, instances: int, triton_name: str | None,
                 as_json: bool) -> None:
    """Write NAME's version (default: production) into a Triton model repository."""
    from .serving.triton_repo import DynamicBatching

    try:
        sizes = [int(s) for s in preferred_batch_sizes.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"--preferred-batch-sizes {preferred_batch_sizes!r}: integers, comma-separated") \
            from None
    if any(not 1 <= size <= TRITON_INT32_MAX for size in sizes):
        raise click.BadParameter(f"--preferred-batch-sizes {preferred_batch_sizes!r}: each size is 1 to "
                                 f"{TRITON_INT32_MAX}")
    tuned = bool(sizes) or max_queue_delay_us is not None
    if no_dynamic_batching and tuned:
        raise click.UsageError("--no-dynamic-batching cannot be combined with --preferred-batch-sizes or "
                               "--max-queue-delay-us")
    batching: DynamicBatching | bool | None = (
        False if no_dynamic_batching else
        DynamicBatching(preferred_batch_sizes=sizes, max_queue_delay_us=max_queue_delay_us or 0) if tuned else None)
    with _platform(ctx) as p:
        export = p.serving.export_triton(name, repository=repository, version=version, stage=stage, alias=alias,
                                         backend=backend, max_batch_size=max_batch_size, dynamic_batching=batching,
                                         instances=instances, triton_name=triton_name)
    data = {"model": export.model, "version": export.version, "backend": export.backend,
            "config": str(export.config_path), "files": export.files}
    if as_json:
        _echo_json(data)
        return
    click.echo(f"wrote {export.model} v{export.version} ({export.backend}) to {export.repository}")


# ---------------------------------------------------------------- monitor
@cli.group()
def monitor() -> None:
    """Monitoring: skew, drift, adoption."""


@monitor.command("skew")
@click.argument("model_or_view")
@click.option("--since", default=None, callback=_time, help="Only requests from this time on (ISO).")
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Check at most this many served rows.")
@click.option("--tolerance", type=_Finite(min=0), default=0.01, show_default=True,
              help="Relative difference that counts as a mismatch.")
@click.option("--threshold", type=_Finite(0, 1), default=0.05, show_default=True,
              help="Mismatch share above which a feature is skewed.")
@click.option("--check", is_flag=True, help=f"Exit with status {CHECK_FAILED} when a feature is skewed.")
@_json_flag
@click.pass_context
def monitor_skew(ctx: click.Context, model_or_view: str, since: datetime | None, sample: int | None, tolerance: float,
                 threshold: float, check: bool, as_json: bool) -> None:
    """Served feature values vs the offline retrieval at the same request times."""
    with _platform(ctx) as p:
        report = p.monitoring.skew(model_or_view, since=since, sample=sample, tolerance=tolerance,
                                   threshold=threshold)
    if as_json:
        _echo_json(report.to_dict())
    else:
        print_skew(_console(), report)
    if check and report.skewed:
        ctx.exit(CHECK_FAILED)


@monitor.command("drift")
@click.argument("model")
@click.option("--version", "version", type=_VERSION, default=None, help="Default: the production version.")
@click.option("--since", default=None, callback=_time, help="Only requests from this time on (ISO).")
@click.option("--bins", type=click.IntRange(2, BINS_MAX), default=10, show_default=True,
              help="Quantile bins of the training values for a numeric feature's PSI.")
@click.option("--psi-threshold", type=_Finite(min=0), default=0.2, show_default=True)
@click.option("--alpha", type=_Finite(0, 1), default=0.01, show_default=True)
@click.option("--check", is_flag=True, help=f"Exit with status {CHECK_FAILED} when a feature drifted.")
@_json_flag
@click.pass_context
def monitor_drift(ctx: click.Context, model: str, version: int | None, since: datetime | None, bins: int,
                  psi_threshold: float, alpha: float, check: bool, as_json: bool) -> None:
    """Training distribution of each feature vs what was served."""
    with _platform(ctx) as p:
        report = p.monitoring.drift(model, version=version, since=since, bins=bins, psi_threshold=psi_threshold,
                                    alpha=alpha)
    if as_json:
        _echo_json(report.to_dict())
    else:
        _table(f"drift of {report.model} v{report.version}", ["feature", "kind", "PSI", "test", "p-value",
                                                             "drifted"],
               [[d.feature, d.kind, f"{d.psi:.3f}", d.test, f"{d.p_value:.3g}", "YES" if d.drifted else "no"]
                for d in report.features.values()])
    if check and report.drifted:
        ctx.exit(CHECK_FAILED)


@monitor.command("adoption")
@_json_flag
@click.pass_context
def monitor_adoption(ctx: click.Context, as_json: bool) -> None:
    """Is the platform used? Runs per week, lineage coverage, time to production, reused views."""
    with _platform(ctx) as p:
        data = p.monitoring.adoption()
    if as_json:
        _echo_json(data)
        return

    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    console = _console()
    console.print(f"[bold]runs[/]: {data['runs']:,}; with a logged input and a git commit: "
                  f"{share(data['share_runs_with_input_and_commit'])}")
    console.print(f"[bold]production models[/]: {data['production_models']}; with complete lineage: "
                  f"{share(data['share_production_with_complete_lineage'])}")
    _table("runs per week", ["week", "runs"], [[w, n] for w, n in data["runs_per_week"].items()])
    _table("time to production", ["model", "first run", "production", "days"],
           [[m, t["first_run"], t["production"], t["days"]] for m, t in data["time_to_production"].items()])
    _table("feature views used by several models", ["view", "models"],
           [[v, ", ".join(m)] for v, m in data["reused_feature_views"].items()])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mlplat`` script and ``python -m mlplat``; returns the exit status."""
    whole = _WholeWrites.install()
    try:
        cli.main(args=argv, prog_name="mlplat")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):  # click's exit 1 for a pipe closed under its help
            _silence_stdout()  # or --version; 141 as for a command's output
            code = BROKEN_PIPE
    except BrokenPipeError:  # written outside a command (help, --version): as inside one
        _silence_stdout()
        code = BROKEN_PIPE
    except OSError as exc:
        click.echo(f"mlplat: error: writing the output failed: {exc.strerror or exc}", err=True)
        code = 1
    return code if whole is None else whole.finish(code)


class _WholeWrites(io.RawIOBase):
    """Standard output's file descriptor, each write written whole or failing.

    A pipe whose reader leaves part way through a write (``| head``), or a disk that fills up, takes part of a
    write and fails the rest; CPython's buffered writer then returned the short count and the text layer dropped
    the rest without a word: the command exited 0 with its output cut (a truncated ``> runs.json``). Here the
    rest is written again, so the failure is raised (BrokenPipeError: exit 141; a full disk: exit 1)."""

    def __init__(self, fd: int, original: Any) -> None:
        self._fd = fd
        self._original = original

    @classmethod
    def install(cls) -> _WholeWrites | None:
        """Put stdout on such a descriptor (not for a terminal, nor a stdout that is no file: a test's capture)."""
        original = sys.stdout
        try:
            fd = original.fileno()
            if original.isatty():
                return None
            original.flush()
        except (AttributeError, OSError, ValueError):
            return None
        raw = cls(fd, original)
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=original.encoding, errors=original.errors,
                                      line_buffering=original.line_buffering)
        return raw

    def finish(self, code: int) -> int:
        """Flush what is left and put the original stdout back; the exit status, 141 if the reader went away."""
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            code = code or BROKEN_PIPE
        except OSError as exc:
            if not code:  # a command that failed said why already (a full disk: once, not twice)
                click.echo(f"mlplat: error: writing the output failed: {exc.strerror or exc}", err=True)
            code = code or 1
        finally:
            sys.stdout = self._original
        return code

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        return done


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
