"""Files the project writes: checked writable before any work, written atomically.

    check_writable_file("--metrics-json", path)   # at start-up: fail before the run
    write_json_atomically(payload, path)          # a reader never sees half a file
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def check_writable_dir(arg: str, path: str | os.PathLike[str]) -> Path:
    """Creates ``path`` (and its parents) if needed and proves a file can be written there
    (a probe file is created and removed); raises ValueError naming ``arg`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{arg}: {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{arg}: cannot write to the directory {str(path)!r} "
                         f"({err.strerror or err})") from None
    return path


def check_writable_file(arg: str, path: str | os.PathLike[str]) -> Path:
    """That ``path`` can be (re)written atomically: its directory is writable (created if
    missing) and the path is not a directory; raises ValueError naming ``arg`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{arg}: {str(path)!r} is a directory; expected a file path")
    if path.name in ("", ".", ".."):
        raise ValueError(f"{arg}: {str(path)!r} names no file")
    check_writable_dir(arg, path.parent if str(path.parent) else Path("."))
    return path


def write_text_atomically(text: str, path: str | os.PathLike[str]) -> Path:
    """Writes ``text`` to ``path`` through a temporary file in the same folder renamed over
    it, so a reader never sees half a file and a failure leaves the old file; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomically(payload: Any, path: str | os.PathLike[str]) -> Path:
    """``payload`` as indented JSON, written with :func:`write_text_atomically`."""
    return write_text_atomically(json.dumps(payload, indent=2) + "\n", path)
