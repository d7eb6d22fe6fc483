"""Feedback events and the effective label (latest event) of each conversation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from daemon.state.core import json_ids
from daemon.state.db import Database


class Feedback:
    """The ``feedback`` and ``labels`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Add feedback events ``(path, line, cid, thumbs_up, quality, note, ts, score)`` and refresh the labels of
        their conversations."""
        self._db.conn.executemany(
            "INSERT INTO feedback (path, line, cid, thumbs_up, quality, note, ts, score) VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )
        self.refresh_labels({r[2] for r in rows})

    def forget_path(self, path: str) -> None:
        """Drop the events read from ``path`` and refresh the labels they set."""
        cids = [r[0] for r in self._db.conn.execute("SELECT DISTINCT cid FROM feedback WHERE path = ?", (path,))]
        self._db.conn.execute("DELETE FROM feedback WHERE path = ?", (path,))
        self.refresh_labels(cids)

    def refresh_labels(self, cids: Iterable[str]) -> None:
        """Recompute the effective label (latest event by timestamp, then arrival) for ``cids``."""
        ids = json_ids(cids)
        if ids is None:
            return
        # Set-based: a SELECT + INSERT per id made feedback ingest the slowest part of a cold ingest.
        self._db.conn.execute(
            "DELETE FROM labels WHERE cid IN (SELECT value FROM json_each(?))"
            " AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.cid = labels.cid)",
            (ids,),
        )
        self._db.conn.execute(
            "INSERT OR REPLACE INTO labels (cid, score, thumbs_up, quality, ts, feedback_id)"
            " SELECT f.cid, f.score, f.thumbs_up, f.quality, f.ts, f.id"
            " FROM (SELECT DISTINCT value AS cid FROM json_each(?)) t JOIN feedback f ON f.id ="
            " (SELECT id FROM feedback WHERE cid = t.cid ORDER BY ts DESC, id DESC LIMIT 1)",
            (ids,),
        )
