"""The one connection to the state database: opening it (private files, pragmas), migrating it, and the write
transaction and savepoint that every repository's writes join."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.state.core import StateError, private_dir, storage_problem
from daemon.state.migrations import MIGRATIONS

DB_NAME = "state.sqlite3"


class Database:
    """One SQLite connection (WAL) in ``state_dir``, with nested transactions. Not shared between threads."""

    def __init__(self, state_dir: Path, *, timeout_s: float = 30.0) -> None:
        self.dir = private_dir(state_dir)
        self.path = self.dir / DB_NAME
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        self.conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._depth = 0
        try:
            self._configure(timeout_s)
        except BaseException:
            self.conn.close()
            raise

    def _configure(self, timeout_s: float) -> None:
        # Only takes effect on a new, empty database (before WAL is set). Rows hold whole conversations (~1-4 KiB):
        # 16 KiB pages make a cold ingest of a large store cheaper (fewer page writes, splits and syscalls).
        self.conn.execute("PRAGMA page_size=16384")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        # Up to 16 MiB of page cache (default 2 MiB): the id indexes of a 100k-conversation store stay in memory
        # during bulk ingest instead of being re-read for every random insert. Grows only as used.
        self.conn.execute("PRAGMA cache_size=-16384")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE); nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:  # a failed COMMIT (disk full) leaves it open; SQLite may have ended it
                self.conn.execute("ROLLBACK")
            problem = storage_problem(exc, self.dir) if isinstance(exc, sqlite3.OperationalError) else None
            if problem:  # disk full, read-only: one line naming the state dir (nothing was written)
                raise StateError(problem) from exc
            raise
        finally:
            self._depth = 0

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """All or nothing for one block: a transaction, or inside one a savepoint, so that an exception undoes just
        this block's writes and leaves the enclosing transaction usable (bulk ingest groups many files into one
        transaction; one unreadable file must not undo the others)."""
        if not self._depth:
            with self.transaction():
                yield
            return
        self.conn.execute("SAVEPOINT atomic")
        self._depth += 1
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO atomic")
            self.conn.execute("RELEASE atomic")
            raise
        else:
            self.conn.execute("RELEASE atomic")
        finally:
            self._depth -= 1

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Apply the migrations this database lacks, each in its own transaction. Raises :class:`StateError` when
        the database is newer than this code or a migration fails (that migration leaves nothing behind)."""
        try:
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise StateError(f"state database {self.path} has schema v{current}, newer than this version knows"
                                 f" (v{len(MIGRATIONS)})")
            for version in range(current, len(MIGRATIONS)):
                self._apply(version)
            for suffix in ("-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    os.chmod(p, 0o600)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(storage_problem(exc, self.dir)
                             or f"cannot migrate the state database {self.path}: {exc}") from exc

    def _apply(self, version: int) -> None:
        """Migration ``version + 1``, and the schema version that says it ran, in one transaction."""
        with self.transaction():
            for stmt in MIGRATIONS[version].split(";"):
                if stmt.strip():
                    self.conn.execute(stmt)
            self.conn.execute(f"PRAGMA user_version={version + 1}")
