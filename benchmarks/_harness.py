"""Reusable pieces for mlplat's benchmark scripts.

A benchmark script built on this module usually has two modes:

* the *parent* (what a person runs): prepares data, then starts one fresh
  worker subprocess per measurement with :func:`run_worker`, collects the
  JSON each worker reports, summarizes with :func:`median`, and prints a
  table with :func:`format_table` (plain text or Markdown);
* the *worker* (``script.py --worker ...``): imports only what its engine
  needs, limits threads (:func:`thread_env` in the parent's environment for
  the child, :func:`limit_pyarrow_threads` inside the child), measures one
  timed region with :class:`TimedRegion`, fingerprints the result *after*
  the timer stops with :func:`table_checksum`, and writes a JSON report with
  :func:`write_report`.

A fresh process per measurement keeps memory numbers clean: the peak RSS of
the process (``getrusage``) then covers only one run, and the RSS just before
the timed region is the baseline to subtract ("peak above baseline").

Nothing here imports pandas, polars or DuckDB, so the parent stays light and
never initializes a thread pool the workers are meant to control.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "WorkerError",
    "run_worker",
    "write_report",
    "thread_env",
    "limit_pyarrow_threads",
    "TimedRegion",
    "peak_rss_mb",
    "current_rss_mb",
    "median",
    "format_table",
    "library_versions",
    "package_fingerprint",
    "machine_info",
    "table_checksum",
    "MODULUS",
    "generate_into",
    "owned_redis_db",
    "redis_client",
    "release_redis_db",
    "profile",
    "print_report",
]


# --------------------------------------------------------------------------- subprocesses

class WorkerError(RuntimeError):
    """A worker subprocess failed, timed out or wrote no report; the message holds its stderr tail."""


def run_worker(
    script: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    """Run ``python script *args --result-file F`` in a fresh process and return the JSON it wrote to F.

    ``env`` entries are added to (and override) the parent's environment. The
    worker must write its report with :func:`write_report` to the path given
    after ``--result-file``; its stdout/stderr are captured and only shown
    (the last lines) when it fails. Raises :class:`WorkerError`.
    """
    fd, result_path = tempfile.mkstemp(prefix="bench-worker-", suffix=".json")
    os.close(fd)
    os.unlink(result_path)  # the worker creates it; absence means it did not finish
    cmd = [python or sys.executable, script, *args, "--result-file", result_path]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        try:
            proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise WorkerError(f"worker timed out after {timeout} s: {' '.join(cmd)}\n{_tail(exc.stderr)}") from None
        if proc.returncode != 0:
            raise WorkerError(
                f"worker exited with {proc.returncode}: {' '.join(cmd)}\n"
                f"--- stdout (tail) ---\n{_tail(proc.stdout)}\n--- stderr (tail) ---\n{_tail(proc.stderr)}"
            )
        try:
            with open(result_path) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise WorkerError(f"worker wrote no readable report ({exc}): {' '.join(cmd)}\n{_tail(proc.stderr)}") from None
    finally:
        try:
            os.unlink(result_path)
        except FileNotFoundError:
            pass


def _tail(text: str | bytes | None, lines: int = 40) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def write_report(path: str, report: Mapping[str, Any]) -> None:
    """Write a worker's JSON report atomically (the parent treats a missing file as failure)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def generate_into(data_dir: Path, head: Mapping[str, Any],
                  generate: Callable[[Path], Mapping[str, Any]]) -> tuple[dict[str, Any], float]:
    """Generate a data folder atomically: ``generate(tmp)`` fills a sibling folder and returns its stats,
    ``_meta.json`` gets ``head``, the time and the stats, then the folder replaces ``data_dir``.

    Returns (meta, seconds spent generating).
    """
    t0 = time.perf_counter()
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = generate(tmp)
    seconds = time.perf_counter() - t0
    meta = {**head, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "generate_seconds": round(seconds, 2),
            **stats}
    (tmp / "_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, data_dir)
    return meta, seconds


# --------------------------------------------------------------------------- Redis db a benchmark owns

def owned_redis_db(url: str, reserved: Mapping[int, str], default: int) -> int:
    """The db number of a ``redis://host:port/db`` URL that a benchmark may FLUSHDB.

    ValueError for a URL it may not use: not a single node, no explicit db, or a db in ``reserved``
    (``default`` is the db to suggest instead).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f"--redis-url {url!r}: use redis://host:port/db or rediss://host:port/db (one node; "
                         "the benchmark flushes its db, so clusters are not supported)")
    db_text = parts.path.strip("/")
    if not db_text.isdigit():
        raise ValueError(f"--redis-url {url!r}: name the db explicitly (e.g. redis://127.0.0.1:6379/{default}); "
                         "the benchmark FLUSHDBs it")
    if any(key.lower() == "db" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise ValueError(f"--redis-url {url!r}: give the db in the path only (redis-py takes ?db= over the path, "
                         "so it would flush another db than the one checked here)")
    db = int(db_text)
    if db in reserved:
        raise ValueError(f"--redis-url {url!r}: db {db} is {reserved[db]}; pick another (default {default})")
    return db


def redis_client(url: str):
    """A redis-py client (bytes replies, 10 s socket timeout, 5 s connect timeout)."""
    import redis

    return redis.Redis.from_url(url, decode_responses=False, socket_timeout=10, socket_connect_timeout=5)


def release_redis_db(client, db: int) -> None:
    """FLUSHDB what the benchmark wrote (a warning if that fails) and close the client."""
    try:
        client.flushdb()
    except Exception as exc:  # noqa: BLE001 - the run's results stand; say what was left behind
        print(f"warning: could not FLUSHDB db {db} at the end: {exc}", file=sys.stderr)
    client.close()


# --------------------------------------------------------------------------- profiles

def profile(fn: Callable[[], Any], label: str, top: int = 25) -> tuple[str, float]:
    """Run ``fn()`` under cProfile; (the top functions by own and by cumulative time, as text; wall seconds)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    wall = time.perf_counter() - t0
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return f"{label} ({wall:.3f} s under the profiler)\n" + out.getvalue(), wall


# --------------------------------------------------------------------------- threads

def thread_env(n: int) -> dict[str, str]:
    """Environment variables that cap the thread pools of the usual libraries at ``n``.

    They must be in the child's environment *before* it starts (polars reads
    POLARS_MAX_THREADS when it is imported, OpenMP on first use). Engines with
    their own knob (DuckDB ``SET threads``, pyarrow's pools, mlplat's
    ``threads=``) still have to be set inside the worker.
    """
    v = str(int(n))
    return {
        "OMP_NUM_THREADS": v,
        "POLARS_MAX_THREADS": v,
        "RAYON_NUM_THREADS": v,
        "MKL_NUM_THREADS": v,
        "OPENBLAS_NUM_THREADS": v,
        "NUMEXPR_MAX_THREADS": v,
        "MLPLAT_THREADS": v,
    }


def limit_pyarrow_threads(n: int) -> None:
    """Cap pyarrow's CPU pool and I/O pool at ``n`` threads (call inside the worker)."""
    import pyarrow as pa

    pa.set_cpu_count(int(n))
    pa.set_io_thread_count(int(n))


# --------------------------------------------------------------------------- memory and time

def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage(RUSAGE_SELF).ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        import psutil  # not on Linux: fall back

        return psutil.Process().memory_info().rss / (1024 * 1024)


@dataclass
class TimedRegion:
    """Measure one timed region: wall seconds, RSS before, peak RSS of the process after.

    Usage::

        region = TimedRegion()
        with region:
            result = do_the_work()
        report = region.as_dict()   # {"wall_s", "rss_before_mb", "peak_rss_mb", "peak_above_baseline_mb"}

    The peak is the process-wide high-water mark, so it includes whatever
    ran before the region (imports, setup). Run one region per fresh process
    and use ``peak_above_baseline_mb`` for what the region itself added.
    """

    wall_s: float = float("nan")
    rss_before_mb: float = float("nan")
    peak_rss_mb: float = float("nan")
    _t0: float = field(default=0.0, repr=False)

    def __enter__(self) -> TimedRegion:
        import gc

        gc.collect()
        self.rss_before_mb = current_rss_mb()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.peak_rss_mb = peak_rss_mb()

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": self.wall_s,
            "rss_before_mb": self.rss_before_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_above_baseline_mb": max(0.0, self.peak_rss_mb - self.rss_before_mb),
        }


