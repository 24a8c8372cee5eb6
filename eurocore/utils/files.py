"""Files the project writes: checked writable before any work, written atomically.

    check_writable_file("--metrics-json", path)   # at start-up: fail before the run
    write_json_atomically(payload, path)          # a reader never sees half a file
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def check_writable_dir(arg: str, path: str | os.PathLike[str]) -> Path:
    """That files can be written in the directory ``path``: it, or the nearest of its
    parents that exists, is a directory where a probe file can be created and removed.
    Creates nothing that stays (a rejected run leaves no empty directories); raises
    ValueError naming ``arg`` otherwise."""
    if not str(path):
        raise ValueError(f"{arg}: the empty string names no directory")
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{arg}: cannot write under {str(path)!r}: {str(existing)!r} is not "
                         f"a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{arg}: cannot write under {str(path)!r} ({str(existing)!r}: "
                         f"{err.strerror or err})") from None
    return path


def check_writable_file(arg: str, path: str | os.PathLike[str]) -> Path:
    """That ``path`` can be (re)written atomically: not a directory, in a directory that
    :func:`check_writable_dir` accepts; raises ValueError naming ``arg`` otherwise."""
    if not str(path):
        raise ValueError(f"{arg}: the empty string names no file")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{arg}: {str(path)!r} is a directory; expected a file path")
    check_writable_dir(arg, path.parent)
    return path


def write_bytes_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any],
                           *, durable: bool = False) -> Path:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder, then renames it over
    ``path``: a reader never sees half a file, and a failure leaves the old one; returns
    the path. ``durable``: the file and the rename are also on disk when this returns
    (fsync of both), so a power loss cannot undo them either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Puts ``path`` on disk: a file's contents (one another library wrote), or a
    directory's entries (files created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(text: str, path: str | os.PathLike[str], *,
                          durable: bool = False) -> Path:
    """``text`` (UTF-8) written with :func:`write_bytes_atomically`."""
    return write_bytes_atomically(path, lambda f: f.write(text.encode("utf-8")),
                                  durable=durable)


def write_json_atomically(payload: Any, path: str | os.PathLike[str], *,
                          durable: bool = False) -> Path:
    """``payload`` as indented JSON, written with :func:`write_text_atomically`."""
    return write_text_atomically(json.dumps(payload, indent=2) + "\n", path, durable=durable)


def read_json(path: str | os.PathLike[str], arg: str, missing: str) -> Any:
    """The JSON value in the file ``path``. Raises ValueError starting with ``arg`` and
    naming the file when it is missing (``missing`` says what that means) or unreadable."""
    file = Path(path)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{arg}: {str(file)!r} is missing: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{arg}: {str(file)!r} is unreadable ({err})") from None
