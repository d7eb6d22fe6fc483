"""What every part of the state package shares: the error type, the storage-failure message, private folders and
the timestamp format."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path


class StateError(Exception):
    """The state database cannot be opened or migrated (disk full, read-only, unreadable, a newer schema);
    ``str()`` is one line."""


_STORAGE_MESSAGES = ("database or disk is full", "disk i/o error", "readonly database", "unable to open database")


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make the leaf 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def storage_problem(exc: BaseException, where: Path) -> str | None:
    """One line naming the state dir and its free space when ``exc`` is its storage failing (disk full, I/O error,
    read-only); None for any other error."""
    if isinstance(exc, StateError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES):
        what = exc.strerror or str(exc)
    elif isinstance(exc, sqlite3.OperationalError) and any(m in str(exc).lower() for m in _STORAGE_MESSAGES):
        what = str(exc)
    else:
        return None
    try:
        free = f"; {shutil.disk_usage(where).free // 1024} KiB free there"
    except OSError:
        free = ""
    return f"cannot write the state dir {where}: {what}{free}"


def json_ids(ids: Iterable[str]) -> str | None:
    """``ids`` as one JSON array parameter (read back with ``json_each``), or None when there are none."""
    listed = list(ids)
    return json.dumps(listed) if listed else None
