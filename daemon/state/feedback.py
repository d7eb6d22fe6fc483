"""Feedback events and the effective label (latest event) of each conversation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from daemon.state.core import json_ids
from daemon.state.db import Database

# ChatOS's quality scores (ingest.records.QUALITY_SCORE; a unit test keeps the two equal), as SQL over ``q.quality``.
QUALITY_SCORE = {"excellent": 1, "good": 1, "acceptable": 0, "unrated": 0, "poor": -1, "failed": -1}
_QUALITY_SQL = "CASE q.quality " + " ".join(f"WHEN '{k}' THEN {v}" for k, v in QUALITY_SCORE.items()) + " ELSE 0 END"
# The label: the latest thumbs vote when there is one (a thumbs vote is the user's own word about this answer), else
# the latest quality rating. Each is the latest event that carries it, so a later rating of one kind never
# replaces the other kind: a thumbs-down stays a thumbs-down when a "good" rating arrives after it. The correction
# ('better') that counts is the latest thumbs vote's, when that vote is down: a later thumbs-up, or a later
# thumbs-down without one, leaves none.
_LABELS_SQL = (
    "INSERT OR REPLACE INTO labels (cid, score, thumbs_up, quality, ts, feedback_id, better)"
    " SELECT t.cid, CASE WHEN th.thumbs_up IS NULL THEN " + _QUALITY_SQL +
    " WHEN th.thumbs_up THEN 1 ELSE -1 END, th.thumbs_up, q.quality, f.ts, f.id,"
    " CASE WHEN th.thumbs_up = 0 THEN th.better END"
    " FROM (SELECT DISTINCT value AS cid FROM json_each(?)) t"
    " JOIN feedback f ON f.id = (SELECT id FROM feedback WHERE cid = t.cid ORDER BY ts DESC, id DESC LIMIT 1)"
    " LEFT JOIN feedback th ON th.id = (SELECT id FROM feedback WHERE cid = t.cid AND thumbs_up IS NOT NULL"
    "  ORDER BY ts DESC, id DESC LIMIT 1)"
    " LEFT JOIN feedback q ON q.id = (SELECT id FROM feedback WHERE cid = t.cid AND quality IS NOT NULL"
    "  ORDER BY ts DESC, id DESC LIMIT 1)"
)


class Feedback:
    """The ``feedback`` and ``labels`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Add feedback events ``(path, line, cid, thumbs_up, quality, note, ts, score[, better])`` and refresh the
        labels of their conversations."""
        self._db.conn.executemany(
            "INSERT INTO feedback (path, line, cid, thumbs_up, quality, note, ts, score, better)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (r if len(r) == 9 else (*r, None) for r in rows),
        )
        self.refresh_labels({r[2] for r in rows})

    def per_day(self) -> list[tuple[str, int, int, int]]:
        """Feedback events by the day of their timestamp (its first ten characters, ``YYYY-MM-DD``), oldest first:
        ``(day, thumbs up, thumbs down, events)``."""
        sql = ("SELECT substr(ts, 1, 10) AS day, SUM(thumbs_up = 1), SUM(thumbs_up = 0), COUNT(*) FROM feedback"
               " GROUP BY day ORDER BY day")
        return [(r[0], int(r[1] or 0), int(r[2] or 0), int(r[3])) for r in self._db.conn.execute(sql)]

    def corrections(self) -> dict[str, str]:
        """Conversation id -> the correction that counts (its latest thumbs vote is down and carries one)."""
        return dict(self._db.conn.execute("SELECT cid, better FROM labels WHERE better IS NOT NULL"))

    def misplaced_corrections(self) -> list[str]:
        """Conversations (not deleted) with an event that carries a correction but no thumbs-down. Sorted."""
        sql = ("SELECT DISTINCT f.cid FROM feedback f LEFT JOIN conversations c ON c.cid = f.cid"
               " WHERE f.better IS NOT NULL AND (f.thumbs_up IS NULL OR f.thumbs_up != 0)"
               " AND COALESCE(c.deleted, 0) = 0 ORDER BY f.cid")
        return [r[0] for r in self._db.conn.execute(sql)]

    def forget_path(self, path: str) -> None:
        """Drop the events read from ``path`` and refresh the labels they set."""
        cids = [r[0] for r in self._db.conn.execute("SELECT DISTINCT cid FROM feedback WHERE path = ?", (path,))]
        self._db.conn.execute("DELETE FROM feedback WHERE path = ?", (path,))
        self.refresh_labels(cids)

    def refresh_labels(self, cids: Iterable[str]) -> None:
        """Recompute the effective label of ``cids``: the latest thumbs vote, else the latest quality rating (each
        latest by timestamp, then arrival; see :data:`_LABELS_SQL`)."""
        ids = json_ids(cids)
        if ids is None:
            return
        # Set-based: a SELECT + INSERT per id made feedback ingest the slowest part of a cold ingest.
        self._db.conn.execute(
            "DELETE FROM labels WHERE cid IN (SELECT value FROM json_each(?))"
            " AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.cid = labels.cid)",
            (ids,),
        )
        self._db.conn.execute(_LABELS_SQL, (ids,))
