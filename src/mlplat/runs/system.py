"""System tags recorded automatically for every run."""
from __future__ import annotations

import getpass
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ..settings import hide_password

__all__ = ["system_tags", "git_state", "calling_script"]

_PACKAGES = ("mlplat", "numpy", "pyarrow", "torch", "pandas", "polars")


def calling_script() -> Path | None:
    """The script that started this process (None in a notebook or REPL)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not Path(path).is_file():  # notebooks, REPL, python -c, stdin
        return None
    return Path(path).resolve()


def git_state(where: Path | None) -> tuple[str, str]:
    """(commit, dirty flag as "true"/"false") of the git repository holding the file ``where`` (None: the
    current directory), or ("", "") outside a repository. Dirty: a tracked file is changed, or ``where``
    itself is not tracked (a script never committed is in no commit). Other untracked files are not
    looked for: listing them can take long in a big working tree."""
    try:
        folder = where.parent if where is not None else Path.cwd()  # FileNotFoundError: a folder deleted under us
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=5, check=True).stdout
        untracked = where is not None and subprocess.run(
            ["git", "--literal-pathspecs", "ls-files", "--error-unmatch", "--", where.name], cwd=folder,
            capture_output=True, timeout=5).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "", ""
    return commit, "true" if status.strip() or untracked else "false"


def system_tags() -> dict[str, str]:
    """mlplat.* tags: git commit and dirty flag, user, host, python and package versions, entry point.

    The commit is the calling script's repository's; a script outside any repository (a console
    script in a virtualenv, say) falls back to the current directory's repository.
    """
    script = calling_script()
    commit, dirty = git_state(script)
    if not commit and script is not None:
        commit, dirty = git_state(None)
    tags = {
        "mlplat.git.commit": commit,
        "mlplat.git.dirty": dirty,
        "mlplat.user": _user(),
        "mlplat.host": socket.gethostname(),
        "mlplat.python": platform.python_version(),
        "mlplat.entry_point": _escaped(" ".join([str(script) if script else sys.argv[0] or "<interactive>",
                                                  *map(_hidden, sys.argv[1:])]))[:1000],  # escaped, then cut
        "mlplat.pid": str(os.getpid()),
    }
    for name in _PACKAGES:
        try:
            tags[f"mlplat.version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {k: _escaped(v) for k, v in tags.items()}


#: user:password@ of a URL inside an argument (``db.url=...``, ``+db={url:redis://...}``, ``-Dredis://...``): first
#: within one value of a JSON or list argument (up to a double quote, comma or bracket), then up to the argument's
#: last "@" where no double quote or comma lies between (``"http://mlflow:5000/api","owner":"ana@corp.com"`` holds a
#: port, then someone's address: no password)
_URL_USER = r"([A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s\"',\[\]{}]*:)"
_URL_PASSWORD_IN_VALUE = re.compile(_URL_USER + r"[^\s\"',\]}]*@")
_URL_PASSWORD = re.compile(_URL_USER + r"(\S*)@")


def _mask(found: re.Match) -> str:
    span = found.group(2)
    return found.group(0) if '"' in span or "," in span else f"{found.group(1)}***@"


def _hidden(arg: str) -> str:
    """A command-line argument with the password of any URL in it hidden: the argument as a URL, the value after
    ``--opt=`` as one (a password holding a blank included), and URLs inside it. The entry point is stored for
    anyone reading runs to see."""
    arg = hide_password(arg)
    option, eq, value = arg.partition("=")
    if eq:
        arg = f"{option}={hide_password(value)}"
    return _URL_PASSWORD.sub(_mask, _URL_PASSWORD_IN_VALUE.sub(r"\1***@", arg))


def _escaped(text: str) -> str:
    """``text`` as every database stores it: a lone surrogate (a command-line argument or path that is not
    UTF-8, as Python decodes it) as its escape (``\\udcff``), a NUL as ``\\x00``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "")
