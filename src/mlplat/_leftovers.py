"""What writes killed half-way (SIGKILL, out of memory) leave behind: hidden staged copies, removed later.

Every writer stages under a hidden name and then moves the result into place, so a killed write leaves
its staged copy, which readers skip: a ``.*.parquet.tmp`` file of the served log or of a push, a
``.staging-*`` copy of an artifact (as large as the artifact). A later write in the same folder removes
those over an hour old; a younger one may be another process's write in progress.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow.fs as pafs

#: how old a staged copy is before a later write in its folder removes it
STALE_S = 3600.0


def parquet_tmp(name: str) -> bool:
    """Whether ``name`` is a Parquet write's hidden temporary file (the served log's, a push's).

    >>> parquet_tmp(".3f2a.parquet.tmp"), parquet_tmp("part-0.parquet")
    (True, False)
    """
    return name.startswith(".") and name.endswith(".parquet.tmp")


class Sweeper:
    """Removes the stale leftovers of a folder, at most once per :data:`STALE_S` per folder and process."""

    def __init__(self, is_leftover: Callable[[str], bool]) -> None:
        self._is_leftover = is_leftover
        self._swept: dict[str, float] = {}  # folder -> time.monotonic() of its last sweep

    def sweep(self, fs: pafs.FileSystem, folder: str) -> None:
        """Remove the leftovers in ``folder`` (not below it) over :data:`STALE_S` old; nothing here fails."""
        now = time.monotonic()
        if now - self._swept.get(folder, -STALE_S) < STALE_S:
            return
        self._swept[folder] = now
        cutoff = time.time() - STALE_S
        try:
            entries = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError:
            return
        for info in entries:
            if not self._is_leftover(info.base_name) or _newest(fs, info) >= cutoff:
                continue
            try:  # gone already (another sweeper), or not ours to remove
                if info.type == pafs.FileType.Directory:
                    fs.delete_dir(info.path)
                else:
                    fs.delete_file(info.path)
            except OSError:
                pass


def _newest(fs: pafs.FileSystem, info: pafs.FileInfo) -> float:
    """When anything in ``info`` (a file, or a folder and all below it) last changed, as a POSIX time: a folder's
    own time stays put while files are written into its subfolders (a live copy of a folder artifact looked an
    hour old); +inf where a store keeps no times (S3's folders), so that nothing is removed on a guess."""
    infos = [info]
    if info.type == pafs.FileType.Directory:
        try:
            infos += fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
        except OSError:
            return float("inf")
    times = [i.mtime.timestamp() for i in infos if i.mtime is not None]
    return max(times) if times else float("inf")
