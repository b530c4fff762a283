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
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from .._checks import storable
from .._leftovers import Sweeper
from ..errors import DataError, StoreError

__all__ = ["ArtifactStore", "check_name", "folder_sha256", "NAME_MAX"]

NAME_MAX = 1024  # the run_artifacts.path column
_OWN_PREFIXES = (".staging-", ".replaced-")  # the hidden names of copies staged or moved aside in a run's folder


def check_name(name: str) -> str:
    """A safe artifact name (posix, relative, no ``..``), or DataError.

    >>> check_name("model/weights.pt")
    'model/weights.pt'
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"artifact name {name!r} is empty")
    if len(name) > NAME_MAX:
        raise DataError(f"artifact name {name[:40]!r}... is {len(name)} characters long; use at most {NAME_MAX}")
    storable(name, "artifact name")  # a lone surrogate came out of the database driver as a raw error
    if any(ord(c) < 32 for c in name) or "\\" in name:
        raise DataError(f"artifact name {name!r} holds a control character or a backslash")
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"artifact name {name!r} is absolute; use a path relative to the run")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise DataError(f"artifact name {name!r} has an empty, '.' or '..' part; artifacts stay inside their run")
    if parts[0].startswith(_OWN_PREFIXES):
        raise DataError(f"artifact name {name!r} starts with {parts[0][:parts[0].index('-') + 1]!r}, which names "
                        "mlplat's own staged copies in the run's folder (removed once an hour old): use another name")
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
        self._sweeper = Sweeper(lambda name: name.startswith(_OWN_PREFIXES))

    def path(self, run_id: str, name: str = "") -> str:
        """The store path of a run's artifact ``name``."""
        return f"{self.root}/{run_id}" + (f"/{check_name(name)}" if name else "")

    def uri(self, run_id: str, name: str = "") -> str:
        """The URI of a run's artifact folder (recorded as the run's artifact_uri)."""
        return f"{self.root_uri.rstrip('/')}/{run_id}" + (f"/{name}" if name else "")

    def put_file(self, run_id: str, source: str | os.PathLike, name: str) -> tuple[int, str]:
        """Copy a local file in as ``name`` (replacing a file or folder of that name); returns (size, sha256).

        Written to a hidden staging name first, then moved into place: a failure half-way (a full disk, an
        unreadable source, the store going away) leaves what ``name`` held before, and nothing else."""
        staged, size, sha = self.stage_file(run_id, source, name)
        self.swap_in(run_id, staged, name)
        return size, sha

    def put_dir(self, run_id: str, source: str | os.PathLike, name: str) -> tuple[int, str]:
        """Copy a local folder in as ``name``; returns (total size, sha256 over the files' names and hashes).

        Symbolic links are followed (a link to a file stores the file's bytes, a link to a folder its files);
        a link that loops back, a broken link or an entry that is neither a file nor a folder (a pipe, a
        socket, a device) is a DataError naming it, before anything is written. The folder is staged under
        a hidden name and then swapped in whole, so the stored folder holds exactly ``source``'s files (files an
        earlier folder of that name held are gone; an artifact is its files, so empty folders are not kept), and a
        failure half-way leaves the earlier folder as it was."""
        staged, size, sha = self.stage_dir(run_id, source, name)
        self.swap_in(run_id, staged, name)
        return size, sha

    def stage_file(self, run_id: str, source: str | os.PathLike, name: str) -> tuple[str, int, str]:
        """The first half of :meth:`put_file`: copy a local file to a fresh hidden name in the run's folder;
        returns (staged store path, size, sha256). Put it in place as ``name`` with :meth:`swap_in`, or drop
        it with :meth:`discard`; until then ``name`` is untouched (``name`` names it in errors)."""
        check_name(name)
        staged = self._staging(run_id)
        try:
            self.fs.create_dir(posixpath.dirname(staged), recursive=True)
            size, sha = self._copy_in(source, staged)
        except OSError as exc:
            raise self._failed(staged, name, exc) from None
        return staged, size, sha

    def stage_dir(self, run_id: str, source: str | os.PathLike, name: str) -> tuple[str, int, str]:
        """The first half of :meth:`put_dir` (as :meth:`stage_file` is of :meth:`put_file`): (staged store
        path, total size, sha256); a refused entry is a DataError before anything is written."""
        check_name(name)
        files = _folder_files(Path(source), name)
        staging = self._staging(run_id)
        digest = hashlib.sha256()
        total = 0
        try:
            self.fs.create_dir(staging, recursive=True)
            for rel, file in files:
                target = f"{staging}/{rel}"
                if "/" in rel:
                    self.fs.create_dir(posixpath.dirname(target), recursive=True)
                size, sha = self._copy_in(file, target)
                digest.update(_entry(rel, sha))
                total += size
            held = sum(i.type == pafs.FileType.File
                       for i in self.fs.get_file_info(pafs.FileSelector(staging, recursive=True)))
            if held != len(files):  # not a hash over files it lacks
                raise OSError(f"the staged copy holds {held} of the {len(files)} files copied into it: something "
                              "removed some meanwhile")
        except OSError as exc:
            raise self._failed(staging, name, exc) from None
        return staging, total, digest.hexdigest()

    def swap_in(self, run_id: str, staged: str, name: str) -> None:
        """The second half of :meth:`put_file` / :meth:`put_dir`: move what was staged into place as ``name``,
        replacing what ``name`` held whole; a failure discards the staged copy and leaves ``name`` as it was."""
        try:
            self._replace(staged, self.path(run_id, name))
        except OSError as exc:
            raise self._failed(staged, name, exc) from None

    def _failed(self, staged: str, name: str, exc: OSError) -> StoreError:
        """Discard ``staged``; the StoreError to raise for writing ``name``."""
        self.discard(staged)
        return StoreError(f"artifact store {self.root_uri}: writing {name!r} failed: {exc}")

    def _staging(self, run_id: str) -> str:
        """A fresh hidden name in the run's folder, on the store's filesystem (so a move is a rename); the
        leftovers of writes killed in that folder are swept first."""
        self._sweeper.sweep(self.fs, self.path(run_id))
        return f"{self.path(run_id)}/.staging-{uuid.uuid4().hex}"

    def _copy_in(self, source: str | os.PathLike, dest: str) -> tuple[int, str]:
        """Copy a local file to the store path ``dest``; returns (size, sha256)."""
        digest = hashlib.sha256()
        size = 0
        with open(source, "rb") as src, self.fs.open_output_stream(dest) as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return size, digest.hexdigest()

    def _replace(self, staged: str, dest: str) -> None:
        """Move ``staged`` (a file or folder) to ``dest``; what ``dest`` held is moved aside first and removed
        once the new one is in place (put back if the move fails)."""
        self.fs.create_dir(posixpath.dirname(dest), recursive=True)
        old = self.fs.get_file_info(dest)
        if old.type == pafs.FileType.NotFound or (old.type == pafs.FileType.File
                                                    and self.fs.get_file_info(staged).type == pafs.FileType.File):
            self._move(staged, dest)  # a new name, or a file over a file: the move replaces it in one step
            return
        aside = f"{posixpath.dirname(staged)}/.replaced-{uuid.uuid4().hex}"
        self._move(dest, aside)
        try:
            self._move(staged, dest)
        except BaseException:
            self._move(aside, dest)
            raise
        self.discard(aside)

    def _move(self, src: str, dest: str) -> None:
        """Rename a file or folder (a store that cannot move folders, such as S3, gets their files moved)."""
        try:
            self.fs.move(src, dest)
            return
        except (OSError, pa.ArrowNotImplementedError):
            if self.fs.get_file_info(src).type != pafs.FileType.Directory:
                raise
        infos = self.fs.get_file_info(pafs.FileSelector(src, recursive=True))
        self.fs.create_dir(dest, recursive=True)
        for info in sorted(infos, key=lambda i: i.path):
            target = dest + info.path[len(src):]
            if info.type == pafs.FileType.Directory:
                self.fs.create_dir(target, recursive=True)
            elif info.type == pafs.FileType.File:
                self.fs.move(info.path, target)
        self.fs.delete_dir(src)

    def discard(self, path: str) -> None:
        """Remove a staged or replaced file or folder (best effort: nothing refers to it)."""
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(path)
        except OSError:
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

    def measure(self, run_id: str, name: str) -> tuple[int, str]:
        """(total size, sha256) of a stored folder, as :meth:`put_dir` returns them for the folder it stored:
        for a folder whose files changed after it was logged (a file logged into it)."""
        base = self.path(run_id, name)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = sorted(((i.path[len(base) + 1:], i) for i in infos if i.type == pafs.FileType.File),
                           key=lambda item: item[0].split("/"))
            digest, total = hashlib.sha256(), 0
            for rel, info in files:
                with self.fs.open_input_stream(info.path) as f:
                    digest.update(_entry(rel, _read_sha256(f)))
                total += info.size
        except OSError as exc:
            raise StoreError(f"artifact store {self.root_uri}: cannot read {name!r} of run {run_id} ({exc})") from None
        return total, digest.hexdigest()

    def open(self, run_id: str, name: str) -> pa.NativeFile:
        """A readable stream of one artifact file."""
        try:
            return self.fs.open_input_file(self.path(run_id, name))
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(f"artifact store {self.root_uri}: {name!r} of run {run_id} is missing ({exc})") from None


