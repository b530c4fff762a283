"""With CI=true, a PostgreSQL or Redis test that would be skipped fails the run instead."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_db.py::test_pool_settings_are_applied[postgresql]"


@pytest.mark.parametrize("ci, outcome", [("true", "1 failed"), ("", "1 skipped")])
def test_unreachable_server_fails_only_in_ci(ci, outcome):
    env = {**os.environ, "CI": ci, "MLPLAT_TEST_PG_PORT": "1"}  # nothing listens on port 1
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in result.stdout, result.stdout
    if ci:
        assert result.returncode != 0 and "must not be skipped in CI" in result.stdout
