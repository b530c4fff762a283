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


@pytest.mark.parametrize("url, message", [
    ("redis://127.0.0.1:6379/13", "db 13 is the tests' db"),
    ("redis://127.0.0.1:6379/9?db=13", r"give the db in the path only"),
    ("redis://127.0.0.1:6379/9?DB=13&x=1", r"give the db in the path only"),
    ("redis://127.0.0.1:6379", "name the db explicitly"),
    ("redis+cluster://127.0.0.1:6379/9", "one node"),
])
def test_a_benchmark_flushes_only_a_db_it_checked(url, message):
    """redis-py takes ?db= over the path: '/9?db=13' passed the check as db 9 and FLUSHDB hit the tests' db 13."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _harness import owned_redis_db
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with pytest.raises(ValueError, match=message):
        owned_redis_db(url, {13: "the tests' db"}, default=15)
    assert owned_redis_db("redis://127.0.0.1:6379/9?socket_timeout=5", {13: "the tests' db"}, default=15) == 9