def folder_sha256(folder: str | os.PathLike) -> str:
    """The sha256 :meth:`ArtifactStore.put_dir` returns for a folder, of a local folder (a fetched artifact)."""
    digest = hashlib.sha256()
    for rel, path in _folder_files(Path(folder), "artifact"):
        with open(path, "rb") as f:
            digest.update(_entry(rel, _read_sha256(f)))
    return digest.hexdigest()


def _read_sha256(f: Any) -> str:
    """The sha256 of what is left to read of ``f`` (a file or a store's stream), read 1 MiB at a time."""
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _entry(rel: str, sha: str) -> bytes:
    """A folder's sha256 is over its files' relative paths and sha256s, in path order, one entry each."""
    return f"{rel}\0{sha}\n".encode()


def _folder_files(base: Path, name: str) -> list[tuple[str, Path]]:
    """(relative posix name, path) of every file under ``base``, links followed; DataError for a link that
    loops, a broken link, an entry that is not a file or a folder, or a name an artifact cannot have."""
    out: list[tuple[str, Path]] = []

    def walk(folder: Path, rel: str, ancestors: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"log_artifact: cannot list {str(folder)!r}: {exc}") from None
        for entry in entries:
            path, sub = Path(entry.path), f"{rel}{entry.name}"
            if entry.is_dir():  # follows links
                real = os.path.realpath(path)
                if real in ancestors:
                    raise DataError(f"log_artifact: {str(path)!r} links back to a folder that holds it, so the "
                                    "folder never ends; remove the link or log the files one by one")
                walk(path, f"{sub}/", ancestors | {real})
            elif entry.is_file():
                check_name(f"{name}/{sub}")
                out.append((sub, path))
            else:
                what = ("a broken link" if entry.is_symlink()
                        else "neither a file nor a folder (a pipe, a socket, a device)")
                raise DataError(f"log_artifact: {str(path)!r} in {str(base)!r} is {what}; remove it or log the "
                                "files one by one")

    walk(base, "", frozenset({os.path.realpath(base)}))
    out.sort(key=lambda item: item[0].split("/"))  # the order the folder's sha256 has always been taken in
    return out
