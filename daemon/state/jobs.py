"""Training jobs. Each update names the columns it sets: a job starts, reports progress, ends, and is judged."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from daemon.state.db import Database
from daemon.state.rows import JobRow

_COLS = (
    "job_id, cycle_id, dataset_version, status, job_dir, config_path, log_path, metrics_path, result_path, params,"
    " created_at, pid, pid_start, latest_metrics, result, error, exit_code, started_at, finished_at, gate"
)


def _encode(value: dict[str, Any] | None) -> str | None:
    return json.dumps(value, default=str) if value is not None else None


def _decode(text: str | None) -> dict[str, Any] | None:
    return json.loads(text) if text else None


def _row(r: Sequence[Any]) -> JobRow:
    return JobRow(
        job_id=r[0], cycle_id=r[1], dataset_version=int(r[2]), status=r[3], job_dir=r[4], config_path=r[5],
        log_path=r[6], metrics_path=r[7], result_path=r[8], params=_decode(r[9]) or {}, created_at=r[10],
        pid=r[11], pid_start=r[12], latest_metrics=_decode(r[13]), result=_decode(r[14]), error=r[15],
        exit_code=r[16], started_at=r[17], finished_at=r[18], gate=_decode(r[19]),
    )


class Jobs:
    """The ``jobs`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, job: JobRow) -> None:
        self._db.conn.execute(
            f"INSERT INTO jobs ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (job.job_id, job.cycle_id, job.dataset_version, job.status, job.job_dir, job.config_path, job.log_path,
             job.metrics_path, job.result_path, _encode(job.params), job.created_at, job.pid, job.pid_start,
             _encode(job.latest_metrics), _encode(job.result), job.error, job.exit_code, job.started_at,
             job.finished_at, _encode(job.gate)),
        )

    def add_trained(self, job_id: str, cids: Iterable[str | tuple[str, int]]) -> None:
        """The conversations job ``job_id`` trains on (its plan), each a conversation id or (id, the sign of the vote
        it learns: 1 a good answer, -1 a thumbs-down); with its warm-start ancestors', a model's lineage."""
        rows = ((job_id, c, 1) if isinstance(c, str) else (job_id, c[0], 1 if c[1] > 0 else -1) for c in cids)
        self._db.conn.executemany("INSERT OR IGNORE INTO job_examples (job_id, cid, score) VALUES (?,?,?)", rows)

    def trained(self, job_ids: Sequence[str]) -> Counter[str]:
        """How many of ``job_ids`` trained on each conversation."""
        marks = ",".join("?" * len(job_ids))
        sql = f"SELECT cid, COUNT(*) FROM job_examples WHERE job_id IN ({marks}) GROUP BY cid"
        return Counter({r[0]: int(r[1]) for r in self._db.conn.execute(sql, tuple(job_ids))})

    def trained_on(self, cid: str) -> list[str]:
        """The jobs whose plan held conversation ``cid`` (a scan: job_examples is keyed by job)."""
        sql = "SELECT job_id FROM job_examples WHERE cid = ? ORDER BY job_id"
        return [r[0] for r in self._db.conn.execute(sql, (cid,))]

    def get(self, job_id: str) -> JobRow | None:
        r = self._db.conn.execute(f"SELECT {_COLS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _row(r) if r else None

    def recent(self, *, status: str | None = None, limit: int = 100) -> list[JobRow]:
        """Up to ``limit`` jobs (with ``status``, when given), newest first."""
        where, args = (" WHERE status = ?", (status,)) if status else ("", ())
        rows = self._db.conn.execute(
            f"SELECT {_COLS} FROM jobs{where} ORDER BY created_at DESC, job_id DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [_row(r) for r in rows]

    def status_counts(self) -> dict[str, int]:
        """Jobs by status (``promoted``, ``rejected``, ``failed`` ...)."""
        rows = self._db.conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def spans(self) -> list[tuple[str, str, str]]:
        """``(job_id, started_at, finished_at)`` of every job that ran and ended, oldest first (job durations)."""
        rows = self._db.conn.execute(
            "SELECT job_id, started_at, finished_at FROM jobs WHERE started_at IS NOT NULL AND finished_at IS NOT NULL"
            " ORDER BY finished_at, job_id"
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def started_since(self, iso: str) -> int:
        """Jobs created at or after ``iso``: the training runs of the policy's daily limit. A job re-attached after
        a restart is still one job, so it counts once."""
        return int(self._db.conn.execute("SELECT COUNT(*) FROM jobs WHERE created_at >= ?", (iso,)).fetchone()[0])

    def running(self, job_id: str, *, pid: int, pid_start: int | None, started_at: str | None = None) -> None:
        """The trainer of ``job_id`` runs as ``pid`` (``started_at``: when it was spawned; None keeps the time
        recorded before, for a trainer found again after a restart)."""
        self._db.conn.execute(
            "UPDATE jobs SET status = 'running', pid = ?, pid_start = ?, started_at = COALESCE(?, started_at)"
            " WHERE job_id = ?",
            (pid, pid_start, started_at, job_id),
        )

    def progress(self, job_id: str, latest_metrics: dict[str, Any]) -> None:
        """The trainer's latest metrics line."""
        self._db.conn.execute(
            "UPDATE jobs SET latest_metrics = ? WHERE job_id = ?", (_encode(latest_metrics), job_id)
        )

    def finished(self, job_id: str, *, status: str, exit_code: int | None, error: str | None,
                 result: dict[str, Any] | None, latest_metrics: dict[str, Any] | None, finished_at: str) -> None:
        """A supervised trainer ended: how, and what it produced."""
        self._db.conn.execute(
            "UPDATE jobs SET status = ?, exit_code = ?, error = ?, result = ?, latest_metrics = ?, finished_at = ?"
            " WHERE job_id = ?",
            (status, exit_code, error, _encode(result), _encode(latest_metrics), finished_at, job_id),
        )

    def stopped(self, job_id: str, *, status: str, error: str, finished_at: str) -> None:
        """The job ended without a trainer's outcome (it could not start, was lost, or was cancelled unwatched)."""
        self._db.conn.execute(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE job_id = ?",
            (status, error, finished_at, job_id),
        )

    def judged(self, job_id: str, *, status: str, error: str | None, gate: dict[str, Any] | None = None) -> None:
        """The gate's verdict on a succeeded job (``promoted``, or ``rejected`` with why), and its numbers check by
        check (None keeps those recorded before)."""
        self._db.conn.execute("UPDATE jobs SET status = ?, error = ?, gate = COALESCE(?, gate) WHERE job_id = ?",
                              (status, error, _encode(gate), job_id))
