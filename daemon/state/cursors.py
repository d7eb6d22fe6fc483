"""File cursors: how far each store file has been read."""

from __future__ import annotations

from daemon.state.core import utcnow
from daemon.state.db import Database
from daemon.state.rows import Cursor

_COLS = "path, kind, dev, ino, size, mtime_ns, offset, lines, head_len, head_hash, tail_len, tail_hash"


class Cursors:
    """The ``files`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> dict[str, Cursor]:
        return {r[0]: Cursor(*r) for r in self._db.conn.execute(f"SELECT {_COLS} FROM files")}

    def get(self, path: str) -> Cursor | None:
        r = self._db.conn.execute(f"SELECT {_COLS} FROM files WHERE path = ?", (path,)).fetchone()
        return Cursor(*r) if r else None

    def save(self, c: Cursor) -> None:
        self._db.conn.execute(
            f"INSERT OR REPLACE INTO files ({_COLS}, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (c.path, c.kind, c.dev, c.ino, c.size, c.mtime_ns, c.offset, c.lines, c.head_len, c.head_hash,
             c.tail_len, c.tail_hash, utcnow()),
        )

    def drop(self, path: str) -> None:
        self._db.conn.execute("DELETE FROM files WHERE path = ?", (path,))