def median(values: Iterable[float]) -> float:
    """The median (mean of the middle two for an even count); NaN for no values."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- environment description

def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the given distributions (without importing them); "-" when absent."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def package_fingerprint(package: str) -> str:
    """A short hash of a package's files (sources and built extensions), found without importing it.

    Take it before and after a series of runs: a different value means the
    code under test changed in between (e.g. an editable install being edited),
    and the runs measured more than one version.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None:
        return "-"
    roots = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    digest = hashlib.blake2b(digest_size=8)
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith((".py", ".pyx", ".pxd", ".so", ".pyd", ".cpp", ".c", ".h")):
                    path = os.path.join(dirpath, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()


def machine_info() -> dict[str, Any]:
    """CPU count (and how many this process may use), CPU model, total memory, OS."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = float("nan")
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": model,
        "mem_gib": round(mem_gib, 1),
        "os": f"{platform.system()} {platform.release()}",
    }


# --------------------------------------------------------------------------- tables

def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    markdown: bool = False,
    align: Sequence[str] | None = None,
) -> str:
    """A table as text: aligned plain columns, or a GitHub Markdown table.

    ``align`` holds one of "l"/"r" per column (default: right for numbers,
    left otherwise, judged on the first row). Floats print with 3 decimals
    below 100 and none above; pre-format cells as strings for anything else.
    """
    cells = [[_fmt(v) for v in row] for row in rows]
    if align is None:
        first = rows[0] if rows else [""] * len(headers)
        align = ["r" if isinstance(v, (int, float)) and not isinstance(v, bool) else "l" for v in first]
    if markdown:
        sep = ["---:" if a == "r" else ":---" for a in align]
        lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_report(header: Sequence[str], sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]],
                                                                 Sequence[str] | None]],
                 notes: Sequence[str] = (), *, markdown: bool = False) -> None:
    """Print the header lines, each ``(title, headers, rows, align)`` section that has rows, then the notes;
    with ``markdown`` all of it again in Markdown (the header lines as a list, titles in bold)."""
    print("\n".join(header))
    for title, headers, rows, align in sections:
        if rows:
            print(f"\n{title}\n")
            print(format_table(headers, rows, align=align))
    for note in notes:
        print(f"\n{note}")
    if markdown:
        print("\n" + "\n".join(f"- {line}" for line in header))
        for title, headers, rows, align in sections:
            if rows:
                print(f"\n**{title}**\n")
                print(format_table(headers, rows, markdown=True, align=align))
        for note in notes:
            print(f"\n{note}")


# --------------------------------------------------------------------------- result fingerprint

MODULUS = 2**61 - 1  # a Mersenne prime
_WEIGHT_PERIOD = 1_000_003
_NULL_SENTINEL = 0x9E3779B97F4A7C15  # stands in for a null before weighting
_CHUNK = 1 << 20


def _canonical(column) -> tuple[Any, int]:
    """One Arrow column as uint64 values (nulls -> sentinel) and its null count.

    Integers: their int64 two's-complement bits; float32/float64: their exact
    IEEE bits; bool: 0/1; timestamps: int64 nanoseconds since the epoch (UTC,
    whatever the unit and time zone label); dates: days; strings/binary: the
    first 8 bytes of BLAKE2b of the UTF-8 bytes (hashed once per distinct value).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pat

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    nulls = arr.null_count
    valid = None if nulls == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    if pat.is_timestamp(t):
        values = pc.cast(arr, pa.timestamp("ns", t.tz), safe=True).cast(pa.int64())
        values = values.fill_null(0).to_numpy().view(np.uint64)
    elif pat.is_date(t):
        values = arr.cast(pa.date32()).cast(pa.int32()).fill_null(0).to_numpy().astype(np.int64).view(np.uint64)
    elif pat.is_integer(t):
        values = arr.cast(pa.int64()).fill_null(0).to_numpy().view(np.uint64)
    elif pat.is_float32(t):
        values = arr.fill_null(0.0).to_numpy().view(np.uint32).astype(np.uint64)
    elif pat.is_float64(t):
        values = arr.fill_null(0.0).to_numpy().view(np.uint64)
    elif pat.is_floating(t):  # float16
        values = arr.cast(pa.float64()).fill_null(0.0).to_numpy().view(np.uint64)
    elif pat.is_boolean(t):
        values = arr.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint64)
    elif pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t) or pat.is_binary(t) \
            or pat.is_large_binary(t) or pat.is_binary_view(t):
        target = pa.large_string() if (pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t)) \
            else pa.large_binary()
        enc = pc.dictionary_encode(arr.cast(target))
        dictionary = enc.dictionary.to_pylist()
        hashes = np.array(
            [int.from_bytes(hashlib.blake2b(v.encode() if isinstance(v, str) else v, digest_size=8).digest(), "little")
             for v in dictionary],
            dtype=np.uint64,
        )
        idx = enc.indices.fill_null(0).to_numpy().astype(np.int64)
        values = hashes[idx] if len(hashes) else np.zeros(len(arr), dtype=np.uint64)
    else:
        raise TypeError(f"table_checksum: no canonical form for {t}")
    values = np.array(values, dtype=np.uint64, copy=True)
    if valid is not None:
        values[~valid] = _NULL_SENTINEL
    return values, nulls


