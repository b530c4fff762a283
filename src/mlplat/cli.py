"""The ``mlplat`` command line.

Usage::

    mlplat demo [--home DIR]      # the end-to-end demo on embedded defaults
    mlplat --version
"""
from __future__ import annotations

import sys

import click

from . import __version__
from .errors import MlplatError

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlplat")
def cli() -> None:
    """mlplat: features, runs, models and serving in one library."""


@cli.command()
@click.option("--home", default="mlplat-demo", show_default=True, help="Folder for the demo (wiped on each run).")
@click.option("--online-store", default=None, help="Online store URL, e.g. redis://127.0.0.1:6379/0.")
def demo(home: str, online_store: str | None) -> None:
    """Run the fintech demo end to end in a fresh folder."""
    from .demo import run_demo

    run_demo(home, online_store=online_store)


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
