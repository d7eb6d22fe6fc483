"""SQLite state (WAL) under the state dir: the only package that speaks SQL.

:class:`State` opens the one connection and hands out one small repository per area, all writing through that
connection and joining the same transaction: ``cursors`` (files read so far), ``conversations`` (with where each was
seen), ``rejects`` (lines that did not parse), ``feedback`` (events and labels), ``examples`` (the dataset filter
and the example cache), ``datasets`` (versions, members, eval pins), ``cycles``, ``jobs``, ``models`` and
``service`` (the champion, ``latest``, the training backoff, a pending export) and ``pruned`` (what disk
retention removed). Rows are typed (``rows.py``); the
schema is a list of migrations keyed by ``PRAGMA user_version`` (``migrations.py``). Files and folders created
here are private (0700 / 0600). Imports only the standard library.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path

from daemon.state.conversations import Conversations, Rejects
from daemon.state.core import StateError, private_dir, storage_problem, utcnow
from daemon.state.cursors import Cursors
from daemon.state.cycles import Cycles
from daemon.state.datasets import Datasets
from daemon.state.db import DB_NAME, Database
from daemon.state.examples import Examples
from daemon.state.feedback import Feedback
from daemon.state.jobs import Jobs
from daemon.state.models import Models
from daemon.state.pruned import Pruned
from daemon.state.rows import (
    CycleRow,
    DatasetRow,
    Eligible,
    JobRow,
    LatestMove,
    ModelRow,
    PendingExport,
    ServiceRow,
)
from daemon.state.service import Service

__all__ = [
    "DB_NAME", "CycleRow", "DatasetRow", "Eligible", "JobRow", "LatestMove", "ModelRow", "PendingExport", "ServiceRow",
    "State", "StateError", "private_dir", "storage_problem", "utcnow",
]


class State:
    """One connection to the state database and its repositories. Not shared between threads; open one per
    thread. Raises :class:`StateError` (one line) when the database cannot be opened or migrated."""

    def __init__(self, state_dir: Path, *, timeout_s: float = 30.0) -> None:
        try:
            self._db = Database(Path(state_dir), timeout_s=timeout_s)
        except (sqlite3.Error, OSError) as exc:  # disk full, read-only, unreadable: one line, not a traceback
            raise StateError(storage_problem(exc, Path(state_dir))
                             or f"cannot open the state database in {state_dir}: {exc}") from None
        try:
            self._db.migrate()
        except StateError:
            self._db.close()
            raise
        self.dir: Path = self._db.dir
        self.path: Path = self._db.path
        self.conn: sqlite3.Connection = self._db.conn
        self.cursors = Cursors(self._db)
        self.feedback = Feedback(self._db)
        self.conversations = Conversations(self._db, self.feedback)
        self.rejects = Rejects(self._db)
        self.examples = Examples(self._db)
        self.datasets = Datasets(self._db)
        self.cycles = Cycles(self._db)
        self.jobs = Jobs(self._db)
        self.models = Models(self._db)
        self.service = Service(self._db)
        self.pruned = Pruned(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction (BEGIN IMMEDIATE); nested uses join the outer one."""
        return self._db.transaction()

    def atomic(self) -> AbstractContextManager[None]:
        """All or nothing for one block: the transaction, or inside one a savepoint (see ``Database.atomic``)."""
        return self._db.atomic()

    @property
    def schema_version(self) -> int:
        return self._db.schema_version

    def migrate(self) -> None:
        """Bring the schema up to date (done on open); raises :class:`StateError` on failure."""
        self._db.migrate()