def _weighted_modsum(values, start: int = 0) -> int:
    """sum_i (values[i] mod P) * ((start + i) % 1000003 + 1) mod P, exactly, with uint64 numpy."""
    import numpy as np

    v = values % np.uint64(MODULUS)  # < 2**61
    w = (np.arange(start, start + len(v), dtype=np.uint64) % np.uint64(_WEIGHT_PERIOD)) + np.uint64(1)  # <= 2**20
    lo = (v & np.uint64(2**31 - 1)) * w  # < 2**51
    hi = (v >> np.uint64(31)) * w  # < 2**50

    def exact_sum(x) -> int:  # x < 2**51: split so the uint64 sums cannot overflow
        return int((x >> np.uint64(26)).sum(dtype=np.uint64)) * 2**26 + int((x & np.uint64(2**26 - 1)).sum(dtype=np.uint64))

    return (exact_sum(lo) + exact_sum(hi) * 2**31) % MODULUS


def table_checksum(table) -> dict[str, Any]:
    """An order-sensitive fingerprint of every column of a pyarrow Table.

    For each column: the values in a canonical uint64 form (see
    :func:`_canonical`; nulls become a fixed sentinel), each multiplied by the
    weight ``row % 1000003 + 1`` and summed modulo 2**61 - 1; plus the exact
    null count. Two tables get equal fingerprints when they hold the same
    values in the same rows, whatever the physical types (string vs
    large_string, timestamp unit or time zone label, chunking). Returns
    ``{"rows", "columns": [names], "sums": {name: int}, "nulls": {name: int}, "types": {name: str}}``.
    """
    sums: dict[str, int] = {}
    nulls: dict[str, int] = {}
    types: dict[str, str] = {}
    for name, column in zip(table.column_names, table.columns):
        values, n_null = _canonical(column)
        total = 0
        for start in range(0, len(values), _CHUNK):
            total = (total + _weighted_modsum(values[start:start + _CHUNK], start)) % MODULUS
        sums[name] = total
        nulls[name] = int(n_null)
        types[name] = str(column.type)
    return {"rows": table.num_rows, "columns": list(table.column_names), "sums": sums, "nulls": nulls, "types": types}


