"""The service's own progress (one row, see :class:`ServiceRow`) and the export that a crash or a stop left
unfinished. These were keys of a key/value table before migration 7."""

from __future__ import annotations

import json

from daemon.state.db import Database
from daemon.state.rows import LatestMove, PendingExport, ServiceRow

_COLS = ("champion_job, last_trained_dataset, last_run_at, last_ingest_at, train_failures, train_backoff_until,"
         " latest_model, previous_latest_model")


class Service:
    """The ``service`` row and the ``pending_export`` row. Each setter names what it changes."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self) -> ServiceRow:
        r = self._db.conn.execute(f"SELECT {_COLS} FROM service WHERE id = 1").fetchone()
        return ServiceRow(*r) if r else ServiceRow()

    def _set(self, sql: str, *args: object) -> None:
        """One ``UPDATE service SET ...`` (``sql``), the row created first when a database lacks it."""
        self._db.conn.execute("INSERT OR IGNORE INTO service (id) VALUES (1)")
        self._db.conn.execute(f"UPDATE service SET {sql} WHERE id = 1", args)

    def set_last_ingest_at(self, at: str) -> None:
        self._set("last_ingest_at = ?", at)

    def set_last_run_at(self, at: str) -> None:
        """When training last started (the policy's minimum interval counts from it)."""
        self._set("last_run_at = ?", at)

    def set_champion(self, job_id: str, *, dataset_version: int | None) -> None:
        """``job_id`` was promoted: its adapter is the one to beat, its dataset the last one trained on."""
        self._set("champion_job = ?, last_trained_dataset = ?", job_id, dataset_version)

    def restore_champion(self, job_id: str | None) -> None:
        """The promoted job failed a check after its export: ``job_id`` (the champion it replaced) is back."""
        self._set("champion_job = ?", job_id)

    def set_last_trained(self, dataset_version: int | None) -> None:
        """A job trained on ``dataset_version`` and was judged (promoted or rejected): new examples count from it."""
        self._set("last_trained_dataset = ?", dataset_version)

    def set_train_backoff(self, *, failures: int, until: str | None) -> None:
        """Consecutive training failures and when training may run again (0 and None after a success)."""
        self._set("train_failures = ?, train_backoff_until = ?", failures, until)

    def set_latest_model(self, version: int | None) -> None:
        """The model version ``latest`` points at (None: none)."""
        self._set("latest_model = ?", version)

    def latest_moved(self, version: int, *, previous: int | None, how: str, at: str) -> None:
        """``latest`` now points at ``version`` (``how``: ``registered`` or ``rollback``): one row of its history."""
        self._db.conn.execute("INSERT INTO latest_moves (at, version, previous, how) VALUES (?,?,?,?)",
                              (at, version, previous, how))

    def latest_moves(self) -> list[LatestMove]:
        """Every move of ``latest``, oldest first."""
        rows = self._db.conn.execute("SELECT at, version, previous, how FROM latest_moves ORDER BY id").fetchall()
        return [LatestMove(at=r[0], version=int(r[1]), previous=r[2], how=r[3]) for r in rows]

    def set_previous_latest_model(self, version: int) -> None:
        """The version ``latest`` pointed at before (kept from retention, the target of a rollback)."""
        self._set("previous_latest_model = ?", version)

    def pending_export(self) -> PendingExport | None:
        r = self._db.conn.execute("SELECT job_id, gate, pid, pid_start FROM pending_export WHERE id = 1").fetchone()
        if r is None:
            return None
        gate = json.loads(r[1])
        return PendingExport(r[0], gate if isinstance(gate, dict) else {}, r[2], r[3])

    def set_pending_export(self, pending: PendingExport) -> None:
        self._db.conn.execute(
            "INSERT OR REPLACE INTO pending_export (id, job_id, gate, pid, pid_start) VALUES (1,?,?,?,?)",
            (pending.job_id, json.dumps(pending.gate, default=str), pending.pid, pending.pid_start),
        )

    def clear_pending_export(self) -> None:
        self._db.conn.execute("DELETE FROM pending_export")
