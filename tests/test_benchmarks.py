"""Smoke runs of the benchmark scripts: tiny sizes, every engine, answers must agree."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_offline_pit_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "offline_pit.py"), "--size", "XS", "--repeats", "1",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for engine in ("mlplat", "pandas", "polars", "duckdb"):
        assert engine in result.stdout


@pytest.mark.slow
def test_online_latency_smoke(tmp_path, redis_server_url):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "online_latency.py"), "--smoke", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("mlplat redis", "redis pipeline", "redis MGET", "mlplat sqlite", "Redis and SQLite: OK"):
        assert text in result.stdout


@pytest.mark.slow
def test_tracking_smoke(pg_admin_url):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tracking.py"), "--smoke", "--pg-url", pg_admin_url],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # non-zero on lost points or wrong results
    assert "results vs reference" in result.stdout and "points stored (read back)" in result.stdout


@pytest.mark.slow
def test_skew_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "skew.py"), "--smoke", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # non-zero when the check misses a planted skew
    assert "pandas merge_asof" in result.stdout and "EXTRAPOLATED" in result.stdout


@pytest.mark.slow
def test_serving_smoke(redis_server_url, triton_python):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--smoke", "--server-python", str(triton_python)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # non-zero on a wrong or mixed-up answer
    for text in ("one-by-one", "mlplat coalescing", "raw aio gRPC", "batched ceiling", "predict Triton gRPC",
                 "correctness"):
        assert text in result.stdout