def checksum_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`table_checksum` results (empty when they agree)."""
    diffs = []
    if a["rows"] != b["rows"]:
        diffs.append(f"rows {a['rows']} != {b['rows']}")
    if a["columns"] != b["columns"]:
        diffs.append(f"columns {a['columns']} != {b['columns']}")
    for name in a["columns"]:
        if name not in b["sums"]:
            continue
        if a["nulls"][name] != b["nulls"].get(name):
            diffs.append(f"{name}: nulls {a['nulls'][name]} != {b['nulls'][name]}")
        if a["sums"][name] != b["sums"].get(name):
            diffs.append(f"{name}: checksum {a['sums'][name]:#x} != {b['sums'][name]:#x}")
    return diffs


__all__.append("checksum_differences")


# --------------------------------------------------------------------------- latency samples

def latency_percentiles(samples_ns: Any, percentiles: Sequence[float] = (50, 99, 99.9)) -> list[float]:
    """Percentiles of latency samples given in nanoseconds, in milliseconds (NaN for no samples).

    Uses the nearest-rank definition (``numpy.percentile(method="inverted_cdf")``):
    every reported value is one that was actually measured, never an interpolation.
    """
    import numpy as np

    arr = np.asarray(samples_ns, dtype=np.float64)
    if arr.size == 0:
        return [float("nan")] * len(percentiles)
    return [float(v) / 1e6 for v in np.percentile(arr, list(percentiles), method="inverted_cdf")]


def machine_line(machine: Mapping[str, Any] | None = None) -> str:
    """One header line describing the machine (from :func:`machine_info`)."""
    m = machine or machine_info()
    return (f"machine: {m['cpu_count']} CPUs ({m['usable_cpus']} usable), {m['cpu_model']}, "
            f"{m['mem_gib']} GiB, {m['os']}")


__all__ += ["latency_percentiles", "machine_line"]


# --------------------------------------------------------------------------- other processes

def process_tree_cpu_seconds(process: Any) -> float:
    """User + system CPU seconds of a process and its live descendants (``process``: a pid or a psutil.Process).

    For a server that runs work in child processes (e.g. Triton's python
    backend stubs). Take it before and after a timed window and subtract; a
    child that starts or ends inside the window makes the difference
    meaningless. NaN when the process is gone.
    """
    import psutil

    try:
        proc = process if isinstance(process, psutil.Process) else psutil.Process(int(process))
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return float(total)
    except psutil.Error:
        return float("nan")


__all__.append("process_tree_cpu_seconds")
