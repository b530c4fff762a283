"""What the CLI prints of a run (its tags; compared runs' param and metric names as written) and what a failed
``features apply`` leaves behind (no new home: a mistyped --home stays an error for the commands after it)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from click.testing import CliRunner, Result

import mlplat as mp
from mlplat.cli import cli


def _invoke(home: Path, *args: object) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *map(str, args)], prog_name="mlplat", env={"COLUMNS": "250"})


def test_compare_shows_param_and_metric_names_as_written(tmp_path):
    with mp.Platform(tmp_path / "home") as p:
        with p.runs.start("exp", params={"lr[/x]": 0.1}) as run:
            run.log_metric("[u]acc", 0.9)
    result = _invoke(tmp_path / "home", "runs", "compare", run.id)
    assert result.exit_code == 0, result.output  # a MarkupError on the closing tag '[/x]' before
    assert "params.lr[/x]" in result.stdout and "metrics.[u]acc" in result.stdout, result.stdout


def test_runs_show_prints_the_run_s_tags(tmp_path):
    with mp.Platform(tmp_path / "home") as p:
        with p.runs.start("exp", tags={"team": "risk[/b]"}) as run:
            pass
    result = _invoke(tmp_path / "home", "runs", "show", run.id)
    assert result.exit_code == 0, result.output
    tags = result.stdout[result.stdout.index("tags"):result.stdout.index("inputs")]
    assert "team" in tags and "risk[/b]" in tags, result.stdout  # only --json showed them


def _bad_definitions(tmp_path: Path) -> Path:
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent("""\
        import mlplat as mp
        a = mp.Entity("user", join_keys=["user_id"])
        b = mp.Entity("user", join_keys=["uid"])
    """))
    return path


def test_a_failed_apply_starts_no_home(tmp_path):
    home = tmp_path / "newhome"
    result = _invoke(home, "features", "apply", _bad_definitions(tmp_path))
    assert result.exit_code == 1 and "two different definitions of entity 'user'" in result.stderr, result.output
    assert not home.exists()  # it held a new, empty database
    later = _invoke(home, "runs", "list")
    assert later.exit_code == 1 and "is not an mlplat home" in later.stderr, later.output


def test_a_failed_apply_leaves_an_existing_home_as_it_was(tmp_path):
    home = tmp_path / "home"
    with mp.Platform(home) as p:
        with p.runs.start("exp") as run:
            pass
    before = sorted(f.relative_to(home) for f in home.rglob("*"))
    assert _invoke(home, "features", "apply", _bad_definitions(tmp_path)).exit_code == 1
    assert sorted(f.relative_to(home) for f in home.rglob("*")) == before
    assert _invoke(home, "runs", "show", run.id).exit_code == 0
