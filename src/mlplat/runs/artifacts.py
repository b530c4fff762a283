"""The artifact store: a local folder by default, any pyarrow filesystem by URI.

Artifacts of run R named N live at ``<root>/<R>/<N>``. Names are relative
paths inside the run's folder: an absolute path, a ``..`` part, a backslash,
an empty part or a control character is refused before anything is written,
so no artifact can land outside its run.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from ..errors import DataError, StoreError

__all__ = ["ArtifactStore", "check_name", "NAME_MAX"]

NAME_MAX = 1024  # the run_artifacts.path column


def check_name(name: str) -> str:
    """A safe artifact name (posix, relative, no ``..``), or DataError.

    >>> check_name("model/weights.pt")
    'model/weights.pt'
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"artifact name {name!r} is empty")
    if len(name) > NAME_MAX:
        raise DataError(f"artifact name {name[:40]!r}... is {len(name)} characters long; use at most {NAME_MAX}")
    if any(ord(c) < 32 for c in name) or "\\" in name:
        raise DataError(f"artifact name {name!r} holds a control character or a backslash")
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"artifact name {name!r} is absolute; use a path relative to the run")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise DataError(f"artifact name {name!r} has an empty, '.' or '..' part; artifacts stay inside their run")
    return name


class ArtifactStore:
    """Files of runs under one root (local folder or URI such as ``s3://bucket/prefix``)."""

    def __init__(self, root: str) -> None:
        self.root_uri = root
        try:
            if "://" in root:
                self.fs, self.root = pafs.FileSystem.from_uri(root)
            else:
                self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(root)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"artifact store {root!r}: {exc}") from None
        self.root = self.root.rstrip("/")

    def path(self, run_id: str, name: str = "") -> str:
        """The store path of a run's artifact ``name``."""
        return f"{self.root}/{run_id}" + (f"/{check_name(name)}" if name else "")

    def uri(self, run_id: str, name: str = "") -> str:
        """The URI of a run's artifact folder (recorded as the run's artifact_uri)."""
        return f"{self.root_uri.rstrip('/')}/{run_id}" + (f"/{name}" if name else "")

    def put_file(self, run_id: str, source: str | os.PathLike, name: str) -> tuple[int, str]:
        """Copy a local file in as ``name``; returns (size, sha256). Written to a temp name, then moved."""
        dest = self.path(run_id, name)
        digest = hashlib.sha256()
        size = 0
        try:
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            tmp = f"{posixpath.dirname(dest)}/.{uuid.uuid4().hex}.tmp"
            with open(source, "rb") as src, self.fs.open_output_stream(tmp) as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            self.fs.move(tmp, dest)
        except OSError as exc:
            raise StoreError(f"artifact store {self.root_uri}: writing {name!r} failed: {exc}") from None
        return size, digest.hexdigest()

    def put_dir(self, run_id: str, source: str | os.PathLike, name: str) -> tuple[int, str]:
        """Copy a local folder in as ``name``; returns (total size, sha256 over the files' names and hashes).

        Files a previous folder of that name held and this one does not are removed afterwards, so the
        stored folder is exactly ``source``."""
        check_name(name)
        digest = hashlib.sha256()
        total = 0
        base = Path(source)
        written = set()
        for file in sorted(p for p in base.rglob("*") if p.is_file()):
            rel = file.relative_to(base).as_posix()
            size, sha = self.put_file(run_id, file, f"{name}/{rel}")
            written.add(self.path(run_id, f"{name}/{rel}"))
            digest.update(f"{rel}\0{sha}\n".encode())
            total += size
        self._remove_stale(self.path(run_id, name), written)
        return total, digest.hexdigest()

    def _remove_stale(self, folder: str, keep: set[str]) -> None:
        """Delete every file under ``folder`` that is not in ``keep``."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
            for info in infos:
                if info.type == pafs.FileType.File and info.path not in keep:
                    self.fs.delete_file(info.path)
        except OSError as exc:
            raise StoreError(f"artifact store {self.root_uri}: clearing old files of {folder!r} failed: "
                             f"{exc}") from None

    def move(self, run_id: str, source: str, name: str) -> None:
        """Move the run's artifact file ``source`` to ``name`` (replacing what was there)."""
        dest = self.path(run_id, name)
        try:
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            self.fs.move(self.path(run_id, source), dest)
        except OSError as exc:
            raise StoreError(f"artifact store {self.root_uri}: moving {source!r} to {name!r} failed: {exc}") from None

    def delete(self, run_id: str, name: str) -> None:
        """Remove the run's artifact file ``name`` if it is there (best effort: for cleaning up)."""
        try:
            self.fs.delete_file(self.path(run_id, name))
        except OSError:  # already gone, or the store is unreachable: nothing refers to it
            pass

    def get_dir(self, run_id: str, name: str, dest: str | os.PathLike) -> Path:
        """Copy ``name`` (a folder) of a run to a local folder and return it."""
        src = self.path(run_id, name)
        dest = Path(dest)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(src, recursive=True))
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(f"artifact store {self.root_uri}: {name!r} of run {run_id} is missing ({exc})") from None
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            target = dest / info.path[len(src) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as f, open(target, "wb") as out:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
        return dest

    def open(self, run_id: str, name: str) -> pa.NativeFile:
        """A readable stream of one artifact file."""
        try:
            return self.fs.open_input_file(self.path(run_id, name))
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(f"artifact store {self.root_uri}: {name!r} of run {run_id} is missing ({exc})") from None
