"""Service cycles: one row per cycle with its canonical summary."""

from __future__ import annotations

import json
from collections.abc import Sequence

from daemon.state.db import Database
from daemon.state.rows import CycleRow


class Cycles:
    """The ``cycles`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(self, cycle: CycleRow) -> None:
        """Insert or replace the row of ``cycle.cycle_id``."""
        self._db.conn.execute(
            "INSERT OR REPLACE INTO cycles (cycle_id, started_at, outcome, reason, trained, summary)"
            " VALUES (?,?,?,?,?,?)",
            (cycle.cycle_id, cycle.started_at, cycle.outcome, cycle.reason, cycle.trained,
             json.dumps(cycle.summary, default=str)),
        )

    def last(self) -> CycleRow | None:
        """The cycle that started last."""
        r = self._db.conn.execute(
            "SELECT cycle_id, started_at, outcome, reason, summary, trained FROM cycles"
            " ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        return CycleRow(r[0], r[1], r[2], r[3], json.loads(r[4]), bool(r[5])) if r else None

    def runs_since(self, iso: str) -> int:
        """Training runs started at or after ``iso`` (for the policy's daily limit)."""
        return int(self._db.conn.execute(
            "SELECT COUNT(*) FROM cycles WHERE trained = 1 AND started_at >= ?", (iso,)
        ).fetchone()[0])

    def outcome_counts(self) -> dict[str, int]:
        """Cycles recorded so far, by outcome (the ``cycles_total`` counter of the metrics)."""
        rows = self._db.conn.execute("SELECT outcome, COUNT(*) FROM cycles GROUP BY outcome").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def last_with(self, outcomes: Sequence[str]) -> CycleRow | None:
        """The cycle that started last among those that ended with one of ``outcomes``."""
        if not outcomes:
            return None
        marks = ",".join("?" * len(outcomes))
        r = self._db.conn.execute(
            "SELECT cycle_id, started_at, outcome, reason, summary, trained FROM cycles"
            f" WHERE outcome IN ({marks}) ORDER BY started_at DESC LIMIT 1", tuple(outcomes)
        ).fetchone()
        return CycleRow(r[0], r[1], r[2], r[3], json.loads(r[4]), bool(r[5])) if r else None
