"""Plain files through one path: OS errors become one :class:`FileError` line with the cause.

    text = read_text(path, "adapter config")          # FileError: "<what> <path>: <cause>"
    obj = read_json(path, "adapter config")           # + not valid JSON / too deeply nested
    check_writable(path, "--out")                     # before any heavy work
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from moelora_dist.errors import FileError


def describe_os_error(exc: OSError) -> str:
    """The real cause of an OS error, in words (permission is not "missing")."""
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, NotADirectoryError):
        return "a component of the path is not a directory"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    return exc.strerror or str(exc)


def fail(what: str, path, cause: str, fix: str = "") -> FileError:
    return FileError(f"{what} {path}: {cause}" + (f"; {fix}" if fix else ""))


def kind_of(path: str | os.PathLike) -> str:
    """``"file"``, ``"dir"``, ``"missing"``, ``"loop"``, ``"denied"`` or ``"other"`` (a
    device, a socket), without following the path through a failing ``is_file`` check."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        return "denied"
    except OSError as exc:
        return "loop" if exc.errno == errno.ELOOP else "missing"
    import stat

    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "other"


_KIND_WORDS = {"missing": "does not exist", "denied": "permission denied",
               "loop": "symbolic link loop", "other": "is not a regular file or directory",
               "dir": "is a directory, not a file", "file": "is a file, not a directory"}


def require(path: str | os.PathLike, want: str, what: str, fix: str = "") -> Path:
    """``path`` as a :class:`Path` if it is a ``want`` (``"file"`` or ``"dir"``), else
    :class:`FileError` saying what it is instead."""
    got = kind_of(path)
    if got != want:
        raise fail(what, path, _KIND_WORDS[got], fix)
    return Path(path)


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise fail(what, path, describe_os_error(exc)) from None


def read_text(path: str | os.PathLike, what: str) -> str:
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(what, path, f"not UTF-8 text (byte {exc.start})") from None


def read_json(path: str | os.PathLike, what: str):
    """Parsed JSON of a file; FileError on I/O, syntax, or nesting too deep to parse."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(what, path, f"not valid JSON ({exc.msg} at line {exc.lineno} column "
                   f"{exc.colno})") from None
    except RecursionError:
        raise fail(what, path, "JSON nested too deeply to read") from None


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """:func:`read_json` that must be a JSON object (``{...}``)."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise fail(what, path, f"expected a JSON object, found a JSON {type(obj).__name__}")
    return obj


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """That ``path`` can be created or overwritten as a file, checked before any work: its
    directory exists and is writable, and ``path`` is not a directory."""
    p = Path(path)
    if kind_of(p) == "dir":
        raise fail(what, p, "is a directory", "give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    got = kind_of(parent)
    if got != "dir":
        raise fail(what, p, f"its directory {parent} {_KIND_WORDS.get(got, 'is not a directory')}"
                   if got != "file" else f"its directory {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail(what, p, f"permission denied to write into {parent}")
    if kind_of(p) == "file" and not os.access(p, os.W_OK):
        raise fail(what, p, "permission denied (the file exists and is read-only)")
    return p


def open_for_write(path: str | os.PathLike, what: str, mode: str = "w"):
    """``open(path, mode)`` with OS errors as :class:`FileError`."""
    try:
        return open(path, mode)
    except OSError as exc:
        raise fail(what, path, describe_os_error(exc)) from None
