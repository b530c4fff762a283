"""Output larger than a pipe's buffer: a reader that leaves part way through (``| head -1``) gives exit 141, as
docs/cli.md says; before, the write was taken in part, the rest dropped without a word and the exit status was 0
(also for a disk that filled up under ``> file``: a truncated file and exit 0)."""
from __future__ import annotations

import json
import subprocess
import sys

import mlplat as mp


def _big_run(tmp_path) -> tuple[str, str]:
    home = str(tmp_path / "home")
    with mp.Platform(home) as p:
        with p.runs.start("e", params={f"p{i:04d}": "v" * 900 for i in range(600)}) as run:  # ~600 KB as JSON
            pass
    return home, run.id


def test_a_reader_leaving_part_way_through_large_output_is_exit_141(tmp_path):
    home, run_id = _big_run(tmp_path)
    for args in (["runs", "show", run_id, "--json"], ["runs", "show", run_id]):
        proc = subprocess.Popen([sys.executable, "-m", "mlplat", "--home", home, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout.readline()  # `| head -1`: one line, then the reader is gone
        proc.stdout.close()
        assert proc.wait(120) == 141, args
        assert proc.stderr.read() == b""  # no message, no traceback
        proc.stderr.close()


def test_large_output_read_whole_is_whole_and_exit_0(tmp_path):
    home, run_id = _big_run(tmp_path)
    done = subprocess.run([sys.executable, "-m", "mlplat", "--home", home, "runs", "show", run_id, "--json"],
                          capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stderr == b""
    assert len(json.loads(done.stdout)["params"]) == 600


def test_a_full_disk_is_exit_1_naming_it(tmp_path):
    home, run_id = _big_run(tmp_path)
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "mlplat", "--home", home, "runs", "show", run_id, "--json"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1 and "No space left on device" in done.stderr, (done.returncode, done.stderr)
    assert done.stderr.count("mlplat: error:") == 1, done.stderr  # the command's error, not again at exit


def test_help_and_version_into_a_closed_pipe_or_a_full_disk_are_one_line_statuses(tmp_path):
    """Written outside a command (a bare `mlplat`, --help, --version), a full disk was a traceback (exit 120) and a
    closed pipe exit 1 (a traceback for the bare help)."""
    for args in (["--version"], [], ["--help"], ["runs"]):
        proc = subprocess.Popen([sys.executable, "-m", "mlplat", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=tmp_path)
        proc.stdout.close()  # the reader is gone before anything is written
        assert (proc.wait(120), proc.stderr.read()) == (141, b""), args
        proc.stderr.close()
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "mlplat", *args], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120, cwd=tmp_path)
        assert (done.returncode, done.stderr) == (1, "mlplat: error: writing the output failed: No space left on "
                                                     "device\n"), args
