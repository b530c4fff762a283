"""Folders a command makes, and removes again when it fails: ``missing_folders`` before, ``remove_empty`` after.

A failed command leaves no folder of its own behind (a mistyped ``--home`` stays an error for the commands after
it), and never one another process wrote into meanwhile: only empty folders are removed.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["missing_folders", "remove_empty"]


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, innermost first: what making ``path`` will make."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (innermost first, as :func:`missing_folders` gives them) while they are empty: the first
    that is not (another process wrote there) stays, with every folder around it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
